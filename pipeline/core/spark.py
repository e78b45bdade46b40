"""Spark session handling. pyspark is imported inside functions only.

Under ``spark-submit`` the session already exists and its master/config win; on a
workstation :func:`get_spark` starts ``local[*]`` with settings that work offline.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)


def get_spark(
    master: str | None = None, app_name: str = "primer", conf: dict[str, Any] | None = None
):
    """Return the active SparkSession, or start one.

    ``master`` is used only when no session is active (``spark-submit`` sets its own).
    ``conf`` adds ``spark.*`` settings for a new session.
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # Spark otherwise binds the machine's external address; a workstation run needs none.
    if not master or master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        # Local workers must run this interpreter (the venv), not whatever python3 is on PATH.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    elif not os.environ.get("SPARK_HOME") and "spark.master" not in (conf or {}):
        builder = builder.master("local[*]")
    defaults = {
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": "8",
        "spark.driver.memory": os.environ.get("PRIMER_SPARK_DRIVER_MEMORY", "2g"),
    }
    for k, v in {**defaults, **(conf or {})}.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    log.info("Spark %s on %s", spark.version, spark.sparkContext.master)
    return spark


_progress_ids = itertools.count()
# The thread-local properties setJobGroup sets, restored when a JobProgress block ends.
_GROUP_PROPERTIES = ("spark.jobGroup.id", "spark.job.description")


class JobProgress:
    """A progress bar of the tasks done by the Spark jobs started inside a ``with`` block.

    PySpark's own console bar is off (``spark.ui.showConsoleProgress``: it prints over the
    logs), so a long scan showed nothing until it ended. The block's jobs get a job group of
    their own; a daemon thread reads the driver's status tracker every ``interval`` seconds
    and moves a bar (``unit`` per task, ``total`` tasks): tqdm on a terminal, log lines at an
    interval elsewhere (:mod:`pipeline.core.progress`). ``bar``: any object with tqdm's
    ``update`` and ``close`` (tests).
    """

    def __init__(self, sc, desc: str, total: int, unit: str = "task", interval=0.5, bar=None):
        self.sc, self.total, self.interval = sc, total, interval
        self.group = f"primer-{desc.replace(' ', '-')}-{next(_progress_ids)}"
        if bar is None:
            from pipeline.core.progress import progress

            bar = progress(total=total, desc=desc, unit=unit)
        self.bar = bar
        self.done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="primer-progress", daemon=True)

    def tasks_done(self) -> int:
        """Tasks finished so far by the group's jobs (their stages' completed tasks)."""
        tracker = self.sc.statusTracker()
        done = 0
        for job in tracker.getJobIdsForGroup(self.group):
            info = tracker.getJobInfo(job)
            for stage in info.stageIds if info else ():
                s = tracker.getStageInfo(stage)
                done += s.numCompletedTasks if s else 0
        return done

    def _advance(self) -> None:
        now = min(self.total, self.tasks_done())
        if now > self.done:
            self.bar.update(now - self.done)
            self.done = now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._advance()
            except Exception as e:  # the gateway going away at shutdown: only the bar stops
                log.debug("progress bar stopped: %r", e)
                return

    def __enter__(self) -> JobProgress:
        self._previous = {k: self.sc.getLocalProperty(k) for k in _GROUP_PROPERTIES}
        self.sc.setJobGroup(self.group, self.group)
        if not getattr(self.bar, "disable", False):
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            if exc_type is None and not getattr(self.bar, "disable", False):
                self._advance()
        finally:
            self.bar.close()
            # Later jobs of this thread leave the group (a property set to None is removed).
            for k, v in self._previous.items():
                self.sc.setLocalProperty(k, v)


def in_task(options: dict, fn, *args):
    """``fn(*args)`` in a Spark task, with the driver's fsspec options (``io.storage_options``,
    from :func:`pipeline.core.io.configured`)."""
    from pipeline.core import io

    io.configure(options)
    return fn(*args)


def task_error_message(e: Exception, what: str) -> str:
    """The Python error inside a failed Spark task, without the JVM stack."""
    text = str(e)
    for marker in ("pipeline.core.io.InputError: ", "InputError: "):
        if marker in text:
            return text.split(marker, 1)[1].splitlines()[0]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return f"{what} failed: {lines[-1] if lines else text}"
