#!/usr/bin/env bash
# Debian packages Primer's tests and offline demo use: Fashion-MNIST (real labelled images
# for the loopback image server), Java 17 (Spark) and Chromium (the report's browser test). Skips what is already there; never fails
# the install on a machine without apt (a cluster node that only runs one stage needs none).
set -u
need=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
# Headless Chromium renders the HTML report in its test.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system_deps: apt-get not found; install ${need[*]} by hand" >&2; exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install_system_deps: installing ${need[*]}"
$SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
