"""Run under ``torchrun --nproc_per_node 2``: for each loss mode, the DDP loss and gradients
equal one process on the concatenated batch. Writes a JSON report to argv[1] (rank 0)."""
from __future__ import annotations

import copy
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from mmpretrain.training.validate import experiment_from_tree
from mmpretrain.config.schema import LossConfig, LossPair, ObjectiveConfig
from mmpretrain.losses import LOSSES, DistContext
from mmpretrain.losses.contrastive import takes_groups
from mmpretrain.models import build_model
from mmpretrain.models.pretrained import _example_ours
from mmpretrain.training.objectives import build_objectives
from mmpretrain.training.task import ContrastiveTask
from tests.conftest import TINY_MODEL

# (loss kind, gather_with_grad, local_loss, masked): masked batches lack images for some samples
# (image_valid False), unevenly across the two ranks; milnce batches carry 2 captions per sample.
# extra: None; "groups" (several positives per row, groups spanning both ranks: the kinds that take
# them); "distill" (the clip pair plus the distill objective, a teacher's similarity matrices).
MODES = [(kind, gwg, local, masked, extra)
         for kind, extra in [(k, None) for k in LOSSES.names()] + [(k, "groups") for k in LOSSES.names()
                                                                  if takes_groups(k)]
                            + [("clip", "distill"), ("clip", "self_distill"), ("clip", "masked_prediction")]
         for masked in (False, True)
         for gwg, local in ((True, False), (True, True), (False, False))]
HEAD = {"prototypes": 16, "hidden": 16, "bottleneck": 8}
SELF_DISTILL = {"global_crops": 1, **HEAD}
VALID = torch.tensor([True, False, True, True, False, False, False, True])  # rank 0: 3 of 4 valid, rank 1: 1 of 4
GROUPS = torch.tensor([0, 1, 0, 2, 1, 3, 2, 0])  # rank 0 holds 0, 1, 0, 2; rank 1 holds 1, 3, 2, 0


def full_batch(model, kind: str, masked: bool, n=8):
    g = torch.Generator().manual_seed(123)
    k = LOSSES.get(kind).make_example()["views"]
    tok = model.tokenizer()([f"caption {i} take {j}" for i in range(n) for j in range(k)])
    if k > 1:
        tok = {key: v.view(n, k, -1) for key, v in tok.items()}
    batch = {"image": torch.randn(n, 3, 32, 32, generator=g), **tok}
    if masked:
        batch["image_valid"] = VALID.clone()
    batch["group"] = GROUPS.clone()
    batch["image_crops"] = torch.randn(n, 3, 3, 32, 32, generator=g)  # 1 global + 2 local (self_distill)
    batch["patch_mask"] = torch.rand(n, 16, generator=g) < 0.5  # the tiny tower's 4 x 4 patches (masked_prediction)
    return batch


def loss_config(kind: str, extra: str | None, teacher: str) -> LossConfig:
    pairs = [LossPair("image", "text", kind, positives="group" if extra == "groups" else None)]
    objectives = {
        "distill": [ObjectiveConfig("distill", params={"teacher": teacher})],
        "self_distill": [ObjectiveConfig("self_distill", params=SELF_DISTILL)],
        "masked_prediction": [ObjectiveConfig("masked_prediction", params=HEAD)],
    }
    return LossConfig(pairs=pairs, objectives=objectives.get(extra, []))


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    # float64: the comparison checks the maths; float32 differs only by summation order (~5e-7 relative)
    torch.set_default_dtype(torch.float64)
    report = {}
    teacher = str(_example_ours(Path(tempfile.mkdtemp(prefix=f"teacher{rank}-")))[0])  # the same weights on each rank
    for kind, gwg, local, masked, extra in MODES:
        tree = {"model": {**TINY_MODEL, "logit_bias_init": LOSSES.get(kind).make_example()["logit_bias"]}}
        torch.manual_seed(0)
        base = build_model(experiment_from_tree(tree).model)
        cfg = loss_config(kind, extra, teacher)
        objectives = build_objectives(cfg, base, steps=1)  # before the copies: they carry its state
        for o in objectives:
            if o.term.init is not None:
                o.term.init(base)
        batch = full_batch(base, kind, masked)
        n = batch["image"].shape[0] // world
        mine = {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}
        ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        task = ContrastiveTask(cfg, DistContext(rank, world, gwg, local, block=3), objectives)
        loss = task.losses(task.outputs(ddp, mine))["loss"]
        loss.backward()
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        if rank == 0:
            single = copy.deepcopy(base)
            ref_task = ContrastiveTask(cfg, DistContext(), objectives)
            ref = ref_task.losses(ref_task.outputs(single, batch))["loss"]
            ref.backward()
            ours = dict(ddp.module.named_parameters())
            diffs = {name: (ours[name].grad - p.grad).abs().max().item()
                     for name, p in single.named_parameters() if p.grad is not None}
            report[f"{kind}{'-' + extra if extra else ''}-gwg{int(gwg)}-local{int(local)}-masked{int(masked)}"] = {
                "loss_diff": abs(torch.stack(losses).mean().item() - ref.item()),
                "max_grad_diff": max(diffs.values()),
                "grad_scale": max(p.grad.abs().max().item() for p in single.parameters() if p.grad is not None),
                "n_grads": len(diffs),
            }
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()  # gloo's teardown can hang when ranks arrive at different times
    # Free the DDP reducers while the group is alive: freed at interpreter exit instead, gloo's
    # destructor joins a worker thread that waits for the GIL the exiting main thread holds
    # (py-spy: ~ProcessGroupGloo -> thread::join; AsyncAllgatherWork dtor -> gil_scoped_acquire).
    del ddp, loss
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
