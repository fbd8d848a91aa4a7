"""Import boundaries: retrieval uses only mmpretrain.api / mmpretrain.types; mmpretrain never imports retrieval."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_mmpretrain_never_imports_retrieval():
    for path in (ROOT / "mmpretrain").rglob("*.py"):
        bad = {n for n in imports(path) if n == "retrieval" or n.startswith("retrieval.")}
        assert not bad, f"{path} imports {bad}"


def test_retrieval_uses_only_public_api():
    allowed = {"mmpretrain", "mmpretrain.api", "mmpretrain.types"}
    for path in (ROOT / "retrieval").rglob("*.py"):
        bad = {n for n in imports(path) if n.startswith("mmpretrain") and n not in allowed}
        assert not bad, f"{path} imports internals {bad}"


def test_no_torch_load_without_weights_only():
    for path in list((ROOT / "mmpretrain").rglob("*.py")) + list((ROOT / "retrieval").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" \
                    and getattr(node.func.value, "id", "") == "torch":
                kws = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kws and getattr(kws["weights_only"], "value", None) is True, path
