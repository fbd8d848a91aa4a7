"""Defaults the docs quote for config keys agree with the schema (``config/schema.py``, the single
source of defaults; ``docs/config.md`` is generated from it and not checked here). The forms the docs use:

- ``` `data.max_member_bytes` (32 MiB) ```: a key, then its value (a number, with a unit) in parentheses;
- ``` `train.run_dir`, by default `runs/{name}` ``` (or ``, default `V```);
- ``` the default `loss.block_size` of 4096 ```;
- ``` `train.strategy: ddp` (default) ``` (or ``key=value``);
- a table whose header is ``| `train.fsdp.` | default |``: each row ``| `key` | `value` |``.
"""

from __future__ import annotations

import re

import pytest
import yaml

from mmpretrain.config.schema import ExperimentConfig
from tests.conftest import ROOT

KEY = r"(?:data|model|loss|optim|train|eval)\.[a-z_][a-z0-9_.]*"
UNITS = {"": 1, "s": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
NUMBER = r"(\d[\d_.]*)\s?(" + "|".join(u for u in UNITS if u) + r")?"
FORMS = [
    re.compile(rf"`({KEY})` \({NUMBER}\)"),
    re.compile(rf"`({KEY})`,? (?:by )?default `([^`]+)`"),
    re.compile(rf"default `({KEY})` of {NUMBER}\b"),
    re.compile(rf"`({KEY})\s*[:=]\s*([^`]+)` \(default\)"),
]
TABLE_HEAD = re.compile(rf"^\| `({KEY}\.)` \| default \|")
TABLE_ROW = re.compile(r"^\| `([a-z_][a-z0-9_]*)` \| `([^`]+)` \|")


def quoted_defaults(text: str) -> list[tuple[str, object]]:
    """(dotted key, the value the text gives as its default), in the forms above."""
    found = []
    for form in FORMS:
        for m in form.finditer(" ".join(text.split())):
            key, value, unit = m.group(1), m.group(2), (m.groups() + (None,))[2]
            found.append((key, float(value) * UNITS[unit or ""] if form.groups == 3 else yaml.safe_load(value)))
    prefix = None
    for line in text.splitlines():
        head, row = TABLE_HEAD.match(line), TABLE_ROW.match(line)
        if head:
            prefix = head.group(1)
        elif prefix and row:
            found.append((prefix + row.group(1), yaml.safe_load(row.group(2))))
        elif not line.startswith("|"):
            prefix = None
    return found


def schema_default(key: str) -> object:
    value = ExperimentConfig()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def disagreements(text: str) -> list[str]:
    out = []
    for key, quoted in quoted_defaults(text):
        actual = schema_default(key)
        if quoted != actual and not (_number(quoted) and _number(actual) and float(quoted) == float(actual)):
            out.append(f"{key}: the docs say {quoted!r}, the schema {actual!r}")
    return out


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


PAGES = sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in {"config.md", "api.md"})


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_defaults_quoted_in_the_docs_are_the_schemas(page):
    assert disagreements(page.read_text()) == []


def test_the_forms_are_found_in_the_docs():
    found = {key for page in PAGES for key, _ in quoted_defaults(page.read_text())}
    assert {"data.max_member_bytes", "train.run_dir", "loss.block_size", "train.strategy"} <= found
    assert {"train.fsdp.param_dtype", "train.fsdp.cpu_offload"} <= found


def test_the_defaults_check_can_fail():
    text = """`data.max_member_bytes` (64 MiB) and `data.stall_timeout_s` (120 s); `train.run_dir`, by default
`out/{name}`; the default `loss.block_size` of 4096; `train.strategy: fsdp` (default).

| `train.fsdp.` | default | |
|---|---|---|
| `cpu_offload` | `true` | |
| `reshard_after_forward` | `true` | |
"""
    assert disagreements(text) == [
        "data.max_member_bytes: the docs say 67108864.0, the schema 33554432",
        "train.run_dir: the docs say 'out/{name}', the schema 'runs/{name}'",
        "train.strategy: the docs say 'fsdp', the schema 'ddp'",
        "train.fsdp.cpu_offload: the docs say True, the schema False",
    ]
