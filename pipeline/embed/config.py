"""The embed stages' settings (section ``embed``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of the embed stages (section ``embed``).

    Attributes:
        model: open_clip model name (``open_clip.list_models()`` plus ``conf/models/``).
        pretrained: open_clip pretrained tag, or ``"none"``/``""`` for untrained weights.
        checkpoint: local path or URL of a state dict (``.pt``/``.bin``/``.safetensors``).
        device: ``auto`` (CUDA when torch sees a GPU), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` (bf16 on CUDA if supported, else fp16; fp32 on CPU), or explicit.
        batch_size: images per model forward.
        workers: DataLoader processes decoding images (0 decodes in the main process).
        seed: seeds untrained weights, so separate runs embed into the same space.
        task_shard_size: task images per output shard.
    """

    model: str = "ViT-B-16"
    pretrained: str = "laion2b_s34b_b88k"
    checkpoint: str = ""
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 256
    workers: int = 4
    seed: int = 0
    task_shard_size: int = 10000

    def __post_init__(self) -> None:
        problems = []
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append("device must be auto, cpu, cuda or cuda:N")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append("precision must be auto, fp32, bf16 or fp16")
        if self.batch_size < 1 or self.workers < 0 or self.task_shard_size < 1:
            problems.append("batch_size and task_shard_size must be >= 1, workers >= 0")
        if self.checkpoint and self.pretrained not in ("", "none"):
            problems.append("give either pretrained or checkpoint, not both")
        if self.precision in ("bf16", "fp16") and self.device == "cpu":
            problems.append(f"precision {self.precision} needs a CUDA device; use fp32 on CPU")
        if problems:
            raise ValueError("; ".join(problems))
