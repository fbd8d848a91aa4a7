"""Named registries: the one way variants are dispatched (encoders, heads, losses, data ops).

A registry maps a name to a builder and, optionally, the frozen dataclass that types the
builder's parameters. Looking up an unknown name fails with the valid names listed.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


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
    example: dict | None = None  # small valid params: registry-generated tests build every entry with them


class Registry(Generic[T]):
    """A name -> builder table.

    Example:
        >>> HEADS = Registry("head")
        >>> @HEADS.register("linear")
        ... def linear(in_dim, out_dim): ...
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, config: type | None = None, example: Any = None,
                 doc: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            first = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
            self._entries[name] = Entry(name, fn, config, doc if doc is not None else first, example)
            return fn

        return deco

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


def unknown_name_message(kind: str, name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Valid: {', '.join(valid) or '(none registered)'}"
