"""The public surface of mmpretrain. Everything else is internal and may change.

>>> from mmpretrain import api
>>> cfg = api.load_config("configs/experiment/smoke.yaml", ["train.steps=50"])
>>> run_dir = api.train(cfg)
>>> model = api.load_checkpoint(run_dir / "checkpoints")     # newest checkpoint
>>> emb = api.encode(model, "text", api.tokenize(model, ["a red circle"]))  # (1, E)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmpretrain import files
from mmpretrain.config.schema import DataConfig, ExperimentConfig, ModelConfig
from mmpretrain.config.strict import ConfigError
from mmpretrain.data.loader import expand_shards
from mmpretrain.data.ops import ImageTooLarge, open_image
from mmpretrain.data.shards import Manifest, ShardWriterConfig, make_shards
from mmpretrain.deploy.backends import ENCODING_BACKENDS, load_backend
from mmpretrain.deploy.onnx_export import export_onnx as _export_onnx
from mmpretrain.encoders import ENCODERS
from mmpretrain.eval.inputs import (
    EvalInput,
    trim_padding,  # noqa: F401  (importable from here, as before)
)
from mmpretrain.eval.inputs import encode_texts as _encode_texts
from mmpretrain.eval.items import input_batches as _input_batches
from mmpretrain.eval.items import item_batches as _item_batches
from mmpretrain.eval.jobs import EVAL_JOBS, build_job
from mmpretrain.eval.zeroshot import ZeroShotClassifier
from mmpretrain.models.contrastive import ContrastiveModel
from mmpretrain.models.formats import export_open_clip as _export_open_clip
from mmpretrain.models.generate import generate_text
from mmpretrain.models.pretrained import create_model as _create
from mmpretrain.models.pretrained import load_pretrained
from mmpretrain.registry import Registry, RegistryError
from mmpretrain.training.convert import convert_checkpoint as _convert
from mmpretrain.training.dist import pick_device
from mmpretrain.training.run import train as _train
from mmpretrain.training.validate import load_experiment
from mmpretrain.types import Batch

# ``files``: durable atomic writes (mmpretrain.files); ``Registry``: the plugin mechanism, for tools
# keeping registries of their own (retrieval's index types)
__all__ = [
    "ConfigError",
    "ContrastiveModel",
    "DataConfig",
    "ExperimentConfig",
    "ImageTooLarge",
    "Manifest",
    "ModelConfig",
    "Registry",
    "RegistryError",
    "ShardWriterConfig",
    "caption",
    "convert_checkpoint",
    "create_model",
    "encode",
    "encode_images",
    "encode_texts",
    "eval_input",
    "evaluate",
    "expand_sources",
    "export_onnx",
    "export_open_clip",
    "files",
    "image_transform",
    "input_batches",
    "item_batches",
    "list_backends",
    "resolve_device",
    "list_encoders",
    "list_eval_jobs",
    "load_checkpoint",
    "load_config",
    "load_model",
    "make_shards",
    "model_id",
    "open_image",
    "tokenize",
    "train",
    "zero_shot",
]


def create_model(
    name: ModelConfig | dict[str, Any] | str | Path, *, pretrained: str | Path | None = None
) -> ContrastiveModel:
    """Build a model, optionally with pretrained weights, offline.

    ``name``: an open_clip model name (``"ViT-B-32"``), ``"local-dir:PATH"`` (an open_clip
    folder with ``open_clip_config.json``), one of our YAML configs, a ``model:`` mapping or a
    ``ModelConfig``. ``pretrained``: our checkpoint directory (or a run's ``checkpoints/``),
    an open_clip ``.pt``/``.bin``/``.safetensors`` file, or an open_clip folder.
    """

    return _create(name, pretrained).eval()


def load_checkpoint(path: str | Path) -> ContrastiveModel:
    """A model from any supported checkpoint: our checkpoint directory (or a run folder or its
    ``checkpoints/``: the newest valid one), an open_clip folder, or a Hugging Face CLIP folder."""

    return load_pretrained(path).eval()


def export_open_clip(model: ContrastiveModel, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` as an open_clip ``local-dir:`` checkpoint that open_clip and CLIP_benchmark load.
    An earlier export in ``out_dir`` is replaced; any other existing folder only with ``overwrite``."""

    return _export_open_clip(model, out_dir, overwrite=overwrite)


def export_onnx(
    model: ContrastiveModel,
    out_dir: str | Path,
    *,
    towers: Sequence[str] | None = None,
    quantize: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s towers (all, or ``towers``) as ONNX files (dynamic batch; dynamic text length for
    mask-aware text towers; opset 20) with ``onnx_export.json`` (model id, inputs, preprocessing, tokenizer),
    each checked against the model with onnxruntime; ``quantize="int8"``: dynamic int8 MatMuls. Load it
    with ``load_model(out_dir, backend="onnxruntime")``. A tower that cannot be exported raises
    ``ExportError`` naming the operator."""

    return _export_onnx(model, out_dir, towers=list(towers) if towers else None, quantize=quantize, overwrite=overwrite)


def load_model(source: str | Path, *, backend: str = "torch", **kwargs: Any):
    """A model to encode with, from an encoding backend (``list_backends()``): ``torch`` loads any
    checkpoint ``load_checkpoint`` reads; ``onnxruntime`` an ONNX export (``threads=``: intra-op threads,
    default torch's). Either works with ``encode``, ``encode_texts``, ``encode_images``, ``zero_shot``
    and ``model_id``."""

    return load_backend(backend, source, **kwargs)


def resolve_device(device: str = "auto", local_rank: int | None = None, *, what: str = "device") -> torch.device:
    """``auto`` (``cuda:LOCAL_RANK`` when CUDA works, else the CPU, warning why when an NVIDIA driver is
    there but CUDA is not), ``cpu``, ``cuda``, ``cuda:N``: the device training uses by the same rule.
    ``cuda`` where CUDA does not work is a ``ValueError`` saying why; ``what`` names the setting in both."""
    rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    return pick_device(device, rank, what=what)


def list_backends() -> list[str]:
    """The registered encoding backends (``load_model(..., backend=)``)."""

    return ENCODING_BACKENDS.names()


def convert_checkpoint(src: str | Path, out: str | Path, *, to: str) -> Path:
    """Rewrite our checkpoint ``src`` in the format of ``train.strategy`` ``to``: ``ddp``
    (``model.safetensors``) or ``fsdp`` (``sharded/``, torch.distributed.checkpoint), into the new
    folder ``out``. Weights, optimizer state, schedule and data positions carry over unchanged."""

    return _convert(src, out, to)


def zero_shot(
    templates: str | Sequence[str], classes: Iterable[str], *, model: ContrastiveModel | str | Path, **kwargs: Any
):
    """A zero-shot classifier: ``clf.predict(images)``, ``clf.logits(...)``, ``clf.classes``,
    ``clf.weights``. ``templates``: ``"a photo of a <>"``, a list, or a named set (``"imagenet80"``).
    ``model``: a model or anything ``load_checkpoint`` takes."""

    if isinstance(model, (str, Path)):
        model = load_checkpoint(model)
    return ZeroShotClassifier(model, list(classes), templates, **kwargs)


def tokenize(model: ContrastiveModel, texts: Iterable[str]) -> Batch:
    """Texts -> ``{"text": (B, L) int64, "text_mask": (B, L) bool, True = real token}``."""
    texts = list(texts)
    if not texts:
        raise ValueError("tokenize: no texts given")
    return model.tokenizer()(texts)


@torch.no_grad()
def encode(model: ContrastiveModel, modality: str, batch: Batch, *, normalize: bool = True) -> Tensor:
    """Embed ``batch[modality]`` -> (B, E), L2-normalised unless ``normalize=False``."""
    if modality not in model.modalities:
        raise ValueError(f"model has no {modality!r} tower (towers: {', '.join(model.modalities)})")
    device = model.device
    return model.encode(modality, {k: v.to(device) for k, v in batch.items()}, normalize=normalize)


def image_transform(model: ContrastiveModel):
    """The model's evaluation preprocessing of images (``eval.inputs.EvalInput``): a PIL image, image
    bytes or file -> normalised (3, H, W) tensor. Picklable, so it can run in another process."""
    return eval_input(model, "image")


def eval_input(model: ContrastiveModel, modality: str = "image"):
    """``modality``'s evaluation preprocessing for ``model`` (``eval.inputs.EvalInput``): raw samples,
    files, bytes or PIL images -> the tower's input. Picklable and small (no weights): send it to
    the processes that decode (``input_batches``)."""

    return EvalInput(model, modality)


def input_batches(inputs, source: str, *, batch_size: int = 64, thumb_size: int = 128):
    """``item_batches`` driven by an ``eval_input`` instead of a model: what a process holding no
    weights (a Ray task decoding for model actors) runs; the batches are the same."""

    return _input_batches(inputs, source, batch_size=batch_size, thumb_size=thumb_size)


def encode_texts(model: ContrastiveModel, texts: Sequence[str], *, batch_size: int = 256) -> Tensor:
    """Texts -> (N, E) L2-normalised embeddings, tokenised and encoded in batches (padding trimmed)."""
    return _encode_texts(model, texts, batch_size=batch_size)


@torch.no_grad()
def encode_images(model: ContrastiveModel, images: Sequence[Any], *, batch_size: int = 64) -> Tensor:
    """Images (PIL images, image files or bytes) -> (N, E) L2-normalised embeddings, with the model's
    evaluation preprocessing. Files and bytes are decoded by ``open_image`` (JPEG/PNG/WEBP/BMP/GIF)."""
    transform, images = image_transform(model), list(images)
    if not images:
        raise ValueError("encode_images: no images given")
    return torch.cat(
        [encode(model, "image", transform.batch(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    )


@torch.no_grad()
def caption(
    model: ContrastiveModel,
    images: Sequence[Any],
    *,
    method: str = "greedy",
    max_len: int = 20,
    min_len: int = 0,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    batch_size: int = 32,
) -> list[str]:
    """A caption per image (PIL images, image files or bytes, as ``encode_images`` takes them) from the
    model's captioning decoder (``model.decoder``: coca or locca): ``method`` ``"greedy"`` or ``"beam"``
    (``num_beams`` hypotheses, scored by log-probability / length ** ``length_penalty``); ``max_len``
    tokens at most, the end token included, and none of them the end before ``min_len``."""

    transform, images = image_transform(model), list(images)
    if not images:
        raise ValueError("caption: no images given")
    options = {"method": method, "max_len": max_len, "min_len": min_len, "num_beams": num_beams}
    out = []
    for i in range(0, len(images), batch_size):
        batch = transform.batch(images[i : i + batch_size])["image"]
        out += generate_text(model, batch, **options, length_penalty=length_penalty)
    return out


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """A layered YAML experiment config with ``key.sub=value`` overrides, checked against every registry."""

    return load_experiment(path, overrides)


def train(config: ExperimentConfig | str | Path, overrides: Iterable[str] = ()) -> Path:
    """Train (or resume, with ``train.resume=latest``); returns the run directory."""

    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides)
    return _train(cfg)


def evaluate(model: ContrastiveModel | str | Path, job: str, **params: Any) -> dict[str, Any]:
    """Run the evaluation ``job`` (``list_eval_jobs()``: zeroshot, retrieval, robustness, hard, media,
    captioning, linear-probe) and return its JSON-able report, as ``mmpretrain eval <job>`` writes it
    (its ``model`` when given a path; the ``hard`` job names its reference by model id unless given
    ``reference_name``, where the command line uses ``--model``).
    ``params``: the job's parameters, named as its command-line flags (``data``, ``templates``,
    ``batch_size``, ...); set specs are parsed and checked before the model loads. ``model``: a model or
    anything ``load_checkpoint`` takes.

    Example:
        >>> api.evaluate(model, "zeroshot", data=["pets@folder=/data/pets"], templates="a photo of a <>")
    """
    built = build_job(job, params)  # a typo in a set spec or a parameter fails here
    if not isinstance(model, (str, Path)):
        return built.run(model).report
    return {**built.run(load_checkpoint(model)).report, "model": str(model)}  # as the command line records it


def list_eval_jobs() -> list[str]:
    """The evaluation jobs ``evaluate`` runs (``EVAL_JOBS``)."""
    return EVAL_JOBS.names()


def list_encoders() -> dict[str, list[str]]:
    """Registered encoder names per modality."""

    return {m: reg.names() for m, reg in ENCODERS.items()}


def expand_sources(spec: str) -> list[str]:
    """A collection to embed -> its sources, in a stable order: shard specs (paths, directories of
    ``.tar``, brace patterns, ``::`` lists, ``pipe:`` URLs), or a folder of image files (one source)."""

    path = Path(spec)
    if path.is_dir() and not any(path.glob("*.tar")):
        return [str(path)]
    return expand_shards(spec)


def item_batches(
    model: ContrastiveModel, source: str, *, batch_size: int = 64, thumb_size: int = 128, modality: str = "image"
):
    """Preprocessed batches of one source (``ItemBatch``: ``inputs={modality: (B, ...)}``, ``keys``,
    ``captions``, ``sources``, JPEG ``thumbnails``; ``skipped`` and ``complete`` on the last batch): a
    shard, or a folder of files, of any modality, with the model's evaluation preprocessing."""

    if modality not in model.modalities:
        raise ValueError(f"model has no {modality!r} tower (towers: {', '.join(model.modalities)})")
    return _item_batches(model, source, modality, batch_size=batch_size, thumb_size=thumb_size)


def model_id(model: ContrastiveModel) -> str:
    """A fingerprint of what decides a model's embeddings (16 hex digits): its weights and every tower's
    input spec (image size, mean, std, interpolation; video frames, fps, size, normalisation; audio sample
    rate and length; the text tokenizer's kind and context length). The same weights loaded from our checkpoint
    or from an open_clip export give the same id, and an ONNX export (fp32 or int8) carries the id of the
    model it came from; embeddings and indexes record it, so a query model that differs from the indexing
    model is caught."""
    return model.fingerprint()
