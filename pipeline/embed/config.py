"""The embed stages' settings (section ``embed``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.core.fingerprint import result_field

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "amp", "amp_bf16")
# Earlier spellings, kept for a release: autocast in fp16 is what open_clip calls "amp".
PRECISION_ALIASES = {"fp16": "amp", "bf16": "amp_bf16"}


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of the embed stages (section ``embed``).

    Attributes:
        model: an open_clip model name (``open_clip.list_models()``, the configs in
            ``conf/models/``, ``hf-hub:org/repo``, ``local-dir:PATH``, or the path of a model
            config ``.json`` to register).
        pretrained: open_clip pretrained tag, or ``"none"``/``""`` for untrained weights.
        checkpoint: local path or URL of a state dict (``.pt``/``.bin``/``.safetensors``); when
            given it is the weights, and ``pretrained`` is ignored.
        device: ``auto`` (CUDA when torch sees a GPU), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: open_clip's names: ``auto`` (``amp_bf16`` on a GPU that supports it, else
            ``amp``; ``fp32`` on CPU), ``fp32``, ``amp`` (fp16 autocast), ``amp_bf16``.
        batch_size: images per model forward.
        workers: DataLoader processes decoding images (0 decodes in the main process).
        seed: seeds untrained weights, so separate runs embed into the same space.
        task_shard_size: task images per output shard.
    """

    model: str = "ViT-B-16"
    pretrained: str = "laion2b_s34b_b88k"
    checkpoint: str = ""
    # How the work is done (left out of the outputs' fingerprints).
    device: str = result_field("auto")
    precision: str = result_field("auto")
    batch_size: int = result_field(256)
    workers: int = result_field(4)
    seed: int = 0
    task_shard_size: int = result_field(10000)

    def __post_init__(self) -> None:
        problems = []
        if self.precision in PRECISION_ALIASES:
            new = PRECISION_ALIASES[self.precision]
            log.warning("embed.precision %r is now called %r", self.precision, new)
            object.__setattr__(self, "precision", new)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append("device must be auto, cpu, cuda or cuda:N")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}")
        if self.batch_size < 1 or self.workers < 0 or self.task_shard_size < 1:
            problems.append("batch_size and task_shard_size must be >= 1, workers >= 0")
        if self.precision.startswith("amp") and self.device == "cpu":
            problems.append(f"precision {self.precision} needs a CUDA device; use fp32 on CPU")
        if problems:
            raise ValueError("; ".join(problems))

    def weights(self) -> str:
        """What the weights are: ``checkpoint``, ``untrained`` or ``pretrained``."""
        if self.checkpoint:
            return "checkpoint"
        return "untrained" if self.pretrained in ("", "none") else "pretrained"
