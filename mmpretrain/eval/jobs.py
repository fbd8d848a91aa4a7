"""Evaluation jobs by name (``EVAL_JOBS``): what ``mmpretrain eval <job>`` and ``api.evaluate`` run.

A job is registered with the frozen dataclass of its parameters. ``build_job(name, params)`` checks
the parameters (an unknown key fails naming the valid ones) and parses and checks every set spec,
so a typo fails before any model loads; ``job.run(model)`` evaluates and returns an ``EvalResult``:
the JSON-able report, the tables and notes the command line prints, and, for the jobs CLIP_benchmark
has a task for, its records (``eval.clip_benchmark``).

The example of an entry is ``fn(folder) -> {"params": ..., "decoder": kind or None}``: parameters
over tiny data written into ``folder``, and the caption decoder the model needs (captioning).
"""

from __future__ import annotations

import dataclasses
import io
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image
from webdataset import TarWriter

from mmpretrain.config.strict import ConfigError, from_dict
from mmpretrain.eval import clip_benchmark as cb
from mmpretrain.eval.captioning import captioning_eval
from mmpretrain.eval.inputs import EVAL_INPUTS, Views
from mmpretrain.eval.media import media_eval, plot_media
from mmpretrain.eval.probe import ProbeConfig, linear_probe, plot_probe, probe_table_rows, set_features
from mmpretrain.eval.runner import (
    embed_folder,
    hard_subset,
    robustness_eval,
    set_retrieval_eval,
    table,
    write_report,
    zeroshot_eval,
)
from mmpretrain.eval.sets import parse_set, parse_source
from mmpretrain.eval.zeroshot import resolve_templates
from mmpretrain.models.contrastive import model_id
from mmpretrain.models.generate import METHODS
from mmpretrain.registry import Registry

Templates = str | tuple[str, ...] | None  # a template with <>, several, or a named set; None: the job's default
ZEROSHOT_COLUMNS = ["dataset", "n", "classes", "top1", "top5", "mean_per_class_recall", "chance_top1"]


@dataclass
class EvalResult:
    """What a job returns: ``report`` (JSON-able), ``tables`` then ``notes`` (printed by the command line)
    and ``records(model=, pretrained=)``: CLIP_benchmark records, for the jobs that have them."""

    report: dict[str, Any]
    tables: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: Callable[..., list[dict]] | None = None


@dataclass(frozen=True)
class EvalJob:
    """A built job: parameters checked and sets parsed; ``run(model)`` evaluates."""

    name: str
    params: Any
    run: Callable[[Any], EvalResult]

    @property
    def clip_benchmark(self) -> bool:
        """Whether the job writes CLIP_benchmark records (``--format clip_benchmark``)."""
        return self.params.clip_benchmark


EVAL_JOBS: Registry[Callable[[Any], EvalJob]] = Registry("evaluation job")


def build_job(name: str, params: dict[str, Any] | Any = None) -> EvalJob:
    """The job ``name`` with ``params`` (a dict or its params dataclass); a single string given for a
    list-valued parameter (``data="toy@folder=DIR"``) counts as a list of one."""
    entry = EVAL_JOBS.get(name)
    if not isinstance(params, entry.config_cls):
        hints = typing.get_type_hints(entry.config_cls)
        params = {k: (v,) if isinstance(v, str) and _is_tuple(hints.get(k)) else v for k, v in (params or {}).items()}
        params = from_dict(entry.config_cls, params, f"eval {name}")
    return entry.builder(params)


def clip_benchmark_jobs() -> list[str]:
    """The jobs that can write CLIP_benchmark records."""
    return [e.name for e in EVAL_JOBS.entries() if e.config_cls.clip_benchmark]


def _is_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple


# ---------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ZeroShotParams:
    data: tuple[str, ...]  # [NAME@]KIND[:OPTION]=PATH labelled sets
    templates: Templates = None  # None: a wds set's own, else imagenet80
    batch_size: int = 64
    workers: int = 0  # image decoding processes
    clip_benchmark: ClassVar[bool] = True


@dataclass(frozen=True)
class RetrievalParams:
    data: tuple[str, ...]  # shard specs with captions, or labelled sets
    templates: Templates = None
    batch_size: int = 64
    clip_benchmark: ClassVar[bool] = True


@dataclass(frozen=True)
class RobustnessParams:
    id: str  # the in-distribution set
    ood: tuple[str, ...]  # the shifted sets
    baseline: Any = None  # {set name or "all": [[id_acc, ood_acc], ...]}, or a JSON file of it
    templates: Templates = None
    batch_size: int = 64
    workers: int = 0
    clip_benchmark: ClassVar[bool] = True


@dataclass(frozen=True)
class HardParams:
    data: tuple[str, ...]  # labelled image folders to filter
    hard_out: str  # the output folder (rebuilt)
    reference_name: str | None = None  # how the report names the reference model (default: its model id)
    templates: Templates = None
    batch_size: int = 64
    workers: int = 0
    clip_benchmark: ClassVar[bool] = False


@dataclass(frozen=True)
class MediaParams:
    data: tuple[str, ...]  # [NAME@]shards[:FIELD,...]=SHARDS
    modalities: tuple[str, ...] = ("video",)
    clips: int = 1
    crops: int = 1
    windows: int = 1
    plot: str | None = None  # a PNG of every figure beside its chance level
    templates: Templates = None  # None: the class names as they are
    batch_size: int = 64
    clip_benchmark: ClassVar[bool] = False


@dataclass(frozen=True)
class CaptioningParams:
    data: tuple[str, ...]  # shard specs with captions, or labelled folders
    method: str = "greedy"
    max_len: int = 20
    min_len: int = 0
    beams: int = 4
    length_penalty: float = 1.0
    templates: Templates = None  # a labelled folder's references: its class names in these
    batch_size: int = 64
    clip_benchmark: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r}: one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class LinearProbeParams:
    train: str
    test: tuple[str, ...]
    shots: tuple[int, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)
    val_proportion: float = 0.2
    max_iter: int = 500
    allow_fewer: bool = False
    modality: str = "image"
    clips: int = 1
    crops: int = 1
    windows: int = 1
    feature_cache: str = ".cache/mmpretrain/features"  # 'none': no cache
    plot: str | None = None
    device: str | None = None  # where the probe is fitted (None: the model's device)
    templates: Templates = None
    batch_size: int = 64
    workers: int = 0
    clip_benchmark: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.modality not in EVAL_INPUTS:
            raise ConfigError(f"modality {self.modality!r}: one of {', '.join(EVAL_INPUTS.names())}")


# ---------------------------------------------------------------- examples (tiny data)


def _image_folder(root: Path, per_class: int = 4) -> Path:
    for i, name in enumerate(["red", "blue"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            Image.new("RGB", (32, 32), (200 * (1 - i), 10 * j, 200 * i)).save(root / name / f"{j}.png")
    return root


def _caption_shards(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    with TarWriter(str(root / "s-000000.tar")) as w:
        for i in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (200 * (i % 2), 40 * i, 0)).save(buf, format="png")
            meta = {"concept": "ab"[i % 2], "captions": [f"a {'ab'[i % 2]} square", "a square"]}
            w.write({"__key__": f"{i:04d}", "png": buf.getvalue(), "json": json.dumps(meta)})
    return str(root / "s-000000.tar")


def _example(**params: Any) -> dict[str, Any]:
    return {"params": params, "decoder": None}


def _folder_spec(folder: Path) -> str:
    return f"toy@folder={_image_folder(folder / 'set')}"


def _zeroshot_example(folder: Path) -> dict[str, Any]:
    return _example(data=[_folder_spec(folder)], templates="a <> square", batch_size=4)


def _hard_example(folder: Path) -> dict[str, Any]:
    spec = _folder_spec(folder)
    return _example(data=[spec], hard_out=str(folder / "hard"), templates="a <> square", batch_size=4)


def _robustness_example(folder: Path) -> dict[str, Any]:
    spec = _folder_spec(folder)
    return _example(id=spec, ood=[f"shifted@folder={folder / 'set'}"], templates="a <>", batch_size=4)


def _retrieval_example(folder: Path) -> dict[str, Any]:
    return _example(data=[_caption_shards(folder / "shards")], batch_size=4)


def _media_example(folder: Path) -> dict[str, Any]:
    shards = _caption_shards(folder / "shards")
    return _example(data=[f"toy@shards:concept={shards}"], modalities=["image"], batch_size=4)


def _captioning_example(folder: Path) -> dict[str, Any]:
    shards = _caption_shards(folder / "shards")
    return {"params": {"data": [shards], "max_len": 4, "batch_size": 4}, "decoder": "locca"}


def _probe_example(folder: Path) -> dict[str, Any]:
    train, test = _image_folder(folder / "train", 5), _image_folder(folder / "test", 2)
    return _example(
        train=f"train@folder={train}",
        test=[f"test@folder={test}"],
        seeds=[0],
        max_iter=20,
        feature_cache="none",
        templates="a <> square",
        batch_size=4,
    )


# ---------------------------------------------------------------- the jobs


def _templates(p: Any) -> Any:
    return list(p.templates) if isinstance(p.templates, tuple) else p.templates


@EVAL_JOBS.register("zeroshot", config=ZeroShotParams, example=_zeroshot_example)
def zeroshot_job(p: ZeroShotParams) -> EvalJob:
    """Zero-shot top-1 / top-5 / mean per-class recall (and chance) on labelled sets."""
    sets = [parse_set(d, check=True) for d in p.data]

    def run(model) -> EvalResult:
        common = {"batch_size": p.batch_size, "templates": _templates(p), "workers": p.workers}
        reports = [zeroshot_eval(model, d, **common) for d in sets]
        return EvalResult(
            {"zeroshot": reports},
            [table(reports, ZEROSHOT_COLUMNS)],
            records=lambda **who: [cb.zeroshot_record(r, **who) for r in reports],
        )

    return EvalJob("zeroshot", p, run)


@EVAL_JOBS.register("retrieval", config=RetrievalParams, example=_retrieval_example)
def retrieval_job(p: RetrievalParams) -> EvalJob:
    """Recall@k (and chance): both ways on shards with captions, text->image on labelled sets."""
    sets = [parse_source(d, check=True) for d in p.data]

    def run(model) -> EvalResult:
        reports = [set_retrieval_eval(model, d, templates=_templates(p), batch_size=p.batch_size) for d in sets]
        keys = list(dict.fromkeys(k for r in reports for k in r if "R@" in k))
        return EvalResult(
            {"retrieval": reports},
            [table(reports, ["dataset", "images", *keys])],
            records=lambda **who: [cb.retrieval_record(r, **who) for r in reports],
        )

    return EvalJob("retrieval", p, run)


@EVAL_JOBS.register("robustness", config=RobustnessParams, example=_robustness_example)
def robustness_job(p: RobustnessParams) -> EvalJob:
    """Zero-shot accuracy in distribution and under shifts, the drop, and effective robustness."""
    id_set, ood = parse_set(p.id, check=True), [parse_set(d, check=True) for d in p.ood]
    baseline = json.loads(Path(p.baseline).read_text()) if isinstance(p.baseline, (str, Path)) else p.baseline

    def run(model) -> EvalResult:
        common = {"templates": _templates(p), "workers": p.workers, "batch_size": p.batch_size}
        report = robustness_eval(model, id_set, ood, baseline=baseline, **common)
        rows = [{**report["in_distribution"], "drop_top1": 0.0}] + report["shifts"]
        columns = ["dataset", "n", "classes", "top1", "top5", "drop_top1", "effective_robustness"]
        return EvalResult(
            report, [table(rows, columns)], records=lambda **who: [cb.zeroshot_record(r, **who) for r in rows]
        )

    return EvalJob("robustness", p, run)


@EVAL_JOBS.register("hard", config=HardParams, example=_hard_example)
def hard_job(p: HardParams) -> EvalJob:
    """A hard subset (ImageNet-A analogue): the images the model misclassifies zero-shot, copied."""
    sets = [parse_set(d, check=True) for d in p.data]

    def run(model) -> EvalResult:
        common = {"batch_size": p.batch_size, "templates": _templates(p), "workers": p.workers}
        fes = [embed_folder(model, d, **common) for d in sets]
        report = hard_subset(fes, p.hard_out, reference=p.reference_name or model_id(model))
        counts = table([{"dataset": k, **v} for k, v in report["counts"].items()], ["dataset", "images", "hard"])
        note = (
            f"hard subset of {report['hard']} images in {report['classes']} class folders: {p.hard_out} "
            f"(evaluate with --data hard@folder={p.hard_out})"
        )
        return EvalResult(report, [counts], [note])

    return EvalJob("hard", p, run)


@EVAL_JOBS.register("media", config=MediaParams, example=_media_example)
def media_job(p: MediaParams) -> EvalJob:
    """Zero-shot per modality and label field, and caption/class/cross-modal recall@k, on labelled shards."""
    sets = [parse_set(d, kinds=("shards",)) for d in p.data]

    def run(model) -> EvalResult:
        views = Views(p.clips, p.crops, p.windows)
        templates = _templates(p) if p.templates is not None else "<>"  # class names as they are
        common = {"templates": templates, "views": views, "batch_size": p.batch_size}
        reports = [media_eval(model, d, list(p.modalities), **common) for d in sets]
        retrieval = ["dataset", "task", "queries", "items"] + [f"R@{k}{c}" for k in (1, 5, 10) for c in ("", "_chance")]
        zs = ["dataset", "modality", "label", "n", "classes", "top1", "top5", "chance_top1"]
        tables = [
            f"{r['dataset']}: {r['samples']} samples, skipped {r['skipped'] or 'none'}, views {r['views']}\n"
            f"{table(r['zeroshot'], zs)}\n\n{table(r['retrieval'], retrieval)}\n"
            for r in reports
        ]
        notes = []
        if p.plot:
            plot_media(reports, p.plot)
            notes.append(f"plot: {p.plot}")
        return EvalResult({"media": reports}, tables, notes)

    return EvalJob("media", p, run)


@EVAL_JOBS.register("captioning", config=CaptioningParams, example=_captioning_example)
def captioning_job(p: CaptioningParams) -> EvalJob:
    """BLEU-4 and CIDEr of the model's captions against each image's references."""
    sets = [parse_source(d, check=True) for d in p.data]
    templates = resolve_templates(_templates(p)) if p.templates else None

    def run(model) -> EvalResult:
        gen = {"method": p.method, "max_len": p.max_len, "min_len": p.min_len, "num_beams": p.beams}
        gen["length_penalty"] = p.length_penalty
        reports = [captioning_eval(model, d, templates=templates, batch_size=p.batch_size, **gen) for d in sets]
        return EvalResult({"captioning": reports}, [table(reports, ["dataset", "images", "bleu4", "cider"])])

    return EvalJob("captioning", p, run)


@EVAL_JOBS.register("linear-probe", config=LinearProbeParams, example=_probe_example)
def linear_probe_job(p: LinearProbeParams) -> EvalJob:
    """Full and K-shot linear probes on frozen embeddings, beside zero-shot on the same embeddings."""
    cfg = ProbeConfig(p.shots, p.seeds, p.val_proportion, p.max_iter, p.allow_fewer)
    train, tests = parse_set(p.train, check=True, split="train"), [parse_set(d, check=True) for d in p.test]

    def run(model) -> EvalResult:
        common = {
            "modality": p.modality,
            "views": Views(p.clips, p.crops, p.windows),
            "cache": None if p.feature_cache.lower() == "none" else p.feature_cache,
            "model_key": model_id(model),
            "batch_size": p.batch_size,
            "workers": p.workers,
        }
        feats = set_features(model, train, **common)
        test_feats = [set_features(model, d, **common) for d in tests]
        device = p.device or str(model.device)
        report = linear_probe(model, feats, test_feats, cfg, templates=_templates(p), device=device)
        columns = ["dataset", "method", "top1", "top1_std", "top5", "mean_per_class_recall", "chance_top1"]
        notes = [f"plot: {plot_probe(report, p.plot)}"] if p.plot else []
        return EvalResult(
            {"linear_probe": report},
            [table(probe_table_rows(report), [*columns, "train_items"])],
            notes,
            records=lambda **who: cb.probe_records(report, **who),
        )

    return EvalJob("linear-probe", p, run)


def job_fields(name: str) -> list[str]:
    """The parameter names of job ``name`` (what the command line fills from its flags)."""
    return [f.name for f in dataclasses.fields(EVAL_JOBS.get(name).config_cls)]


# ---------------------------------------------------------------- report formats (`--format`)
# name -> write(result, report, out, model) -> the files written; attrs: records (needs a job's
# CLIP_benchmark records, so a job that has them: EvalJob.clip_benchmark)
REPORT_FORMATS: Registry[Callable[..., list[Path]]] = Registry("report format")
_REPORT_EXAMPLE = {"report": {"zeroshot": [{"dataset": "toy", "top1": 0.5}]}, "dataset": "toy"}


@REPORT_FORMATS.register("mmpretrain", example=_REPORT_EXAMPLE, records=False)
def write_mmpretrain(result: EvalResult, report: dict[str, Any], out: str, model: str) -> list[Path]:
    """One JSON report (the figures of every set, the model) at ``out``."""
    return [write_report(report, out)]


@REPORT_FORMATS.register("clip_benchmark", example=_REPORT_EXAMPLE, records=True)
def write_clip_benchmark(result: EvalResult, report: dict[str, Any], out: str, model: str) -> list[Path]:
    """One JSON file per dataset and task in CLIP_benchmark's schema (``out``: a folder or a
    ``{dataset}/{task}/...`` template), which ``clip_benchmark build`` reads."""
    return cb.write_records(result.records(model="mmpretrain", pretrained=model), out)
