"""Command-line options made from the config dataclasses, so a flag's default, type and choices are the
field's and no value is copied by hand between argparse and a config.

A field is a flag when it is declared with ``option(...)``; a field whose type is a dataclass is walked
(``ServeConfig.batch``'s fields are serve's flags). ``add_options`` adds the flags, ``config_from_args``
builds the dataclass back from the parsed ones (plus what the command gives itself)::

    @dataclass(frozen=True)
    class DedupConfig:
        threshold: float = option(0.94, help="cosine similarity of near-duplicates")

    add_options(parser, DedupConfig)
    cfg = config_from_args(DedupConfig, parser.parse_args())
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass
from typing import Any

UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}
UNITS |= {"T": 2**40, "TB": 2**40}


def parse_bytes(text: str) -> int:
    """``2GB``, ``512M``, ``1.5G``, ``1000000`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 512MB)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def show_bytes(n: int) -> str:
    """4294967296 -> ``4GB`` (the largest unit that divides it)."""
    for unit in ("TB", "GB", "MB", "KB"):
        if n and n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]}{unit}"
    return str(n)


@dataclass(frozen=True)
class Option:
    """How a field looks on the command line. ``flag``: its name (default ``--field-name``); ``parse``: the
    text -> value function (default the field's type); ``choices``: a tuple, or a function returning them
    (a registry's ``names``, read when the parser is built); ``show``: the default as the help shows it."""

    help: str
    flag: str | None = None
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | Callable[[], Iterable[str]] | None = None
    metavar: str | None = None
    show: Callable[[Any], str] | None = None


def option(default: Any = MISSING, *, help: str, **how: Any) -> Any:
    """A config field that is also a command-line flag (``how``: ``Option``'s fields)."""
    return dataclasses.field(default=default, metadata={"cli": Option(help=help, **how)})


def _scalar(hint: Any) -> type:
    """``int`` / ``float`` / ``str``; ``str | None`` -> ``str``; ``tuple[int, ...]`` -> ``int``."""
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _add_one(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: Any, dest: str) -> None:
    opt: Option = f.metadata["cli"]
    flag = opt.flag or "--" + f.name.replace("_", "-")
    metavar = opt.metavar or (None if opt.choices else flag.lstrip("-").replace("-", "_").upper())
    kw: dict[str, Any] = {"dest": dest}
    help_text = opt.help
    if hint is bool:
        kw |= {"action": "store_true", "default": f.default}
    else:
        kw |= {"type": opt.parse or _scalar(hint), "metavar": metavar}
        if typing.get_origin(hint) is tuple:  # repeated; none given: the field's default (config_from_args)
            kw |= {"action": "append", "default": None}
        elif f.default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
        if f.default not in (MISSING, None, ()):
            help_text += f" ({opt.show(f.default) if opt.show else f.default})"
    if opt.choices is not None:
        kw["choices"] = list(opt.choices() if callable(opt.choices) else opt.choices)
    parser.add_argument(flag, help=help_text, **kw)


def add_options(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "") -> None:
    """Add the flags of ``cls``'s ``option`` fields, and of its dataclass-typed fields' (destinations
    ``prefix + name``, nested ones ``prefix + field.name``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if "cli" in f.metadata:
            _add_one(parser, f, hint, prefix + f.name)
        elif dataclasses.is_dataclass(hint):
            add_options(parser, hint, prefix=f"{prefix}{f.name}.")


def config_from_args(cls: type, args: argparse.Namespace, *, prefix: str = "", **given: Any) -> Any:
    """``cls`` from the flags ``add_options`` added (tuples from repeated flags), nested configs included;
    ``given`` sets fields that are not flags (or overrides them)."""
    hints, values = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        hint, dest = hints[f.name], prefix + f.name
        if f.name in given:
            continue
        if "cli" in f.metadata and hasattr(args, dest):
            value = getattr(args, dest)
            if typing.get_origin(hint) is tuple:
                if value is None:  # the flag not given: the field's default
                    continue
                value = tuple(value)
            values[f.name] = value
        elif dataclasses.is_dataclass(hint) and "cli" not in f.metadata:
            values[f.name] = config_from_args(hint, args, prefix=f"{dest}.")
    return cls(**values, **given)


RAY_ADDRESS = (
    "ray: the cluster to use (auto: the one `ray start` runs here; ray://HEAD:10001); default: start a local one "
    "for the job"
)
