"""The one registry type behind every extension point (alignment methods, vocabulary mappings, fusion
functions, merge methods): see ARCHITECTURE.md, "Extension points".

A recipe names a method by string (`alignment: {tokens: dtw, vocab: stats}`); the registry turns that
name into a plain function, and its `pretty_name` / `reference_url` feed the model card, as mergekit does
for merge methods. Registering is a decorator so that a method's definition is the only place it is named.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from fusemerge.errors import FusemergeError

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class Entry(Generic[F]):
    """One registered method: the function, and what a model card says about it."""

    name: str
    fn: F
    pretty_name: str
    reference_url: str | None
    batch_fn: Callable | None = None  # the same method over a sequence of inputs, when it has one


class Registry(Generic[F]):
    """Name -> function for one extension point; unknown names are user mistakes, not bugs."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[F]] = {}

    def register(
        self,
        name: str,
        *,
        pretty_name: str | None = None,
        reference_url: str | None = None,
        batch: Callable | None = None,
    ) -> Callable[[F], F]:
        """Register the decorated function as `name`; `batch`, if given, does the same for a list of
        inputs at once (returning a list), for methods whose per-call overhead a batch can amortise."""

        def decorator(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = Entry(name, fn, pretty_name or name, reference_url, batch)
            return fn

        return decorator

    def get(self, name: str, *, key: str | None = None) -> Entry[F]:
        try:
            return self._entries[name]
        except KeyError:
            raise FusemergeError(
                f"unknown {self.kind} '{name}' (choose from {', '.join(sorted(self._entries))})", key=key
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
