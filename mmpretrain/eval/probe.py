"""Linear probes and few-shot probes on frozen embeddings (the CLIP paper's and CLIP_benchmark's protocol).

features   each set is embedded once (``sets.parse_set``, the one evaluation-input path, any
           modality) and cached, memory-mapped, under ``CACHE/<model id>/<set fingerprint>``;
           features are the L2-normalised embeddings (CLIP_benchmark's ``--normalize``, its default)
classifier multinomial logistic regression minimising ``C * sum_i CE(W x_i + b, y_i) + |W|^2 / 2``
           (scikit-learn's objective: the intercept is not penalised), full-batch L-BFGS in torch on
           the model's device, warm-started along the sweep
C          chosen on a validation split of the training set (``val_proportion``, stratified, seeded):
           97 values log-spaced over 1e-6 .. 1e6, a coarse pass over 7 of them, then CLIP_benchmark's
           bisection around the best (spans 8, 4, 2, 1); ties keep the earlier value
refit      the full probe refits on train + validation with that C; a K-shot probe draws K images
           per class from the training part (seeded, ``fewshot_indices``) and fits on those alone
           (adding the validation split would train on more labels than K; CLIP_benchmark does the same)
seeds      every seed redraws the validation split and the shots; the report gives mean and spread
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mmpretrain.eval.inputs import Views
from mmpretrain.eval.metrics import classification_metrics, topk_accuracy
from mmpretrain.eval.sets import Labelled
from mmpretrain.eval.zeroshot import ZeroShotClassifier
from mmpretrain.models.contrastive import model_id
from mmpretrain.utils.io import atomic_dir

log = logging.getLogger(__name__)
C_GRID = tuple(float(c) for c in np.logspace(-6, 6, 97))
COARSE = tuple(range(0, 97, 16))  # 1e-6, 1e-4, ..., 1e6
SPANS = (8, 4, 2, 1)


@dataclass(frozen=True)
class ProbeConfig:
    shots: tuple[int, ...] = ()  # K-shot probes to run beside the full one (e.g. 1 2 4 8 16)
    seeds: tuple[int, ...] = (0, 1, 2)
    val_proportion: float = 0.2
    max_iter: int = 500  # L-BFGS iterations per fit
    allow_fewer: bool = False  # a class with fewer than K training images takes all it has (else an error)

    def __post_init__(self) -> None:
        if not 0 < self.val_proportion < 1:
            raise ValueError(f"val_proportion must be in (0, 1), not {self.val_proportion}")
        if any(k < 1 for k in self.shots) or not self.seeds:
            raise ValueError("shots must be >= 1 and at least one seed is needed")


@dataclass
class Features:
    """Cached features of one set: ``x`` (N, E) float32 (memory-mapped), ``y`` (N,) int64 into ``classes``."""

    name: str
    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    templates: tuple[str, ...] | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    cached: bool = False


def cache_folder(cache: Path, model_key: str, data, modality: str, views) -> Path:
    """``cache/<model id>/<modality>-<views>-<set fingerprint>``: a set re-embedded only when the model,
    its preprocessing, the views or the set's files change."""
    v = f"{views.clips}x{views.crops}x{views.windows}"
    return Path(cache) / model_key / f"{modality}-{v}-{data.fingerprint()}"


def set_features(
    model, data, *, modality="image", views=None, cache=None, model_key=None, batch_size=64, workers=0, progress=True
) -> Features:
    """``data``'s features, from the cache when there (``cache`` None: no cache). ``model_key``:
    ``api.model_id(model)``, computed here when not given."""

    views = views or Views()
    folder = None
    if cache is not None:
        if model_key is None:
            model_key = model_id(model)
        folder = cache_folder(Path(cache), model_key, data, modality, views)
        if (folder / "meta.json").is_file():
            meta = json.loads((folder / "meta.json").read_text())
            x, y = np.load(folder / "features.npy", mmap_mode="r"), np.load(folder / "labels.npy")
            log.info("%s: %d cached features from %s", data.name, len(y), folder)
            tpl = tuple(meta["templates"]) if meta.get("templates") else None
            return Features(data.name, x, y, meta["classes"], tpl, meta.get("skipped", {}), cached=True)
    lab: Labelled = data.embed(model, modality, views=views, batch_size=batch_size, workers=workers, progress=progress)
    x, y = lab.emb.numpy().astype(np.float32), lab.labels.numpy().astype(np.int64)
    if folder is not None:
        meta = {"set": data.name, "n": len(y), "dim": x.shape[1], "classes": lab.classes, "skipped": lab.skipped}
        meta["templates"] = list(lab.templates) if lab.templates else None
        with atomic_dir(folder) as tmp:
            np.save(tmp / "features.npy", x)
            np.save(tmp / "labels.npy", y)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return Features(data.name, x, y, lab.classes, lab.templates, lab.skipped)


def align(train: Features, tests: Sequence[Features]) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """One class list for a probe: the training classes, then any class only a test set has (a probe
    never predicts those). Returns (classes, train labels, each test set's labels) in that list."""
    classes = list(train.classes)
    index = {c: i for i, c in enumerate(classes)}
    for t in tests:
        for c in t.classes:
            if c not in index:
                index[c] = len(classes)
                classes.append(c)

    def remap(f: Features) -> np.ndarray:
        return np.array([index[c] for c in f.classes], dtype=np.int64)[np.asarray(f.y)]

    return classes, remap(train), [remap(t) for t in tests]


def _device_dtype(device) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device)
    return device, (torch.float64 if device.type == "cpu" else torch.float32)


@dataclass
class LinearModel:
    """``scores = x @ weight.T + bias``: weight (C, E), bias (C,)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def scores(self, x) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(x), device=self.weight.device, dtype=self.weight.dtype)
        return x @ self.weight.T + self.bias


def fit_logistic(
    x, y, n_classes: int, c: float, *, init: LinearModel | None = None, max_iter: int = 500, device="cpu"
) -> LinearModel:
    """Multinomial logistic regression: argmin ``C * sum_i CE(W x_i + b, y_i) + |W|^2 / 2`` (scikit-learn's
    ``LogisticRegression(C=c)``), full-batch L-BFGS with a strong-Wolfe line search. x: (N, E); y: (N,)."""
    device, dtype = _device_dtype(device)
    xt = torch.as_tensor(np.asarray(x), device=device, dtype=dtype)
    yt = torch.as_tensor(np.asarray(y), device=device, dtype=torch.long)
    n, dim = xt.shape
    w = torch.zeros(n_classes, dim, device=device, dtype=dtype) if init is None else init.weight.clone()
    b = torch.zeros(n_classes, device=device, dtype=dtype) if init is None else init.bias.clone()
    w.requires_grad_(True), b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:  # the objective over C * N, for conditioning; same minimiser
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w.T + b, yt) + (w * w).sum() / (2 * c * n)
        loss.backward()
        return loss

    opt.step(closure)
    return LinearModel(w.detach(), b.detach())


def accuracy(model: LinearModel, x, y) -> float:
    return topk_accuracy(model.scores(x).cpu(), torch.as_tensor(np.asarray(y)), 1)


def sweep_c(xtr, ytr, xval, yval, n_classes: int, *, max_iter: int = 500, device="cpu") -> tuple[float, dict]:
    """C by validation top-1 over ``C_GRID``: the coarse pass, then CLIP_benchmark's bisection around the
    best. Returns (C, {C: validation top-1} of every value tried)."""
    tried: dict[int, float] = {}
    fits: dict[int, LinearModel] = {}

    def val_acc(i: int) -> float:
        if i not in tried:
            near = min(fits, key=lambda j: abs(j - i), default=None)  # warm start from the nearest fit
            fits[i] = fit_logistic(
                xtr, ytr, n_classes, C_GRID[i], init=fits.get(near), max_iter=max_iter, device=device
            )
            tried[i] = accuracy(fits[i], xval, yval)
        return tried[i]

    def peak(candidates: Sequence[int]) -> int:
        best, best_acc = candidates[0], -1.0
        for i in candidates:  # strictly better only: ties keep the earlier candidate
            if val_acc(i) > best_acc:
                best, best_acc = i, val_acc(i)
        return best

    best = peak(COARSE)
    for span in SPANS:
        best = peak([max(best - span, 0), best, min(best + span, len(C_GRID) - 1)])
    return C_GRID[best], {C_GRID[i]: acc for i, acc in sorted(tried.items())}


def stratified_split(y: np.ndarray, proportion: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: ``proportion`` of each class (rounded, at least one when the class
    has two or more items) to validation, seeded."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])
        k = int(round(proportion * len(idx))) if len(idx) > 1 else 0
        k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1)
        val.append(idx[:k]), train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def fewshot_indices(y: np.ndarray, k: int, seed: int, *, allow_fewer: bool = False) -> np.ndarray:
    """K indices per class of ``y`` drawn without replacement, deterministic per seed (sorted). A class
    with fewer than K items is an error, or gives all it has with ``allow_fewer``."""
    rng = np.random.default_rng(seed)
    out, short = [], []
    for c in np.unique(y):
        idx = np.nonzero(y == c)[0]
        if len(idx) < k:
            short.append(int(c))
        out.append(rng.choice(idx, size=min(k, len(idx)), replace=False))
    if short and not allow_fewer:
        raise ValueError(
            f"{len(short)} of {len(np.unique(y))} classes have fewer than {k} training items "
            f"(e.g. class {short[0]}); use fewer shots, or allow_fewer (--allow-fewer) to take all they have"
        )
    return np.sort(np.concatenate(out))


def probe_runs(x, y, tests: Sequence[tuple[Any, np.ndarray]], n_classes: int, k: int | None, cfg: ProbeConfig, device,
               on_seed=None):  # fmt: skip
    """One probe (full: ``k`` None; else K-shot) per seed, evaluated on every test set: a list per seed
    of ``{"C", "train_items", "val_top1", "tests": [metrics per test set]}``; ``on_seed()`` after each."""
    runs = []
    for seed in cfg.seeds:
        tr, val = stratified_split(y, cfg.val_proportion, seed)
        fit_idx = tr if k is None else tr[fewshot_indices(y[tr], k, seed, allow_fewer=cfg.allow_fewer)]
        c, tried = sweep_c(x[fit_idx], y[fit_idx], x[val], y[val], n_classes, max_iter=cfg.max_iter, device=device)
        final_idx = np.sort(np.concatenate([tr, val])) if k is None else fit_idx
        model = fit_logistic(x[final_idx], y[final_idx], n_classes, c, max_iter=cfg.max_iter, device=device)
        runs.append(
            {
                "seed": seed,
                "C": c,
                "train_items": len(final_idx),
                "val_top1": tried[c],
                "tests": [classification_metrics(model.scores(tx).cpu(), ty, n_classes) for tx, ty in tests],
            }
        )
        if on_seed is not None:
            on_seed()
    return runs


def summarise(runs: list[dict], i: int) -> dict[str, Any]:
    """Mean and standard deviation over seeds of test set ``i``'s metrics."""
    out: dict[str, Any] = {}
    for key in runs[0]["tests"][i]:
        values = np.array([r["tests"][i][key] for r in runs])
        out[key], out[f"{key}_std"] = float(values.mean()), float(values.std())
    out["C"] = [r["C"] for r in runs]
    items = np.mean([r["train_items"] for r in runs])
    out["train_items"] = int(items) if items == int(items) else round(float(items), 1)
    out["seeds"] = [r["seed"] for r in runs]
    return out


def zeroshot_on_features(model, classes: list[str], templates, tests: Sequence[tuple[Any, np.ndarray]], **kw):
    """Zero-shot metrics of each test set from its cached features (the same embeddings the probe
    reads), against prompt-ensembled class embeddings; None when the model has no text tower."""

    if "text" not in model.modalities:
        return [None] * len(tests)
    weights = ZeroShotClassifier(model, classes, templates, allow_duplicates=True, **kw).weights.float().cpu()
    return [classification_metrics(torch.as_tensor(np.asarray(tx)) @ weights.T, ty, len(classes)) for tx, ty in tests]


def linear_probe(
    model,
    train: Features,
    tests: Sequence[Features],
    cfg: ProbeConfig = ProbeConfig(),
    *,
    templates=None,
    device="cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """The full probe and each K-shot probe, over ``cfg.seeds``, on every test set, beside zero-shot
    on the same features. ``templates``: None takes the training set's own, else ``imagenet80``."""

    classes, y, test_ys = align(train, tests)
    x, test_sets = np.asarray(train.x), [(np.asarray(t.x), ty) for t, ty in zip(tests, test_ys)]
    plans = [None, *cfg.shots]
    results = {}
    with tqdm(
        total=len(plans) * len(cfg.seeds), desc="probes (C sweep + refit)", unit="probe", disable=not progress
    ) as bar:
        for k in plans:
            results["full" if k is None else k] = probe_runs(
                x, y, test_sets, len(classes), k, cfg, device, on_seed=lambda: bar.update(1)
            )
    zs = zeroshot_on_features(
        model, classes, templates if templates is not None else (train.templates or "imagenet80"), test_sets,
        progress=progress,
    )  # fmt: skip
    rows = []
    for i, t in enumerate(tests):
        rows.append(
            {
                "dataset": t.name,
                "n": len(t.y),
                "skipped": t.skipped,
                "zeroshot": zs[i],
                "linear_probe": summarise(results["full"], i),
                "fewshot": {str(k): summarise(results[k], i) for k in cfg.shots},
            }
        )
    return {
        "train": {"dataset": train.name, "n": len(train.y), "classes": len(train.classes), "skipped": train.skipped},
        "classes": len(classes),
        "config": {"shots": list(cfg.shots), "seeds": list(cfg.seeds), "val_proportion": cfg.val_proportion},
        "tests": rows,
        "runs": {str(k): v for k, v in results.items()},
    }


def probe_table_rows(report: dict) -> list[dict[str, Any]]:
    """One row per (test set, method): zero-shot, the full probe, each K-shot probe."""
    rows = []
    for t in report["tests"]:
        if t["zeroshot"]:
            rows.append({"dataset": t["dataset"], "method": "zero-shot", **t["zeroshot"]})
        rows.append({"dataset": t["dataset"], "method": "linear probe (all)", **t["linear_probe"]})
        rows += [{"dataset": t["dataset"], "method": f"{k}-shot", **m} for k, m in t["fewshot"].items()]
    return rows


def plot_probe(report: dict, path: str | Path) -> Path:
    """Few-shot top-1 (mean +- std over seeds) against shots per test set, with the full probe and
    zero-shot on the same set as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, t in enumerate(report["tests"]):
        colour = f"C{i}"
        shots = sorted(int(k) for k in t["fewshot"])
        if shots:
            mean = [100 * t["fewshot"][str(k)]["top1"] for k in shots]
            std = [100 * t["fewshot"][str(k)]["top1_std"] for k in shots]
            ax.errorbar(
                shots, mean, yerr=std, marker="o", capsize=3, color=colour, label=f"{t['dataset']}: K-shot probe"
            )
        full = t["linear_probe"]
        ax.axhline(100 * full["top1"], color=colour, linestyle="--", linewidth=1,
                   label=f"{t['dataset']}: probe, all {full['train_items']:.0f} items")  # fmt: skip
        if t["zeroshot"]:
            ax.axhline(100 * t["zeroshot"]["top1"], color=colour, linestyle=":", linewidth=1.5,
                       label=f"{t['dataset']}: zero-shot")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training images per class (K)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"linear probe on {report['train']['dataset']} ({report['classes']} classes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
