"""Progress off a terminal: log lines at a fixed interval with done/total, rate and ETA."""

from __future__ import annotations

import logging

from pipeline.core import progress as P


def test_log_progress_lines(monkeypatch, caplog):
    now = [0.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: now[0])
    with caplog.at_level(logging.INFO, logger="primer.progress"):
        bar = P.LogProgress(total=10, desc="embed shards", unit="shard", interval=3)
        for _ in range(10):
            now[0] += 1.0  # a shard a second
            bar.update()
        bar.close()
        bar.close()  # once
    lines = [r.getMessage() for r in caplog.records]
    # A line every 3 clock ticks, then the last one; each says done/total, rate and ETA.
    assert lines[0].startswith("embed shards: 3/10 shard (") and "ETA" in lines[0]
    assert lines[-1].startswith("embed shards: 10/10 shard") and "ETA" not in lines[-1]
    assert len(lines) == 4  # at 3, 6 and 9 s, then the end
    assert lines[0] == "embed shards: 3/10 shard (1 shard/s, ETA 0:07, 0:03 elapsed)"


def test_mode_follows_the_terminal_and_the_environment(monkeypatch):
    monkeypatch.delenv("PRIMER_PROGRESS", raising=False)
    monkeypatch.setattr(P.sys.stderr, "isatty", lambda: False)
    assert P.mode() == "log" and isinstance(P.progress(range(3)), P.LogProgress)
    monkeypatch.setattr(P.sys.stderr, "isatty", lambda: True)
    assert P.mode() == "bar"
    monkeypatch.setenv("PRIMER_PROGRESS", "off")
    assert list(P.progress(range(3))) == [0, 1, 2]
    assert list(P.LogProgress(range(4), interval=0)) == [0, 1, 2, 3]
