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
import sys
from pathlib import Path

import numpy as np
import torch

from mmpretrain import api
from retrieval.errors import EmbedError, IndexError_, QueryError
from retrieval.jobs.curate import DedupConfig, FilterConfig, dedup, filter_items, report_path
from retrieval.jobs.embed import EmbedConfig, run_embed
from retrieval.jobs.gpu import DEVICES
from retrieval.jobs.index import BuildConfig, add_to_index, build_index, open_index
from retrieval.jobs.models import header_source
from retrieval.jobs.search import Searcher
from retrieval.options import add_options, config_from_args
from retrieval.serve.service import ServeConfig, serve

log = logging.getLogger(__name__)


def cmd_embed(args: argparse.Namespace) -> int:
    backend, model = backend_source(args)
    if model is None:
        raise QueryError("give the model to embed with: --model CHECKPOINT, or --onnx EXPORT")
    stats = run_embed(config_from_args(EmbedConfig, args, model=model, backend=backend or "torch"))
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
    queries = np.load(args.queries_file) if args.queries_file else None
    h = build_index(args.embeddings, args.out, config_from_args(BuildConfig, args), queries=queries)
    recalls = ", ".join(f"{kind} {r:.3f}" for kind, r in h["recalls"].items())
    print(
        f"{h['spec']['type']} ({h['spec']['factory']}) over {h['ntotal']:,} vectors: recall@10 {recalls} "
        f"at {h['knob']}={h['knob_value']} (tuned on {h['recall_queries']}), built in {h['build_seconds']:.1f} s, "
        f"{sum(h['bytes'].values()) / 2**20:.1f} MiB -> {args.out}"
    )
    return 0


def cmd_index_add(args: argparse.Namespace) -> int:
    h = add_to_index(args.index, args.embeddings)
    print(f"{args.index}: {h['ntotal']:,} vectors")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    if not args.query and not args.info:
        raise QueryError("give one or more queries, or --info")
    backend, model = backend_source(args)
    searcher = Searcher.open(args.index, model, device=args.device, backend=backend, verify=not args.no_verify)
    if args.info:
        print(json.dumps(searcher.info(), indent=2))
    for query, hits in zip(args.query, searcher.search(args.query, args.k) if args.query else []):
        print(f"# {query}")
        for h in hits:
            print(f"{h.rank + 1:3d}  {h.score:.4f}  {h.key}  {h.caption[:60]!r}  {h.source}")
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    r = dedup(args.embeddings, args.out, config_from_args(DedupConfig, args))
    print(
        f"{r['items']:,} items: {r['groups']:,} near-duplicate groups, {r['removed']:,} removed, {r['kept']:,} kept "
        f"({r['method']}, threshold {r['threshold']}, {r['seconds']:.1f} s) -> {args.out}"
    )
    print(f"group sizes: {json.dumps(r['group_sizes'])}; report: {report_path(Path(args.out))}")
    return 0


def cmd_filter(args: argparse.Namespace) -> int:
    backend, model = backend_source(args)
    r = filter_items(args.embeddings, args.out, config_from_args(FilterConfig, args, model=model, backend=backend))
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


def open_searchers(indexes: list[str], args: argparse.Namespace) -> dict[str, Searcher]:
    """``[NAME=]INDEX`` -> Searcher by name, one model per checkpoint and backend, shared by the indexes it
    built (``--model``/``--onnx`` for all of them)."""
    specs = [s.split("=", 1) if "=" in s else (os.path.basename(os.path.normpath(s)), s) for s in indexes]
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):
        raise QueryError(f"index names must differ: {', '.join(names)} (name them: NAME=PATH)")
    models: dict[tuple, object] = {}
    searchers = {}
    backend, model = backend_source(args)
    for name, path in specs:
        loaded = open_index(path, verify=not args.no_verify)
        ref = header_source(loaded.header, model, backend)
        if ref not in models:
            models[ref] = api.load_model(ref[0], backend=ref[1])
        searchers[name] = Searcher(models[ref], loaded)
    return searchers


def cmd_serve(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    searchers = open_searchers(args.indexes, args)
    cfg = config_from_args(ServeConfig, args, api_key=read_api_key(args))
    total = sum(s.index.ntotal for s in searchers.values())
    print(
        f"serving {', '.join(searchers)} ({total:,} items) on http://{cfg.host}:{cfg.port}/"
        + ("  (API docs: /docs)" if cfg.docs else ""),
        flush=True,
    )
    serve(searchers, cfg)
    return 0


def add_backend_args(p: argparse.ArgumentParser, default: str) -> None:
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


def add_verify_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="open the index without hashing its files (only that each is there): for a big index in a "
        "read-only folder, which keeps no record of the last check (docs/retrieval.md)",
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


def build_parser() -> argparse.ArgumentParser:
    """The ``retrieval`` command: each job's flags come from its config dataclass (``retrieval.options``);
    only the model source, the API key and the positional arguments are written here."""
    p = argparse.ArgumentParser(
        prog="retrieval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    _embed_parser(sub)
    ix = sub.add_parser("index", help="build or extend an index").add_subparsers(dest="index_cmd", required=True)
    b = ix.add_parser("build", help="build a FAISS index over an embedding folder", description=BUILD_DOC)
    b.add_argument("embeddings", help="folder written by `retrieval embed`")
    b.add_argument("--out", required=True, help="index folder (replaced atomically)")
    b.add_argument("--queries-file", help="(Q, E) .npy of real query embeddings to tune on instead")
    add_options(b, BuildConfig)
    b.set_defaults(fn=cmd_index_build)
    a = ix.add_parser("add", help="add a new embedding folder (same model) to an index")
    a.add_argument("index")
    a.add_argument("embeddings")
    a.set_defaults(fn=cmd_index_add)
    _curate_parsers(sub)
    s = sub.add_parser("search", help="text -> items from the command line")
    s.add_argument("index")
    s.add_argument("query", nargs="*", help="one or more text queries")
    s.add_argument("--info", action="store_true", help="print the index's description (type, recalls) as JSON")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--model", help="query model (default: the one recorded in the index)")
    add_backend_args(s, "the index's backend")
    add_verify_arg(s)
    s.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="search a GPU copy of the index with faiss-gpu where it has the index's type",
    )
    s.set_defaults(fn=cmd_search)
    _serve_parser(sub)
    return p


BUILD_DOC = (
    "Exact search below 20k vectors; else the first of HNSW (below 200k), IVF-Flat, IVF-SQ8, OPQ+IVF-PQ that "
    "fits --memory, measured beside its rivals that fit (HNSW: IVF-Flat; IVF-Flat: IVF-SQ8 and the fast-scan PQ "
    "shortlist; IVF-SQ8: the RaBitQ and fast-scan shortlists, both re-ranked on 8-bit codes; each: exact search), "
    "each with its search parameter tuned to --recall (recall@10 vs exact search on --tune-on queries; captions "
    "by default), and the fastest that reaches it kept; --on-disk builds IVF-Flat. index.json records the choice, "
    "the recall on held-out queries and a checksum of every file (docs/retrieval.md)."
)


def _embed_parser(sub) -> None:
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
    add_options(e, EmbedConfig)
    e.set_defaults(fn=cmd_embed)


def _curate_parsers(sub) -> None:
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
    add_options(d, DedupConfig)
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
    f.add_argument("--model", help="scoring model (default: the one the embeddings record; its id must match)")
    add_backend_args(f, "the embeddings' backend")
    add_options(f, FilterConfig)
    f.set_defaults(fn=cmd_filter)


def _serve_parser(sub) -> None:
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
    add_verify_arg(v)
    v.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="file holding the API key (>= 16 characters), required on every route but /health, / and /login; "
        "or set RETRIEVAL_API_KEY (docs/security.md)",
    )
    v.add_argument("--api-key", help="the API key itself: visible to every user in `ps`; prefer --api-key-file")
    v.add_argument("--threads", type=int, default=0, help="torch compute threads (0: torch's default)")
    add_options(v, ServeConfig)
    v.set_defaults(fn=cmd_serve)


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
