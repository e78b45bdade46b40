"""`python -m pipeline.embed` under torchrun (two ranks on CPU, gloo), and every model name
open_clip accepts: bundled configs, a config file, local-dir:, hf-hub: (up to the network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.core import embeddings as E
from pipeline.core import io
from pipeline.embed.config import EmbedConfig
from pipeline.embed.model import model_name
from pipeline.embed.pool import embed_shards
from tests.embed.test_embed import make_shards

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = {"model": "primer-tiny-vit", "pretrained": "none", "device": "cpu", "workers": 0}


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_embed_every_shard_once(tmp_path):
    shards = str(tmp_path / "shards")
    make_shards(shards, n_shards=3, per=5)
    out = str(tmp_path / "pool")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "pipeline.embed",
         "--shards", shards, "--out", out, "--model", CFG["model"], "--pretrained", "none",
         "--device", "cpu", "--workers", "0"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert io.is_done(out) and sorted(E.completed_shards(out)) == ["00000", "00001", "00002"]
    stats = io.read_json(os.path.join(out, "stats.json"))
    assert stats["world_size"] == 2 and stats["embedded"] == 15
    # The same embeddings as one process makes.
    one = str(tmp_path / "one")
    embed_shards(EmbedConfig(**CFG), shards, one)
    (u2, y2, f2), (u1, y1, f1) = E.load(out), E.load(one)
    assert list(u2) == list(u1) and (y2 == y1).all()
    np.testing.assert_allclose(f2.astype(np.float32), f1.astype(np.float32), atol=2e-3)


def test_a_failing_rank_fails_every_rank(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "pipeline.embed",
         "--shards", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--device", "cpu",
         "--model", CFG["model"], "--pretrained", "none"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert r.returncode != 0 and "no .tar shards" in r.stderr


def test_model_names_open_clip_accepts(tmp_path):
    assert model_name("primer-tiny-vit") == "primer-tiny-vit"  # bundled in conf/models
    assert model_name("hf-hub:timm/ViT-B-16-SigLIP") == "hf-hub:timm/ViT-B-16-SigLIP"
    with pytest.raises(io.InputError, match="did you mean 'ViT-B-32'"):
        model_name("ViT-B/32")
    with pytest.raises(io.InputError, match="unknown open_clip model 'not-a-model'"):
        model_name("not-a-model")
    # A user's own config file, registered under its file name.
    cfg = json.loads(open(os.path.join(REPO, "conf", "models", "primer-tiny-vit.json")).read())
    cfg["embed_dim"] = 32
    mine = tmp_path / "my-small-vit.json"
    mine.write_text(json.dumps(cfg))
    assert model_name(str(mine)) == "my-small-vit"


def test_local_dir_and_config_file_models_embed(tmp_path):
    """local-dir:PATH (open_clip_config.json + weights) loads offline and embeds."""
    import torch

    from pipeline.core.torchcompat import import_open_clip
    from pipeline.embed.model import encode_texts, load_model

    open_clip = import_open_clip()
    cfg = json.loads(open(os.path.join(REPO, "conf", "models", "primer-tiny-vit.json")).read())
    model = open_clip.create_model("primer-tiny-vit", pretrained=None)
    d = tmp_path / "mymodel"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.save(model.state_dict(), d / "open_clip_pytorch_model.bin")
    lm = load_model(EmbedConfig(model=f"local-dir:{d}", pretrained="", device="cpu"))
    t = encode_texts(lm, ["a shirt", "a boot"])
    assert t.shape == (2, 64)
    with torch.no_grad():
        want = model.encode_text(open_clip.get_tokenizer("primer-tiny-vit")(["a shirt"]))
    want = torch.nn.functional.normalize(want, dim=-1).numpy()[0]
    np.testing.assert_allclose(t[0].astype(np.float32), want, atol=2e-3)


def test_an_hf_hub_model_offline_fails_naming_the_fix(monkeypatch):
    from pipeline.embed.model import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(io.InputError, match="HF_HOME"):
        load_model(EmbedConfig(model="hf-hub:timm/no-such-model-here", device="cpu"))
