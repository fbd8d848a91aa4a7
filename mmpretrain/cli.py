"""``mmpretrain`` command line. argparse lives here only; below it, typed configs."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from mmpretrain.config.strict import ConfigError
from mmpretrain.errors import DataError


def _setup_logging() -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def cmd_train(args: argparse.Namespace) -> int:
    from mmpretrain import api

    cfg = api.load_config(args.config, args.overrides)
    run_dir = api.train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"run directory: {run_dir}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from mmpretrain.config.loader import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_shards_make(args: argparse.Namespace) -> int:
    from mmpretrain.data.shards import ShardWriterConfig, make_shards

    cfg = ShardWriterConfig(max_count=args.max_count, max_bytes=args.max_size, prefix=args.prefix,
                            verify_images=not args.no_verify)
    manifest = make_shards(args.images, args.captions, args.out, cfg)
    print(f"wrote {manifest.samples} samples in {len(manifest.shards)} shard(s) to {args.out}")
    if manifest.skipped:
        print(f"skipped: {json.dumps(manifest.skipped)}")
    print(f"train with: data.train={os.path.join(args.out, manifest.pattern)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from mmpretrain.data.ops import DATA_OPS
    from mmpretrain.encoders import ENCODERS, HEADS
    from mmpretrain.losses import LOSSES

    for modality, reg in ENCODERS.items():
        print(f"{modality} encoders: {', '.join(reg.names()) or '(none yet)'}")
    for title, reg in (("heads", HEADS), ("losses", LOSSES), ("data ops", DATA_OPS)):
        print(f"{title}: {', '.join(reg.names())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmpretrain", description="Multimodal contrastive pre-training.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train or resume a model", description=(
        "Train from a layered YAML config; key=value overrides apply last (e.g. train.steps=100 "
        "train.resume=latest). Run under torchrun for several processes or nodes."))
    t.add_argument("config", help="experiment YAML, e.g. configs/experiment/smoke.yaml")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("config", help="print the resolved config", description="Print the fully resolved config.")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(fn=cmd_config)

    s = sub.add_parser("shards", help="webdataset shard tools").add_subparsers(dest="shards_cmd", required=True)
    m = s.add_parser("make", help="write shards from an image folder + captions file", description=(
        "Write img2dataset-style webdataset shards (jpg/png/webp + txt + json) and manifest.json. "
        "Captions: CSV/TSV with a header or JSONL, with an image-path column (file/filepath/path/image) "
        "relative to --images and a caption column (caption/text)."))
    m.add_argument("--images", required=True, help="image folder")
    m.add_argument("--captions", required=True, help="captions file (.csv, .tsv, .jsonl)")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    m.add_argument("--max-size", type=int, default=1_000_000_000, help="bytes per shard (default 1e9)")
    m.add_argument("--prefix", default="shard", help="shard name prefix (default 'shard')")
    m.add_argument("--no-verify", action="store_true", help="do not decode images to check them")
    m.set_defaults(fn=cmd_shards_make)

    ls = sub.add_parser("list", help="list registered encoders, heads, losses, data ops")
    ls.set_defaults(fn=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
