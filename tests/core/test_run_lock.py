"""The run lock on an object store (moto's S3 server on loopback): a live run is never taken
over however long it runs; a dead one's lock is, after its heartbeat goes stale."""

from __future__ import annotations

import time

import pytest

from pipeline.core import io


def test_a_live_s3_run_keeps_its_lock_and_a_dead_ones_is_taken_over(s3_bucket):
    run = io.join(s3_bucket, "runs", "cars")
    a = io.RunLock(run, stale_after_s=1.5, heartbeat_s=0.2).acquire()
    try:
        time.sleep(2.5)  # longer than stale_after_s: only the heartbeat keeps it fresh
        with pytest.raises(io.LockedError, match="in use by another run"):
            io.RunLock(run, stale_after_s=1.5, heartbeat_s=0.2).acquire()
        # The holder dies without releasing (its heartbeat stops, the lock stays).
        a._stop.set()
        a._beat.join()
        time.sleep(2.0)
        b = io.RunLock(run, stale_after_s=1.5, heartbeat_s=0.2).acquire()
        assert io.read_json(io.join(run, "_LOCK"))["token"] == b.token
        a.release()  # the dead run coming back never removes another run's lock
        assert io.read_json(io.join(run, "_LOCK"))["token"] == b.token
        b.release()
        assert not io.exists(io.join(run, "_LOCK"))
    finally:
        a._stop.set()


def test_a_local_lock_is_released_by_the_kernel(tmp_path):
    run = str(tmp_path / "run")
    with io.RunLock(run):
        with pytest.raises(io.LockedError):
            io.RunLock(run).acquire()
    with io.RunLock(run):
        pass
