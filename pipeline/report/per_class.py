"""Per-class test accuracy of zero-shot CLIP and of the priming head, from a run's cached
embeddings, for the report's per-class gain chart.

The evaluation's table gives one accuracy per row; the chart needs it per class, so the two
heads are rebuilt from the run's embeddings: the template text head T, and
``alpha T + (1 - alpha) M`` over the priming set the evaluation used, at the alpha its row
records (``alpha`` of the row, when present), else the alpha with the best accuracy on the
train split's labels. The evaluation may leave images out (near copies of test images), so
the rebuilt head can differ slightly from the table's row; the file says which alpha it used.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from pipeline.core import embeddings as E
from pipeline.core import io
from pipeline.evaluate import classify as C
from pipeline.evaluate import influence as I

log = logging.getLogger(__name__)

FILE = "per_class.json"


def per_class_accuracy(
    feats: np.ndarray, labels: np.ndarray, weights: np.ndarray, num_classes: int
) -> tuple[list[float], list[int]]:
    """Accuracy of ``argmax feats @ weights^T`` per class (NaN for a class without test
    images), and the test images per class."""
    y = np.asarray(labels, np.int64)
    pred = C.predict(feats, weights)  # float32, as the evaluation scores
    n = np.bincount(y, minlength=num_classes)
    right = np.bincount(y[pred == y], minlength=num_classes)
    acc = [float(r / k) if k else math.nan for r, k in zip(right, n)]
    return acc, n.tolist()


def priming_method(priming: str) -> str:
    """The evaluation's name of the row a priming input gives."""
    if E.is_decision(priming) and E.read_meta(priming).get("filter") == "transductive":
        return "transductive priming"
    return "priming"


def _row_alpha(results: dict, method: str) -> float | None:
    for r in results.get("records", []):
        if r.get("method") == method and int(r.get("shots", 0)) == 0:
            a = r.get("alpha")
            if isinstance(a, (int, float)) and 0.0 <= a <= 1.0:
                return float(a)
    return None


def compute(run_dir: str, results: dict | None = None) -> dict | None:
    """Per-class accuracies of a run directory (None when its embeddings are incomplete).

    Returns ``{classnames, n_test, methods: {name: [accuracy per class]}, priming, alpha,
    alpha_from}``; accuracies in [0, 1], NaN as None.
    """
    from pipeline.evaluate.attribution import run_sources

    src = run_sources(run_dir)["inputs"]
    need = ("test", "text", "priming")
    if not all(src.get(k) and io.is_done(src[k]) for k in need):
        return None
    te = E.load_text(src["text"])
    c = te.num_classes
    text = te.heads("template")
    _, t_y, t_f = E.load(src["test"])
    _, p_y, p_f = E.load(src["priming"])
    ok = (p_y >= 0) & (p_y < c)
    sums = C.class_sums(p_f[ok], p_y[ok], c)
    method = priming_method(src["priming"])
    alpha = _row_alpha(results or {}, method)
    alpha_from = "the evaluation's row"
    if alpha is None:
        _, tr_y, tr_f = E.load(src["train"])
        alpha, _ = I.best_alpha(text, sums, tr_f, tr_y)
        alpha_from = "the best on the train split's labels"
    weights = C.weights_from_sums(text, sums, alpha)
    zero, n = per_class_accuracy(t_f, t_y, text, c)
    primed, _ = per_class_accuracy(t_f, t_y, weights, c)

    def clean(v: list[float]) -> list[float | None]:
        return [None if math.isnan(x) else x for x in v]

    return {
        "classnames": list(te.classnames) or [str(i) for i in range(c)],
        "n_test": n,
        "methods": {"zero-shot CLIP": clean(zero), method: clean(primed)},
        "priming": method,
        "alpha": alpha,
        "alpha_from": alpha_from,
    }


def gains(per_class: dict) -> tuple[list[str], list[float]]:
    """Class names and the priming head's gain over zero-shot per class, in points (NaN where a
    class has no test image)."""
    zero = per_class["methods"]["zero-shot CLIP"]
    primed = per_class["methods"][per_class["priming"]]
    out = [math.nan if a is None or b is None else 100.0 * (b - a) for a, b in zip(zero, primed)]
    return list(per_class["classnames"]), out
