"""Issue 5: embeddings of shards, task images and prompts with a tiny open_clip model."""

from __future__ import annotations

import io as _io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest

from pipeline.core import embeddings as E
from pipeline.core import io
from pipeline.demo.imageserver import fashion_mnist_bytes, skimage_bytes
from pipeline.embed.config import EmbedConfig
from pipeline.embed.pool import embed_shards
from pipeline.embed.task import embed_task
from pipeline.embed.text import embed_text

DATASET = "FashionMNIST"


@pytest.fixture
def cfg(tiny_model_name):
    return EmbedConfig(
        model=tiny_model_name, pretrained="none", device="cpu", batch_size=7, workers=0
    )


def _tar(path, samples):
    with tarfile.open(path, "w") as tf:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, _io.BytesIO(data))


def make_shards(d, n_shards=2, per=9, bad=True):
    os.makedirs(d, exist_ok=True)
    expect = []
    for s in range(n_shards):
        samples = []
        for i in range(per):
            uid = f"{s:02d}{i:030d}"
            key = f"{s:05d}{i:04d}"
            img = (
                fashion_mnist_bytes("train", s * per + i, "jpg", 64)
                if i % 4
                else skimage_bytes("chelsea")
            )
            samples += [
                (f"{key}.jpg", img),
                (f"{key}.txt", b"caption"),
                (f"{key}.json", json.dumps({"uid": uid, "label": i % 3}).encode()),
            ]
            expect.append((uid, i % 3))
        if bad:
            samples += [
                ("bad01.jpg", b"\xff\xd8 not really a jpeg"),
                ("bad01.json", json.dumps({"uid": f"bad{s}", "label": 1}).encode()),
            ]
            samples += [("../../evil.json", json.dumps({"uid": f"noimg{s}", "label": 0}).encode())]
        _tar(os.path.join(d, f"{s:05d}.tar"), samples)
    return expect


def test_pool_embeddings_unit_aligned_and_bad_images_counted(tmp_path, cfg):
    expect = make_shards(str(tmp_path / "shards"))
    out = str(tmp_path / "emb")
    stats = embed_shards(cfg, str(tmp_path / "shards"), out)
    uids, labels, feats = E.load(out)
    assert [(u, int(y)) for u, y in zip(uids, labels)] == sorted(expect)  # uid order within a shard
    assert feats.dtype == np.float16 and feats.shape == (len(expect), 64)
    np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert stats["embedded"] == len(expect) and stats["failed"] == 4
    failed = {u for _, u, _ in stats["failures"]}
    assert {"bad0", "bad1", "noimg0", "noimg1"} == failed
    assert stats["failed_by_reason"]["no image in sample"] == 2
    done = io.read_json(os.path.join(out, "00000.done"))
    assert sorted(u for u, _ in done["errors"]) == ["bad0", "noimg0"]  # kept with the shard
    meta = E.read_meta(out)
    assert meta["untrained"] is True and meta["model"] == cfg.model and meta["embed_dim"] == 64
    assert not any(os.path.exists(p) for p in ("evil.json", str(tmp_path / "evil.json")))


def test_reruns_and_batch_sizes_agree_and_resume_skips_done(tmp_path, cfg):
    make_shards(str(tmp_path / "shards"), bad=False)
    a = str(tmp_path / "a")
    embed_shards(cfg, str(tmp_path / "shards"), a)
    from dataclasses import replace

    embed_shards(replace(cfg, batch_size=64), str(tmp_path / "shards"), str(tmp_path / "b"))
    _, _, fa = E.load(a)
    _, _, fb = E.load(str(tmp_path / "b"))
    np.testing.assert_allclose(fa.astype(np.float32), fb.astype(np.float32), atol=2e-3)
    # Resume: drop one shard's marker and _SUCCESS; only that shard is recomputed.
    kept = os.path.getmtime(os.path.join(a, "00000.npy"))
    os.unlink(os.path.join(a, "00001.done"))
    os.unlink(os.path.join(a, "_SUCCESS"))
    stats = embed_shards(cfg, str(tmp_path / "shards"), a)
    assert os.path.getmtime(os.path.join(a, "00000.npy")) == kept
    assert stats["images_this_run"] == 9 and stats["embedded"] == 18
    _, _, fc = E.load(a)
    np.testing.assert_array_equal(fa, fc)


def test_checkpoint_round_trip_and_code_pickle_refused(tmp_path, cfg):
    import torch

    from pipeline.embed.model import load_model

    make_shards(str(tmp_path / "shards"), n_shards=1, bad=False)
    lm = load_model(cfg)
    ckpt = str(tmp_path / "model.pt")
    torch.save(lm.model.state_dict(), ckpt)
    from dataclasses import replace

    embed_shards(cfg, str(tmp_path / "shards"), str(tmp_path / "a"))
    embed_shards(
        replace(cfg, pretrained="", checkpoint=ckpt, seed=99),
        str(tmp_path / "shards"),
        str(tmp_path / "b"),
    )
    np.testing.assert_array_equal(E.load(str(tmp_path / "a"))[2], E.load(str(tmp_path / "b"))[2])
    assert len(E.read_meta(str(tmp_path / "b"))["checkpoint_sha256"]) == 64

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = str(tmp_path / "evil.pt")
    with open(evil, "wb") as f:
        pickle.dump({"visual.proj": Evil()}, f)
    with pytest.raises(io.InputError, match="refused"):
        load_model(replace(cfg, pretrained="", checkpoint=evil))
    assert not marker.exists()


def test_missing_checkpoint_and_offline_tag_say_what_to_do(cfg):
    from dataclasses import replace

    from pipeline.embed.model import load_model

    with pytest.raises(io.InputError, match="does not exist"):
        load_model(replace(cfg, pretrained="", checkpoint="/nonexistent/model.pt"))
    with pytest.raises(io.InputError, match="unknown open_clip model"):
        load_model(replace(cfg, model="no-such-model"))


def test_task_imagefolder_and_text(tmp_path, cfg):
    from pipeline.demo.run import write_task_imagefolder

    root = str(tmp_path / "task")
    write_task_imagefolder(root, train_per_class=2, test_per_class=3)
    out = str(tmp_path / "test")
    embed_task(cfg, DATASET, "test", root, out)
    uids, labels, feats = E.load(out)
    assert len(uids) == 30 and sorted(set(labels.tolist())) == list(range(10))
    assert uids[0] == io.make_uid(
        f"task:test/{io.read_parquet(io.join(out, '00000.parquet')).column('path')[0]}", ""
    )
    train = str(tmp_path / "train")
    embed_task(cfg, DATASET, "train", root, train)
    assert not set(E.load(train)[0]) & set(uids)
    text = str(tmp_path / "text")
    embed_text(cfg, DATASET, text)
    te = E.load_text(text)
    assert te.num_classes == 10 and len(te.prompts) == 10 * 4 and te.heads().shape == (10, 64)
    assert te.prompts[0] == "a photo of a T-shirt."


def test_task_torchvision_pets_layout(tmp_path, cfg):
    """OxfordIIITPet as torchvision lays it out: images/ and annotations/{trainval,test}.txt."""
    from pipeline.core.config import load_dataset
    from pipeline.embed.tasks import list_task_images

    base = tmp_path / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    spec = load_dataset("OxfordIIITPet")
    lines = {"trainval": [], "test": []}
    for i in range(6):
        name = f"{spec.classes[i % 3].replace(' ', '_')}_{i}"
        (base / "images" / f"{name}.jpg").write_bytes(fashion_mnist_bytes("test", i))
        lines["trainval" if i < 4 else "test"].append(f"{name} {i % 3 + 1} 1 1")
    for k, v in lines.items():
        (base / "annotations" / f"{k}.txt").write_text("\n".join(v) + "\n")
    items = list_task_images(spec, str(tmp_path), "train")
    assert [it.label for it in items] == [0, 1, 2, 0]
    out = str(tmp_path / "emb")
    embed_task(cfg, "OxfordIIITPet", "test", str(tmp_path), out)
    assert E.load(out)[1].tolist() == [1, 2]


def test_embed_reads_shards_from_s3(tmp_path, cfg, s3_bucket):
    expect = make_shards(str(tmp_path / "shards"), n_shards=1, bad=False)
    fs, _ = io.url_to_fs(s3_bucket)
    fs.put(str(tmp_path / "shards" / "00000.tar"), s3_bucket + "/shards/00000.tar")
    out = io.join(s3_bucket, "emb")
    embed_shards(cfg, io.join(s3_bucket, "shards"), out)
    assert sorted(u for u, _ in expect) == list(E.load(out)[0])


def test_ranks_split_shards_and_parts_split_a_shard(tmp_path, cfg):
    """Two ranks (torchrun's RANK/WORLD_SIZE) give the single process's output; _SUCCESS
    only once both are done. Two workers on one tar split it into two parts: same rows."""
    from dataclasses import replace

    shards = str(tmp_path / "shards")
    make_shards(shards, n_shards=3, per=5, bad=False)
    single = str(tmp_path / "single")
    embed_shards(cfg, shards, single)
    multi = str(tmp_path / "multi")
    part = embed_shards(cfg, shards, multi, rank=1, world=2)
    assert part["images_this_run"] == 5 and not io.is_done(multi)
    assert E.completed_shards(multi) == ["00001"]
    embed_shards(cfg, shards, multi, rank=0, world=2)
    assert io.is_done(multi)
    for x, y in zip(E.load(single), E.load(multi)):
        np.testing.assert_array_equal(x, y)

    one = str(tmp_path / "one")
    os.makedirs(one)
    os.rename(os.path.join(shards, "00000.tar"), os.path.join(one, "00000.tar"))
    embed_shards(replace(cfg, workers=2), one, str(tmp_path / "parts"))
    uids, labels, feats = E.load(str(tmp_path / "parts"))
    ref = E.load(single)
    assert list(uids) == list(ref[0][:5]) and list(labels) == list(ref[1][:5])
    np.testing.assert_allclose(feats.astype(np.float32), ref[2][:5].astype(np.float32), atol=2e-3)


def test_cli_end_to_end_and_text_with_descriptions(tmp_path, tiny_model_name, capsys):
    from pipeline.app.cli import main

    shards = str(tmp_path / "shards")
    make_shards(shards, n_shards=1, per=4)
    model = ["--model", tiny_model_name, "--pretrained", "none", "--device", "cpu"]
    out = str(tmp_path / "pool")
    assert main(["embed", "--shards", shards, "--out", out, "--workers", "0", *model]) == 0
    assert '"embedded": 4' in capsys.readouterr().out
    meta = E.read_meta(out)
    assert meta["untrained"] and meta["precision"] == "fp32" and "Resize" in meta["preprocess"]
    assert json.load(open(os.path.join(out, "stats.json")))["failed"] == 2
    assert main(["embed", "--shards", shards, "--out", out, *model]) == 0  # complete: skipped

    (tmp_path / "desc.json").write_text(json.dumps({"cat": ["a small feline.", "whiskers."]}))
    yaml_path = tmp_path / "toy.yaml"
    yaml_path.write_text(
        "name: toy\nclasses: [cat, dog]\ntemplates: ['a photo of a {}.', 'a {}.']\n"
        "descriptions: desc.json\n"
    )
    text = str(tmp_path / "text")
    assert main(["embed-text", "--dataset", str(yaml_path), "--out", text, *model]) == 0
    te = E.load_text(text)
    assert te.kinds.tolist() == ["template"] * 4 + ["description"] * 2
    assert te.prompts.tolist()[-2:] == ["a small feline.", "whiskers."]
    assert te.has("description") and te.classnames == ("cat", "dog")
    assert np.abs(te.heads("description")[1]).sum() == 0  # dog has no description
    # A checkpoint that does not exist: exit 2 and a message, not a traceback.
    bad = ["--model", tiny_model_name, "--checkpoint", str(tmp_path / "no.pt")]
    assert (
        main(["embed-text", "--dataset", str(yaml_path), "--out", str(tmp_path / "t2"), *bad]) == 2
    )


def test_pretrained_tag_offline_says_what_to_do(cfg):
    """HF_HUB_OFFLINE=1 (conftest): open_clip cannot fetch the weights and makes no request."""
    from dataclasses import replace

    from pipeline.embed.model import load_model

    with pytest.raises(io.InputError, match="--checkpoint PATH"):
        load_model(replace(cfg, model="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    with pytest.raises(io.InputError, match="no pretrained tag"):
        load_model(replace(cfg, model="ViT-B-32", pretrained="no_such_tag"))
