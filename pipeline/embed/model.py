"""Loading an open_clip model (pretrained tag, local checkpoint, or seeded untrained weights) and
encoding images and texts into float16 unit vectors.

Weights: an open_clip pretrained tag, a local checkpoint (``torch.load(weights_only=True)``, so
a pickle that would run code is refused; ``.safetensors`` too), or ``none`` for untrained
weights initialised from ``seed`` (pool and task runs then embed into the same space). Images
reach the model as uint8 crops; the float conversion and normalisation run on its device,
bit-identical to open_clip's ``ToTensor`` + ``Normalize``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from pipeline.core import io
from pipeline.core.config import CONF_DIR
from pipeline.core.torchcompat import import_open_clip
from pipeline.embed.config import EmbedConfig

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """An open_clip model ready to embed.

    ``pre_pil`` is the PIL part of open_clip's preprocessing (resize, centre crop) that
    DataLoader workers run; ``mean``/``std`` finish it on ``device`` (see :func:`encode_images`).
    """

    model: object
    preprocess: object
    tokenizer: object
    device: str
    dtype: object  # torch dtype for autocast, or None for fp32
    meta: dict
    pre_pil: object = None
    mean: object = None  # [1, 3, 1, 1] float32 tensor on device
    std: object = None
    image_size: int = 224
    extra: dict = field(default_factory=dict)


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a local file or fsspec URL."""
    h = hashlib.sha256()
    fs, p = io.url_to_fs(path)
    with fs.open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_device(device: str, local_rank: int | None = None) -> str:
    """``auto``/``cuda`` -> ``cuda:<local_rank>`` when torch sees GPUs, else ``cpu``.

    Raises :class:`pipeline.core.io.InputError` when CUDA is asked for and torch sees no GPU.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise io.InputError("device cuda requested but torch sees no GPU; use --device cpu")
    if device == "cuda":
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
        # One process per GPU: torchrun's LOCAL_RANK picks it (Spark sets CUDA_VISIBLE_DEVICES).
        device = f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def _split_preprocess(preprocess):
    """Split open_clip's eval transform into (PIL part, mean, std), or None if unrecognised."""
    steps = list(getattr(preprocess, "transforms", []))
    names = [type(t).__name__ for t in steps]
    if len(steps) < 2 or "ToTensor" not in names[-2] or names[-1] != "Normalize":
        return None
    import torchvision.transforms as T

    return T.Compose(steps[:-2]), tuple(steps[-1].mean), tuple(steps[-1].std)


def _read_state_dict(path: str):
    import torch

    data = io.read_bytes(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data), data
    return torch.load(_io.BytesIO(data), map_location="cpu", weights_only=True), data


# Model names open_clip resolves itself, weights and config included.
SCHEMAS = ("hf-hub:", "local-dir:")


def model_name(model: str) -> str:
    """The open_clip name of ``model``: a bundled or open_clip config, a schema name
    (``hf-hub:org/repo``, ``local-dir:PATH``) as it is, or a model config ``.json`` path
    (registered, then named by its file stem). Raises :class:`pipeline.core.io.InputError`
    for an unknown name, with the closest known one (``ViT-B/32``: did you mean ``ViT-B-32``?).
    """
    from pathlib import Path

    from pipeline.core.config import closest

    open_clip = import_open_clip()
    open_clip.add_model_config(str(CONF_DIR / "models"))
    if model.startswith(SCHEMAS):
        return model
    if model.endswith(".json"):
        if not Path(model).is_file():
            raise io.InputError(f"model config {model!r} does not exist")
        open_clip.add_model_config(model)
        return Path(model).stem
    known = open_clip.list_models()
    if model not in known:
        hint = closest(model.replace("/", "-"), known) or closest(model, known)
        raise io.InputError(
            f"unknown open_clip model {model!r}{hint}: see open_clip.list_models(), "
            "conf/models/, or give hf-hub:org/repo, local-dir:PATH or a model config .json"
        )
    return model


def model_identity(cfg: EmbedConfig) -> dict:
    """What the weights are, for the outputs' fingerprints: the model with its pretrained tag,
    its checkpoint's SHA-256, its local directory's files, or the seed of untrained weights."""
    from pipeline.core import fingerprint

    if cfg.model.startswith("local-dir:"):
        return {"model": cfg.model, "files": fingerprint.file_identity(cfg.model[10:])}
    if cfg.model.startswith("hf-hub:"):
        return {"model": cfg.model}
    if cfg.checkpoint:
        return {"model": cfg.model, "checkpoint_sha256": checkpoint_sha256(cfg.checkpoint)}
    if cfg.weights() == "untrained":
        return {"model": cfg.model, "untrained_seed": cfg.seed}
    return {"model": cfg.model, "pretrained": cfg.pretrained}


_SHA_CACHE: dict[tuple, str] = {}


@contextlib.contextmanager
def _quiet_root_warnings():
    """Drop WARNING records of the root logger (open_clip logs there) inside the block."""
    # A filter on the root logger sees exactly the records logged on it (not its children's).
    root = logging.getLogger()
    drop = _DropWarnings()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


class _DropWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno != logging.WARNING


def checkpoint_sha256(url: str) -> str:
    """SHA-256 of a checkpoint (read once per process for an unchanged file)."""
    fs, path = io.url_to_fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise io.InputError(
            f"checkpoint {url!r} does not exist; pass the path of a saved state dict, or "
            "--pretrained TAG / --pretrained none"
        ) from None
    key = (url, info.get("size"), str(info.get("mtime", info.get("LastModified", ""))))
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(url)
    return _SHA_CACHE[key]


def load_model(cfg: EmbedConfig, local_rank: int | None = None) -> LoadedModel:
    """Build the open_clip model with its preprocessing and tokenizer.

    Args:
        cfg: the stage config (model, weights, device, precision, seed).
        local_rank: the GPU index for ``device`` cuda/auto; default ``$LOCAL_RANK`` or 0.

    Returns:
        A :class:`LoadedModel` in eval mode on its device; ``meta`` holds what the outputs'
        ``meta.json`` records (model, pretrained tag or checkpoint sha256, untrained, seed,
        precision, embed_dim, preprocess, image_size).

    Raises:
        pipeline.core.io.InputError: unknown model; a tag that cannot be loaded (offline, unknown);
            a checkpoint that is missing, refused by ``weights_only`` or does not fit.
    """
    import torch

    open_clip = import_open_clip()
    name = model_name(cfg.model)
    device = resolve_device(cfg.device, local_rank)
    precision = cfg.precision
    if precision == "auto":
        on_cuda = device.startswith("cuda")
        precision = ("amp_bf16" if torch.cuda.is_bf16_supported() else "amp") if on_cuda else "fp32"
    dtype = {"fp32": None, "amp_bf16": torch.bfloat16, "amp": torch.float16}[precision]
    meta = {
        "model": cfg.model,
        "pretrained": None,
        "checkpoint": None,
        "checkpoint_sha256": None,
        "untrained": False,
        "seed": cfg.seed,
        "precision": precision,
    }
    # Seeded before creation: untrained weights are then identical in every process.
    torch.manual_seed(cfg.seed)
    if name.startswith(SCHEMAS):
        if cfg.checkpoint:
            raise io.InputError(
                f"{cfg.model} brings its own weights; drop embed.checkpoint, or name the model's "
                "architecture (its open_clip config) to load the checkpoint into"
            )
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name)
        except Exception as e:
            raise io.InputError(
                f"could not load {cfg.model} ({type(e).__name__}: {str(e)[:200]}). An hf-hub: "
                "model needs network access or a filled Hugging Face cache (HF_HOME); a local-dir: "
                "one needs open_clip_config.json and its weights in that directory."
            ) from None
        meta["pretrained"] = name
    elif cfg.checkpoint:
        if not io.exists(cfg.checkpoint):
            raise io.InputError(
                f"checkpoint {cfg.checkpoint!r} does not exist; pass the path of a saved state "
                "dict, or --pretrained TAG / --pretrained none"
            )
        # open_clip warns that the weights are random; the checkpoint replaces them just below.
        with _quiet_root_warnings():
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        try:
            state, raw = _read_state_dict(cfg.checkpoint)
        except Exception as e:
            raise io.InputError(
                f"checkpoint {cfg.checkpoint!r} refused: it is not a plain tensor state dict "
                f"({type(e).__name__}: {str(e)[:160]}). Only weights_only-loadable files are "
                "accepted; a pickle that carries code is never executed."
            ) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # open_clip training checkpoints
        if not isinstance(state, dict):
            raise io.InputError(f"checkpoint {cfg.checkpoint!r} holds no state dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise io.InputError(
                f"checkpoint {cfg.checkpoint!r} does not fit model {cfg.model}: {str(e)[:300]}"
            ) from None
        meta["checkpoint"] = cfg.checkpoint
        meta["checkpoint_sha256"] = hashlib.sha256(raw).hexdigest()
    elif cfg.pretrained in ("", "none"):
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        meta["untrained"] = True
        log.warning(
            "embedding with UNTRAINED %s weights (seed %d): similarities are meaningless",
            cfg.model,
            cfg.seed,
        )
    else:
        if cfg.pretrained not in open_clip.list_pretrained_tags_by_model(name):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise io.InputError(
                f"open_clip has no pretrained tag {cfg.pretrained!r} for {cfg.model} (known: "
                f"{tags}); or pass --checkpoint PATH, or --pretrained none"
            )
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=cfg.pretrained
            )
        except Exception as e:
            raise io.InputError(
                f"could not load open_clip weights {cfg.model}/{cfg.pretrained} "
                f"({type(e).__name__}: {str(e)[:200]}). On a networked machine open_clip "
                "downloads them; offline, copy a filled Hugging Face cache (HF_HOME) here, or "
                "pass --checkpoint PATH, or --pretrained none for untrained weights."
            ) from None
        meta["pretrained"] = cfg.pretrained
    model.eval().to(device)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    proj = getattr(model, "text_projection", None)
    if proj is not None and hasattr(proj, "shape"):
        meta["embed_dim"] = int(proj.shape[1])
    else:
        with torch.inference_mode():
            meta["embed_dim"] = int(
                model.encode_text(open_clip.tokenize(["a"]).to(device)).shape[1]
            )
    size = getattr(model.visual, "image_size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    meta["preprocess"] = repr(preprocess)
    meta["image_size"] = size
    lm = LoadedModel(model, preprocess, open_clip.get_tokenizer(name), device, dtype, meta)
    lm.image_size = size
    split = _split_preprocess(preprocess)
    if split is not None:
        pre_pil, mean, std = split
        lm.pre_pil = pre_pil
        lm.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        lm.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return lm


def _autocast(lm: LoadedModel):
    import contextlib

    import torch

    if lm.dtype is None:
        return contextlib.nullcontext()
    device_type = "cuda" if lm.device.startswith("cuda") else "cpu"
    return torch.autocast(device_type=device_type, dtype=lm.dtype)


def encode_images(lm: LoadedModel, batch) -> np.ndarray:
    """float16 L2-normalised embeddings ``[B, D]`` of a batch.

    ``batch`` is either uint8 ``[B, 3, H, W]`` crops from :func:`decode_image` (converted and
    normalised here, on the device) or float tensors already through ``lm.preprocess``.
    Normalisation to unit length happens in float32, before the cast to float16.
    """
    import torch

    with torch.inference_mode():
        x = batch.to(lm.device, non_blocking=True)
        if x.dtype == torch.uint8:
            # Same arithmetic as ToTensor (x/255) then Normalize ((x-mean)/std), in fp32.
            x = (x.float().div_(255) - lm.mean) / lm.std
        if lm.device.startswith("cuda"):
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(lm):
            f = lm.model.encode_image(x)
        f = torch.nn.functional.normalize(f.float(), dim=-1)
        return f.cpu().numpy().astype(np.float16)


def encode_texts(lm: LoadedModel, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """float16 L2-normalised text embeddings ``[len(texts), D]``, in input order."""
    import torch

    out = []
    for i in range(0, len(texts), batch_size):
        tokens = lm.tokenizer(texts[i : i + batch_size]).to(lm.device)
        with torch.inference_mode(), _autocast(lm):
            f = lm.model.encode_text(tokens)
        f = torch.nn.functional.normalize(f.float(), dim=-1)
        out.append(f.cpu().numpy().astype(np.float16))
    return np.concatenate(out) if out else np.zeros((0, lm.meta["embed_dim"]), np.float16)
