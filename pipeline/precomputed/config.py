"""The precomputed-embedding stages' settings (section ``precomputed``,
conf/stages/precomputed.yaml): one object for import, kNN retrieval and export, as
:class:`pipeline.select.filters.SelectConfig` serves both filters."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.fingerprint import result_field
from pipeline.select.knn import KnnConfig

# The outputs' layouts (imported embeddings, candidate rows); another is never reused.
OUTPUT_FORMAT = 1
# The settings that change each stage's result (its fingerprint's config).
IMPORT_SETTINGS = (
    "emb_glob",
    "meta_glob",
    "url_columns",
    "caption_columns",
    "model",
    "pretrained",
    "verify_urls",
)
RETRIEVE_SETTINGS = IMPORT_SETTINGS + (
    "k", "exact_max_rows", "nlist", "pq_m", "rerank", "nprobe", "target_recall",
    "calibration_queries", "train_size", "seed",
)  # fmt: skip


@dataclass(frozen=True)
class PrecomputedConfig:
    """Settings of ``import-embeddings``, ``knn-retrieve`` and ``export-embeddings``.

    The folder: ``emb_glob`` and ``meta_glob`` (relative to the folder's root) find the
    ``.npy`` and ``.parquet`` files, paired by the number in their names; ``url_columns`` and
    ``caption_columns`` name the metadata columns to try, in order. ``model`` / ``pretrained``:
    the open_clip model (and tag) that made the embeddings, recorded in ``meta.json`` (import
    requires ``model``; a stage mixing it with another model's embeddings fails).

    Import: ``verify_urls`` compares each gathered row's metadata URL with its match's;
    ``gap_bytes``: rows less than this apart are read in one ranged request (an object store's
    request costs about as much as a megabyte more in it); ``engine``: ``local``
    (threads), ``spark`` (a task per file) or ``auto`` (Spark above ``local_max_files`` files
    to read); ``io_threads``: concurrent file reads.

    kNN: ``k`` neighbours per query; an exact ``IndexFlatIP`` up to ``exact_max_rows`` rows,
    IVF-PQ above (``nlist`` lists, 0: ``4 sqrt(N)``; ``pq_m`` sub-quantizers of 8 bits, 0:
    ``dim / 8``), whose ``k * rerank`` candidates are rescored exactly from the folder;
    ``nprobe`` 0 calibrates it to ``target_recall`` as :mod:`pipeline.select.knn` does. The
    rest are that module's FAISS settings. Export: ``export_dtype`` of the written ``.npy``.
    """

    emb_glob: str = "img_emb/*.npy"
    meta_glob: str = "metadata/*.parquet"
    url_columns: tuple[str, ...] = ("url", "URL")
    caption_columns: tuple[str, ...] = ("caption", "TEXT", "text")
    model: str = ""
    pretrained: str = ""
    verify_urls: bool = True
    gap_bytes: int = result_field(1 << 20)
    engine: str = result_field("auto")
    local_max_files: int = result_field(8)
    io_threads: int = result_field(8)
    k: int = 100
    exact_max_rows: int = 2_000_000
    nlist: int = 0
    pq_m: int = 0
    rerank: int = 4
    nprobe: int = 0
    target_recall: float = 0.95
    calibration_queries: int = 256
    train_size: int = 200_000
    query_batch: int = result_field(1024)
    tie_slack: int = 8
    use_gpu: str = result_field("auto")
    threads: int = result_field(0)
    seed: int = 0
    export_dtype: str = "float16"

    def __post_init__(self) -> None:
        problems = []
        if not self.emb_glob.endswith(".npy") or not self.meta_glob.endswith(".parquet"):
            problems.append("emb_glob must end in .npy and meta_glob in .parquet")
        if not self.url_columns:
            problems.append("url_columns must name at least one column")
        if self.engine not in ("auto", "local", "spark"):
            problems.append("engine must be auto, local or spark")
        if self.gap_bytes < 0 or self.local_max_files < 0 or self.pq_m < 0:
            problems.append("gap_bytes, local_max_files and pq_m must be >= 0")
        if self.io_threads < 1 or self.k < 1 or self.rerank < 1:
            problems.append("io_threads, k and rerank must be >= 1")
        if self.export_dtype not in ("float16", "float32"):
            problems.append("export_dtype must be float16 or float32")
        try:
            self.knn()
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))

    def knn(self) -> KnnConfig:
        """The FAISS part of this config (:mod:`pipeline.select.knn`'s settings)."""
        return KnnConfig.of(self, exact_max_pool=self.exact_max_rows)
