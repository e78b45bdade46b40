"""The text filter's settings (section ``filter``) and the names of its output files."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.core.fingerprint import result_field
from pipeline.text_filter.matcher import ENGINES

# Canonical column -> candidate source names (original LAION-2B-en first, then Re-LAION).
DEFAULT_COLUMNS: dict[str, list[str]] = {
    "url": ["URL", "url"],
    "caption": ["TEXT", "caption", "text"],
    "width": ["WIDTH", "width"],
    "height": ["HEIGHT", "height"],
    "similarity": ["similarity"],
    "punsafe": ["punsafe"],
    "pwatermark": ["pwatermark"],
}


REQUIRED = ("url", "caption")


OPTIONAL_TYPES = {
    "width": pa.int64(),
    "height": pa.int64(),
    "similarity": pa.float64(),
    "punsafe": pa.float64(),
    "pwatermark": pa.float64(),
}


SCAN_DIR = "_scan"


# The layout of the scan parts and their keys files; a failed run's scans of another layout are
# not reused. 2: URL keys are MurmurHash3-128 (BLAKE2b-128 before). 3: a part per scan unit
# (a file, or a run of a large file's row groups), numbered in input order. 4: matches whose URL
# holds a control character are dropped by the scan. 5: parts carry ``candidates``; stats count
# excluded, contradicted and family rows. 6: matches carry source_file and source_row.
SCAN_FORMAT = 6


# Underscore names: pyarrow.dataset.dataset(out) skips them and reads the parquet parts alone.
STATS = "_stats.json"


CONFIG = "_config.json"


@dataclass(frozen=True)
class TextFilterConfig:
    """Settings of the text filter (section ``filter``).

    Size/safety filters are off at their defaults (0 / 1.0 / 0). ``max_per_class`` 0 keeps
    every match. ``columns`` maps canonical names to the source column names to try.
    ``split_rows``: a file of more rows is scanned in pieces of whole row groups, about that many
    rows each (0: never split); ``task_rows``: consecutive small pieces share a Spark task up to
    that many rows (0: a task per piece). See :func:`split_row_groups` and :func:`task_groups`.
    ``global_memory_mb``: what the driver's global filters may hold; more matches than fit are
    filtered in URL buckets, one at a time (0: no limit). See :func:`global_buckets`.
    """

    columns: dict = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_COLUMNS.items()})
    keep_ambiguous: bool = False
    min_width: int = 0
    min_height: int = 0
    max_punsafe: float = 1.0
    min_similarity: float = 0.0
    max_caption_chars: int = 4096
    dedup_urls: bool = True
    max_per_class: int = 0
    seed: int = 0
    skip_bad_files: bool = False
    # How the work is done, never what it finds: left out of the output's fingerprint.
    batch_rows: int = result_field(65536)
    engine: str = result_field("auto")
    task_rows: int = result_field(4_000_000)
    split_rows: int = result_field(4_000_000)
    global_memory_mb: int = result_field(4096)

    def __post_init__(self) -> None:
        problems = []
        missing = [c for c in REQUIRED if not self.columns.get(c)]
        if missing:
            problems.append(f"columns must name source columns for {missing}")
        if self.max_per_class < 0:
            problems.append("max_per_class must be >= 0 (0 = no cap)")
        if not 0.0 <= self.max_punsafe <= 1.0:
            problems.append("max_punsafe must be in [0, 1]")
        if self.batch_rows < 1:
            problems.append("batch_rows must be >= 1")
        if self.task_rows < 0:
            problems.append("task_rows must be >= 0 (0 = a task per scan unit)")
        if self.split_rows < 0:
            problems.append("split_rows must be >= 0 (0 = never split a file)")
        if self.global_memory_mb < 0:
            problems.append("global_memory_mb must be >= 0 (0 = no limit)")
        if self.engine != "auto" and self.engine not in ENGINES:
            problems.append("engine must be auto or one of " + ", ".join(ENGINES))
        if problems:
            raise ValueError("; ".join(problems))
