"""Where checkpoints live and which one is valid: the read side of the checkpoint layout, used by
loading (``models.pretrained``), fine-tuning (``models.init``) and resuming (``training``). Writing
them is ``training.checkpoint``.

``<run>/checkpoints/step_XXXXXXXX/`` holds the weights, ``state.pt``, ``config.yaml`` and
``checksums.json`` (sha256 and size of every other file, written last). The weights are either
``model.safetensors`` (``train.strategy: ddp``: the whole model, the optimizer's moments in
``state.pt``) or ``sharded/`` (``fsdp``: a ``torch.distributed.checkpoint`` folder of each rank's
shards of the model, under ``model.``, and of the optimizer state, under ``optim.``). Either loads
into any strategy at any world size, and ``read_weights`` gives the whole model of both.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, load_model
from torch import Tensor, nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from mmpretrain.utils.io import sha256_file

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{8})$")
FORMAT = "mmpretrain-checkpoint/1"
CHECKSUMS = "checksums.json"
FILES = ("state.pt", "config.yaml")  # in every checkpoint, beside one of WEIGHTS
WEIGHTS = ("model.safetensors", "sharded/.metadata")
EXTRAS = "extras."  # the state training objectives keep in the model (an EMA teacher); models built to use skip it
SHARDED = "sharded"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def step_of(ckpt: Path) -> int:
    return int(STEP_DIR.match(Path(ckpt).name).group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Every ``step_*`` folder of a run, oldest first (valid or not: see ``verify_checkpoint``)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=step_of)


def verify_checkpoint(ckpt: Path, *, deep: bool = True) -> str | None:
    """None if ``ckpt`` is complete and matches its checksums, else what is wrong with it.
    ``deep=False`` checks presence and sizes only (no hashing).

    A checkpoint written before checksums existed (no ``checksums.json``) passes if its files exist."""
    ckpt = Path(ckpt)
    missing = [f for f in FILES if not (ckpt / f).is_file()]
    if not has_weights(ckpt):
        missing.insert(0, "model.safetensors")
    if missing:
        return f"missing {', '.join(missing)}"
    if not (ckpt / CHECKSUMS).is_file():
        log.warning("%s has no %s (written by an older version): not verified", ckpt, CHECKSUMS)
        return None
    try:
        recorded = json.loads((ckpt / CHECKSUMS).read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable {CHECKSUMS}: {exc}"
    for name, want in recorded.items():
        path = ckpt / name
        if not path.is_file():
            return f"missing {name}"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {want['bytes']} recorded"
        if deep and sha256_file(path) != want["sha256"]:
            return f"{name} does not match its sha256"
    return None


def find_latest(run_dir: Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` that passes ``verify_checkpoint``; newer broken ones
    are skipped with a warning naming them and why."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s", ckpt, problem)
    return None


def has_weights(ckpt: Path) -> bool:
    return any((Path(ckpt) / w).is_file() for w in WEIGHTS)


def load_weights(model: nn.Module, ckpt: Path, *, strict: bool = True) -> None:
    """``model``'s weights from a checkpoint folder (either weights format) or a ``.safetensors`` file."""
    ckpt = Path(ckpt)
    training_only = not any(k.startswith(EXTRAS) for k in model.state_dict())  # a model built to use, not train
    if ckpt.is_dir() and not (ckpt / "model.safetensors").is_file() and (ckpt / SHARDED).is_dir():
        state = read_sharded(ckpt / SHARDED, "model.")
        if training_only:
            state = {k: v for k, v in state.items() if not k.startswith(EXTRAS)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in _aliases(model)]  # a shared trunk is saved under one name
        if strict and (missing or unexpected):
            raise RuntimeError(f"sharded weights {ckpt}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return
    path = ckpt / "model.safetensors" if ckpt.is_dir() else ckpt
    if not path.is_file():
        raise FileNotFoundError(f"no model weights at {path}")
    if training_only and _has_extras(path):  # an objective's state (an EMA teacher): the model does not use it
        state = {k: v for k, v in load_file(str(path)).items() if not k.startswith(EXTRAS)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in _aliases(model)]
        if strict and (missing or unexpected):
            raise RuntimeError(f"weights {path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return
    missing, unexpected = load_model(model, str(path), strict=strict)
    if missing or unexpected:
        log.warning("weights %s: missing %s, unexpected %s", path, missing[:5], unexpected[:5])


def _has_extras(path: Path) -> bool:
    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith(EXTRAS) for k in f.keys())


def read_weights(ckpt: Path) -> dict[str, Tensor]:
    """The whole model's state of a checkpoint folder (either weights format), on the CPU."""
    ckpt = Path(ckpt)
    if (ckpt / "model.safetensors").is_file():
        return load_file(str(ckpt / "model.safetensors"))
    if (ckpt / SHARDED).is_dir():
        return read_sharded(ckpt / SHARDED, "model.")
    raise FileNotFoundError(f"no model weights in {ckpt} (model.safetensors or {SHARDED}/)")


def read_sharded(folder: Path, prefix: str) -> dict[str, Tensor]:
    """Every tensor under ``prefix`` of a ``torch.distributed.checkpoint`` folder, whole (shards from
    any number of ranks joined), read in this process alone (no process group), keys without ``prefix``.
    Nothing but tensors is read (no pickled payloads): see ``SafeReader`` and ``SafePlanner``."""
    meta = SafeReader(str(folder)).read_metadata().state_dict_metadata
    state = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)
    }
    load_sharded(state, folder, no_dist=True, objects=False)
    return {k[len(prefix) :]: v for k, v in state.items()}


def load_sharded(state: dict, folder: Path, *, no_dist: bool, objects: bool = True) -> None:
    """``torch.distributed.checkpoint.load`` into ``state`` (in place); ``no_dist``: this process reads
    what it needs alone, else every rank of the group takes part. The metadata is unpickled by
    ``SafeReader``; non-tensor values (``objects``: an optimizer's param groups) by
    ``torch.load(weights_only=True)``, or refused when ``objects`` is False (model weights)."""
    with warnings.catch_warnings():  # "torch.distributed is disabled ... load in a single process": the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=SafeReader(str(folder)), planner=SafePlanner(objects=objects), no_dist=no_dist)


class UnsafeCheckpoint(RuntimeError):
    """A sharded checkpoint's metadata names something other than the classes DCP writes."""


# What DCP's ``.metadata`` pickle may name (checked with torch 2.11's writer); anything else (os.system,
# builtins.eval, ...) is refused before it is called: checkpoints are trusted data, never code.
_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_CLASSES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"sharded checkpoint metadata names {module}.{name}, which DCP never writes: refused")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with its ``.metadata`` unpickled through an allow-list of DCP's own classes."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except UnsafeCheckpoint:
                raise
            except Exception as exc:  # truncated or corrupt pickle
                raise UnsafeCheckpoint(f"unreadable sharded checkpoint metadata {path}: {exc}") from None
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpoint(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor values read by ``torch.load(weights_only=True)`` (DCP's own
    uses ``weights_only=False``), or refused (``objects=False``)."""

    def __init__(self, *, objects: bool):
        super().__init__()
        self.objects = objects

    def load_bytes(self, read_item, value) -> None:
        if not self.objects:
            raise UnsafeCheckpoint(f"{read_item.dest_index.fqn}: a non-tensor value where only weights are read")
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _aliases(model: nn.Module) -> set[str]:
    """State keys that name a tensor already named earlier (a trunk shared by towers)."""
    seen, aliases = set(), set()
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            aliases.add(key)
        seen.add(id(value))
    return aliases


def write_checksums(folder: Path, step: int) -> None:
    """``checksums.json`` for every file in ``folder`` (sha256 and size of each, as read back)."""
    names = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())
    names = [n for n in names if n != CHECKSUMS]
    files = {f: {"sha256": sha256_file(folder / f), "bytes": (folder / f).stat().st_size} for f in names}
    (folder / CHECKSUMS).write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
