"""Encoding backends, by registry (``ENCODING_BACKENDS``): what embeds queries and collections behind one
interface, the one ``api.encode`` / ``encode_texts`` / ``encode_images``, ``zero_shot``, retrieval's
``Searcher``, engine and embedding job use.

``torch`` (default): a ``ContrastiveModel`` from any checkpoint ``api.load_checkpoint`` reads.
``onnxruntime``: an ONNX export folder (``mmpretrain export --format onnx``), as ``OnnxModel``.

Both give: ``modalities``, ``embed_dim``, ``device``, ``encode(m, batch, normalize=)``, ``input_spec(m)``,
``data_context()``, ``tokenizer()``, ``variable_length(m)``, ``logit_scale`` (log space), ``eval()`` and
``fingerprint()`` (the model id: an export carries the id of the model it came from, so an index built by
the torch model accepts its queries).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import Tensor

from mmpretrain.data.ops import OpContext
from mmpretrain.deploy.onnx_export import read_manifest, spec_from_record
from mmpretrain.models.pretrained import load_pretrained
from mmpretrain.registry import Registry
from mmpretrain.types import SAMPLE_DIMS, Batch, mask_key

log = logging.getLogger(__name__)
# name -> fn(source, **options) -> model; example: the kind of source it loads ("checkpoint", "onnx export")
ENCODING_BACKENDS: Registry[Any] = Registry("encoding backend")

NUMPY_DTYPES = {"int64": np.int64, "int32": np.int32, "bool": np.bool_, "float32": np.float32}


class OnnxModel:
    """An ONNX export run by onnxruntime (CPU), one session per tower, ``threads`` intra-op threads each
    (default: torch's, so the project's thread sizing holds) with spinning off: an idle session must not
    hold a core the event loop or a data worker needs."""

    def __init__(self, folder: str | Path, *, threads: int | None = None):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.embed_dim = int(self.manifest["embed_dim"])
        self.quantization = self.manifest.get("quantization")
        self.logit_scale = torch.tensor(float(self.manifest["logit_scale"]))  # log space, as ContrastiveModel's
        bias = self.manifest.get("logit_bias")
        self.logit_bias = None if bias is None else torch.tensor(float(bias))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._sessions, self._specs = {}, {}
        for m, entry in self.manifest["towers"].items():
            session = ort.InferenceSession(str(self.folder / entry["file"]), opts, providers=["CPUExecutionProvider"])
            stored = session.get_modelmeta().custom_metadata_map.get("mmpretrain.model_id")
            if stored != self.manifest["model_id"]:
                raise ValueError(
                    f"{self.folder / entry['file']} carries model id {stored}, the export's manifest "
                    f"{self.manifest['model_id']}: the folder mixes two exports; export again"
                )
            self._sessions[m] = session
            self._specs[m] = spec_from_record(m, entry["spec"], self.folder)

    @property
    def modalities(self) -> list[str]:
        return list(self._sessions)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def eval(self) -> OnnxModel:
        return self

    def to(self, device: str | torch.device) -> OnnxModel:
        if torch.device(device).type != "cpu":
            raise ValueError(f"the onnxruntime backend runs on the CPU, not {device}")
        return self

    def fingerprint(self) -> str:
        return self.manifest["model_id"]

    def variable_length(self, modality: str) -> bool:
        return bool(self.manifest["towers"][modality]["variable_length"])

    def input_spec(self, modality: str) -> Any:
        return self._specs[modality]

    def data_context(self):
        return OpContext(dict(self._specs))

    def tokenizer(self):
        if "text" not in self._specs:
            raise ValueError(f"this export has no text tower (towers: {', '.join(self.modalities)})")
        return self._specs["text"].tokenizer

    def encode(self, modality: str, batch: Batch, *, normalize: bool = True) -> Tensor:
        """As ``ContrastiveModel.encode``: (B, E), or (B, V, E) with a views axis."""
        x = batch[modality]
        if x.dim() - 1 - SAMPLE_DIMS[modality] == 1:
            b, v = x.shape[:2]
            flat = {k: t.flatten(0, 1) for k, t in batch.items() if k in (modality, mask_key(modality))}
            return self.encode(modality, flat, normalize=normalize).view(b, v, -1)
        entry, session = self.manifest["towers"][modality], self._sessions[modality]
        feeds = {}
        for spec in entry["inputs"]:
            tensor = batch.get(spec["name"])
            if tensor is None:  # a mask the batch left out: every position is real
                tensor = torch.ones(batch[modality].shape[: 1 + (batch[modality].dim() > 1)], dtype=torch.bool)
            feeds[spec["name"]] = tensor.detach().cpu().numpy().astype(NUMPY_DTYPES[spec["dtype"]], copy=False)
        features = torch.from_numpy(session.run(None, feeds)[0])
        return F.normalize(features, dim=-1) if normalize else features


@ENCODING_BACKENDS.register("torch", example="checkpoint")
def torch_backend(source: str | Path, **kwargs: Any):
    """PyTorch eager: a ``ContrastiveModel`` from a checkpoint, run folder or open_clip/HF folder."""

    return load_pretrained(source).eval()


@ENCODING_BACKENDS.register("onnxruntime", example="onnx export")
def onnxruntime_backend(source: str | Path, *, threads: int | None = None, **kwargs: Any) -> OnnxModel:
    """onnxruntime (CPU): a folder written by ``mmpretrain export --format onnx`` (fp32 or int8)."""
    return OnnxModel(source, threads=threads)


def load_backend(name: str, source: str | Path, **kwargs: Any):
    """The ``name`` backend's model from ``source`` (a checkpoint for torch; an export for onnxruntime)."""
    return ENCODING_BACKENDS.build(name, source, **kwargs)
