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


def test_api_reference_is_current():
    proc = subprocess.run(
        [sys.executable, "scripts/gen_api_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True
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
        "cluster.md",
        "scale_out.md",
        "migrating.md",
        "troubleshooting.md",
        "api.md",
        "security.md",
    ):
        assert f"docs/{page}" in (ROOT / "README.md").read_text(), f"README does not link docs/{page}"
        assert (ROOT / "docs" / page).is_file(), page
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "(security.md)" in (ROOT / "docs" / "retrieval.md").read_text()


def test_every_control_in_the_threat_model_names_a_test_that_exists():
    """docs/security.md names the test of each control; each must be a test function in tests/."""
    import re

    named = set(re.findall(r"`(test_\w+)`", (ROOT / "docs" / "security.md").read_text()))
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)\(", path.read_text(), re.M))
    assert len(named) >= 25 and named <= defined, sorted(named - defined)


# ---------------------------------------------------------------- docs that stay true
# Every mmpretrain / retrieval command in README.md and docs/ code blocks names subcommands and flags
# that exist, and every config key it sets (key.sub=value, or a YAML block's keys) is in the schema.
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = {"mmpretrain": "mmpretrain.cli", "retrieval": "retrieval.cli"}


def code_blocks(path):
    """(language, text) of each fenced block."""
    import re

    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", path.read_text(), re.S)]


def commands(text: str):
    """Each shell command line (continuations joined) as tokens, from the program name on."""
    import shlex

    for line in text.replace("\\\n", " ").splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        for i, tok in enumerate(tokens):
            name = tok.rsplit("/", 1)[-1]
            if name in PROGRAMS and (i == 0 or tokens[i - 1] in ("&&", ";", "|") or "/" in tok):
                yield name, tokens[i + 1 :]
            elif tok == "-m" and i + 1 < len(tokens) and tokens[i + 1] in PROGRAMS.values():
                yield next(k for k, v in PROGRAMS.items() if v == tokens[i + 1]), tokens[i + 2 :]


def parser_for(program: str, args: list[str]):
    """The (sub)parser the leading words of ``args`` select, and the words used."""
    import argparse
    import importlib

    parser = importlib.import_module(PROGRAMS[program]).build_parser()
    used = [program]
    for word in args:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
        used.append(word)
    return parser, used


def schema_has(parts: list[str]) -> bool:
    """Whether ``a.b.c`` is a config key (free-form mappings such as tower params accept anything)."""
    import dataclasses
    import typing

    from mmpretrain.config.schema import ExperimentConfig

    kind: typing.Any = ExperimentConfig
    for part in parts:
        origin = typing.get_origin(kind)
        if origin is dict:
            kind = typing.get_args(kind)[1]  # the key is free (a modality, a param name)
            continue
        if origin in (list, typing.Union) or kind is typing.Any or not dataclasses.is_dataclass(kind):
            args = [a for a in typing.get_args(kind) if dataclasses.is_dataclass(a)]
            if origin is typing.Union and args:
                kind = args[0]
            else:
                return True  # a value (or a list of them): nothing below to check
        hints = typing.get_type_hints(kind)
        if part not in hints:
            return False
        kind = hints[part]
    return True


def doc_problems() -> list[str]:
    import yaml

    problems = []
    for path in DOC_FILES:
        for lang, text in code_blocks(path):
            where = path.name
            if lang == "yaml":
                tree = yaml.safe_load(text) if text.strip() else None
                for key in _yaml_keys(tree) if isinstance(tree, dict) else []:
                    if not schema_has(key.split(".")):
                        problems.append(f"{where}: config key {key} (yaml block) does not exist")
                problems += _tower_param_problems(tree, where)
                continue
            for program, args in commands(text):
                parser, used = parser_for(program, args)
                flags = {s for a in parser._actions for s in a.option_strings}
                for word in args[len(used) - 1 :]:
                    if word.startswith("--") and word.split("=")[0] not in flags:
                        problems.append(f"{where}: `{' '.join(used)}` has no flag {word.split('=')[0]}")
                    elif "=" in word and not word.startswith("-") and "." in word.split("=")[0] and "@" not in word:
                        key = word.split("=")[0]
                        if key.replace(".", "").replace("_", "").isalnum() and not schema_has(key.split(".")):
                            problems.append(f"{where}: `{' '.join(used)}` sets {key}, not a config key")
    return problems


def _tower_param_problems(tree, where) -> list[str]:
    """A YAML block's tower params are fields of the named encoder's params class."""
    import dataclasses

    from mmpretrain.encoders import ENCODERS

    towers = ((tree or {}).get("model") or {}).get("towers") or {} if isinstance(tree, dict) else {}
    problems = []
    for modality, tower in towers.items():
        if not isinstance(tower, dict) or "encoder" not in tower or modality not in ENCODERS:
            continue
        cls = ENCODERS[modality].get(tower["encoder"]).config_cls
        fields = {f.name for f in dataclasses.fields(cls)} if cls else set()
        problems += [
            f"{where}: model.towers.{modality}.params.{key} is not a {tower['encoder']} param"
            for key in tower.get("params") or {}
            if key not in fields
        ]
    return problems


def _yaml_keys(tree: dict, prefix: str = "") -> list[str]:
    """Dotted keys of a config YAML block (``base:`` / ``defaults`` lines and non-config blocks skipped)."""
    from mmpretrain.config.schema import ExperimentConfig

    if not prefix and not set(tree) & {f.name for f in __import__("dataclasses").fields(ExperimentConfig)}:
        return []
    keys = []
    for key, value in tree.items():
        if not prefix and key == "base":
            continue
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys += _yaml_keys(value, f"{dotted}.")
    return keys


def test_docs_commands_and_config_keys_exist():
    problems = doc_problems()
    assert not problems, "\n".join(problems)


def test_the_docs_check_can_fail(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\nmmpretrain eval zeroshot --modle x\nmmpretrain train c.yaml train.stepz=3\n```\n"
        "```yaml\ntrain:\n  steps: 3\n  resume_from: x\n```\n"
    )
    monkeypatch.setitem(globals(), "DOC_FILES", [page])
    problems = doc_problems()
    assert any("no flag --modle" in p for p in problems) and any("train.stepz" in p for p in problems)
    assert any("train.resume_from" in p for p in problems)
