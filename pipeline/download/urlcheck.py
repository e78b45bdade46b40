"""Refuse URLs a downloader inside a cloud network must never fetch (pure, no network).

A LAION URL is attacker-controlled text. Fetching ``http://169.254.169.254/...`` from a cloud
worker returns the instance's credentials; ``http://10.0.0.5:8080/admin`` reaches internal
services. Before anything is fetched, :func:`check_url` refuses:

- schemes other than http and https (``file:``, ``ftp:``, ``gopher:``, ``data:``, ...),
- credentials in the URL (``http://user:pass@host/``),
- ``localhost`` and ``*.localhost``,
- IP-literal hosts outside the public internet: loopback, private (RFC 1918, ULA), link-local
  (169.254.0.0/16 with the metadata service, fe80::/10), shared (100.64.0.0/10), reserved,
  multicast, unspecified, and IPv4-mapped IPv6 forms of these. Legacy IPv4 spellings that
  resolvers accept (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``) count as literals.

``allow_private`` lifts the address rules (not the scheme or credential rules) for local test
servers and the offline demo. What a pre-check cannot catch: a public hostname whose DNS
answer is a private address (DNS rebinding); run downloaders in a network that cannot reach
internal services for that.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

REASON_SCHEME = "refused_scheme"
REASON_CREDENTIALS = "refused_credentials"
REASON_ADDRESS = "refused_address"
REASON_INVALID = "invalid_url"


def parse_ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address ``host`` spells, in any form a resolver accepts, or ``None``."""
    h = host.strip("[]").rstrip(".")
    if "%" in h:  # IPv6 zone id: fe80::1%eth0
        h = h.split("%", 1)[0]
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    # inet_aton accepts the legacy forms (decimal, hex, octal, 1-3 parts) that resolvers and
    # urllib follow, and rejects hostnames.
    if h and all(c in "0123456789abcdefxABCDEFX." for c in h):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            return None
    return None


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for globally routable unicast addresses only."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return is_public_address(mapped)
        if ip.teredo:
            return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved and not ip.is_unspecified


def check_url(url: str | None, allow_private: bool = False) -> str | None:
    """``None`` when ``url`` may be fetched, else the refusal reason
    (``refused_scheme``, ``refused_credentials``, ``refused_address`` or ``invalid_url``)."""
    if not url or not isinstance(url, str):
        return REASON_INVALID
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        _ = parts.port  # raises on a malformed port
    except ValueError:
        return REASON_INVALID
    if parts.scheme.lower() not in ("http", "https"):
        return REASON_SCHEME
    if "@" in parts.netloc:
        return REASON_CREDENTIALS
    if not host:
        return REASON_INVALID
    if allow_private:
        return None
    if not host.isascii():
        # Resolvers see the IDNA form: Python's socket layer NFKC-maps the name (nameprep) and
        # splits on ideographic/fullwidth dots, so "ｌｏｃａｌｈｏｓｔ" or "１２７．０．０．１" would
        # reach loopback. Judge that form, and refuse a name that has none.
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return REASON_INVALID
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return REASON_ADDRESS
    ip = parse_ip_literal(host)
    if ip is not None and not is_public_address(ip):
        return REASON_ADDRESS
    return None


# A URL of this shape is an http(s) URL whose host is a plain DNS name with no port, no
# credentials and nothing urlsplit would rewrite (control characters, backslashes): for it,
# check_url's answer depends only on the last label of the host. LAION URLs nearly all have
# this shape, so check_urls settles them with Arrow's vectorised RE2 and sends only the rest
# through check_url.
_PLAIN_URL = r"^[hH][tT][tT][pP][sS]?://(?:[A-Za-z0-9-]+\.)*(?P<last>[A-Za-z0-9-]+)\.?(?:[/?#][^\x00-\x20\\]*)?$"
# A last label that resolvers read as a number makes the host an IPv4 literal (inet_aton:
# "127.1", "0x7f000001", "2130706433"); "localhost" names loopback.
_NUMERIC_OR_LOCAL_LABEL = r"^(?:0[xX][0-9A-Fa-f]*|[0-9]+|[lL][oO][cC][aA][lL][hH][oO][sS][tT])$"


def check_urls(urls, allow_private: bool = False) -> list[str | None]:
    """:func:`check_url` over many URLs at once (millions per run: the download stage's hot path).

    Args:
        urls: a list, ``pyarrow.Array`` or ``ChunkedArray`` of URL strings (nulls allowed).
        allow_private: as in :func:`check_url`.

    Returns:
        One entry per URL: ``None`` (may be fetched) or the refusal reason, exactly what
        :func:`check_url` returns for it.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(urls, pa.ChunkedArray):
        urls = urls.combine_chunks()
    arr = urls if isinstance(urls, pa.Array) else pa.array(list(urls), pa.string())
    if len(arr) == 0:
        return []
    if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
        return [check_url(u, allow_private) for u in arr.to_pylist()]
    plain = pc.fill_null(pc.match_substring_regex(arr, _PLAIN_URL), False)
    last = pc.struct_field(
        pc.extract_regex(pc.if_else(plain, arr, "http://x/"), _PLAIN_URL), "last"
    )
    special = pc.match_substring_regex(last, _NUMERIC_OR_LOCAL_LABEL)
    fast_ok = pc.and_(plain, pc.invert(special)).to_numpy(zero_copy_only=False)
    out: list[str | None] = [None] * len(arr)
    slow = (~fast_ok).nonzero()[0]
    if len(slow):
        for i, u in zip(slow.tolist(), arr.take(pa.array(slow)).to_pylist()):
            out[i] = check_url(u, allow_private)
    return out
