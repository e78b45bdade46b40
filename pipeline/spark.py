"""Spark session handling. pyspark is imported inside functions only.

Under ``spark-submit`` the session already exists and its master/config win; on a
workstation :func:`get_spark` starts ``local[*]`` with settings that work offline.
"""

from __future__ import annotations

import logging
import os
import sys
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
