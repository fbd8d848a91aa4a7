"""Docs that are generated from code stay in sync; every documented command exists."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_config_reference_is_current():
    proc = subprocess.run(
        [sys.executable, "scripts/gen_config_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_docs_pages_exist():
    for page in (
        "quickstart.md",
        "config.md",
        "data_format.md",
        "training.md",
        "zero_shot.md",
        "pretrained.md",
        "evaluation.md",
        "architecture.md",
    ):
        assert (ROOT / "docs" / page).is_file(), page
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
