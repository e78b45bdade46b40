"""Settings about a run as a whole (sections ``run``, ``io``, ``spark`` and ``subset``); each
stage's own settings live in its section, with its dataclass beside the stage."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RunConfig:
    """``root``: where ``primer subset`` puts a dataset's run directory (any fsspec URL)."""

    root: str = "data"


@dataclass(frozen=True)
class IoConfig:
    """``storage_options``: fsspec options per protocol, for every URL of that protocol (for
    example ``{s3: {client_kwargs: {endpoint_url: ...}}}``); AWS variables work as usual."""

    storage_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [k for k, v in self.storage_options.items() if not isinstance(v, dict)]
        if bad:
            raise ValueError(
                f"storage_options maps a protocol to its options (e.g. s3: {{...}}); {bad} are not"
            )


@dataclass(frozen=True)
class SparkConfig:
    """``master``: the Spark master when no session is active ("" = ``local[*]``; spark-submit
    sets its own). ``conf``: extra ``spark.*`` settings for a session Primer starts."""

    master: str = ""
    conf: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SubsetConfig:
    """What ``primer subset`` runs on, and which optional stages it runs.

    ``dataset``: a bundled name or a YAML path. ``metadata``: LAION parquet URL, directory or
    glob (needed by the text filter). ``data_root``: the target task's images, in the layout
    the dataset config names (needed by the task embeddings). ``run_dir`` defaults to
    ``<run.root>/<dataset>``. ``caption_filter``: run the caption sense filter between the
    text filter and the download. ``clip_filter`` / ``transductive``: run those filters. ``attribute``: rank
    the priming images, terms and classes by their effect on labelled train accuracy.

    Precomputed embeddings (LAION / clip-retrieval layout): ``embeddings`` is the folder's
    root; selection then runs on the candidates' imported vectors before anything is
    downloaded, and only the kept rows are downloaded, none at all when the run's model is the
    folder's (``precomputed.model``) unless ``force_download``. ``candidates``: where
    candidates come from: ``text`` (the text filter), ``knn-text`` (the folder's nearest rows
    to each class prompt), ``knn-image`` (to each test image); the kNN sources need
    ``embeddings``.
    """

    dataset: str = ""
    metadata: str = ""
    data_root: str = ""
    run_dir: str = ""
    caption_filter: bool = True
    clip_filter: bool = True
    transductive: bool = True
    attribute: bool = True
    embeddings: str = ""
    candidates: tuple[str, ...] = ("text",)
    force_download: bool = False

    def __post_init__(self) -> None:
        problems = []
        known = ("text", "knn-text", "knn-image")
        unknown = [c for c in self.candidates if c not in known]
        if unknown or not self.candidates:
            problems.append(f"candidates must be some of {', '.join(known)}, not {unknown}")
        if any(c.startswith("knn") for c in self.candidates) and not self.embeddings:
            problems.append("kNN candidates need precomputed embeddings (subset.embeddings)")
        if problems:
            raise ValueError("; ".join(problems))

    def select_first(self) -> bool:
        """Whether selection runs on precomputed embeddings before the download."""
        return bool(self.embeddings)
