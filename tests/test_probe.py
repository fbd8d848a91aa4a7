"""Linear and few-shot probes (eval/probe.py), CLIP_benchmark's webdataset layout and result files."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def colour_folder(root: Path, per_class: int, seed: int, size: int = 32) -> Path:
    """``root/<colour>/<i>.png``: noisy squares of four colours, a task a random tower separates."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    from mmpretrain import api

    torch.manual_seed(0)
    return api.load_checkpoint(tiny_ckpt)


def sklearn_fit(x, y, c):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=20_000, tol=1e-10).fit(x, y)


@pytest.mark.parametrize("c", [0.01, 1.0, 100.0])
def test_logistic_regression_equals_scikit_learn(c):
    """Same objective as scikit-learn's LogisticRegression(C): the same test accuracy (to 1e-3) and
    nearly the same coefficients."""
    from mmpretrain.eval.probe import accuracy, fit_logistic
    from tests.conftest import clustered

    x = clustered(600, 16, 6, seed=1, spread=0.6)
    y = np.argmax(x @ np.random.default_rng(2).standard_normal((16, 6)), axis=1)
    xtr, ytr, xte, yte = x[:400], y[:400], x[400:], y[400:]
    ours = fit_logistic(xtr, ytr, 6, c, max_iter=2000)
    ref = sklearn_fit(xtr, ytr, c)
    assert abs(accuracy(ours, xte, yte) - ref.score(xte, yte)) <= 1e-3
    if c <= 1.0:  # well-conditioned: the optimum itself matches
        np.testing.assert_allclose(ours.weight.numpy(), ref.coef_, atol=2e-3 * max(1.0, np.abs(ref.coef_).max()))


def test_the_parity_check_can_fail():
    """A different C gives a different classifier: the comparison above is not vacuous."""
    from mmpretrain.eval.probe import fit_logistic
    from tests.conftest import clustered

    x = clustered(300, 16, 6, seed=1, spread=0.6)
    y = np.argmax(x @ np.random.default_rng(2).standard_normal((16, 6)), axis=1)
    ours = fit_logistic(x, y, 6, 1e-4)
    assert not np.allclose(ours.weight.numpy(), sklearn_fit(x, y, 1.0).coef_, atol=1e-2)


def test_fewshot_sampler_is_deterministic_per_seed():
    from mmpretrain.eval.probe import fewshot_indices, stratified_split

    y = np.repeat(np.arange(5), 12)
    a, b, other = fewshot_indices(y, 4, 7), fewshot_indices(y, 4, 7), fewshot_indices(y, 4, 8)
    assert np.array_equal(a, b) and not np.array_equal(a, other)
    assert np.bincount(y[a]).tolist() == [4] * 5 and len(set(a.tolist())) == 20
    with pytest.raises(ValueError, match="fewer than 13"):
        fewshot_indices(y, 13, 0)
    assert len(fewshot_indices(y, 13, 0, allow_fewer=True)) == 60
    tr, val = stratified_split(y, 0.25, 3)
    assert np.bincount(y[val]).tolist() == [3] * 5 and not set(tr) & set(val) and len(tr) + len(val) == 60
    assert np.array_equal(stratified_split(y, 0.25, 3)[1], val)


def test_c_sweep_bisects_to_the_best_validation_accuracy():
    from mmpretrain.eval.probe import C_GRID, sweep_c
    from tests.conftest import clustered

    x = clustered(300, 8, 4, seed=3, spread=0.9)
    y = np.argmax(x @ np.random.default_rng(4).standard_normal((8, 4)), axis=1)
    c, tried = sweep_c(x[:200], y[:200], x[200:], y[200:], 4)
    assert c in C_GRID and tried[c] == max(tried.values())
    assert 7 + 4 <= len(tried) <= 7 + 8  # the coarse pass, then two new values per span at most
    assert min(tried) == C_GRID[0] and max(tried) == C_GRID[-1]


def test_probe_on_cached_features_equals_scikit_learn(model, tmp_path):
    """The whole job: features cached by model id (the second call reads the cache), the chosen C
    refit on train+validation; scikit-learn on the same cached features with the same C gets the same
    test accuracy (to 1e-3)."""
    from mmpretrain.eval.probe import ProbeConfig, linear_probe, set_features
    from mmpretrain.eval.sets import parse_set

    train = parse_set(f"train@folder={colour_folder(tmp_path / 'train', 10, 0)}")
    test = parse_set(f"test@folder={colour_folder(tmp_path / 'test', 6, 1)}")
    cache = tmp_path / "cache"
    ftr, fte = set_features(model, train, cache=cache, progress=False), set_features(model, test, cache=cache)
    assert not ftr.cached and set_features(model, train, cache=cache).cached
    assert len(list(cache.iterdir())) == 1  # one model id
    report = linear_probe(model, ftr, [fte], ProbeConfig(seeds=(0,)), templates="a <> square", progress=False)
    run, row = report["runs"]["full"][0], report["tests"][0]
    cached = set_features(model, train, cache=cache)
    assert cached.cached and np.array_equal(np.asarray(cached.x), np.asarray(ftr.x))
    ref = sklearn_fit(np.asarray(cached.x), cached.y, run["C"])  # all of train (= train + validation split)
    assert abs(row["linear_probe"]["top1"] - ref.score(np.asarray(fte.x), fte.y)) <= 1e-3
    assert row["zeroshot"]["chance_top1"] == 0.25 and run["train_items"] == 40


def test_linear_probe_cli_shots_plot_and_clip_benchmark_files(tiny_ckpt, tmp_path):
    train, test = colour_folder(tmp_path / "train", 6, 0), colour_folder(tmp_path / "test", 4, 1)
    out = tmp_path / "lp.json"
    args = ["eval", "linear-probe", "--model", tiny_ckpt, "--train", f"seen@folder={train}"]
    args += ["--test", f"held@folder={test}", "--shots", "1", "2", "--seeds", "0", "1", "--templates", "a <> square"]
    args += ["--feature-cache", str(tmp_path / "cache")]
    proc = run_cli(*args, "--out", str(out), "--plot", str(tmp_path / "shots.png"))
    assert proc.returncode == 0, proc.stderr
    assert "2-shot" in proc.stdout and "zero-shot" in proc.stdout
    report = json.loads(out.read_text())["linear_probe"]
    shots = report["tests"][0]["fewshot"]
    assert set(shots) == {"1", "2"} and shots["1"]["train_items"] == 4 and shots["2"]["seeds"] == [0, 1]
    assert (tmp_path / "shots.png").stat().st_size > 10_000
    proc = run_cli(*args, "--format", "clip_benchmark", "--out", str(tmp_path / "cb"))
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in (tmp_path / "cb").iterdir())
    assert len(files) == 3 and any(n.endswith("_linear_probe_k2.json") for n in files)
    rec = json.loads((tmp_path / "cb" / files[-1]).read_text())
    assert rec["task"] == "linear_probe" and {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"} <= set(rec["metrics"])


def test_too_few_items_for_the_shots_is_one_line(tiny_ckpt, tmp_path):
    train, test = colour_folder(tmp_path / "train", 3, 0), colour_folder(tmp_path / "test", 2, 1)
    proc = run_cli(
        "eval", "linear-probe", "--model", tiny_ckpt, "--train", f"a@folder={train}", "--test", f"b@folder={test}",
        "--shots", "8", "--feature-cache", "none",
    )  # fmt: skip
    assert proc.returncode == 2 and "fewer than 8 training items" in proc.stderr and "Traceback" not in proc.stderr


def clip_benchmark_wds(root: Path, per_class: int, seed: int) -> Path:
    """A CLIP_benchmark webdataset folder written by CLIP_benchmark's own converter (train and test)."""
    from clip_benchmark.webdataset_builder import convert_dataset

    class Colours(torch.utils.data.Dataset):
        classes, templates = list(COLOURS), ["a photo of a {c}.", "a {c} square."]

        def __init__(self, folder: Path):
            self.items = [(p, self.classes.index(p.parent.name)) for p in sorted(folder.rglob("*.png"))]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return str(self.items[i][0]), self.items[i][1]

    from clip_benchmark.webdataset_builder import path_to_bytes

    for split, s in (("train", seed), ("test", seed + 1)):
        ds = Colours(colour_folder(root / f"raw_{split}", per_class, s))
        convert_dataset(ds, split, root / "wds", transform=path_to_bytes, max_count=7, verbose=False)
    return root / "wds"


def test_clip_benchmark_wds_folder_evaluates_with_its_templates(tiny_ckpt, tmp_path, monkeypatch):
    """A folder from CLIP_benchmark's converter (nshards.txt, N.tar with cls + png, classnames.txt, its
    templates) evaluates zero-shot and in a linear probe (train split for --train), unchanged."""
    import clip_benchmark.webdataset_builder as wb

    monkeypatch.setattr(wb.torch.utils.data, "DataLoader", _serial_loader)  # its 8 workers, in-process here
    wds = clip_benchmark_wds(tmp_path, 5, 0)
    assert (wds / "test" / "nshards.txt").read_text().strip() == "3"
    from mmpretrain import api
    from mmpretrain.eval.runner import zeroshot_eval
    from mmpretrain.eval.sets import parse_set

    model = api.load_checkpoint(tiny_ckpt)
    data = parse_set(f"colours@wds={wds}", check=True)
    r = zeroshot_eval(model, data, progress=False)
    assert r["n"] == 20 and r["classes"] == 4 and r["skipped"] == 0
    from mmpretrain.eval.runner import embed_folder

    assert embed_folder(model, data, progress=False).clf.templates == ("a photo of a <>.", "a <> square.")
    proc = run_cli(
        "eval", "linear-probe", "--model", tiny_ckpt, "--train", f"colours@wds={wds}", "--test",
        f"colours@wds={wds}", "--seeds", "0", "--feature-cache", str(tmp_path / "cache"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "linear probe (all)" in ln]
    assert lines and lines[0].split()[-1] == "20"  # fitted on the 20 train-split images


def _serial_loader(dataset, batch_size=1, num_workers=0, collate_fn=None, **kw):
    return (collate_fn([dataset[i]]) for i in range(len(dataset)))


def test_clip_benchmark_retrieval_wds_folder(tiny_ckpt, tmp_path):
    """A retrieval folder (dataset_type.txt: retrieval; several captions per image, one per txt line)."""
    from webdataset import TarWriter

    from tests.conftest import png_bytes

    root = tmp_path / "flickr"
    (root / "test").mkdir(parents=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    (root / "test" / "nshards.txt").write_text("1\n")
    with TarWriter(str(root / "test" / "0.tar")) as w:
        for i, name in enumerate(COLOURS):
            w.write({"__key__": f"s{i:07d}", "png": png_bytes(COLOURS[name]), "txt": f"a {name} thing\nall {name}"})
    proc = run_cli("eval", "retrieval", "--model", tiny_ckpt, "--data", f"f@wds={root}", "--format", "clip_benchmark",
                   "--out", str(tmp_path / "out" / "{dataset}_{task}.json"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((tmp_path / "out" / "f_zeroshot_retrieval.json").read_text())
    assert rec["dataset"] == "f" and rec["metrics"]["image_retrieval_recall@5"] == 1.0  # 8 captions, 4 images


def test_clip_benchmark_build_reads_our_result_files(tiny_ckpt, tmp_path):
    """CLIP_benchmark's own `build` (cli.main_build) merges our files into its CSV."""
    import argparse
    import csv

    folder = colour_folder(tmp_path / "set", 3, 0)
    proc = run_cli("eval", "zeroshot", "--model", tiny_ckpt, "--data", f"colours@folder={folder}", "--templates",
                   "a <> square", "--format", "clip_benchmark", "--out", str(tmp_path / "results"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name in ("tokenizer.ptbtokenizer", "bleu.bleu", "meteor.meteor", "rouge.rouge", "cider.cider", "spice.spice"):
        parts = f"pycocoevalcap.{name}".split(".")  # its captioning metrics need Java; not used by build
        for i in range(1, len(parts) + 1):
            sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        setattr(
            sys.modules[f"pycocoevalcap.{name}"],
            {"ptbtokenizer": "PTBTokenizer"}.get(parts[-1], parts[-1].title()),
            object,
        )
    from clip_benchmark.cli import main_build

    main_build(argparse.Namespace(files=[str(tmp_path / "results")], output=str(tmp_path / "bench.csv")))
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert len(rows) == 1 and rows[0]["task"] == "zeroshot_classification" and rows[0]["dataset"] == "colours"
    assert 0.0 <= float(rows[0]["acc1"]) <= 1.0 and rows[0]["model_fullname"].startswith("mmpretrain ")
