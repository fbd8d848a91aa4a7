"""Export formats, by registry (``EXPORT_FORMATS``; ``mmpretrain export --format``): a model written for
another runtime. ``open_clip``: an open_clip ``local-dir:`` checkpoint (``models.formats``); ``onnx``: one
ONNX file per tower for onnxruntime (``deploy.onnx_export``). Each builder is
``fn(model, out, *, towers, quantize, overwrite) -> Path``; its example: the encoding backend (and the
reference prefix) that loads the export back (the contract: the same embeddings and model id)."""

from __future__ import annotations

from pathlib import Path

from mmpretrain.deploy.onnx_export import export_onnx
from mmpretrain.models.contrastive import ContrastiveModel
from mmpretrain.models.formats import export_open_clip
from mmpretrain.registry import Registry

EXPORT_FORMATS: Registry[Path] = Registry("export format")


@EXPORT_FORMATS.register("open_clip", example={"backend": "torch", "prefix": "local-dir:"})
def _open_clip(model: ContrastiveModel, out: Path, *, towers=None, quantize=None, overwrite=False) -> Path:
    """An open_clip local-dir checkpoint (open_clip_config.json + safetensors): open_clip.create_model and
    CLIP_benchmark load it."""
    if towers or quantize:
        raise ValueError("the open_clip format writes the whole model in fp32: --towers and --quantize are for onnx")
    return export_open_clip(model, out, overwrite=overwrite)


@EXPORT_FORMATS.register("onnx", example={"backend": "onnxruntime", "prefix": ""})
def _onnx(model: ContrastiveModel, out: Path, *, towers=None, quantize=None, overwrite=False) -> Path:
    """One ONNX file per tower (dynamic batch, opset 20) + onnx_export.json, for the onnxruntime backend."""
    return export_onnx(model, out, towers=towers, quantize=quantize, overwrite=overwrite)
