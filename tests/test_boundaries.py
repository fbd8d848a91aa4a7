"""Import boundaries: retrieval uses only mmpretrain.api / mmpretrain.types; mmpretrain never imports retrieval."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", "") == "load"
                and getattr(node.func.value, "id", "") == "torch"
            ):
                kws = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kws and getattr(kws["weights_only"], "value", None) is True, path


# ---------------------------------------------------------------- layers and cycles
# Bottom to top: a module may import its own layer's shared leaves and anything below it, never above.
LAYERS = {
    "mmpretrain": [
        {"registry", "types", "errors", "utils", "files"},  # leaves (files: the public face of utils.io)
        {"config"},
        {"data", "encoders", "losses"},  # siblings: none imports another
        {"models"},
        {"deploy"},  # ONNX export, quantisation, encoding backends: over models, under eval (which takes either)
        {"eval", "corpora"},
        {"training"},
        {"api"},
        {"cli", "cli_caption", "cli_export", "__init__"},  # cli_caption/cli_export: commands of their own, beside cli
    ],
    "retrieval": [
        {"errors", "options", "_openmp"},  # options: config dataclasses -> command-line flags (stdlib only);
        #                                    _openmp: OpenMP's wait policy, set before torch and FAISS load
        {"jobs"},  # embedding, indexes, search, curation, the Ray engines
        {"serve"},  # the service: over the jobs' Searcher, never imported by them
        {"cli", "__init__"},
    ],
}
SIBLINGS_APART = {"mmpretrain": [{"data", "encoders", "losses"}, {"eval", "corpora"}], "retrieval": []}
PACKAGES = sorted(LAYERS)


def _part(module: str) -> str:
    """``mmpretrain.data.ops`` -> ``data``; ``mmpretrain.api`` -> ``api``; ``mmpretrain`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(package: str, part: str) -> int:
    return next(i for i, names in enumerate(LAYERS[package]) if part in names)


def _module_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (top-level, function-local and under TYPE_CHECKING),
    from the source."""
    graph = {}
    for path in (ROOT / package).rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if _inside(a.name, package)}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}:{node.lineno}: a relative import (the checks read absolute ones)"
                if node.module and _inside(node.module, package):
                    modules = {f"{node.module}.{a.name}" for a in node.names}
                    targets |= {m for m in modules if _is_module(m)} or {node.module}
        graph[name] = targets
    return graph


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@pytest.mark.parametrize("package", PACKAGES)
def test_every_part_has_a_layer(package):
    for module in _module_graph(package):
        assert any(_part(module) in names for names in LAYERS[package]), f"{module}: give its part a layer"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_goes_up_a_layer_or_across_siblings(package):
    bad = []
    for module, targets in _module_graph(package).items():
        src = _part(module)
        for target in targets:
            dst = _part(target)
            if dst == src:
                continue
            siblings = any({src, dst} <= group for group in SIBLINGS_APART[package])
            if _layer(package, dst) > _layer(package, src) or siblings:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles_between_files(package):
    cycles = import_cycles(_module_graph(package))
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_check_can_fail():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_commands_start_without_the_deferred_imports():
    """What pyproject.toml lets load only where it is used (TID253's list) stays out of both commands' start."""
    block = re.search(r"banned-module-level-imports = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S)
    deferred = re.findall(r'"([\w.]+)"', block.group(1))
    assert "peft" in deferred and "ray" in deferred
    code = "import sys, mmpretrain.cli, retrieval.cli; print(' '.join(m for m in sys.argv[1:] if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code, *deferred], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == [], f"imported at start: {out.stdout}"


def test_no_source_file_is_over_600_lines():
    """House rule 5 (small pieces), for every Python file the project keeps."""
    tracked = subprocess.run(["git", "ls-files", "*.py"], capture_output=True, text=True, cwd=ROOT).stdout.split()
    files = [ROOT / f for f in tracked] or list(ROOT.glob("[!.]*/**/*.py"))
    long = {str(f.relative_to(ROOT)): n for f in files if f.is_file() and (n := len(f.read_text().splitlines())) > 600}
    assert not long, f"split these: {long}"
