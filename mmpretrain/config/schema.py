"""The experiment schema: frozen dataclasses, the single source of defaults.

YAML files and CLI ``key=value`` overrides only override these values; ``loader.py``
rejects unknown keys and wrong types. Each section is the narrowest config a component
needs: the data pipeline takes ``DataConfig``, the optimizer ``OptimConfig``, and so on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on a tower (``peft``): only the adapters train (and the projection head, if asked)."""

    r: int = 8  # adapter rank
    alpha: float = 16.0  # scaling: the update is (alpha / r) * B @ A
    dropout: float = 0.0  # on the adapter's input (Linear targets; peft's MultiheadAttention adapter ignores it)
    targets: list[str] | None = None  # module names (exact or a ".name" suffix) or one regex (full match) in the encoder's adapted module; None: the encoder's own (its attention and MLP projections)
    parameters: list[str] | None = None  # weight tensors adapted in place (peft target_parameters; e.g. open_clip's attn.in_proj_weight); None: the encoder's own
    train_head: bool = False  # the tower's projection head trains too


@dataclass(frozen=True)
class TowerConfig:
    """One modality's encoder + projection head.

    ``params`` is validated against the registered encoder's own config dataclass at load.
    """

    encoder: str  # registered encoder for this modality (see "Registered names")
    params: dict[str, Any] = field(default_factory=dict)  # the encoder's own typed params, checked at load
    head: Literal["auto", "linear", "mlp", "none"] = "auto"  # auto: none if the encoder projects itself
    lr_mult: float = 1.0  # learning-rate multiplier for this tower and its head (0 leaves it out)
    freeze: bool = False  # no gradient for the encoder (LiT: a locked, pretrained text tower)
    trainable_layers: int | None = None  # partial unfreezing: only the encoder's top N layers train (open_clip's lock(unlocked_groups) for its towers); None: all, or none with freeze
    lora: LoraConfig | None = None  # LoRA adapters (models.lora): the encoder's weights stay as loaded; exports merge them
    layer_decay: float | None = None  # layer-wise LR decay (open_clip's --visual-layer-decay): the encoder's layer groups, input to output, train at lr * decay ** (groups - 1 - i); in (0, 1]; None: off
    init_from: str | None = None  # a fresh run starts this tower from a checkpoint (any format model.pretrained takes, or a timm weights file for a timm tower): its same-modality tower, or (video) a timm ViT image tower, inflated


@dataclass(frozen=True)
class DecoderConfig:
    """A captioning decoder over the image tower's tokens (CoCa, LocCa): a registered kind and its params."""

    kind: str  # registered caption decoder (see "Registered names"): coca, locca
    params: dict[str, Any] = field(default_factory=dict)  # the decoder's own typed params, checked at load


@dataclass(frozen=True)
class ModelConfig:
    """The towers by modality, the shared embedding width and the temperature."""

    embed_dim: int = 512  # width of the shared embedding space
    towers: dict[str, TowerConfig] = field(default_factory=dict)  # modality -> tower (image, text, ...)
    logit_scale_init: float = 2.6592  # log(1 / 0.07), as CLIP
    logit_scale_max: float = 100.0  # exp(logit_scale) is clamped to this, as CLIP
    logit_bias_init: float | None = None  # SigLIP uses -10 (with logit_scale_init log(10))
    shared_backbone: list[str] = field(default_factory=list)  # modalities whose towers share one transformer trunk (VATT-MA); each keeps its own embedding and head
    pretrained: str | None = None  # a fresh run starts the whole model from this checkpoint: ours, an open_clip folder (local-dir:) or weights file, a Hugging Face CLIP/SigLIP folder; its towers, temperature, bias and preprocessing become the model's, under what this config sets
    decoder: DecoderConfig | None = None  # a captioning decoder (trained by the caption objective; api.caption)
    architecture: str | None = None  # the model an open_clip weights file in pretrained belongs to: an open_clip name (ViT-B-32) or a model YAML


@dataclass(frozen=True)
class OpSpec:
    """One data op: a registered name plus its typed parameters (validated at load)."""

    op: str  # registered data op
    params: dict[str, Any] = field(default_factory=dict)  # the op's typed params


def _default_ops() -> list[OpSpec]:
    return [
        OpSpec("decode_image"),
        OpSpec("random_resized_crop", {"scale": [0.9, 1.0]}),
        OpSpec("to_tensor_normalize"),
        OpSpec("caption"),
        OpSpec("tokenize"),
    ]


@dataclass(frozen=True)
class SourceConfig:
    """One dataset of a mixture: its shards, sampling weight and (optionally) its own ops."""

    train: str  # shards, as data.train
    weight: float = 1.0  # relative probability of drawing a step's batch from this source
    ops: list[OpSpec] | None = None  # this source's transforms (None: data.ops)


@dataclass(frozen=True)
class DataConfig:
    """A webdataset stream. ``train`` is a local path, brace pattern, ``pipe:`` URL, or a
    ``::``-separated list of them (webdataset's URL syntax)."""

    train: str = ""  # shards: path, directory, brace pattern, pipe: URL, or a::b lists
    batch_size: int = 256  # per rank, per micro-step
    num_workers: int = 2  # loader processes per rank; compute threads are sized around them
    shuffle_buffer: int = 1000  # 0 disables sample shuffling
    shuffle_shards: bool = True  # reshuffle the shard order every epoch (seeded)
    resampled: bool = False  # draw shards with replacement (infinite stream, no epochs)
    ops: list[OpSpec] = field(default_factory=_default_ops)  # per-sample training transforms, in order
    on_error: Literal["skip", "raise"] = "skip"  # bad samples/shards: skip and count, or stop the run
    max_errors: int | None = None  # abort once one loader worker has skipped more than this many samples/shards (each worker counts its own; None: never)
    max_member_bytes: int = 32 << 20  # a tar member larger than this is skipped (counted as oversized_member), never read into memory
    timeout_s: float = 600.0  # a loader worker that delivers no batch for this long stops the run, naming its shard (0: wait forever)
    stall_timeout_s: float = 120.0  # a pipe: shard that sends no bytes for this long is abandoned and counted (stalled_shard); 0: off
    drop_last: bool = True  # batches are always full (ranks must agree on batch size)
    prefetch_factor: int = 2  # batches each loader worker prepares ahead
    device_ops: list[OpSpec] = field(default_factory=list)  # batch ops on the training device after the copy: [{op: decode_jpeg}] decodes the jpeg_bytes op's output with nvjpeg on CUDA
    sources: list[SourceConfig] = field(default_factory=list)  # a mixture instead of data.train: each step's batch comes from one source, drawn by weight (the same on every rank)


@dataclass(frozen=True)
class LossPair:
    """One contrastive term: ``weight * kind(embeddings[a], embeddings[b])``."""

    a: str  # modality whose embeddings are the rows
    b: str  # modality whose embeddings are the columns
    kind: str = "clip"  # registered loss kind: clip | siglip | milnce | clip_blockwise | siglip_chunked
    weight: float = 1.0  # this term's weight in the total loss
    positives: str | None = None  # a batch key of (B,) group ids (the group_id op writes "group"): rows sharing an id are positives of each other (clip, siglip); None: the diagonal only


@dataclass(frozen=True)
class ObjectiveConfig:
    """One registered objective beside the pairs: ``weight * kind(outputs)`` while it is active."""

    kind: str  # registered objective (see "Registered names"): distill, ...
    weight: float = 1.0  # its weight in the total loss
    start_frac: float = 0.0  # active from step start_frac * train.steps on (SigLIP 2 adds its last terms at 0.8)
    params: dict[str, Any] = field(default_factory=dict)  # the objective's own typed params, checked at load


def _default_pairs() -> list[LossPair]:
    return [LossPair("image", "text", "clip", 1.0)]


@dataclass(frozen=True)
class LossConfig:
    """Which modality pairs are contrasted, and how negatives are shared across ranks."""

    pairs: list[LossPair] = field(default_factory=_default_pairs)  # the loss graph, as data
    gather_with_grad: bool = True  # all-gather negatives with gradient (exact DDP gradients)
    local_loss: bool = False  # each rank scores only its own rows against all columns
    block_size: int = 4096  # logits block side of clip_blockwise / siglip_chunked (memory O(block^2), not O(B^2))
    objectives: list[ObjectiveConfig] = field(default_factory=list)  # registered objectives added to the pairs (distillation from a teacher, ...)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (no decay on biases, norms, temperature) with linear warm-up and cosine decay."""

    lr: float = 5e-4  # peak learning rate (times each tower's lr_mult)
    weight_decay: float = 0.2  # applied to matrices only (ndim >= 2)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas, as CLIP
    eps: float = 1e-6  # AdamW epsilon
    warmup_steps: int = 100  # linear warm-up from lr/warmup_steps to lr
    schedule: Literal["cosine", "constant"] = "cosine"  # after warm-up
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip_norm: float | None = 1.0  # global gradient-norm clip (null: off)


@dataclass(frozen=True)
class FsdpConfig:
    """FSDP2 settings (``train.strategy: fsdp``): parameters, gradients and optimizer state sharded over ranks."""

    reshard_after_forward: bool = True  # free gathered block weights after forward (less memory, one more all-gather in backward)
    param_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # compute dtype of gathered weights; auto: bfloat16 when the run is bf16 on CUDA
    reduce_dtype: Literal["auto", "float32", "bfloat16"] = "float32"  # gradient reduce-scatter dtype; auto: param_dtype
    cpu_offload: bool = False  # keep sharded parameters and optimizer state in (pinned) CPU memory; CUDA only


@dataclass(frozen=True)
class TrainConfig:
    """Run length, devices, precision, logging and checkpoints."""

    name: str = "run"  # run name, used in run_dir
    run_dir: str = "runs/{name}"  # checkpoints, metrics.jsonl, tb/, resolved.yaml
    steps: int = 1000  # optimizer steps; the LR schedule spans these
    stop_after: int | None = None  # stop this invocation at this step (schedule still spans `steps`)
    accum_steps: int = 1  # micro-batches per optimizer step; exact large-batch contrastive gradients
    seed: int = 0  # model init, shuffling and augmentation all derive from it
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA (LOCAL_RANK's GPU) when available
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    grad_checkpointing: bool = False  # recompute activations in backward (less memory, one more forward per block)
    compile: bool = False  # torch.compile the model
    strategy: str = "ddp"  # how ranks share the model: ddp (replicated) or fsdp (sharded, FSDP2); see docs/training.md
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)  # used when strategy is fsdp
    threads: int | None = None  # torch intra-op threads; None: cores // ranks - data workers of every source, min 1
    log_every: int = 10  # steps between metrics records (JSONL + TensorBoard)
    ckpt_every: int = 500  # steps between checkpoints (one is also written at the end, on SIGTERM and on Ctrl-C)
    keep_last: int = 3  # checkpoints kept; older ones are deleted
    resume: str | None = None  # "latest" (the newest valid checkpoint of this run) or a checkpoint directory
    overwrite: bool = False  # start over in a run folder that holds checkpoints (deletes them and the logs); or resume an older checkpoint, deleting newer ones
    resume_allow: list[str] = field(default_factory=list)  # fields (e.g. data.batch_size, train.seed, world_size) that may differ from the checkpoint's config; the continuation is then not exact
    log_sample_keys: bool = False  # write each step's sample keys to samples.rank{N}.jsonl, one file per rank (for audits/tests)
    progress: bool = True  # tqdm progress bar with samples/s


@dataclass(frozen=True)
class EvalConfig:
    """Periodic evaluation during training, logged with the other metrics (main rank only)."""

    every: int = 0  # steps between evaluations (0: off); also runs at the last step when on
    zeroshot: list[str] = field(default_factory=list)  # [NAME@]LAYOUT=DIR image sets (see docs/evaluation.md)
    retrieval: list[str] = field(default_factory=list)  # shard specs with captions
    templates: str | list[str] = "a photo of a <>."  # a template, a list, or a named set (imagenet80)
    batch_size: int = 64  # evaluation batch size


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
