"""ONNX export of a model's towers: ``<modality>.onnx`` per tower (what ``encode`` computes before the L2
normalisation: the tower and its head), dynamic batch (and dynamic text length for mask-aware towers),
opset 20 through torch's dynamo exporter, each file checked against the model with onnxruntime before
the folder is written; beside them ``onnx_export.json``: the model id, the embedding width, and each
tower's inputs and preprocessing (its image size and normalisation, or its tokenizer, saved in the folder).

A tower the exporter cannot convert fails with ``ExportError`` naming the operator.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import onnxruntime as ort
import torch
from torch import Tensor, nn

from mmpretrain.deploy.quantize import QUANTIZERS
from mmpretrain.encoders import load_tokenizer
from mmpretrain.models.contrastive import ContrastiveModel
from mmpretrain.models.lora import merged
from mmpretrain.types import SPEC_TYPES, TextSpec, mask_key
from mmpretrain.utils.io import atomic_dir

log = logging.getLogger(__name__)
MANIFEST, FORMAT = "onnx_export.json", 1
OPSET = 20  # torch 2.11's dynamo exporter's default; onnxruntime >= 1.20 runs it (int64 ArgMax: EOT pooling)
EXAMPLE_BATCH, EXAMPLE_LENGTH = 3, 7  # distinct and > 1: torch.export specialises sizes 0 and 1 and equal sizes
ATOL = 1e-4  # the export is checked against the model at a new batch size before it is written


class ExportError(RuntimeError):
    """A tower could not be exported (the operator the exporter has no conversion for is named)."""


class _Tower(nn.Module):
    """``heads[m](towers[m](batch))`` with named tensor arguments (the ONNX input names)."""

    def __init__(self, model: ContrastiveModel, modality: str):
        super().__init__()
        self.tower, self.head, self.modality = model.towers[modality], model.heads[modality], modality

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.tower({self.modality: x}))


class _MaskedTower(_Tower):
    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.head(self.tower({self.modality: x, mask_key(self.modality): mask}))


def example_inputs(model: ContrastiveModel, modality: str) -> dict[str, Tensor]:
    """The tower's own example batch (its input names and dtypes), at the export's example sizes."""
    batch = model.towers[modality].example_batch(EXAMPLE_BATCH)
    if model.variable_length(modality):
        batch = {k: v[:, :EXAMPLE_LENGTH] for k, v in batch.items()}
        batch[mask_key(modality)][:, :2] = True  # every row keeps a few real tokens
    return batch


def export_tower(model: ContrastiveModel, modality: str, path: Path, opset: int = OPSET) -> dict:
    """``modality``'s tower and head -> ``path`` (one file, weights inside); its inputs, for the manifest."""
    batch = example_inputs(model, modality)
    names = list(batch)
    if len(names) > 2:
        raise ExportError(f"the {modality} tower takes {names}: at most an input and its mask can be exported")
    module = (_MaskedTower if len(names) == 2 else _Tower)(model, modality).eval()
    seq = model.variable_length(modality)
    axes = {0: "batch", 1: "sequence"} if seq else {0: "batch"}
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                module,
                tuple(batch[k] for k in names),
                dynamo=True,
                opset_version=opset,
                input_names=names,
                output_names=["features"],
                dynamic_shapes=tuple(axes for _ in names),
                verbose=False,
            )
    except Exception as exc:  # the exporter wraps its reasons several layers deep
        raise ExportError(f"model.towers.{modality} ({type(model.towers[modality]).__name__}): {_reason(exc)}") from exc
    program.save(str(path), external_data=False)
    return {
        "file": path.name,
        "inputs": [{"name": k, "dtype": str(batch[k].dtype).removeprefix("torch."), "dynamic": axes} for k in names],
        "output": "features",
    }


def _reason(exc: BaseException) -> str:
    """The operator the exporter could not convert, or the first line of torch.export's complaint."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    for text in chain:
        op = re.search(r"op='([\w.:]+)'", text) or re.search(r"No ONNX function found for ([\w.:]+)", text)
        if op:
            return f"operator {op.group(1)} has no ONNX conversion at opset {OPSET}"
    lines = [x.strip() for text in chain for x in text.splitlines() if x.strip() and "This is step" not in x]
    return lines[-1] if lines else "the exporter failed"


def spec_record(spec: Any, folder: Path) -> dict:
    """A tower's input spec as JSON: the dataclass's fields, or a text tower's saved tokenizer."""
    if isinstance(spec, TextSpec):
        return {"tokenizer": spec.tokenizer.save(folder)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()}


def spec_from_record(modality: str, record: dict, folder: Path) -> Any:
    cls = SPEC_TYPES[modality]
    if cls is TextSpec:
        return TextSpec(load_tokenizer(record["tokenizer"], folder))
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})


def check_tower(model: ContrastiveModel, modality: str, path: Path) -> float:
    """The largest absolute difference between the file (onnxruntime) and the model, at batch 5."""

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = model.towers[modality].example_batch(5)
    with torch.no_grad():
        ref = model.encode(modality, batch, normalize=False).float().numpy()
    got = session.run(None, {i.name: batch[i.name].numpy() for i in session.get_inputs()})[0]
    return float(np.abs(got - ref).max())


def export_onnx(
    model: ContrastiveModel,
    out_dir: str | Path,
    *,
    towers: list[str] | None = None,
    opset: int = OPSET,
    quantize: str | None = None,
    overwrite: bool = False,
) -> Path:
    """``model``'s towers (all, or ``towers``) -> ONNX files + ``onnx_export.json`` in ``out_dir``, each
    checked against the model (max abs diff <= 1e-4) before the folder is written (atomically);
    ``quantize="int8"``: onnxruntime's dynamic int8 quantisation of the MatMuls (``deploy.quantize``)."""

    model = merged(model).float().cpu().eval()  # LoRA adapters folded into the weights (models.lora)
    chosen = towers or model.modalities
    unknown = [m for m in chosen if m not in model.modalities]
    if unknown:
        raise ValueError(f"no {unknown[0]!r} tower to export (towers: {', '.join(model.modalities)})")
    quantizer = QUANTIZERS.get(quantize) if quantize else None
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file() and not overwrite:
        raise FileExistsError(f"{out} holds other files; pass overwrite to replace it")
    manifest = {"format": FORMAT, "model_id": model.fingerprint(), "embed_dim": model.embed_dim, "opset": opset}
    manifest["logit_scale"] = model.logit_scale.item()  # log space, as the model keeps it: zero-shot logits
    manifest["logit_bias"] = None if model.logit_bias is None else model.logit_bias.item()
    manifest.update({"quantization": quantize, "versions": _versions(), "towers": {}})
    with atomic_dir(out) as tmp:
        for m in chosen:
            path = tmp / f"{m}.onnx"
            entry = export_tower(model, m, path, opset)
            entry["max_abs_diff"] = diff = check_tower(model, m, path)
            if diff > ATOL:
                raise ExportError(f"the exported {m} tower differs from the model by {diff:.2e} (> {ATOL})")
            if quantizer is not None:
                entry["quantization"] = quantizer.builder(path)
            entry["variable_length"] = model.variable_length(m)
            entry["spec"] = spec_record(model.input_spec(m), tmp)
            _stamp(path, manifest, m)
            manifest["towers"][m] = entry
            log.info("exported the %s tower: %s (max abs diff %.1e)", m, path.name, diff)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _stamp(path: Path, manifest: dict, modality: str) -> None:
    """The model id and modality inside the file too (``metadata_props``), so a file alone says what it is."""
    proto = onnx.load(str(path))
    props = {"mmpretrain.model_id": manifest["model_id"], "mmpretrain.modality": modality}
    props["mmpretrain.quantization"] = manifest["quantization"] or "none"
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))


def _versions() -> dict:
    import onnxscript

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not an ONNX export (no {MANIFEST}; write one with `mmpretrain export --format onnx`)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: export format {manifest.get('format')!r}, this version reads {FORMAT}")
    return manifest
