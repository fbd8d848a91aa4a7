"""Process-group setup for ``torchrun`` (single process when WORLD_SIZE is unset)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mmpretrain.config.schema import TrainConfig
from mmpretrain.errors import DeviceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(cfg: TrainConfig, local_rank: int = 0) -> torch.device:
    return pick_device(cfg.device, local_rank, what="train.device")


def pick_device(device: str, local_rank: int = 0, *, what: str = "device") -> torch.device:
    """``auto`` | ``cuda`` | ``cpu`` | ``cuda:N`` ... -> a torch device. ``auto`` takes ``cuda:local_rank``
    when CUDA works, else the CPU, with a warning saying why when an NVIDIA driver is there (a torch built
    for a newer CUDA than the driver); ``cuda`` without CUDA fails, saying why. ``what`` names the setting."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DeviceError(f"{what}=cuda but CUDA is not available: {_why_no_cuda()}")
        return torch.device("cuda", local_rank)
    if device == "auto":
        if _nvidia_driver_present():
            log.warning("%s=auto: an NVIDIA driver is present but %s; running on the CPU", what, _why_no_cuda())
        return torch.device("cpu")
    return torch.device(device)


def _nvidia_driver_present() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def _why_no_cuda() -> str:
    """What to check when CUDA is not available (docs/troubleshooting.md)."""
    built = torch.version.cuda
    if built is None:
        return "this torch is a CPU build; install a CUDA wheel of the pinned torch"
    return (
        f"this torch is built for CUDA {built}, which needs a driver at least that new (nvidia-smi shows the "
        "driver's CUDA version): upgrade the driver, or install the pinned torch's wheel for an older CUDA"
    )


def init_distributed(cfg: TrainConfig, *, sharded: bool = False) -> DistInfo:
    """Join the process group that ``torchrun`` describes (NCCL on CUDA, gloo on CPU). ``sharded``: the
    strategy shards the model (``Strategy.sharded``), which needs a group even in one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg, local_rank)
    # a sharded strategy needs a group even in one process (one GPU with CPU offload): a private in-memory store then
    if (world > 1 or sharded) and not dist.is_initialized():
        backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = attempt_store() if "MASTER_ADDR" in os.environ else dist.HashStore()
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
        log.info("rank %d/%d on %s (%s)", rank, world, device, backend)
    return DistInfo(rank, world, local_rank, device)


def attempt_store() -> dist.Store:
    """The launcher's store (``env://``), under a prefix of this restart attempt
    (``TORCHELASTIC_RESTART_COUNT``). torchrun's c10d rendezvous shares one store across restarts
    with no per-attempt prefix (torch 2.11), so the group restarted after a rank died could read the
    dead group's keys (gloo's peer addresses: "connectFullMesh ... Connection refused"), depending
    on which rank wrote first: a restart failed about half the time without this."""
    store, _, _ = next(dist.rendezvous("env://"))
    return dist.PrefixStore(f"mmpretrain/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    if info.world_size == 1:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """The main rank's ``obj`` on every rank."""
    if info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is True on any rank (a MAX all-reduce)."""
    if info.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def summed_counts(counts: dict[str, int], info: DistInfo) -> dict[str, int]:
    """``counts`` summed over every rank, each key any rank has (a collective: every rank calls it)."""
    total: dict[str, int] = {}
    for part in all_gather_object(counts, info):
        for key, n in part.items():
            total[key] = total.get(key, 0) + n
    return total


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group. The barrier first: gloo's teardown can hang when ranks
    arrive at different times (seen with torch 2.11 on CPU)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
