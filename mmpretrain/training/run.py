"""Build everything a run needs from a config, resume if asked, and train."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
from functools import partial
from pathlib import Path

import numpy as np
import torch

from mmpretrain.config.loader import dump_config, save_resolved
from mmpretrain.config.schema import ExperimentConfig, TrainConfig
from mmpretrain.config.strict import ConfigError
from mmpretrain.data.device import build_device_ops
from mmpretrain.data.loader import build_loader, check_shards, restart_state
from mmpretrain.data.stream import derive_seed
from mmpretrain.errors import CheckpointError
from mmpretrain.eval.runner import periodic_eval
from mmpretrain.losses import DistContext
from mmpretrain.models import build_model
from mmpretrain.models.init import init_towers
from mmpretrain.models.layout import load_weights
from mmpretrain.training.checkpoint import load_state, set_rng_state
from mmpretrain.training.dist import DistInfo, broadcast_object, init_distributed, shutdown
from mmpretrain.training.loop import Trainer
from mmpretrain.training.objectives import build_objectives
from mmpretrain.training.optim import build_optimizer, build_scheduler, restore_optimizer
from mmpretrain.training.resume import ResumePlan, StartDecision, apply_decision, choose_checkpoint, plan_resume
from mmpretrain.training.strategy import STRATEGIES, build_strategy
from mmpretrain.training.task import ContrastiveTask
from mmpretrain.training.validate import validate_experiment
from mmpretrain.utils.io import makedirs_durable

log = logging.getLogger(__name__)


def train(cfg: ExperimentConfig) -> Path:
    """Train (or resume) the run described by ``cfg``; returns its run directory."""
    validate_experiment(cfg)  # a hand-built config is checked too, before any rank starts work
    check_shards(cfg.data)  # a shard pattern that matches no file fails now, not after the model is built
    info = init_distributed(cfg.train, sharded=STRATEGIES.get(cfg.train.strategy).builder.sharded)
    trainer = None
    try:
        trainer = build_trainer(cfg, info)
        trainer.fit()
        return trainer.run_dir
    finally:
        # Free DDP's reducer (and its process-group references) while the group is alive: freed at
        # interpreter exit instead, gloo's destructor joins a thread that waits for the GIL the
        # exiting main thread holds, and the rank hangs (seen in 1 of 5 torchrun runs, torch 2.11).
        del trainer
        gc.collect()
        shutdown()


def run_dir_of(cfg: TrainConfig) -> Path:
    return Path(cfg.run_dir.format(name=cfg.name))


def agreed_start(tc: TrainConfig, run_dir: Path, info: DistInfo) -> StartDecision:
    """Where this run starts, decided once on the main rank (``resume.choose_checkpoint``) and
    broadcast, so every rank starts from the same checkpoint, or every rank raises the same error
    (a rank that raised alone would leave the others hanging)."""
    decision: dict = {"start": None, "error": None}
    if info.is_main:
        try:
            makedirs_durable(run_dir)  # its entry survives a power cut (so do the checkpoints in it)
            decision["start"] = choose_checkpoint(tc, run_dir)
        except (ConfigError, CheckpointError, FileNotFoundError) as exc:
            decision["error"] = (type(exc).__name__, str(exc))
    decision = broadcast_object(decision, info)
    if decision["error"] is not None:
        kind, message = decision["error"]
        raise {"ConfigError": ConfigError, "CheckpointError": CheckpointError}.get(kind, FileNotFoundError)(message)
    return decision["start"]


def configure_threads(cfg: ExperimentConfig) -> int:
    """Size compute threads together with data workers so the two don't oversubscribe the cores: each
    source of a mixture (``data.sources``) starts ``data.num_workers`` workers of its own."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = cfg.data.num_workers * max(1, len(cfg.data.sources))
    threads = cfg.train.threads or max(1, cores // local_ranks - workers)
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_factory(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


def restore_state(
    cfg: ExperimentConfig,
    info: DistInfo,
    state: dict | None,
    plan: ResumePlan | None,
    optimizer: torch.optim.Optimizer,
    scheduler,
    load_moments,
) -> dict | None:
    """Optimizer (``load_moments()``: the strategy's reader of either checkpoint format), schedule and
    RNG from a checkpoint's ``state`` (or fresh seeds); returns this rank's data-stream state for the
    loader (None: a fresh stream)."""
    tc = cfg.train
    if state is None:
        seed_everything(tc.seed + 1000 * info.rank)
        return None
    restore_optimizer(optimizer, scheduler, state, load_moments)
    if plan.restart_data:  # an allowed change (seed, shards, workers, ranks) voids the saved positions
        seed_everything(derive_seed(tc.seed, "restart", info.rank, int(state["step"])) % 2**32)
        return restart_state(state["data"], cfg.data, info.world_size)
    set_rng_state(state["rng"][info.rank])
    return state["data"][info.rank]


def build_trainer(cfg: ExperimentConfig, info: DistInfo) -> Trainer:
    tc = cfg.train
    threads = configure_threads(cfg)
    run_dir = run_dir_of(tc)
    start = agreed_start(tc, run_dir, info)
    ckpt = Path(start.ckpt) if start.ckpt else None
    state = load_state(ckpt) if ckpt is not None else None
    plan = plan_resume(cfg, ckpt, len(state["rng"]), info.world_size) if state is not None else None
    if info.is_main:  # only now, with the resume accepted, may the run folder change
        apply_decision(start, run_dir)
        save_resolved(cfg, run_dir)
    seed_everything(tc.seed)  # identical initial weights on every rank
    model = build_model(cfg.model).to(info.device)
    strategy = build_strategy(cfg, info)
    objectives = build_objectives(cfg.loss, model, tc.steps, info.device)  # + model.extras
    if ckpt is not None:
        load_weights(model, ckpt)
    else:  # a fresh run: towers may start from other checkpoints (model.towers.<m>.init_from)
        init_towers(model, cfg.model)
        for o in objectives:
            if o.term.init is not None:
                o.term.init(model)  # an EMA teacher starts as the initialised student
    if tc.grad_checkpointing:
        model.set_grad_checkpointing(True)
    wrapped = strategy.wrap(model)  # before the optimizer: FSDP replaces the parameters with shards
    optimizer = build_optimizer(model, cfg.optim, cfg.model)
    scheduler = build_scheduler(optimizer, cfg.optim, tc.steps)
    moments = lambda: strategy.load_moments(model, optimizer, ckpt, state)  # noqa: E731
    data_state = restore_state(cfg, info, state, plan, optimizer, scheduler, moments)
    loader = build_loader(
        cfg.data,
        model.data_context(),
        seed=tc.seed,
        rank=info.rank,
        world_size=info.world_size,
        state=data_state,
        group=tc.accum_steps,
    )
    if tc.compile:
        wrapped = torch.compile(wrapped)
    task = ContrastiveTask(
        cfg.loss,
        DistContext(info.rank, info.world_size, cfg.loss.gather_with_grad, cfg.loss.local_loss, cfg.loss.block_size),
        objectives,
    )
    log.info(
        "run %s: %d rank(s), device %s, %d thread(s), resume from %s",
        run_dir,
        info.world_size,
        info.device,
        threads,
        ckpt,
    )
    evaluate = None
    if cfg.eval.every > 0 and (cfg.eval.zeroshot or cfg.eval.retrieval):
        evaluate = partial(periodic_eval, cfg=cfg.eval)
    return Trainer(
        cfg,
        info,
        wrapped,
        model,
        optimizer,
        scheduler,
        task,
        strategy,
        loader,
        run_dir,
        dump_config(cfg),
        autocast_factory(tc, info.device),
        evaluate=evaluate,
        step=int(state["step"]) if state else 0,
        device_ops=build_device_ops(cfg.data.device_ops, model.data_context()),
    )
