"""Issue 18, part 3: ``evaluate.protocol: reference`` against an independent re-implementation
of what the public Neural Priming code (Priming/prime.py) computes, on synthetic features."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.app.cli import main
from pipeline.core import io
from pipeline.evaluate.classify import sample_shots
from pipeline.evaluate.reference import IMAGENET_TEMPLATES
from tests.evaluate.test_classify import unit
from tests.evaluate.test_evaluate import _write_embeddings, _write_text

C, D = 10, 16


def ref_text_head(feats, labels, prompts, classnames, templates):
    """zeroshot_classifier: per class, each template's prompt embedding normalised, the mean
    normalised (the prompts are looked up instead of re-embedded)."""
    rows = []
    for c, name in enumerate(classnames):
        e = [feats[(labels == c) & (prompts == t.format(name))][0] for t in templates]
        e = np.array(e, np.float64)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        m = e.mean(0)
        rows.append(m / np.linalg.norm(m))
    return np.array(rows)


def ref_centroids(emb, labels, num_classes):
    """centroid(): one-hot^T @ embeddings, rows normalised (0/0 is NaN), then nan_to_num. The
    reference's one-hot had labels.max() + 1 columns; padded to num_classes here (it crashed)."""
    onehot = np.zeros((len(labels), num_classes))
    onehot[np.arange(len(labels)), labels] = 1
    protos = onehot.T @ np.asarray(emb, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        protos = protos / np.linalg.norm(protos, axis=1, keepdims=True)
    return np.nan_to_num(protos)


def ref_accuracy(test_f, test_y, text, alpha, emb=None, labels=None):
    w = text if emb is None else alpha * text + (1 - alpha) * ref_centroids(emb, labels, len(text))
    return float(np.mean(np.argmax(test_f @ w.T, axis=1) == test_y))


@pytest.fixture
def world(tmp_path):
    rng = np.random.default_rng(0)
    centers = unit(rng.standard_normal((C, D)))
    names = [f"flower {i}" for i in range(C)]

    def draw(y, noise=2.0):
        return unit(centers[y] + noise * rng.standard_normal((len(y), D)) / np.sqrt(D)).astype(
            np.float32
        )

    test_y = np.repeat(np.arange(C), 40)
    train_y = np.repeat(np.arange(C), 6)
    # Pool in shard order: class 0 has 1200 images (capped at the first 1000), classes 4 and
    # 9 (the last, where the reference crashed) none; two images carry two classes' captions.
    pool_y = np.concatenate([np.zeros(1200, int), np.repeat([1, 2, 3, 5, 6, 7, 8], 30)])
    pool_f = draw(pool_y)
    pool_u = [f"p{i}" for i in range(len(pool_y))]
    pool_y = np.concatenate([pool_y, [7, 7]])  # p1200 and p1201 are also class 7's
    pool_f = np.concatenate([pool_f, pool_f[[1200, 1201]]])
    pool_u += ["p1200", "p1201"]
    d = {k: str(tmp_path / k) for k in ("train", "test", "pool", "text", "text_in")}
    _write_embeddings(d["train"], draw(train_y), train_y, "tr")
    _write_embeddings(d["test"], draw(test_y), test_y, "te")
    _write_embeddings(d["pool"], pool_f, pool_y, "p", pool_u)
    text = unit(centers + 1.5 * rng.standard_normal((C, D)) / np.sqrt(D)).astype(np.float32)
    cupl = unit(centers + 1.0 * rng.standard_normal((C, D)) / np.sqrt(D)).astype(np.float32)
    templates = ("a photo of a {}, a type of flower.", "a {} in bloom.")
    _write_text(d["text"], text, names, cupl[:8], templates=templates)  # 8, 9: no description
    _write_text(
        d["text_in"], text, names, cupl[:8], templates=("a photo of a {}.", *IMAGENET_TEMPLATES)
    )
    for name, n in (("Flowers102", "flowers.yaml"), ("ImageNet", "imagenet.yaml")):
        (tmp_path / n).write_text(f"name: {name}\nclasses: [" + ", ".join(names) + "]\n")
        d[name] = str(tmp_path / n)
    d.update(names=names, templates=templates, pool_y=pool_y, pool_f=pool_f, train_y=train_y)
    return d


def _run(d, dataset, text, out, shots="0,2"):
    argv = [
        "evaluate",
        "--dataset",
        d[dataset],
        "--task-train",
        d["train"],
        "--task-test",
        d["test"],
        "--text",
        d[text],
        "--priming",
        d["pool"],
        "--shots",
        shots,
        "--seeds",
        "1",
        "--protocol",
        "reference",
        "--out",
        out,
    ]
    assert main(argv) == 0
    return io.read_json(io.join(out, "results.json"))


def _heads(d, text, templates):
    from pipeline.core import embeddings as E

    te = E.load_text(d[text])
    f = te.feats.astype(np.float64)
    t = ref_text_head(f, te.labels, te.prompts, d["names"], templates)
    desc = te.kinds == "description"
    cupl = np.array(t)
    for c in range(8):  # the CuPL head from descriptions alone, averaged unnormalised
        e = f[desc & (te.labels == c)]
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        m = e.mean(0)
        cupl[c] = (t[c] + m / np.linalg.norm(m)) / 2
    return t, cupl


def test_reference_protocol_matches_an_independent_reimplementation(world, tmp_path):
    d = world
    res = _run(d, "Flowers102", "text", str(tmp_path / "e"))
    by = {(r["method"], r["shots"]): r for r in res["records"]}
    from pipeline.core import embeddings as E

    _, test_y, test_f = E.load(d["test"])
    _, train_y, train_f = E.load(d["train"])
    test_f, train_f = test_f.astype(np.float64), train_f.astype(np.float64)
    t, cupl = _heads(d, "text", d["templates"])
    # The pool as the reference saw it: every caption under each class it names, and the
    # first 1000 images of each class.
    first = np.concatenate([np.flatnonzero(d["pool_y"] == c)[:1000] for c in range(C)])
    first.sort()
    _, pool_y, pool_f = E.load(d["pool"])
    assert (pool_y == d["pool_y"]).all()  # shard order is pool order
    pf, py = pool_f[first].astype(np.float64), pool_y[first]
    assert res["priming"]["zero-shot priming"]["capped"] == 200
    assert res["priming"]["zero-shot priming"]["priming_images"] == len(first) == 1000 + 7 * 30 + 2
    want = {
        "zero-shot CLIP": ref_accuracy(test_f, test_y, t, 1.0),
        "CuPL": ref_accuracy(test_f, test_y, cupl, 1.0),
        "priming": ref_accuracy(test_f, test_y, t, 0.7, pf, py),  # Flowers102, zero-shot: 0.7
        "priming + CuPL": ref_accuracy(test_f, test_y, cupl, 0.7, pf, py),
    }
    for method, acc in want.items():
        assert by[(method, 0)]["accuracy"] == pytest.approx(acc, abs=1e-9), method
        assert by[(method, 0)]["alpha_rule"] == "reference"
    assert by[("priming", 0)]["alpha"] == 0.7
    idx = sample_shots(train_y, 2, 0, C)
    sf, sy = train_f[idx], train_y[idx]
    assert by[("few-shot", 2)]["alpha"] == 0.58  # 2-shot Flowers102
    assert by[("few-shot", 2)]["accuracy"] == pytest.approx(
        ref_accuracy(test_f, test_y, t, 0.58, sf, sy)
    )
    fp = ref_accuracy(test_f, test_y, t, 0.58, np.concatenate([sf, pf]), np.concatenate([sy, py]))
    assert by[("few-shot + priming", 2)]["accuracy"] == pytest.approx(fp)
    # Primer's own protocol on the same inputs differs: the empty classes take their text rows,
    # and the two-class captions are dropped.
    primer = main(
        [
            "evaluate",
            "--dataset",
            d["Flowers102"],
            "--task-train",
            d["train"],
            "--task-test",
            d["test"],
            "--text",
            d["text"],
            "--priming",
            d["pool"],
            "--shots",
            "0",
            "--alpha",
            "0.7",
            "--out",
            str(tmp_path / "p"),
        ]
    )
    assert primer == 0
    stats = io.read_json(str(tmp_path / "p" / "results.json"))["priming"]["zero-shot priming"]
    assert stats["ambiguous_dropped"] == 4 and "capped" not in stats


def test_reference_imagenet_uses_its_template_subset_and_default_alpha(world, tmp_path):
    d = world
    res = _run(d, "ImageNet", "text_in", str(tmp_path / "e"), shots="0,3")
    by = {(r["method"], r["shots"]): r for r in res["records"]}
    from pipeline.core import embeddings as E

    _, test_y, test_f = E.load(d["test"])
    t7, _ = _heads(d, "text_in", IMAGENET_TEMPLATES)
    t8, _ = _heads(d, "text_in", ("a photo of a {}.", *IMAGENET_TEMPLATES))
    got = by[("zero-shot CLIP", 0)]["accuracy"]
    assert got == pytest.approx(ref_accuracy(test_f.astype(np.float64), test_y, t7, 1.0))
    assert not np.allclose(t7, t8)  # the eighth template would give another head
    assert {r["alpha"] for r in res["records"] if r["protocol"] != "zero-shot"} == {0.9}
