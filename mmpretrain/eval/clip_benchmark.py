"""Results in CLIP_benchmark's JSON schema, one file per (dataset, task), so its tooling reads them.

CLIP_benchmark writes ``{"dataset", "model", "pretrained", "task", "metrics", "language"}`` per
evaluation to ``--output`` (default ``{dataset}_{pretrained}_{model}_{language}_{task}.json``) and
``clip_benchmark build FILES`` merges them into one CSV. The metric names are its own:

    zeroshot_classification   acc1, acc5, mean_per_class_recall
    zeroshot_retrieval        image_retrieval_recall@k (text -> image), text_retrieval_recall@k (image -> text)
    linear_probe              lp_acc1, lp_acc5, lp_mean_per_class_recall, fewshot_k (-1: all), seed,
                              normalized; ``C`` (our regulariser, scikit-learn's) replaces its weight_decay

Few-shot results get ``_k{K}`` before ``.json`` (CLIP_benchmark runs one K per call, so its
template has no field for it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mmpretrain.utils.io import atomic_write_text

OUTPUT = "{dataset}_{pretrained}_{model}_{language}_{task}.json"  # CLIP_benchmark's default --output


def record(dataset: str, task: str, metrics: dict[str, Any], model: str, pretrained: str) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": task,
        "metrics": metrics,
        "language": "en",
    }


def zeroshot_record(row: dict, model: str, pretrained: str) -> dict:
    metrics = {"acc1": row["top1"], "acc5": row["top5"], "mean_per_class_recall": row["mean_per_class_recall"]}
    return record(row["dataset"], "zeroshot_classification", metrics, model, pretrained)


def retrieval_record(row: dict, model: str, pretrained: str) -> dict:
    metrics = {}
    for key, value in row.items():
        m = re.fullmatch(r"(image_to_text|text_to_image)_R@(\d+)", key)
        if m:
            name = "image_retrieval_recall" if m[1] == "text_to_image" else "text_retrieval_recall"
            metrics[f"{name}@{m[2]}"] = value
    return record(str(row["dataset"]), "zeroshot_retrieval", metrics, model, pretrained)


def probe_records(report: dict, model: str, pretrained: str) -> list[dict]:
    out = []
    for t in report["tests"]:
        for k, m in [(-1, t["linear_probe"]), *[(int(k), v) for k, v in t["fewshot"].items()]]:
            metrics = {
                "lp_acc1": m["top1"],
                "lp_acc5": m["top5"],
                "lp_mean_per_class_recall": m["mean_per_class_recall"],
                "lp_acc1_std": m["top1_std"],
                "C": m["C"],
                "fewshot_k": k,
                "seed": m["seeds"],
                "normalized": True,
            }
            out.append(record(t["dataset"], "linear_probe", metrics, model, pretrained))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def write_records(records: list[dict], out: str | Path) -> list[Path]:
    """Each record to its file: ``out`` is a folder (CLIP_benchmark's default name inside) or a
    template with ``{dataset}``, ``{model}``, ``{pretrained}``, ``{task}``, ``{language}``."""
    out, paths = str(out), []
    template = out if "{" in out else str(Path(out) / OUTPUT)
    for r in records:
        fields = {k: _slug(r[k]) for k in ("dataset", "model", "pretrained", "task", "language")}
        path = Path(template.format(**fields))
        k = r["metrics"].get("fewshot_k", -1)
        if k != -1:
            path = path.with_name(f"{path.stem}_k{k}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(r))
        paths.append(path)
    return paths
