"""``mmpretrain caption`` and ``mmpretrain eval captioning``: the command line of the captioning decoder
(``api.caption``, ``eval.captioning``). argparse lives here and in ``cli``; below it, plain arguments."""

from __future__ import annotations

import argparse
import json

from mmpretrain import api
from mmpretrain.models.generate import METHODS


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=METHODS, default="greedy", help="greedy, or beam search (default greedy)")
    p.add_argument("--max-len", type=int, default=20, help="longest caption in tokens, the end token included")
    p.add_argument("--min-len", type=int, default=0, help="tokens before the end token may come (default 0)")
    p.add_argument("--beams", type=int, default=4, help="beam search: hypotheses kept per image (default 4)")
    p.add_argument(
        "--length-penalty", type=float, default=1.0, help="beam search: score = log-prob / length ** this (default 1)"
    )


def generation(args: argparse.Namespace) -> dict:
    return {"method": args.method, "max_len": args.max_len, "min_len": args.min_len, "num_beams": args.beams}


def cmd_caption(args: argparse.Namespace, model) -> int:
    captions = api.caption(
        model, args.images, **generation(args), length_penalty=args.length_penalty, batch_size=args.batch_size
    )
    for image, text in zip(args.images, captions):
        print(json.dumps({"image": image, "caption": text}) if args.jsonl else f"{image}\t{text}")
    return 0


def add_caption(sub, model_args) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "caption",
        help="caption images with a model's captioning decoder",
        description=(
            "Generate a caption per image with the model's captioning decoder (model.decoder: coca, as open_clip's "
            "CoCa, or locca), greedy or by beam search. Prints one 'IMAGE<TAB>caption' line per image (--jsonl: "
            "JSON lines)."
        ),
    )
    model_args(p)
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, WEBP, BMP, GIF)")
    _generation_args(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--jsonl", action="store_true", help="print JSON lines {image, caption}")
    return p


def add_eval_captioning(e) -> argparse.ArgumentParser:
    p = e.add_parser(
        "captioning",
        help="BLEU-4 and CIDEr of the model's captions (CLIP_benchmark's captioning task)",
        description=(
            "Caption every image of each --data and score the captions against its references with BLEU-4 and "
            "CIDEr (CIDEr-D), on COCO-tokenised text as the COCO caption evaluation. --data: shard specs whose "
            "samples carry their captions (json {'captions': [...]} or the caption field), or [NAME@]LAYOUT=DIR "
            "labelled folders, whose references are the class name in each of --templates."
        ),
    )
    p.add_argument("--data", nargs="+", required=True, help="shard specs, or [NAME@]LAYOUT=DIR folders")
    _generation_args(p)
    return p
