"""Named registries: the one way variants are dispatched (encoders, heads, losses, data ops, ...).

A registry maps a name to a builder and, optionally, the frozen dataclass that types the
builder's parameters, and an *example*: what the registry-generated tests need to exercise the
entry (small params, the raw members a data op reads, a function writing a tiny checkpoint, ...),
each registry defining its example's meaning. Looking up an unknown name fails with the valid
names listed. Every registry is listed in ``REGISTRIES`` (by kind); ``load_all`` imports every
module of the package that registers entries, so the lists are complete.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
REGISTRIES: dict[str, Registry] = {}  # kind -> registry, filled as registries are created
BUILT_INS = (
    "mmpretrain.data",
    "mmpretrain.data.shards",
    "mmpretrain.encoders",
    "mmpretrain.losses",
    "mmpretrain.models.pretrained",
    "mmpretrain.eval.inputs",
    "mmpretrain.eval.datasets",
    "mmpretrain.eval.sets",
    "mmpretrain.eval.jobs",
    "mmpretrain.corpora",
    "mmpretrain.training.strategy",
    "mmpretrain.training.objectives",
    "mmpretrain.deploy.backends",
    "mmpretrain.deploy.exports",
    "mmpretrain.deploy.quantize",
)


class RegistryError(KeyError):
    """An unknown name was looked up; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    builder: Callable[..., T]
    config_cls: type | None = None
    doc: str = ""
    example: Any = None  # what the generated tests need (a value, or a zero-argument function making it)
    attrs: dict[str, Any] = field(default_factory=dict)  # what callers ask of the entry instead of its name

    def make_example(self) -> Any:
        return self.example() if callable(self.example) else self.example


class Registry(Generic[T]):
    """A name -> builder table.

    Example:
        >>> HEADS = Registry("head")
        >>> @HEADS.register("linear")
        ... def linear(in_dim, out_dim): ...
    """

    def __init__(self, kind: str):
        if kind in REGISTRIES:
            raise ValueError(f"a registry of {kind!r} exists already")
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        REGISTRIES[kind] = self

    def register(
        self,
        name: str,
        *,
        config: type | None = None,
        example: Any = None,
        doc: str | None = None,
        **attrs: Any,
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """``attrs``: what callers may ask of the entry (``get(name).attrs[...]``), so that no caller
        compares its name."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            first = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())  # the first paragraph
            self._entries[name] = Entry(name, fn, config, doc if doc is not None else first, example, attrs)
            return fn

        return deco

    @contextlib.contextmanager
    def temporary(self, name: str, builder: Callable[..., T], **kwargs: Any) -> Iterator[Entry[T]]:
        """Register ``builder`` as ``name`` for the duration of a ``with`` block (tests, experiments);
        an existing ``name`` is replaced (keeping its config, example and doc unless given) and restored."""
        before = self._entries.pop(name, None)
        if before is not None:
            kwargs = {
                "config": before.config_cls,
                "example": before.example,
                "doc": before.doc,
                **before.attrs,
                **kwargs,
            }
        self.register(name, **kwargs)(builder)
        try:
            yield self._entries[name]
        finally:
            del self._entries[name]
            if before is not None:
                self._entries[name] = before

    def get(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(unknown_name_message(self.kind, name, self.names())) from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> T:
        return self.get(name).builder(*args, **kwargs)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def load_all() -> dict[str, Registry]:
    """Import every module of the package that registers entries; returns ``REGISTRIES``."""
    for module in BUILT_INS:
        importlib.import_module(module)
    return REGISTRIES


def unknown_name_message(kind: str, name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    listed = ", ".join(valid) or "(none registered)"
    if close:  # whole sentences, so docs/troubleshooting.md can quote them (tests/test_troubleshooting.py)
        return f"unknown {kind} {name!r}. Did you mean {close[0]!r}? Valid: {listed}"
    return f"unknown {kind} {name!r}. Valid: {listed}"
