"""The train loop: micro-batches -> task.forward_backward -> clip -> step -> log -> checkpoint.

It knows nothing of modalities or losses (the task does); it is the same for CLIP and VATT.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mmpretrain.config.schema import ExperimentConfig
from mmpretrain.data.device import BatchOp, DeviceFeed
from mmpretrain.data.loader import MixedLoader, ResumableLoader
from mmpretrain.models import ContrastiveModel
from mmpretrain.training.checkpoint import rng_state, save_checkpoint
from mmpretrain.training.dist import DistInfo, all_gather_object, any_rank, summed_counts
from mmpretrain.training.metrics import MetricsLogger, truncate_jsonl
from mmpretrain.training.strategy import Strategy
from mmpretrain.training.task import ContrastiveTask
from mmpretrain.utils.faults import crash_point

log = logging.getLogger(__name__)


@dataclass
class Trainer:
    cfg: ExperimentConfig
    info: DistInfo
    model: nn.Module  # possibly DDP-wrapped / compiled
    raw: ContrastiveModel  # the bare model: checkpoints, logit-scale clamp
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    task: ContrastiveTask
    strategy: Strategy  # how the ranks share the model: sync, clipping, checkpoint weights
    loader: ResumableLoader | MixedLoader
    run_dir: Path
    config_yaml: str
    autocast: Callable[[], ContextManager]
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None  # periodic evaluation hook (main rank)
    device_ops: list[BatchOp] = field(default_factory=list)  # data.device_ops, built
    step: int = 0
    _stop_signal: bool = field(default=False, repr=False)

    def fit(self) -> int:
        """Train until ``train.stop_after`` (or ``train.steps``); returns the last step."""
        tc = self.cfg.train
        stop = min(tc.stop_after or tc.steps, tc.steps)
        logger = MetricsLogger(self.run_dir, enabled=self.info.is_main, resume_step=self.step)
        keys_log = self._keys_log()
        previous = self._catch_stops() if _main_thread() else None
        data = DeviceFeed(iter(self.loader), self.info.device, self.device_ops, seed=tc.seed, rank=self.info.rank)
        bar = tqdm(
            total=stop,
            initial=self.step,
            unit="step",
            disable=not (tc.progress and self.info.is_main),
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )  # logs to files: a line per 30 s
        window = _Window(time.perf_counter())
        stopping = False
        try:
            while self.step < stop and not stopping:
                t0 = time.perf_counter()
                micro = [next(data) for _ in range(tc.accum_steps)]
                window.data_time += time.perf_counter() - t0
                losses, grad_norm = self._train_step([b.data for b in micro])
                self.step += 1
                crash_point("train.step")
                window.samples += sum(len(b.keys) for b in micro) * self.info.world_size
                if keys_log is not None:
                    keys_log.write(json.dumps({"step": self.step, "keys": [k for b in micro for k in b.keys]}) + "\n")
                    keys_log.flush()
                if self.step % tc.log_every == 0 or self.step == stop:
                    values = self._metrics(losses, grad_norm, window)
                    logger.log(self.step, values)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", sps=f"{values['samples_per_s']:.1f}")
                    window = _Window(time.perf_counter())
                bar.update(1)
                if self._eval_due(stop):
                    self._run_eval(logger)
                # every rank decides together: a SIGTERM seen by one rank stops all of them after this step
                stopping = any_rank(self._stop_signal, self.info)
                if self.step % tc.ckpt_every == 0 or self.step == stop or stopping:
                    self.save()
        finally:
            bar.close()
            logger.close()
            if keys_log is not None:
                keys_log.close()
            for signum, handler in (previous or {}).items():
                signal.signal(signum, handler)
        return self.step

    def _train_step(self, micro: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        self.model.train()
        device = self.info.device
        micro = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in micro]  # DeviceFeed moved them
        no_sync = self.strategy.no_sync(self.model)
        losses = self.task.forward_backward(
            self.model, micro, autocast=self.autocast, step=self.step, **({"no_sync": no_sync} if no_sync else {})
        )
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(
                f"loss is {losses['loss'].item()} at step {self.step + 1}; lower optim.lr or raise optim.warmup_steps"
            )
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = self.strategy.clip_grad_norm(self.raw, params, self.cfg.optim.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.raw.clamp_logit_scale()
        self.task.after_step(self.raw, self.step)
        return losses, grad_norm

    def _metrics(self, losses: dict[str, torch.Tensor], grad_norm: torch.Tensor, window: _Window) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        values: dict[str, Any] = {k: float(v) for k, v in losses.items()}
        values.update(
            lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=float(grad_norm),
            logit_scale=float(self.raw.logit_scale.detach().exp()),
            samples_per_s=window.samples / elapsed,
            data_wait_frac=window.data_time / elapsed,
        )
        if self.info.device.type == "cuda":  # peak since the last log line, then reset
            values["cuda_max_mem_gib"] = torch.cuda.max_memory_allocated(self.info.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.info.device)
        # every rank's workers' skips (a collective: every rank logs at the same steps)
        for kind, n in sorted(summed_counts(self.loader.error_counts(), self.info).items()):
            values[f"data/skipped_{kind}"] = n
        return values

    def _eval_due(self, stop: int) -> bool:
        every = self.cfg.eval.every
        return self.evaluate is not None and every > 0 and (self.step % every == 0 or self.step == stop)

    def _run_eval(self, logger: MetricsLogger) -> None:
        model = self.strategy.eval_model(self.raw)  # every rank: a sharded model is gathered for the main one
        if self.info.is_main:
            with torch.no_grad():
                logger.log(self.step, self.evaluate(model))
        if self.info.world_size > 1:
            torch.distributed.barrier()

    def save(self) -> None:
        """Gather every rank's data position and RNG state; the main rank writes the checkpoint, with the
        weights written as the strategy says (by the main rank, or a shard by every rank)."""
        per_rank = all_gather_object({"data": self.loader.state_dict(), "rng": rng_state()}, self.info)
        state = None
        if self.info.is_main:
            state = {
                "scheduler": self.scheduler.state_dict(),
                "data": [r["data"] for r in per_rank],
                "rng": [r["rng"] for r in per_rank],
            }
        save_checkpoint(
            self.run_dir,
            self.step,
            lambda folder: self.strategy.write_weights(folder, self.raw, self.optimizer),
            state,
            self.config_yaml,
            keep_last=self.cfg.train.keep_last,
            info=self.info,
        )

    def _keys_log(self):
        if not self.cfg.train.log_sample_keys:
            return None
        path = self.run_dir / f"samples.rank{self.info.rank}.jsonl"
        truncate_jsonl(path, self.step)
        return open(path, "a", encoding="utf-8")

    def _catch_stops(self) -> dict[int, Any]:
        """SIGTERM (preemption) and a first Ctrl-C stop the run after this step with a checkpoint; a
        second Ctrl-C aborts. Returns the handlers to restore."""
        return {s: signal.signal(s, self._on_stop) for s in (signal.SIGTERM, signal.SIGINT)}

    def _on_stop(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self._stop_signal:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt("second Ctrl-C: aborting without a checkpoint")
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        hint = " (Ctrl-C again aborts)" if signum == signal.SIGINT else ""
        log.warning("%s: checkpointing after step %d and stopping%s", name, self.step + 1, hint)
        self._stop_signal = True


@dataclass
class _Window:
    start: float
    samples: int = 0
    data_time: float = 0.0


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
