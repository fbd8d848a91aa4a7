"""Scale-out on Ray (``pip install -e '.[ray]'``): ``retrieval embed --engine ray`` and
``retrieval index build --engine ray``, on a running cluster (``--address auto`` / ``ray://head:10001``)
or on a local one started for the job.

Embedding. The driver opens the job as the local engine does (same folder, header and part files)
and submits one CPU task per unfinished source. A task decodes and preprocesses its source
(``api.input_batches``: no weights in the task), sends each batch to one of a pool of model actors
(one per GPU with ``num_gpus=1``, or CPU actors), keeps two batches in flight per task, and writes
the part when its whole source was read: the same files ``embed_part`` writes, each atomically, the
parquet (the "done" marker) last. So a re-run skips finished parts whichever engine wrote them, and
a source read only in part leaves no parquet. Ray retries a task whose worker died
(``max_retries``) and restarts a dead actor, retrying its calls (``max_restarts`` /
``max_task_retries``); the driver keeps as many tasks in flight as the actors leave CPUs (at least
two: one starts decoding while another finishes its part), the rest wait (backpressure), and
shows a progress bar over items with the rate.

Indexing (autofaiss's / the FAISS wiki's distributed pattern). The quantizer is trained once on a
sample (by the driver); the empty trained index goes to the object store; tasks each add a run of
consecutive parts to a copy and write it as a piece next to the index; the driver merges the pieces
in id order: IVF lists into ``index.ivfdata`` (``--on-disk``) or in RAM. Graph and flat indexes
(HNSW, exact search) cannot be merged from pieces and are filled by the driver. Nodes must share the
embedding and index folders' filesystem (as they share the shards' store when embedding).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm import tqdm

from mmpretrain import api
from retrieval.jobs import shards
from retrieval.jobs.embed import (
    EMBED_ENGINES,
    EmbedConfig,
    EmbedError,
    PartWriter,
    finish_stats,
    job_stats,
    note_part,
    open_job,
)
from retrieval.jobs.index import FILL_ENGINES, BuildConfig, IndexSpec, fill_local, make_piece, merge_pieces

log = logging.getLogger(__name__)
IN_FLIGHT = 2  # batches a decoding task keeps at the model actors (decode the next while one is embedded)


def _ray():
    try:
        import ray
    except ImportError:
        raise EmbedError("the ray engine needs Ray: pip install -e '.[ray]'") from None
    return ray


@contextmanager
def ray_session(address: str | None):
    """Ray, initialised: the session already open in this process, the cluster at ``address``, or (None)
    a local cluster of this machine's CPUs and GPUs, shut down afterwards (only if started here)."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()


class Encoder:
    """A model actor: the checkpoint, loaded once, on its GPU (Ray sets ``CUDA_VISIBLE_DEVICES``) or
    on ``threads`` CPU threads; checks it is the model the job was started with."""

    def __init__(self, model: str, model_id: str, modality: str, device: str, threads: int, backend: str = "torch"):
        torch.set_num_threads(threads)
        self.model = api.load_model(model, backend=backend, threads=threads).to(
            api.resolve_device(device, 0, what="--device")
        )
        self.modality = modality
        if api.model_id(self.model) != model_id:
            raise EmbedError(f"{model} on this node is not the model the job started with ({model_id})")

    def encode(self, inputs: dict) -> np.ndarray:
        """``{modality: (B, ...)}`` -> (B, E) float32, L2-normalised."""
        return api.encode(self.model, self.modality, inputs).float().cpu().numpy()


def _embed_source(inputs, actors: list, cfg: EmbedConfig, source: str, part: str, dim: int, progress, i: int) -> dict:
    """A Ray task: decode ``source``, embed its batches on ``actors`` (round robin from a random start),
    write its part. Returns the part's summary."""
    ray = _ray()
    writer, last, pending = PartWriter(cfg, source, Path(part), dim), None, deque()
    turn = random.randrange(len(actors))

    def collect() -> None:
        ref, batch = pending.popleft()
        writer.add(batch, ray.get(ref))
        progress.report.remote(i, writer.items)

    for batch in api.input_batches(inputs, source, batch_size=cfg.batch_size, thumb_size=cfg.thumb_size):
        last = batch
        if batch.keys:
            turn = (turn + 1) % len(actors)
            pending.append((actors[turn].encode.remote(batch.inputs), batch))
        while len(pending) > IN_FLIGHT:
            collect()
    while pending:
        collect()
    return writer.finish(last)


class Progress:
    """Items embedded per part, as reported by the tasks (a retried task restarts its part's count)."""

    def __init__(self):
        self.items: dict[int, int] = {}

    def report(self, part: int, items: int) -> None:
        self.items[part] = items

    def total(self) -> int:
        return sum(self.items.values())


def _actors(ray, cfg: EmbedConfig, job) -> tuple[list, int]:
    """The model actors, and how many decoding tasks to keep in flight beside them."""
    gpus, cpus = int(ray.cluster_resources().get("GPU", 0)), int(ray.cluster_resources().get("CPU", 1))
    on_gpu = gpus > 0 and cfg.device in ("auto", "cuda")
    n = cfg.actors or max(gpus, 1)
    opts = {"num_gpus": 1, "num_cpus": 1} if on_gpu else {"num_cpus": cfg.actor_cpus}
    if cpus - n * opts["num_cpus"] < 1:
        raise EmbedError(
            f"{n} model actor(s) of {opts['num_cpus']} CPU(s) take all {cpus} CPUs of the cluster: none is left to "
            f"decode (lower --actors / --actor-cpus; --actor-threads sets the actors' torch threads apart)"
        )
    actor = ray.remote(max_restarts=cfg.retries, max_task_retries=cfg.retries, **opts)(Encoder)
    device = "cuda" if on_gpu else ("cpu" if cfg.device == "auto" else cfg.device)
    threads = cfg.actor_threads or (1 if on_gpu else _cpu_threads(ray, n))
    decoders = cfg.decoders or max(2, cpus - n * opts["num_cpus"])
    log.info("%d model actor(s) (%s, %d threads), %d decoding tasks", n, json.dumps(opts), threads, decoders)
    return [
        actor.remote(cfg.model, job.model_id, cfg.modality, device, threads, cfg.backend) for _ in range(n)
    ], decoders


def _cpu_threads(ray, actors: int) -> int:
    """Torch threads of a CPU actor by default: its node's cores shared by the actors on it (measured on
    2 cores: 0.51x the local job with 1 thread, 0.8x with 2, the decoding tasks taking their turns)."""
    nodes = [n["Resources"].get("CPU", 1) for n in ray.nodes() if n.get("Alive")]
    per_node = max(1, -(-actors // max(1, len(nodes))))
    return max(1, int(min(nodes or [1])) // per_node)


@EMBED_ENGINES.register("ray", example={"extra": "ray"})
def embed_ray(cfg: EmbedConfig, progress: bool = True) -> dict:
    """Ray: sources decoded in CPU tasks, embedded by a pool of model actors, parts written by the tasks."""
    model = api.load_model(cfg.model, backend=cfg.backend)  # the header's model id and dimension, the preprocessing
    job = open_job(cfg, model)
    mine = list(range(len(job.sources)))
    todo = deque(job.todo(mine))
    stats = job_stats(job, mine, list(todo), engine="ray")
    with ray_session(cfg.address) as ray:
        start = time.perf_counter()
        actors, decoders = _actors(ray, cfg, job)
        tracker = ray.remote(num_cpus=0)(Progress).remote()
        try:
            _run_tasks(ray, cfg, job, model, actors, tracker, todo, stats, progress, decoders)
        finally:  # free the actors' CPUs/GPUs now, not when the handles are collected (a session may go on)
            for handle in [*actors, tracker]:
                ray.kill(handle)
        return finish_stats(stats, job, mine, time.perf_counter() - start)


def _run_tasks(ray, cfg: EmbedConfig, job, model, actors: list, tracker, todo: deque, stats: dict, progress, limit):
    """Submit a task per part of ``todo``, ``limit`` at a time (each decodes a source; a task waiting on
    the actors frees its CPU, so more would start processes that then compete with the actors)."""

    task = ray.remote(num_cpus=1, max_retries=cfg.retries)(_embed_source)
    inputs = ray.put(api.eval_input(model, cfg.modality))
    running: dict = {}
    with tqdm(total=None, desc="embed (ray)", unit="item", disable=not progress) as bar:
        while todo or running:
            while todo and len(running) < limit:
                i = todo.popleft()
                ref = task.remote(inputs, actors, cfg, job.sources[i], str(job.part(i)), job.dim, tracker, i)
                running[ref] = i
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in done:
                i = running.pop(ref)
                note_part(stats, job, i, _result(ray, ref, job.sources[i]))
            bar.update(ray.get(tracker.total.remote()) - bar.n)


def _result(ray, ref, source: str) -> dict:
    """A task's summary; its error (after Ray's retries) as an ``EmbedError`` naming the source."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, Exception) else exc
        if isinstance(cause, EmbedError):
            raise cause from None
        raise EmbedError(f"{source}: {type(cause).__name__}: {cause}") from None
    except ray.exceptions.RayError as exc:
        raise EmbedError(f"{source}: failed after retries: {str(exc).splitlines()[0]}") from None


def _add_piece(empty: np.ndarray, parts: list[tuple[str, int]], name: str, positional: bool = False) -> str:
    """A Ray task: the serialised trained ``empty`` index plus the vectors of ``parts`` ((.npy path, first
    id) in id order), written atomically to ``name``; ``positional``: a shard (ids from 0)."""

    vectors = np.concatenate([np.load(path, mmap_mode="r") for path, _ in parts]).astype(np.float32)
    piece = make_piece(faiss.deserialize_index(empty), vectors, parts[0][1], positional=positional)
    tmp = f"{name}.tmp-{os.getpid()}"
    faiss.write_index(piece, tmp)
    os.replace(tmp, name)
    return name


@FILL_ENGINES.register("ray", example={"extra": "ray"})
def fill_ray(spec: IndexSpec, empty, emb, folder: Path, cfg: BuildConfig, progress: bool = True):
    """Ray: runs of parts added to copies of the trained index in parallel tasks, the pieces merged in
    id order (IVF types; others are filled here), or kept as the index's shards (``cfg.shards``)."""

    if not _mergeable(empty) and cfg.shards == 1:
        log.info("%s cannot be merged from pieces: filled in this process", spec.type)
        return fill_local(spec, empty, emb, folder, cfg, progress)
    starts = np.cumsum([0, *emb.counts])
    with ray_session(cfg.address) as ray:
        n_groups = cfg.shards if cfg.shards > 1 else max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
        groups = shards.groups(emb.counts, n_groups)
        ref = ray.put(faiss.serialize_index(empty))
        task = ray.remote(num_cpus=1, max_retries=3)(_add_piece)
        names = [str(folder / f"piece-{g:05d}.index") for g in range(len(groups))]
        pending = [
            task.remote(
                ref, [(str(emb.parts[j].with_suffix(".npy")), int(starts[j])) for j in group], name, cfg.shards > 1
            )
            for group, name in zip(groups, names)
        ]
        with tqdm(total=len(pending), desc=f"add ({spec.type}, ray)", unit="piece", disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
                bar.update(len(done))
    if cfg.shards > 1:
        pieces = [faiss.read_index(name) for name in names]
        for name in names:
            os.unlink(name)
        return shards.combine(pieces, emb.dim)
    return merge_pieces(empty, names, [int(starts[g[0]]) for g in groups], folder, on_disk=cfg.on_disk)


def _mergeable(index) -> bool:
    """IVF indexes (behind a transform or a re-ranking stage) merge from pieces; graphs and flat codes do not."""

    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False
