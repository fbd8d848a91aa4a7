"""``mmpretrain export``: a model written for another runtime (``deploy.exports``: open_clip, ONNX, int8).
argparse lives here and in ``cli``; below it, plain arguments."""

from __future__ import annotations

import argparse

from mmpretrain.deploy.exports import EXPORT_FORMATS
from mmpretrain.deploy.quantize import QUANTIZERS

LOADS = {
    "open_clip": "load with open_clip.create_model('local-dir:{out}')",
    "onnx": "serve with --backend onnxruntime --onnx {out}, or api.load_model('{out}', backend='onnxruntime')",
}


def cmd_export(args: argparse.Namespace, model) -> int:
    towers = [t.strip() for t in args.towers.split(",") if t.strip()] if args.towers else None
    out = EXPORT_FORMATS.build(
        args.format, model, args.out, towers=towers, quantize=args.quantize, overwrite=args.overwrite
    )
    print(f"wrote {args.format} export {out} ({LOADS.get(args.format, '').format(out=out)})")
    return 0


def add_export(sub, model_args) -> argparse.ArgumentParser:
    formats = "; ".join(f"{e.name}: {e.doc}" for e in EXPORT_FORMATS.entries())
    x = sub.add_parser(
        "export",
        help="write a model as an open_clip checkpoint or as ONNX (fp32 or int8)",
        description=f"Write a model for another runtime. Formats: {formats}",
    )
    model_args(x)
    x.add_argument("--out", required=True, help="output folder (an earlier export there is replaced)")
    x.add_argument("--format", choices=EXPORT_FORMATS.names(), default="open_clip", help="default open_clip")
    x.add_argument("--quantize", choices=QUANTIZERS.names(), help="onnx: quantise the towers' MatMuls (int8: dynamic)")
    x.add_argument("--towers", help="onnx: comma-separated modalities to export (default: every tower)")
    x.add_argument(
        "--overwrite", action="store_true", help="replace --out even when it holds other files (they are deleted)"
    )
    return x
