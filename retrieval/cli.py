"""``retrieval``: embed a collection, build/extend a FAISS index, search it, serve it.

retrieval embed --model CKPT --data 'shards/{000000..000099}.tar' --out emb/   (torchrun-able)
retrieval index build emb/ --out index/ [--memory 2GB] [--recall 0.95] [--type auto] [--on-disk | --shards N]
retrieval index add index/ emb2/
retrieval search index/ "a red bicycle" -k 10
retrieval dedup emb/ --out keep.parquet [--threshold 0.94] [--index index/]
retrieval filter emb/ --out keep.parquet [--min-score 0.28] [--exclude "a watermark"]
retrieval serve [NAME=]index/ [NAME2=index2/ ...] [--port 8000] [--api-key-file FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from mmpretrain.types import MODALITIES
from retrieval.jobs.curate import KEEP_RULES
from retrieval.jobs.dedup import NEAR_DUPLICATE
from retrieval.jobs.embed import EMBED_ENGINES, EmbedError
from retrieval.jobs.gpu import DEVICES
from retrieval.jobs.index import FILL_ENGINES, INDEX_TYPES, IndexError_
from retrieval.jobs.index_config import TUNE_ON
from retrieval.jobs.search import QueryError

log = logging.getLogger(__name__)

UNITS = {
    "": 1,
    "B": 1,
    "K": 2**10,
    "KB": 2**10,
    "M": 2**20,
    "MB": 2**20,
    "G": 2**30,
    "GB": 2**30,
    "T": 2**40,
    "TB": 2**40,
}


def parse_bytes(text: str) -> int:
    """``2GB``, ``512M``, ``1.5G``, ``1000000`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 512MB)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def cmd_embed(args: argparse.Namespace) -> int:
    from retrieval.jobs.embed import EmbedConfig, run_embed

    backend, model = backend_source(args)
    if model is None:
        raise QueryError("give the model to embed with: --model CHECKPOINT, or --onnx EXPORT")
    cfg = EmbedConfig(
        model=model,
        backend=backend or "torch",
        data=args.data,
        out=args.out,
        batch_size=args.batch_size,
        dtype=args.dtype,
        thumb_size=args.thumb_size,
        device=args.device,
        modality=args.modality,
        strict=args.strict,
        engine=args.engine,
        address=args.address,
        actors=args.actors,
        actor_cpus=args.actor_cpus,
        actor_threads=args.actor_threads,
        decoders=args.decoders,
        retries=args.retries,
    )
    stats = run_embed(cfg)
    print(json.dumps(stats))
    if stats["failed"]:
        print(
            f"error: {len(stats['failed'])} source(s) could not be read to their end; their parts were not "
            "written. Fix them (or wait for the store) and re-run the same command to retry.",
            file=sys.stderr,
        )
        return 3
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    import numpy as np

    from retrieval.jobs.index import BuildConfig, build_index

    cfg = BuildConfig(
        index_type=args.type,
        memory_bytes=args.memory,
        recall_target=args.recall,
        on_disk=args.on_disk,
        queries=args.queries,
        tune_seconds=args.tune_seconds,
        tune_on=args.tune_on,
        threads=args.threads,
        engine=args.engine,
        address=args.address,
        device=args.device,
        shards=args.shards,
    )
    queries = np.load(args.queries_file) if args.queries_file else None
    h = build_index(args.embeddings, args.out, cfg, queries=queries)
    recalls = ", ".join(f"{kind} {r:.3f}" for kind, r in h["recalls"].items())
    print(
        f"{h['spec']['type']} ({h['spec']['factory']}) over {h['ntotal']:,} vectors: recall@10 {recalls} "
        f"at {h['knob']}={h['knob_value']} (tuned on {h['recall_queries']}), built in {h['build_seconds']:.1f} s, "
        f"{sum(h['bytes'].values()) / 2**20:.1f} MiB -> {args.out}"
    )
    return 0


def cmd_index_add(args: argparse.Namespace) -> int:
    from retrieval.jobs.index import add_to_index

    h = add_to_index(args.index, args.embeddings)
    print(f"{args.index}: {h['ntotal']:,} vectors")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from retrieval.jobs.search import Searcher

    if not args.query and not args.info:
        raise QueryError("give one or more queries, or --info")
    backend, model = backend_source(args)
    searcher = Searcher.open(args.index, model, device=args.device, backend=backend)
    if args.info:
        print(json.dumps(searcher.info(), indent=2))
    for query, hits in zip(args.query, searcher.search(args.query, args.k) if args.query else []):
        print(f"# {query}")
        for h in hits:
            print(f"{h.rank + 1:3d}  {h.score:.4f}  {h.key}  {h.caption[:60]!r}  {h.source}")
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    from retrieval.jobs.curate import DedupConfig, dedup, report_path

    cfg = DedupConfig(threshold=args.threshold, keep=args.keep, index=args.index, k=args.k)
    r = dedup(args.embeddings, args.out, cfg)
    print(
        f"{r['items']:,} items: {r['groups']:,} near-duplicate groups, {r['removed']:,} removed, {r['kept']:,} kept "
        f"({r['method']}, threshold {r['threshold']}, {r['seconds']:.1f} s) -> {args.out}"
    )
    print(f"group sizes: {json.dumps(r['group_sizes'])}; report: {report_path(Path(args.out))}")
    return 0


def cmd_filter(args: argparse.Namespace) -> int:
    from retrieval.jobs.curate import FilterConfig, filter_items, report_path

    cfg = FilterConfig(
        min_score=args.min_score,
        exclude=tuple(args.exclude),
        exclude_threshold=args.exclude_threshold,
        model=(source := backend_source(args))[1],
        backend=source[0],
        device=args.device,
    )
    r = filter_items(args.embeddings, args.out, cfg)
    print(
        f"{r['items']:,} items: {r['kept']:,} kept; {r['below_min_score']:,} below {r['min_score']}, "
        f"{r['excluded']:,} excluded, {r['no_caption']:,} without a caption -> {args.out}"
    )
    print(f"histogram: {r['histogram']}; report: {report_path(Path(args.out))}")
    return 0


def read_api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file, RETRIEVAL_API_KEY or --api-key (which ``ps`` shows: warned)."""
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip()
        if not key:
            raise QueryError(f"{args.api_key_file} is empty")
        return key
    if os.environ.get("RETRIEVAL_API_KEY"):
        return os.environ["RETRIEVAL_API_KEY"]
    if args.api_key:
        log.warning("--api-key is visible to every user of this machine (ps); use --api-key-file or RETRIEVAL_API_KEY")
    return args.api_key


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from retrieval.jobs.search import Searcher
    from retrieval.serve.batcher import BatchConfig
    from retrieval.serve.connections import ConnectionLimits
    from retrieval.serve.fetch import FetchPolicy
    from retrieval.serve.service import ServeConfig, serve

    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [s.split("=", 1) if "=" in s else (os.path.basename(os.path.normpath(s)), s) for s in args.indexes]
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):
        raise QueryError(f"index names must differ: {', '.join(names)} (name them: NAME=PATH)")
    models: dict[tuple, object] = {}  # one model per checkpoint and backend, shared by the indexes it built
    searchers = {}
    backend, model = backend_source(args)
    for name, path in specs:
        from mmpretrain import api
        from retrieval.jobs.index import open_index
        from retrieval.jobs.models import header_source

        loaded = open_index(path)
        ref = header_source(loaded.header, model, backend)
        if ref not in models:
            models[ref] = api.load_model(ref[0], backend=ref[1])
        searchers[name] = Searcher(models[ref], loaded)
    cfg = ServeConfig(
        host=args.host,
        port=args.port,
        max_upload_bytes=args.max_upload,
        api_key=read_api_key(args),
        insecure=args.insecure,
        cors_origins=tuple(args.cors_origin),
        allowed_hosts=tuple(args.allowed_host),
        docs=args.docs,
        batch=BatchConfig(args.max_batch, args.max_wait_ms, args.max_queue, args.max_queue_per_client),
        request_timeout_s=args.timeout,
        concurrency=args.concurrency,
        per_client=args.per_client,
        fetch=FetchPolicy(hosts=tuple(args.image_url_host), allow_private=args.image_url_private),
        connections=ConnectionLimits(
            header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout,
            max_connections=args.max_connections,
            max_per_client=args.max_connections_per_client,
            new_per_second=args.new_connections_per_second,
        ),
    )
    total = sum(s.index.ntotal for s in searchers.values())
    print(
        f"serving {', '.join(searchers)} ({total:,} items) on http://{args.host}:{args.port}/"
        + ("  (API docs: /docs)" if args.docs else ""),
        flush=True,
    )
    serve(searchers, cfg)
    return 0


def add_backend_args(p: argparse.ArgumentParser, default: str) -> None:
    from mmpretrain import api

    p.add_argument(
        "--backend",
        choices=api.list_backends(),
        help=f"encoding backend: torch, or onnxruntime running an ONNX export (default: {default})",
    )
    p.add_argument(
        "--onnx",
        metavar="DIR",
        help="encode with this ONNX export (`mmpretrain export --format onnx`): --backend onnxruntime --model DIR",
    )


def backend_source(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(backend, model) from --backend / --model / --onnx: None where the header's is meant."""
    if args.onnx is None:
        return args.backend, args.model
    if args.model is not None:
        raise QueryError("give --model or --onnx, not both")
    if args.backend not in (None, "onnxruntime"):
        raise QueryError(f"--onnx is an export for the onnxruntime backend, not {args.backend}")
    return "onnxruntime", args.onnx


def add_engine_args(p: argparse.ArgumentParser, engines) -> None:
    """--engine, its choices from ``engines`` (EMBED_ENGINES or FILL_ENGINES), and --address."""
    p.add_argument(
        "--engine",
        choices=engines.names(),
        default="local",
        help="local: this process (default, needs nothing running); ray: a Ray cluster (pip install -e '.[ray]')",
    )
    p.add_argument(
        "--address",
        help="ray: the cluster to use (auto: the one `ray start` runs here; ray://HEAD:10001); default: start a "
        "local one for the job",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="retrieval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser(
        "embed",
        help="embed a collection (resumable; parallel under torchrun)",
        description=(
            "Embed shards (img2dataset/webdataset, any mmpretrain shard spec; images, or video/audio with --modality) "
            "or an image folder into DIR: one part "
            "per shard (.npy vectors, .parquet metadata, .thumbs JPEGs). Unreadable items are skipped and counted "
            "in their part; a shard that cannot be read to its end gets no part (exit status 3). Re-running skips "
            "finished parts and retries failed ones; under torchrun each rank takes every WORLD_SIZE-th shard. "
            "--engine ray runs it on a Ray cluster: shards decoded in CPU tasks, embedded by model actors (one per "
            "GPU), tasks retried when a worker dies (docs/scale_out.md)."
        ),
    )
    e.add_argument("--model", help="checkpoint dir, run's checkpoints/, or local-dir:OPEN_CLIP_DIR (or --onnx DIR)")
    add_backend_args(e, "torch")
    e.add_argument("--data", required=True, help="shard spec or image folder")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    e.add_argument("--thumb-size", type=int, default=128, help="thumbnail side in pixels (0: none)")
    e.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cpu, cuda:0, ...")
    e.add_argument("--strict", action="store_true", help="stop at the first skipped item or unreadable shard")
    e.add_argument(
        "--modality",
        choices=[m for m in MODALITIES if m != "text"],
        default="image",
        help="what to embed from each item (video/audio: shards; default image); text queries then "
        "search it (text->video, text->audio)",
    )
    add_engine_args(e, EMBED_ENGINES)
    e.add_argument("--actors", type=int, default=0, help="ray: model actors (0: one per GPU, else one CPU actor)")
    e.add_argument("--actor-cpus", type=int, default=1, help="ray: CPUs reserved per CPU model actor (1)")
    e.add_argument(
        "--actor-threads",
        type=int,
        default=0,
        help="ray: torch threads per CPU model actor (0: its node's cores, shared by the actors on it)",
    )
    e.add_argument(
        "--decoders", type=int, default=0, help="ray: decoding tasks in flight (0: the CPUs the actors leave, >= 2)"
    )
    e.add_argument("--retries", type=int, default=3, help="ray: retries of a task or actor call whose worker died (3)")
    e.set_defaults(fn=cmd_embed)

    ix = sub.add_parser("index", help="build or extend an index").add_subparsers(dest="index_cmd", required=True)
    b = ix.add_parser(
        "build",
        help="build a FAISS index over an embedding folder",
        description=(
            "Exact search below 20k vectors; else the first of HNSW (below 200k), IVF-Flat, IVF-SQ8, OPQ+IVF-PQ that "
            "fits --memory, measured beside its fitting rivals (IVF-SQ8, the fast-scan and RaBitQ shortlists with "
            "re-ranking, exact search), each with its search parameter tuned to --recall (recall@10 vs exact search "
            "on --tune-on queries; captions by default), and the fastest that reaches it kept; index.json records "
            "the choice, the recall on held-out queries and a checksum of every file (docs/retrieval.md)."
        ),
    )
    b.add_argument("embeddings", help="folder written by `retrieval embed`")
    b.add_argument("--out", required=True, help="index folder (replaced atomically)")
    b.add_argument("--type", default="auto", help="auto or an index type: " + ", ".join(INDEX_TYPES.names()))
    b.add_argument("--memory", type=parse_bytes, default=parse_bytes("4GB"), help="RAM budget for the index (4GB)")
    b.add_argument("--recall", type=float, default=0.95, help="recall@10 target (0.95)")
    b.add_argument("--queries", type=int, default=500, help="held-out queries sampled for tuning (500)")
    b.add_argument("--queries-file", help="(Q, E) .npy of real query embeddings to tune on instead")
    b.add_argument(
        "--tune-on",
        choices=TUNE_ON,
        default="auto",
        help="queries to tune on: captions of sampled items encoded by the job's model (text queries, as users "
        "search), sampled items, or auto: captions when the items have them (auto)",
    )
    b.add_argument(
        "--tune-seconds", type=float, default=0.25, help="time each search setting at least this long (0.25)"
    )
    b.add_argument("--on-disk", action="store_true", help="IVF lists on disk (index larger than RAM)")
    b.add_argument(
        "--shards",
        type=int,
        default=1,
        help="keep N shard files over consecutive parts, searched together, instead of one merged index (1)",
    )
    b.add_argument("--threads", type=int, default=0, help="FAISS threads (0: default)")
    b.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="IVF training k-means on the GPUs with faiss-gpu (auto: when one is visible)",
    )
    add_engine_args(b, FILL_ENGINES)
    b.set_defaults(fn=cmd_index_build)
    a = ix.add_parser("add", help="add a new embedding folder (same model) to an index")
    a.add_argument("index")
    a.add_argument("embeddings")
    a.set_defaults(fn=cmd_index_add)

    d = sub.add_parser(
        "dedup",
        help="near-duplicate groups -> a keep-list (one keeper per group)",
        description=(
            "Pairs with cosine similarity >= --threshold (exact range search, or each item's --k nearest "
            "neighbours on --index, an index over the same embeddings: any type, on-disk too); groups are their "
            "connected components; one keeper per group (--keep first: first in source order; resolution: most "
            "pixels). Writes the keep-list parquet (id, key, shard, source, caption, group_size) and "
            "OUT.report.json with the group sizes; `mmpretrain shards filter` applies it."
        ),
    )
    d.add_argument("embeddings", help="folder written by `retrieval embed`")
    d.add_argument("--out", required=True, help="keep-list parquet to write")
    d.add_argument(
        "--threshold",
        type=float,
        default=NEAR_DUPLICATE,
        help=f"cosine similarity of near-duplicates ({NEAR_DUPLICATE}, clip-retrieval's)",
    )
    d.add_argument("--keep", choices=KEEP_RULES.names(), default="first", help="which item of a group stays")
    d.add_argument("--index", help="index folder over these embeddings: search its kNN instead of every pair")
    d.add_argument("-k", type=int, default=32, help="neighbours per item with --index (32)")
    d.set_defaults(fn=cmd_dedup)
    f = sub.add_parser(
        "filter",
        help="CLIP-score filtering (+ text-query exclusions) -> a keep-list and a score histogram",
        description=(
            "An item's CLIP score is the cosine similarity of its embedding and its caption's, under the model that "
            "embedded it (LAION kept >= 0.28 with ViT-B/32). Keeps items at or above --min-score that no --exclude "
            "query matches (similarity >= --exclude-threshold); items without a caption are dropped. Writes the "
            "keep-list parquet (with clip_score), OUT.report.json and OUT.hist.png."
        ),
    )
    f.add_argument("embeddings", help="folder written by `retrieval embed`")
    f.add_argument("--out", required=True, help="keep-list parquet to write")
    f.add_argument("--min-score", type=float, default=0.28, help="lowest CLIP score kept (0.28)")
    f.add_argument("--exclude", action="append", default=[], metavar="TEXT", help="drop items matching this query")
    f.add_argument("--exclude-threshold", type=float, default=0.25, help="similarity to an --exclude query (0.25)")
    f.add_argument("--model", help="scoring model (default: the one the embeddings record; its id must match)")
    f.add_argument("--device", default="cpu", help="torch device for the text encoder (cpu)")
    add_backend_args(f, "the embeddings' backend")
    f.set_defaults(fn=cmd_filter)

    s = sub.add_parser("search", help="text -> items from the command line")
    s.add_argument("index")
    s.add_argument("query", nargs="*", help="one or more text queries")
    s.add_argument("--info", action="store_true", help="print the index's description (type, recalls) as JSON")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--model", help="query model (default: the one recorded in the index)")
    add_backend_args(s, "the index's backend")
    s.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="search a GPU copy of the index with faiss-gpu where it has the index's type",
    )
    s.set_defaults(fn=cmd_search)

    v = sub.add_parser(
        "serve",
        help="HTTP API + web page + clip-retrieval's protocol",
        description=(
            "Serve one or more indexes (FastAPI + uvicorn): /search, /classify, /thumb/ID, a web page, "
            "clip-retrieval's /knn-service, /metadata and /indices-list, /health, /info and Prometheus /metrics. "
            "Queries are micro-batched per index; a full queue answers 503 with Retry-After. Binds to 127.0.0.1 "
            "unless --host says otherwise; any other host needs --api-key (or --insecure)."
        ),
    )
    v.add_argument(
        "indexes",
        nargs="+",
        metavar="[NAME=]INDEX",
        help="index folders, optionally named (default name: the folder's); the first is the default",
    )
    v.add_argument("--model", help="query model for every index (default: the one recorded in each index)")
    add_backend_args(v, "each index's backend")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-upload", type=parse_bytes, default=parse_bytes("8MB"), help="upload size limit (8MB)")
    v.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="file holding the API key (>= 16 characters), required on every route but /health, / and /login; "
        "or set RETRIEVAL_API_KEY (docs/security.md)",
    )
    v.add_argument("--api-key", help="the API key itself: visible to every user in `ps`; prefer --api-key-file")
    v.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host, --cors-origin '*' and proxied (forwarded) requests without an API key",
    )
    v.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host header name clients use (besides loopback's and --host's; '*': any); DNS rebinding defence",
    )
    v.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browsers on ORIGIN (e.g. clip-retrieval's front end; '*' for any, needs a key) to call the API",
    )
    v.add_argument(
        "--image-url-host",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="hosts whose images /knn-service's image_url may fetch (ports 80/443 unless named; default: none)",
    )
    v.add_argument(
        "--image-url-private",
        action="store_true",
        help="let image_url hosts resolve to private/loopback addresses (an internal deployment)",
    )
    v.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (Swagger loads JS from a CDN)")
    v.add_argument("--max-batch", type=int, default=64, help="queries per encoder/search batch (64)")
    v.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a batch waits to fill (2 ms)")
    v.add_argument(
        "--max-queue", type=int, default=64, help="waiting queries, texts counted (all indexes) before 503 (64)"
    )
    v.add_argument("--max-queue-per-client", type=int, default=32, help="one client's waiting queries before 429 (32)")
    v.add_argument("--timeout", type=float, default=30.0, help="seconds a query may wait for its answer (30)")
    v.add_argument("--concurrency", type=int, default=256, help="requests in flight before 503 (256)")
    v.add_argument("--per-client", type=int, default=32, help="requests in flight from one address before 429 (32)")
    v.add_argument("--header-timeout", type=float, default=10.0, help="seconds to send a request's headers (10)")
    v.add_argument("--body-timeout", type=float, default=30.0, help="seconds to send a request's body (30)")
    v.add_argument("--max-connections", type=int, default=1000, help="open connections in all (1000)")
    v.add_argument("--max-connections-per-client", type=int, default=64, help="open connections from one address (64)")
    v.add_argument(
        "--new-connections-per-second",
        type=float,
        default=50.0,
        help="new connections from one address a second, bursts of twice that (50; 0: no limit)",
    )
    v.add_argument("--threads", type=int, default=0, help="torch compute threads (0: torch's default)")
    v.set_defaults(fn=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except (EmbedError, IndexError_, QueryError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
