"""The caption sense filter: its config, the scoring core against a re-implementation, the real
MiniLM encoder on clear cases of two senses, retrieval quality on the hand-labelled real
captions, and the stage end to end through a local Spark session (resume, bad input, stats,
and the download stage reading its output)."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.caption_filter.config import CaptionFilterConfig
from pipeline.caption_filter.score import (
    SCORE_COLUMN,
    SenseIndex,
    build_index,
    class_counts,
    keep,
    prototype_texts,
    score_captions,
    sense_scores,
)
from pipeline.core import io
from pipeline.core.config import ConfigError, build, load_config, load_dataset

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def minilm():
    """The real default encoder on CPU (loaded once)."""
    from pipeline.caption_filter.encoders import load_encoder

    return load_encoder(CaptionFilterConfig(device="cpu"))


# --------------------------------------------------------------------------- config


def test_yaml_defaults_agree_with_the_dataclass():
    assert build(CaptionFilterConfig, load_config()["caption_filter"]) == CaptionFilterConfig()


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"encoder": "bert"}, "encoder must be one of"),
        ({"device": "tpu"}, "device must be"),
        ({"batch_size": 0}, "batch_size"),
        ({"templates": ["a photo"]}, "templates"),
        ({"negatives": []}, "negatives"),
        ({"negatives_for": {"ImageNet-R": []}}, "negatives_for"),
        ({"thresholds": {"Flowers102": "high"}}, "thresholds"),
        ({"thresold": 0.1}, "unknown key"),
    ],
)
def test_config_rejects_bad_values_with_a_clear_message(bad, message):
    with pytest.raises(ConfigError, match=message):
        build(CaptionFilterConfig, bad, where="caption_filter")


def test_threshold_per_dataset_only_for_the_calibrated_encoder():
    cfg = CaptionFilterConfig(threshold=0.3, thresholds={"Flowers102": 0.1})
    assert cfg.threshold_for("Flowers102") == 0.1
    assert cfg.threshold_for("OxfordIIITPet") == 0.3
    assert CaptionFilterConfig(encoder="open_clip", threshold=0.3).threshold_for("Food101") == 0.3


def test_every_bundled_dataset_names_its_sense():
    from pipeline.core.config import list_datasets

    for name in list_datasets():
        assert load_dataset(name, descriptions=False).sense, name
    flowers = load_dataset("Flowers102")
    assert flowers.sense_of(0) == "a type of flower"
    # ImageNet reads each class in its own CuPL description.
    inet = load_dataset("ImageNet")
    assert inet.sense_of(0) == inet.class_descriptions(0)[0] != inet.sense
    texts = prototype_texts(flowers, ["a photo of a {name}, {sense}."])
    assert texts[flowers.classes.index("rose")] == ["a photo of a rose, a type of flower."]


# --------------------------------------------------------------------------- scoring core


def test_scores_equal_a_direct_reimplementation():
    rng = np.random.default_rng(0)

    def unit(*shape):
        x = rng.normal(size=shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    protos, negs, emb = unit(5, 16), unit(3, 16), unit(40, 16)
    labels = rng.integers(0, 5, 40)
    got = sense_scores(emb, labels, SenseIndex(protos, negs))
    want = [
        float(emb[i] @ protos[labels[i]]) - max(float(emb[i] @ n) for n in negs) for i in range(40)
    ]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_blank_captions_score_nan_and_are_dropped_and_counted():
    def encode(texts):  # a fixed "encoder": the caption's length picks one of two directions
        return np.array([[1.0, 0.0] if len(t) > 5 else [0.0, 1.0] for t in texts], np.float32)

    index = SenseIndex(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), np.array([[0.6, 0.8]]))
    captions = pa.array(["a long caption", None, "   ", "short", "another long one"])
    labels = np.array([0, 0, 1, 0, 1])
    scores = score_captions(captions, labels, index, encode, batch_size=2)
    np.testing.assert_allclose(scores, [1 - 0.6, np.nan, np.nan, 0 - 0.8, 0 - 0.6], atol=1e-6)
    table = pa.table({"caption": captions, "label": pa.array(labels)})
    kept, mask = keep(table, scores, threshold=0.0)
    assert kept.column_names == ["caption", "label", SCORE_COLUMN]
    assert kept.column("caption").to_pylist() == ["a long caption"]
    assert kept.schema.field(SCORE_COLUMN).type == pa.float32()
    assert class_counts(labels, mask, 3) == ([1, 0, 0], [2, 2, 0])


# --------------------------------------------------------------------------- real encoder


# (dataset, class, caption showing the class, caption using the name in another sense)
CLEAR_CASES = [
    ("Flowers102", "rose", "a bouquet of red roses in a glass vase", "14k rose gold engagement ring"),
    ("Flowers102", "sunflower", "a field of sunflowers at sunset", "Sunflower print smartphone case"),
    ("OxfordIIITPet", "Boxer", "portrait of a boxer dog playing in the garden", "Men's boxer shorts, cotton, 3 pack"),
    ("OxfordIIITPet", "Bengal", "a bengal cat lying on the sofa", "Cincinnati Bengals quarterback throws a pass"),
    ("Food101", "pizza", "a slice of pepperoni pizza on a plate", "Pizza Hut logo vector illustration"),
]  # fmt: skip
# A sense no negative anchor describes (weather news) is ranked below the class's, but may
# still pass the threshold: the text filter's exclusion phrases are the tool for those.
RANKED_ONLY = [
    ("FGVCAircraft", "Tornado", "a Panavia Tornado fighter jet at the air show", "a huge tornado destroyed homes in Oklahoma"),
]  # fmt: skip


@pytest.mark.parametrize(
    "dataset, name, shows, other, by_threshold",
    [(*c, True) for c in CLEAR_CASES] + [(*c, False) for c in RANKED_ONLY],
)
def test_real_encoder_separates_senses_on_clear_cases(
    minilm, dataset, name, shows, other, by_threshold
):
    cfg = CaptionFilterConfig(device="cpu")
    spec = load_dataset(dataset)
    index = build_index(spec, cfg.templates, cfg.negatives, minilm.encode)
    label = spec.classes.index(name)
    s_shows, s_other = sense_scores(minilm.encode([shows, other]), np.array([label] * 2), index)
    assert s_shows > s_other + 0.1
    threshold = cfg.threshold_for(dataset)
    assert s_shows >= threshold, (s_shows, threshold)
    if by_threshold:
        assert threshold > s_other, (threshold, s_other)


def _retrieval_quality():
    spec = importlib.util.spec_from_file_location(
        "retrieval_quality", os.path.join(_REPO, "bench", "retrieval_quality.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_retrieval_quality_on_real_captions_meets_the_targets():
    """Issue 20's targets on the hand-labelled real captions, with the shipped thresholds:
    precision >= 0.6 at recall >= 0.85 (recall relative to the relevant rows exact matching
    finds), on all rows and on the half the thresholds were not calibrated on; and the sense
    filter keeps >= 60% of the captions that name a StanfordCars class's make and model."""
    rq = _retrieval_quality()
    rows = rq.read_labels()
    assert len(rows) >= 500
    assert len({r["dataset"] for r in rows}) >= 4
    result = rq.run(CaptionFilterConfig(device="cpu"))
    got = {(t["rows"], t["dataset"], t["method"]): t for t in result["table"]}
    for part in ("all rows", "held-out half"):
        for group in ("all", "fine-grained four"):
            alone = got[(part, group, "filter")]
            sensed = got[(part, group, "filter + exclusions + sense")]
            assert sensed["precision"] >= 0.6, sensed
            assert sensed["recall"] >= 0.85, sensed
            assert sensed["precision"] > alone["precision"] + 0.1, (alone, sensed)
    cars = got[("all rows", "StanfordCars", "sense alone")]
    assert cars["recall"] >= 0.6, cars
    # The text filter keeps >= 60% of the captions naming a car's make and model under a class
    # of that make and model (exact matching of the class names finds almost none).
    named = [r for r in result["rows"] if r["dataset"] == "StanfordCars"]
    assert sum(r["filter"] for r in named) >= 0.6 * len(named)
    # The shipped thresholds are what calibration on the first half gives.
    assert result["thresholds"] == {
        "threshold": CaptionFilterConfig().threshold,
        "thresholds": CaptionFilterConfig().thresholds,
    }


def test_open_clip_text_tower_scores_as_an_option(tiny_model_name):
    from pipeline.caption_filter.encoders import load_encoder
    from pipeline.embed.config import EmbedConfig

    cfg = CaptionFilterConfig(encoder="open_clip", device="cpu", batch_size=4)
    enc = load_encoder(cfg, EmbedConfig(model=tiny_model_name, pretrained="none", device="cpu"))
    assert enc.name == f"open_clip:{tiny_model_name}:none"
    spec = load_dataset("Flowers102")
    index = build_index(spec, cfg.templates, cfg.negatives, enc.encode)
    assert index.prototypes.shape[0] == spec.num_classes
    captions = pa.array(["red roses", "rose gold ring", None, "a sunflower", "daisies", "x"])
    scores = score_captions(captions, np.array([0, 1, 2, 3, 4, 5]), index, enc.encode, 4)
    assert scores.dtype == np.float32 and np.isnan(scores[2])
    assert np.isfinite(np.delete(scores, 2)).all()


# --------------------------------------------------------------------------- the stage

CAPTIONS = [
    "a bouquet of red roses in a glass vase",
    "18K rose gold diamond ring",
    "a field of sunflowers at sunset",
    "Sunflower print smartphone case",
    "Guns N' Roses live in Houston",
    "pink roses in a garden after the rain",
    "a lotus flower in bloom on the pond",
    "Lotus F1 team car at the grand prix",
] * 3
# What the text filter matches of them: Flowers102's exclusions take "rose gold", "Guns N'
# Roses" and "Lotus F1" out already; the smartphone case is left for the sense filter.
MATCHED = len(CAPTIONS) - 9
IN_SENSE = [
    "a bouquet of red roses in a glass vase",
    "a field of sunflowers at sunset",
    "pink roses in a garden after the rain",
    "a lotus flower in bloom on the pond",
]


@pytest.fixture
def matches(tmp_path, laion_parquet, spark):
    """A real text-filter output for Flowers102 over captions of both senses, in 3 files."""
    from pipeline.text_filter.config import TextFilterConfig
    from pipeline.text_filter.stage import run_text_filter

    urls = [f"http://127.0.0.1:9/img/{i}.jpg" for i in range(len(CAPTIONS))]
    src = laion_parquet(n=len(CAPTIONS), captions=CAPTIONS, urls=urls, files=3)
    out = str(tmp_path / "matches")
    stats = run_text_filter(TextFilterConfig(split_rows=0), "Flowers102", src, out)
    assert stats["dropped"]["excluded"] == 9 and stats["rows_matched"] == MATCHED
    return out


def _expected(minilm, table: pa.Table, threshold: float) -> np.ndarray:
    cfg = CaptionFilterConfig(device="cpu")
    spec = load_dataset("Flowers102")
    index = build_index(spec, cfg.templates, cfg.negatives, minilm.encode)
    labels = table.column("label").to_numpy().astype(np.int64)
    scores = sense_scores(minilm.encode(table.column("caption").to_pylist()), labels, index)
    return scores >= threshold


def test_stage_end_to_end_through_spark_and_the_cli(matches, tmp_path, minilm, capsys):
    from pipeline.app.cli import main
    from pipeline.download.stage import read_matches

    out = str(tmp_path / "sensed")
    rc = main(["caption-filter", "--dataset", "Flowers102", "--matches", matches, "--out", out,
               "--device", "cpu"])  # fmt: skip
    assert rc == 0
    assert capsys.readouterr().out.strip().endswith(f"-> {out}")
    assert io.is_done(out)
    source = io.read_parquet(matches)
    result = io.read_parquet(out)
    # The matches' schema plus sense_score, kept rows only, in input order.
    assert result.schema.names == source.schema.names + [SCORE_COLUMN]
    assert result.schema.field(SCORE_COLUMN).type == pa.float32()
    want = _expected(minilm, source, CaptionFilterConfig().threshold_for("Flowers102"))
    assert result.column("uid").to_pylist() == source.filter(pa.array(want))["uid"].to_pylist()
    kept = set(result.column("caption").to_pylist())
    assert kept >= set(IN_SENSE)
    assert not kept & {"Sunflower print smartphone case", "Lotus F1 team car at the grand prix"}
    # Every caption of the flower's sense outscores every caption of another sense.
    score = dict(zip(result["caption"].to_pylist(), result[SCORE_COLUMN].to_pylist()))
    others = [score[c] for c in kept - set(IN_SENSE)]
    assert min(score[c] for c in IN_SENSE) > max(others, default=-1.0)
    assert min(score.values()) >= CaptionFilterConfig().threshold_for("Flowers102")
    stats = io.read_json(io.join(out, "_stats.json"))
    assert stats["rows_in"] == source.num_rows and stats["rows_kept"] == result.num_rows
    assert stats["rows_dropped"] == source.num_rows - result.num_rows
    per_class = {}
    for name, lab in zip(source["class_name"].to_pylist(), want.tolist()):
        per_class.setdefault(name, {"kept": 0, "dropped": 0})["kept" if lab else "dropped"] += 1
    assert stats["per_class"] == per_class
    assert stats["files"] == 3 and stats["bad_files"] == {}
    assert not io.exists(io.join(out, "_parts"))
    # The download stage reads it as it reads the text filter's output.
    table = read_matches(out)
    assert table.column("uid").to_pylist() == result.column("uid").to_pylist()
    # A complete output is skipped, not redone.
    stamp = os.path.getmtime(os.path.join(out, "_SUCCESS"))
    assert (
        main(["caption-filter", "--dataset", "Flowers102", "--matches", matches, "--out", out]) == 0
    )
    assert os.path.getmtime(os.path.join(out, "_SUCCESS")) == stamp


def test_stage_resumes_finished_files_and_redoes_them_when_settings_change(matches, tmp_path):
    from pipeline.caption_filter import stage

    cfg = CaptionFilterConfig(device="cpu")
    spec = load_dataset("Flowers102")
    files = io.list_files(matches, suffixes=(".parquet",))
    out = str(tmp_path / "resumed")
    # A run that died after scoring the first file left its part and marker behind.
    io.makedirs(out)
    stage.check_fingerprint(out, stage.fingerprint_inputs(cfg, spec, files))
    first = stage.filter_file(0, files[0], out, cfg, spec.path)
    marker = os.path.join(out, "_parts", "part-00000.stats.json")
    tampered = {**first, "rows": first["rows"] + 1000}  # shows whether the marker is reused
    io.write_json(marker, tampered)
    stats = stage.run_caption_filter(cfg, "Flowers102", matches, out)
    assert stats["rows_in"] == MATCHED + 1000
    # Other settings: the stale part of the failed run is not mixed in.
    out2 = str(tmp_path / "changed")
    io.makedirs(out2)
    stage.check_fingerprint(out2, stage.fingerprint_inputs(cfg, spec, files))
    stage.filter_file(0, files[0], out2, cfg, spec.path)
    io.write_json(os.path.join(out2, "_parts", "part-00000.stats.json"), tampered)
    stats2 = stage.run_caption_filter(
        CaptionFilterConfig(device="cpu", threshold=-1.0, thresholds={}),
        "Flowers102",
        matches,
        out2,
    )
    assert stats2["rows_in"] == MATCHED == stats2["rows_kept"]


def test_stage_refuses_unfinished_or_foreign_matches(tmp_path, spark):
    from pipeline.caption_filter.stage import run_caption_filter

    cfg = CaptionFilterConfig(device="cpu")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    pq.write_table(
        pa.table({"caption": ["roses"], "label": [0]}), unfinished / "part-00000.parquet"
    )
    with pytest.raises(io.InputError, match="no _SUCCESS.*run `primer filter` first"):
        run_caption_filter(cfg, "Flowers102", str(unfinished), str(tmp_path / "o1"))
    empty = tmp_path / "empty"
    empty.mkdir()
    io.mark_done(str(empty))
    with pytest.raises(io.InputError, match="no parquet files"):
        run_caption_filter(cfg, "Flowers102", str(empty), str(tmp_path / "o2"))
    no_label = tmp_path / "nolabel"
    no_label.mkdir()
    pq.write_table(pa.table({"caption": ["roses"]}), no_label / "part-00000.parquet")
    io.mark_done(str(no_label))
    with pytest.raises(io.InputError, match=r"missing column\(s\) \['label'\]"):
        run_caption_filter(cfg, "Flowers102", str(no_label), str(tmp_path / "o3"))
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(pa.table({"caption": ["roses"], "label": [5000]}), other / "part-00000.parquet")
    io.mark_done(str(other))
    with pytest.raises(io.InputError, match="another dataset than Flowers102"):
        run_caption_filter(cfg, "Flowers102", str(other), str(tmp_path / "o4"))


def test_unreadable_match_file_fails_naming_it_or_is_listed(matches, tmp_path):
    from pipeline.caption_filter.stage import run_caption_filter

    bad = os.path.join(matches, "part-99999.parquet")
    with open(bad, "wb") as f:
        f.write(b"PAR1 this is not parquet")
    with pytest.raises(io.InputError, match="part-99999.parquet: cannot read parquet"):
        run_caption_filter(
            CaptionFilterConfig(device="cpu"), "Flowers102", matches, str(tmp_path / "a")
        )
    stats = run_caption_filter(
        CaptionFilterConfig(device="cpu", skip_bad_files=True),
        "Flowers102",
        matches,
        str(tmp_path / "b"),
    )
    assert list(stats["bad_files"]) == [bad] and "cannot" not in json.dumps(stats["per_class"])
    assert stats["rows_in"] == MATCHED


def test_datasets_of_renditions_keep_graphics_and_tattoos(minilm):
    """ImageNet-R's images are renditions: a cartoon or a tattoo of a goldfish shows the class,
    so its negatives leave graphics out and such captions pass."""
    cfg = CaptionFilterConfig(device="cpu")
    assert len(cfg.negatives_of("ImageNet-R")) < len(cfg.negatives_of("ImageNet"))
    captions = ["cartoon illustration of a goldfish", "a goldfish tattoo on the arm"]
    photo = ["goldfish swimming in a glass bowl"]
    scores = {}
    for name in ("ImageNet", "ImageNet-R"):
        spec = load_dataset(name)
        index = build_index(spec, cfg.templates, cfg.negatives_of(name), minilm.encode)
        label = np.array([spec.classes.index("goldfish")] * 3)
        scores[name] = sense_scores(minilm.encode(captions + photo), label, index)
    assert (scores["ImageNet-R"][:2] >= cfg.threshold_for("ImageNet-R")).all()
    assert (scores["ImageNet-R"][:2] > scores["ImageNet"][:2] + 0.1).all()
    # Fewer negatives never lower a score; a photo of the class passes under both.
    assert (scores["ImageNet-R"] >= scores["ImageNet"] - 1e-6).all()
    assert scores["ImageNet"][2] >= cfg.threshold_for("ImageNet")
