"""How ranks share the model (``train.strategy``), one registered entry each:

    ``ddp``    every rank holds the whole model (DistributedDataParallel; gradients all-reduced).
               Checkpoint: ``model.safetensors`` + the optimizer's moments in ``state.pt``.
    ``fsdp``   FSDP2: ``fully_shard`` on each transformer block of every tower, then on the model, so
               parameters, gradients and optimizer state are split over the ranks (each block's
               weights gathered just in time). bf16 parameters / fp32 reduce on CUDA by default
               (``train.fsdp``), optional CPU offload. Checkpoint: ``sharded/``, written by every rank
               with ``torch.distributed.checkpoint``.

Both read both checkpoint formats (a DDP run resumes an FSDP checkpoint and the reverse, at any
world size), so switching strategy is a resume, and ``mmpretrain checkpoint convert`` rewrites one
format as the other offline. The scalar parameters (logit scale / bias) stay outside FSDP (it
shards along dim 0, which a 0-d tensor lacks): they are replicated, and their gradients are averaged
over the ranks here, as DDP would.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from mmpretrain.config.schema import ExperimentConfig
from mmpretrain.models import ContrastiveModel
from mmpretrain.models.layout import SHARDED, load_sharded
from mmpretrain.registry import Registry
from mmpretrain.training.checkpoint import weights_only
from mmpretrain.training.dist import DistInfo, broadcast_object

log = logging.getLogger(__name__)
STRATEGIES: Registry[Strategy] = Registry("training strategy")


class Strategy:
    """A strategy for one process (no group) or for ``info.world_size`` ranks. ``wrap`` is called once
    on the built (and possibly loaded) model, before the optimizer is built on it."""

    sharded = False

    def __init__(self, cfg: ExperimentConfig, info: DistInfo):
        self.cfg, self.info = cfg, info

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def no_sync(self, wrapped: nn.Module) -> Callable[[], contextlib.AbstractContextManager] | None:
        """A context that skips the gradient all-reduce (micro-batches before the last), or None."""
        return getattr(wrapped, "no_sync", None)

    def clip_grad_norm(self, model: nn.Module, params: list[nn.Parameter], max_norm: float | None) -> Tensor:
        """Average what the wrapper leaves unsynchronised, clip to ``max_norm`` (None: no clipping);
        returns the total gradient norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))

    def write_weights(self, folder: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Write the weights into ``folder`` (the main rank's temp checkpoint folder; None on the others)
        and return what ``state.pt`` must add (the main rank's return value is used). Called on every rank."""
        weights_only(model)(folder)
        return {"optimizer": optimizer.state_dict()} if folder is not None else {}

    def load_moments(self, model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path, state: dict) -> None:
        """The optimizer state of checkpoint ``ckpt`` (either format) into ``optimizer``."""
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
            return
        osd = _sharded_moments(model, optimizer, ckpt, no_dist=True)

        set_optimizer_state_dict(model, optimizer, osd)

    def eval_model(self, model: nn.Module) -> nn.Module | None:
        """A model the main rank can evaluate alone (None on the other ranks). Called on every rank."""
        return model if self.info.is_main else None


@STRATEGIES.register("ddp", example={"sharded": False})
class DDPStrategy(Strategy):
    """Replicate the model on every rank (DistributedDataParallel); one process: the bare model."""

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.info.world_size == 1:
            return model
        device = self.info.device
        ids = [device.index] if device.type == "cuda" else None
        # a mixture's steps may leave a tower unused (an image-text batch has no video)
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=bool(self.cfg.data.sources)
        )


@STRATEGIES.register("fsdp", example={"sharded": True})
class FSDPStrategy(Strategy):
    """Shard parameters, gradients and optimizer state over the ranks (FSDP2 ``fully_shard`` per
    transformer block); sharded ``torch.distributed.checkpoint`` checkpoints."""

    sharded = True

    def wrap(self, model: nn.Module) -> nn.Module:
        if not torch.distributed.is_initialized():  # one process: a mesh of one rank (tests, debugging)
            raise RuntimeError("train.strategy=fsdp needs a process group: launch with torchrun")
        mesh = init_device_mesh(self.info.device.type, (self.info.world_size,))
        kwargs = dict(mesh=mesh, reshard_after_forward=self.cfg.train.fsdp.reshard_after_forward, **self._policies())
        extras = {id(m) for m in model.extras.modules()}  # objectives' state: an EMA teacher, heads
        blocks = [b for b in transformer_blocks(model) if id(b) not in extras]
        for block in blocks:
            fully_shard(block, **kwargs)
        # replicated, each rank whole: the scalars, and the objectives' state (called outside the model's
        # forward: an EMA teacher runs on its own, and is updated from the gathered student)
        kept = list(model.extras.parameters())
        self.replicated = [p for p in model.parameters() if p.ndim == 0 and all(p is not k for k in kept)] + kept
        fully_shard(model, ignored_params=set(self.replicated), **kwargs)
        for method in ("encode", "patch_tokens"):  # forwards the objectives run besides the model's
            register_fsdp_forward_method(model, method)
        log.info(
            "fsdp: %d blocks sharded over %d ranks, %d tensor(s) replicated (scalars, objectives' state)",
            len(blocks),
            mesh.size(),
            len(self.replicated),
        )
        return model

    def _policies(self) -> dict[str, Any]:
        fc, tc, cuda = self.cfg.train.fsdp, self.cfg.train, self.info.device.type == "cuda"
        bf16 = tc.precision == "bf16" or (tc.precision == "auto" and cuda)
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        param = dtypes.get(fc.param_dtype, torch.bfloat16 if bf16 and cuda else torch.float32)
        reduce = dtypes.get(fc.reduce_dtype, param)
        out: dict[str, Any] = {"mp_policy": MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)}
        if fc.cpu_offload:
            if not cuda:
                raise RuntimeError("train.fsdp.cpu_offload needs CUDA (the parameters already live on the CPU)")
            out["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
        return out

    def no_sync(self, wrapped: nn.Module):
        @contextlib.contextmanager
        def skip():
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)

        return skip

    def clip_grad_norm(self, model: nn.Module, params: list[nn.Parameter], max_norm: float | None) -> Tensor:
        for p in self.replicated:  # averaged as FSDP averages the sharded ones
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(self.info.world_size)
        grads = [p.grad for p in params if p.grad is not None]
        sharded = [g for g in grads if isinstance(g, DTensor)]
        plain = [g for g in grads if not isinstance(g, DTensor)]
        norms = [torch.nn.utils.get_total_norm(sharded).full_tensor()] if sharded else []
        norms += [torch.nn.utils.get_total_norm(plain)] if plain else []
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        if max_norm is not None:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for local in [g.to_local() for g in sharded] + plain:
                local.mul_(coef.to(local.device, local.dtype))
        return total

    def write_weights(self, folder: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        msd, osd = get_state_dict(model, optimizer)
        target = broadcast_path(folder, self.info)
        with warnings.catch_warnings():  # one process (checkpoint convert): "torch.distributed is disabled ..."
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(target / SHARDED))
        return {}

    def load_moments(self, model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path, state: dict) -> None:
        if "optimizer" in state:  # a DDP checkpoint: the whole state, keyed by position -> by name
            full = fqn_moments(model, optimizer, state["optimizer"])
            set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))
            return
        set_optimizer_state_dict(model, optimizer, _sharded_moments(model, optimizer, ckpt, no_dist=False))

    def eval_model(self, model: nn.Module) -> nn.Module | None:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.info.is_main:
            return None
        copy = ContrastiveModel(model.cfg)
        copy.load_state_dict(full, strict=False)  # strict=False: a shared trunk is saved under one name
        return copy.to(self.info.device)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of every tower: the children of each ``ModuleList`` / ``Sequential`` of two or
    more modules of one class that hold parameters (open_clip's ``resblocks``, Hugging Face's
    ``layer``, timm's ``blocks``, ours), outermost first; a block's insides are not searched again."""
    found: list[nn.Module] = []
    claimed: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(c + ".") for c in claimed):
            continue
        kids = list(module.named_children())
        if (
            isinstance(module, (nn.ModuleList, nn.Sequential))
            and len(kids) >= 2
            and len({type(k) for _, k in kids}) == 1
            and any(True for _ in kids[0][1].parameters())
        ):
            found += [k for _, k in kids]
            claimed += [f"{name}.{n}" for n, _ in kids]
    return found


def broadcast_path(folder: Path | None, info: DistInfo) -> Path:
    return Path(broadcast_object(str(folder) if folder is not None else None, info))


def fqn_moments(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """A ``torch.optim`` state dict (parameters by position) -> keyed by parameter name, the form of
    ``torch.distributed.checkpoint.state_dict``. Positions follow ``optimizer.param_groups``, which
    ``build_optimizer`` fills in the same order for every strategy."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {
        "state": {order[i]: s for i, s in saved["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def _sharded_moments(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path, *, no_dist: bool) -> dict:
    """The optimizer state of a ``sharded/`` checkpoint, in ``optimizer``'s layout (whole tensors for a
    replicated model, this rank's shards for an FSDP one)."""

    osd = get_optimizer_state_dict(model, optimizer)  # initialises the moments' shapes (a zero step)
    box = {"optim": osd}
    load_sharded(box, Path(ckpt) / SHARDED, no_dist=no_dist)
    return box["optim"]


def build_strategy(cfg: ExperimentConfig, info: DistInfo) -> Strategy:
    return STRATEGIES.build(cfg.train.strategy, cfg, info)
