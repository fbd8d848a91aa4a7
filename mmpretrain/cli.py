"""``mmpretrain`` command line. argparse lives here only; below it, typed configs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from mmpretrain import api
from mmpretrain.cli_caption import add_caption, add_eval_captioning, cmd_caption
from mmpretrain.cli_export import add_export, cmd_export
from mmpretrain.config.loader import dump_config
from mmpretrain.config.strict import ConfigError, from_dict
from mmpretrain.corpora import CORPORA, CorpusError
from mmpretrain.data.loader import check_shards
from mmpretrain.data.shards import CAPTION_COLUMNS, PATH_COLUMNS, ShardWriterConfig, filter_shards, make_shards
from mmpretrain.errors import CheckpointError, DataError
from mmpretrain.eval.jobs import REPORT_FORMATS, build_job, clip_benchmark_jobs, job_fields
from mmpretrain.registry import load_all
from mmpretrain.training.strategy import STRATEGIES
from mmpretrain.training.validate import load_experiment
from mmpretrain.types import MODALITIES

MEDIA = [m for m in MODALITIES if m != "text"]  # what an item to embed, probe or classify is


def _setup_logging() -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def cmd_train(args: argparse.Namespace) -> int:
    cfg = api.load_config(args.config, args.overrides)
    run_dir = api.train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"run directory: {run_dir}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_experiment(args.config, args.overrides)
    print(dump_config(cfg), end="")
    try:
        problems = check_shards(cfg.data)
    except ConfigError as exc:  # the config is valid; this machine lacks its data
        problems = [str(exc)]
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return 0


def cmd_shards_make(args: argparse.Namespace) -> int:
    cfg = ShardWriterConfig(
        max_count=args.max_count,
        max_bytes=args.max_size,
        prefix=args.prefix,
        verify_images=not args.no_verify,
        media=args.media,
    )
    manifest = make_shards(args.images, args.captions, args.out, cfg)
    print(f"wrote {manifest.samples} samples in {len(manifest.shards)} shard(s) to {args.out}")
    if manifest.skipped:
        print(f"skipped: {json.dumps(manifest.skipped)}")
    print(f"train with: data.train={os.path.join(args.out, manifest.pattern)}")
    return 0


def cmd_shards_filter(args: argparse.Namespace) -> int:
    cfg = ShardWriterConfig(max_count=args.max_count, max_bytes=args.max_size, prefix=args.prefix)
    manifest = filter_shards(args.shards, args.keep, args.out, cfg)
    print(f"kept {manifest.samples} samples in {len(manifest.shards)} shard(s) in {args.out}")
    print(f"dropped or skipped: {json.dumps(manifest.skipped)}")
    if manifest.skipped.get("missing"):
        print(f"warning: {manifest.skipped['missing']} keep-list entries are in none of the shards", file=sys.stderr)
    print(f"train with: data.train={os.path.join(args.out, manifest.pattern) if manifest.shards else args.out}")
    return 0


def _load_model(args: argparse.Namespace):
    model = (
        api.create_model(args.model, pretrained=args.pretrained) if args.pretrained else api.load_checkpoint(args.model)
    )
    return model.to(args.device)


def cmd_eval(args: argparse.Namespace) -> int:
    """Any ``EVAL_JOBS`` job, its parameters from the flags of its subcommand."""
    fields = job_fields(args.eval_cmd)
    params = {k: getattr(args, k) for k in fields if hasattr(args, k)}
    if "reference_name" in fields and not params.get("reference_name"):  # a job naming the model it ran
        params["reference_name"] = str(args.model)
    job = build_job(args.eval_cmd, params)  # a typo in --data fails here, before the model loads
    output = REPORT_FORMATS.get(args.format)
    if output.attrs["records"] and (not args.out or not job.clip_benchmark):
        raise ValueError(
            f"--format {args.format} needs --out (a folder or a file-name template) and a "
            f"{', '.join(clip_benchmark_jobs())} evaluation"
        )
    result = job.run(_load_model(args))
    for text in result.tables + result.notes:
        print(text)
    if args.out:
        report = {**result.report, "model": str(args.model)}
        paths = output.builder(result, report, args.out, str(args.model))
        more = " ..." if len(paths) > 4 else ""
        print(f"{args.format} report, {len(paths)} file(s): {', '.join(str(p) for p in paths[:4])}{more}")
    return 0


def cmd_checkpoint_convert(args: argparse.Namespace) -> int:
    out = api.convert_checkpoint(args.checkpoint, args.out, to=args.to)
    print(f"wrote {out} ({args.to} format); resume with train.resume={out}")
    return 0


def cmd_data_build(args: argparse.Namespace) -> int:
    entry = CORPORA.get(args.corpus)
    given = {k: v for k, v in (("size", args.size), ("seed", args.seed)) if v is not None}
    if args.concepts is not None:
        given["concepts"] = args.concepts or None  # 0: all
    cfg = from_dict(entry.config_cls, given, args.corpus)  # a flag the corpus has no field for fails, naming it
    cache = args.cache or f".cache/mmpretrain/{args.corpus}"
    out = args.out or f"data/{args.corpus}"
    try:
        manifest = entry.builder(cfg, cache, out)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.corpus} corpus in {out}: " + ", ".join(f"{k} {v}" for k, v in manifest["counts"].items()))
    print(
        manifest.get("next")
        or f"train with: data.train={out}/shards   evaluate: mmpretrain eval zeroshot --data "
        f"seen@folder={out}/eval/train_styles_seen unseen@folder={out}/eval/unseen_concepts ..."
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for kind, reg in load_all().items():  # every registry: encoders, heads, losses, ops, formats, layouts, ...
        print(f"{kind}: {', '.join(reg.names()) or '(none yet)'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmpretrain", description="Multimodal contrastive pre-training.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train or resume a model",
        description=(
            "Train from a layered YAML config; key=value overrides apply last (e.g. train.steps=100 "
            "train.resume=latest). Run under torchrun for several processes or nodes."
        ),
    )
    t.add_argument("config", help="experiment YAML, e.g. configs/experiment/smoke.yaml")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("config", help="print the resolved config", description="Print the fully resolved config.")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(fn=cmd_config)

    s = sub.add_parser("shards", help="webdataset shard tools").add_subparsers(dest="shards_cmd", required=True)
    m = s.add_parser(
        "make",
        help="write shards from an image folder + captions file",
        description=(
            "Write img2dataset-style webdataset shards (jpg/png/webp + txt + json) and manifest.json. "
            f"Captions: CSV/TSV with a header, or JSONL, with an image-path column ({'/'.join(PATH_COLUMNS)}) "
            f"relative to --images and a caption column ({'/'.join(CAPTION_COLUMNS)}); every other column "
            "goes into each sample's json member."
        ),
    )
    m.add_argument("--images", required=True, help="image folder")
    m.add_argument("--captions", required=True, help="captions file (.csv, .tsv, .jsonl)")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    m.add_argument("--max-size", type=int, default=1_000_000_000, help="bytes per shard (default 1e9)")
    m.add_argument("--prefix", default="shard", help="shard name prefix (default 'shard')")
    m.add_argument("--no-verify", action="store_true", help="do not decode images/clips to check them")
    kind = m.add_mutually_exclusive_group()
    kind.add_argument(
        "--video",
        dest="media",
        action="store_const",
        const="video",
        help="the path column names video clips (mp4/webm/avi/mkv/mov), stored as they are",
    )
    kind.add_argument(
        "--audio",
        dest="media",
        action="store_const",
        const="audio",
        help="the path column names audio files (wav/flac/mp3/ogg), stored as they are",
    )
    m.set_defaults(media="image")
    m.set_defaults(fn=cmd_shards_make)
    f = s.add_parser(
        "filter",
        help="write new shards holding only a keep-list's samples",
        description=(
            "Copy the samples that a keep-list parquet names (retrieval dedup / retrieval filter: its 'shard' and "
            "'key' columns; 'key' alone when keys are unique) from SHARDS into new shards, every member unchanged, "
            "each shard atomic, manifest.json last. An earlier filter output in --out is replaced; another "
            "non-empty folder is refused."
        ),
    )
    f.add_argument("shards", help="shard spec: folder of .tar, brace pattern, :: list, pipe: URLs")
    f.add_argument("--keep", required=True, help="keep-list parquet")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    f.add_argument("--max-size", type=int, default=1_000_000_000, help="bytes per shard (default 1e9)")
    f.add_argument("--prefix", default="shard", help="shard name prefix (default 'shard')")
    f.set_defaults(fn=cmd_shards_filter)

    _add_eval(sub)
    d = sub.add_parser("data", help="benchmark corpora").add_subparsers(dest="data_cmd", required=True)
    db = d.add_parser(
        "build",
        help="build a benchmark corpus",
        description=(
            "Fetch (emoji: npm; icons: Debian packages via apt-get download, no install), rasterise "
            "(rsvg-convert) and split a benchmark corpus: training shards plus ImageFolder evaluation splits "
            "(training styles, held-out rendition and sketch styles, unseen concepts) and manifest.json with "
            "sources, versions and licences. `motion` renders video-audio-text clips (emoji in motion, spoken "
            "names by espeak-ng) with video shards for every split. Cached and idempotent. See docs/corpus.md "
            "and docs/video_audio.md."
        ),
    )
    db.add_argument("corpus", choices=CORPORA.names(), help="which corpus")
    db.add_argument("--cache", default=None, help="download and raster cache (default .cache/mmpretrain/CORPUS)")
    db.add_argument("--out", default=None, help="output folder, rebuilt (default data/CORPUS)")
    db.add_argument(
        "--concepts",
        type=int,
        default=None,
        help="concepts to sample (0: all; default: emoji 300, icons all, motion 40)",
    )
    db.add_argument("--size", type=int, help="image (motion: video frame) side in pixels (default: the corpus's, 64)")
    db.add_argument("--seed", type=int, help="the split's and sampling's seed (default: the corpus's, 0)")
    db.set_defaults(fn=cmd_data_build)
    add_export(sub, _model_args).set_defaults(fn=lambda args: cmd_export(args, _load_model(args)))

    ck = sub.add_parser("checkpoint", help="checkpoint tools").add_subparsers(dest="checkpoint_cmd", required=True)
    cv = ck.add_parser(
        "convert",
        help="rewrite a checkpoint in the ddp or fsdp format",
        description=(
            "Rewrite one of our checkpoints in the format train.strategy=TO writes: ddp (model.safetensors, "
            "optimizer in state.pt) or fsdp (sharded/, torch.distributed.checkpoint). Weights, optimizer state, "
            "schedule, RNG and data positions carry over unchanged. Training reads either format anyway; this is "
            "for tools that want one."
        ),
    )
    cv.add_argument("checkpoint", help="a step_XXXXXXXX checkpoint folder")
    cv.add_argument("--to", required=True, choices=STRATEGIES.names(), help="the target format")
    cv.add_argument("--out", required=True, help="a new folder (e.g. another run's checkpoints/step_XXXXXXXX)")
    cv.set_defaults(fn=cmd_checkpoint_convert)

    add_caption(sub, _model_args).set_defaults(fn=lambda args: cmd_caption(args, _load_model(args)))

    ls = sub.add_parser(
        "list", help="list every registry's names: encoders, heads, losses, data ops, formats, layouts, ..."
    )
    ls.set_defaults(fn=cmd_list)
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint dir, run dir, open_clip local-dir:PATH, or a model name/YAML together with --pretrained",
    )
    p.add_argument(
        "--pretrained", help="weights for --model given as a name/YAML (e.g. --model ViT-B-32 --pretrained w.pt)"
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="zero-shot, retrieval and robustness evaluation").add_subparsers(
        dest="eval_cmd", required=True
    )
    z = e.add_parser(
        "zeroshot",
        help="zero-shot classification on ImageFolder sets",
        description=(
            "Top-1/top-5/mean per-class recall. Each --data is [NAME@]LAYOUT=DIR; layouts: folder (folder names are "
            "classes), imagenet, imagenet-sketch, imagenet-v2, imagenet-r, imagenet-a; or NAME@wds[:SPLIT]=DIR, a "
            "CLIP_benchmark webdataset folder (its classnames.txt and templates, SPLIT/N.tar; split test); or "
            "NAME@shards:FIELD=SHARDS (labels in json[FIELD])."
        ),
    )
    z.add_argument("--data", nargs="+", required=True, help="[NAME@]LAYOUT=DIR, NAME@wds=DIR, NAME@shards:F=S ...")
    r = e.add_parser(
        "retrieval",
        help="image-text retrieval recall@1/5/10 on shards or labelled folders",
        description=(
            "Recall@k both ways on webdataset shards (several captions per image via json "
            "{'captions': [...]}), or text->image recall@k on a labelled folder given as "
            "[NAME@]LAYOUT=DIR (each class prompt is a query; its images are the hits), or a CLIP_benchmark "
            "webdataset folder NAME@wds=DIR (retrieval sets: several txt captions per image)."
        ),
    )
    r.add_argument("--data", nargs="+", required=True, help="shard specs, or [NAME@]LAYOUT=DIR folders")
    b = e.add_parser(
        "robustness",
        help="accuracy under distribution shift, drop and effective robustness",
        description="Zero-shot accuracy on an in-distribution set and shifted sets ([NAME@]LAYOUT=DIR).",
    )
    b.add_argument("--id", required=True, help="in-distribution set, e.g. imagenet=/data/imagenet/val")
    b.add_argument("--ood", nargs="+", required=True, help="shifted sets, e.g. imagenet-r=/data/imagenet-r")
    b.add_argument("--baseline", help="JSON {set name or 'all': [[id_acc, ood_acc], ...]} for effective robustness")
    h = e.add_parser(
        "hard",
        help="build a hard subset (ImageNet-A analogue) from a reference model's mistakes",
        description=(
            "Copy the images of the given labelled folders that --model (the reference) "
            "misclassifies zero-shot into --hard-out/<class>/, keeping every class folder, with "
            "hard_subset.json naming the reference. Evaluate other models on it with "
            "`eval zeroshot --data hard@folder=DIR`."
        ),
    )
    h.add_argument("--data", nargs="+", required=True, help="[NAME@]LAYOUT=DIR folders to filter")
    h.add_argument("--hard-out", required=True, help="output folder (rebuilt)")
    h.add_argument("--reference-name", help="how the report names the reference model (default: --model)")
    md = e.add_parser(
        "media",
        help="zero-shot and retrieval for video / audio (and image) on labelled shards",
        description=(
            "Embed every sample's --modalities once (averaging --clips x --crops video views and "
            "--windows audio windows), then report zero-shot top-1/top-5 per modality and json "
            "label field, and recall@1/5/10 with chance for caption->m, class->m and m->m' "
            "(e.g. video->audio). Each --data is [NAME@]shards[:FIELD,...]=SHARDS, e.g. "
            "heldout@shards:concept,motion=data/motion/eval/heldout_combos."
        ),
    )
    md.add_argument("--data", nargs="+", required=True, help="[NAME@]shards[:FIELD,...]=SHARDS ...")
    md.add_argument(
        "--modalities",
        nargs="+",
        default=["video"],
        choices=MEDIA,
        help="what to embed from each sample (default video)",
    )
    md.add_argument("--clips", type=int, default=1, help="video clips spread over each video (default 1)")
    md.add_argument("--crops", type=int, default=1, help="spatial crops per clip: 1 centre, 3 left/centre/right")
    md.add_argument("--windows", type=int, default=1, help="audio windows spread over each track (default 1)")
    md.add_argument("--plot", help="write a PNG of every figure beside its chance level")
    for p in (z, r, b, h, md, add_eval_captioning(e), _add_linear_probe(e)):
        _model_args(p)
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--out", help="write the JSON report here")
        p.add_argument(
            "--templates",
            default=None,
            help="'a photo of a <>' or a named set (imagenet80, imagenet_simple, photo); default: a wds set's own "
            "templates, else imagenet80 (media: the class names as they are)",
        )
        if "workers" in job_fields(p.prog.split()[-1]):  # only where the job decodes in processes
            p.add_argument("--workers", type=int, default=0, help="image decoding processes")
        p.add_argument(
            "--format",
            choices=REPORT_FORMATS.names(),
            default="mmpretrain",
            help="clip_benchmark: --out is a folder (or a {dataset}/{task}/... template) of one JSON per dataset "
            "and task in CLIP_benchmark's schema, which `clip_benchmark build` reads",
        )
        p.set_defaults(fn=cmd_eval)


def _add_linear_probe(e) -> argparse.ArgumentParser:
    lp = e.add_parser(
        "linear-probe",
        help="linear probe and few-shot probes on frozen embeddings, beside zero-shot",
        description=(
            "Embed --train and every --test set once (cached under --feature-cache by model id), fit a "
            "multinomial logistic regression with its L2 strength C chosen on a validation split of --train "
            "(97 values over 1e-6..1e6, CLIP_benchmark's bisection), refit on train+validation, and report "
            "top-1/top-5/mean per-class recall on each --test set next to zero-shot on the same embeddings. "
            "--shots K ... adds K-shot probes (K images per class, drawn per --seeds). Sets as in `eval zeroshot` "
            "(a wds set's --train reads its train split); video/audio with --modality and NAME@shards:FIELD=SHARDS."
        ),
    )
    lp.add_argument("--train", required=True, help="training set, e.g. seen@folder=DIR or cifar10@wds=DIR")
    lp.add_argument("--test", nargs="+", required=True, help="test sets, e.g. rendition@folder=DIR")
    lp.add_argument("--shots", type=int, nargs="*", default=[], help="K-shot probes to add, e.g. 1 2 4 8 16")
    lp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="validation split and shot draws (0 1 2)")
    lp.add_argument("--val-proportion", type=float, default=0.2, help="of --train, to choose C on (0.2)")
    lp.add_argument("--allow-fewer", action="store_true", help="a class with fewer than K items gives all it has")
    lp.add_argument("--max-iter", type=int, default=500, help="L-BFGS iterations per fit (500)")
    lp.add_argument("--modality", choices=MEDIA, default="image")
    lp.add_argument("--clips", type=int, default=1, help="video clips averaged per item (1)")
    lp.add_argument("--crops", type=int, default=1, help="spatial crops per clip (1)")
    lp.add_argument("--windows", type=int, default=1, help="audio windows averaged per item (1)")
    lp.add_argument(
        "--feature-cache", default=".cache/mmpretrain/features", help="feature cache folder ('none': no cache)"
    )
    lp.add_argument("--plot", help="write the few-shot curves (PNG) with the full probe and zero-shot")
    return lp


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.fn(args)
    except (
        ConfigError,
        FileNotFoundError,
        FileExistsError,
        DataError,
        CheckpointError,
        ValueError,
        FloatingPointError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
