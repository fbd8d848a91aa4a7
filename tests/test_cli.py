"""The command line: every command has --help; errors are one clear line, before any work."""

from __future__ import annotations

import json

import pytest
import yaml

from mmpretrain.cli import build_parser
from tests.conftest import TINY_MODEL, make_image_folder, run_cli


def test_help_from_the_entry_point():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "usage: mmpretrain" in proc.stdout


@pytest.mark.parametrize("args", [["train"], ["config"], ["shards"], ["shards", "make"], ["list"]])
def test_help(args, capsys):
    """The parser the entry point runs, in this process (an interpreter start per command is 4 s)."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*args, "--help"])
    assert exit_.value.code == 0 and "usage: mmpretrain" in capsys.readouterr().out


def test_shards_make_cli(tmp_path):
    root = make_image_folder(tmp_path / "imgs", 30)
    proc = run_cli(
        "shards",
        "make",
        "--images",
        str(root),
        "--captions",
        str(root / "captions.csv"),
        "--out",
        str(tmp_path / "out"),
        "--max-count",
        "12",
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 30 samples in 3 shard(s)" in proc.stdout
    assert "shard-{000000..000002}.tar" in proc.stdout
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["samples"] == 30


def test_unknown_model_fails_before_work(tmp_path):
    bad = {
        "model": {**TINY_MODEL, "towers": {**TINY_MODEL["towers"], "image": {"encoder": "vit_huge_typo"}}},
        "data": {"train": str(tmp_path / "nothing-{0..3}.tar")},
        "train": {"run_dir": str(tmp_path / "run")},
    }
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(bad))
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 2
    assert (
        "unknown image encoder 'vit_huge_typo'" in proc.stderr
        and "Valid: hf_clip_vision, openclip_vision, timm_vision" in proc.stderr
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_missing_dataset_fails_clearly(tmp_path):
    pattern = str(tmp_path / "s-{0..3}.tar")
    tree = {"model": TINY_MODEL, "data": {"train": pattern}, "train": {"run_dir": str(tmp_path / "run")}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 2 and f"data.train: {pattern!r} matches no file (4 local shard path(s)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
    proc = run_cli("config", str(cfg))  # the config is fine; this machine lacks its data: a warning
    assert proc.returncode == 0 and "warning: data.train" in proc.stderr and yaml.safe_load(proc.stdout)["data"]


def test_eval_data_typos_fail_in_one_line_before_the_model_loads(tmp_path):
    proc = run_cli("eval", "zeroshot", "--model", str(tmp_path / "no-model"), "--data", f"toy@foldr={tmp_path}")
    assert proc.returncode == 2 and "unknown dataset layout 'foldr'. Did you mean 'folder'?" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("eval", "zeroshot", "--model", str(tmp_path / "no-model"), "--data", f"toy@folder={tmp_path}/x")
    assert proc.returncode == 2 and "no folder" in proc.stderr


def test_config_command_prints_resolved(tmp_path):
    proc = run_cli("config", "configs/experiment/smoke.yaml", "train.steps=7")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["train"]["steps"] == 7


def test_list_command():
    proc = run_cli("list")
    assert (
        proc.returncode == 0
        and "image encoder: hf_clip_vision, openclip_vision, timm_vision" in proc.stdout
        and "siglip" in proc.stdout
    )
