"""The experiment schema: frozen dataclasses, the single source of defaults.

YAML files and CLI ``key=value`` overrides only override these values; ``loader.py``
rejects unknown keys and wrong types. Each section is the narrowest config a component
needs: the data pipeline takes ``DataConfig``, the optimizer ``OptimConfig``, and so on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Modality = Literal["image", "video", "audio", "text"]


@dataclass(frozen=True)
class TowerConfig:
    """One modality's encoder + projection head.

    ``params`` is validated against the registered encoder's own config dataclass at load.
    """

    encoder: str
    params: dict[str, Any] = field(default_factory=dict)
    head: Literal["auto", "linear", "mlp", "none"] = "auto"  # auto: none if the encoder projects itself
    lr_mult: float = 1.0  # learning-rate multiplier for this tower (0 with freeze for LiT)
    freeze: bool = False


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int = 512
    towers: dict[str, TowerConfig] = field(default_factory=dict)
    logit_scale_init: float = 2.6592  # log(1 / 0.07), as CLIP
    logit_scale_max: float = 100.0  # exp(logit_scale) is clamped to this, as CLIP
    logit_bias_init: float | None = None  # SigLIP uses -10 (with logit_scale_init log(10))


@dataclass(frozen=True)
class OpSpec:
    """One data op: a registered name plus its typed parameters (validated at load)."""

    op: str
    params: dict[str, Any] = field(default_factory=dict)


def _default_ops() -> list[OpSpec]:
    return [
        OpSpec("decode_image"),
        OpSpec("random_resized_crop", {"scale": [0.9, 1.0]}),
        OpSpec("to_tensor_normalize"),
        OpSpec("caption"),
        OpSpec("tokenize"),
    ]


def _default_eval_ops() -> list[OpSpec]:
    return [
        OpSpec("decode_image"),
        OpSpec("resize_center_crop"),
        OpSpec("to_tensor_normalize"),
        OpSpec("caption"),
        OpSpec("tokenize"),
    ]


@dataclass(frozen=True)
class DataConfig:
    """A webdataset stream. ``train`` is a local path, brace pattern, ``pipe:`` URL, or a
    ``::``-separated list of them (webdataset's URL syntax)."""

    train: str = ""
    batch_size: int = 256  # per rank, per micro-step
    num_workers: int = 2
    shuffle_buffer: int = 1000  # 0 disables sample shuffling
    shuffle_shards: bool = True
    resampled: bool = False  # draw shards with replacement (infinite stream, no epochs)
    ops: list[OpSpec] = field(default_factory=_default_ops)
    eval_ops: list[OpSpec] = field(default_factory=_default_eval_ops)
    on_error: Literal["skip", "raise"] = "skip"
    max_errors: int | None = None  # abort after this many skipped samples/shards (None: never)
    drop_last: bool = True
    prefetch_factor: int = 2


@dataclass(frozen=True)
class LossPair:
    """One contrastive term: ``weight * kind(embeddings[a], embeddings[b])``."""

    a: str
    b: str
    kind: str = "clip"  # registered loss: clip | siglip
    weight: float = 1.0


def _default_pairs() -> list[LossPair]:
    return [LossPair("image", "text", "clip", 1.0)]


@dataclass(frozen=True)
class LossConfig:
    pairs: list[LossPair] = field(default_factory=_default_pairs)
    gather_with_grad: bool = True  # all-gather negatives with gradient (exact DDP gradients)
    local_loss: bool = False  # each rank scores only its own rows against all columns


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip_norm: float | None = 1.0


@dataclass(frozen=True)
class TrainConfig:
    name: str = "run"
    run_dir: str = "runs/{name}"
    steps: int = 1000  # optimizer steps; the LR schedule spans these
    stop_after: int | None = None  # stop this invocation at this step (schedule still spans `steps`)
    accum_steps: int = 1  # micro-batches per optimizer step; exact large-batch contrastive gradients
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    grad_checkpointing: bool = False
    compile: bool = False
    threads: int | None = None  # torch intra-op threads; None: cores // ranks - data workers, min 1
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    resume: str | None = None  # "latest" or a checkpoint directory
    log_sample_keys: bool = False  # write each step's sample keys to samples.jsonl (for audits/tests)
    progress: bool = True


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
