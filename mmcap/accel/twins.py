"""One cache for the twins of a module: a copy made for speed (BatchNorm folded, int8 weights, an
ONNX Runtime session, an encoder runner), kept while the module's weights stay as they are.

A twin is keyed by its module (weakly: it goes with the module) and a kind, and remade when any of
the module's tensors is replaced or updated in place (more training); the module itself is never altered.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Callable, Hashable, TypeVar

from torch import nn

T = TypeVar("T")
_TWINS: "weakref.WeakKeyDictionary[nn.Module, dict[Hashable, tuple[tuple, object]]]" = weakref.WeakKeyDictionary()


def fingerprint(module: nn.Module) -> tuple:
    """Identifies the current values of `module`'s tensors: it changes when any is replaced or updated in place."""
    return tuple((t.data_ptr(), t._version) for t in itertools.chain(module.parameters(), module.buffers()))


def twin(module: nn.Module, kind: Hashable, make: Callable[[], T]) -> T:
    """`module`'s twin of `kind`, made by `make()` on first use and again after a weight changed."""
    key = fingerprint(module)
    held = _TWINS.setdefault(module, {})
    entry = held.get(kind)
    if entry is None or entry[0] != key:
        entry = held[kind] = (key, make())
    return entry[1]


def replace(module: nn.Module, kind: Hashable, value: T) -> T:
    """Set `module`'s twin of `kind` to `value` (for the module's current weights)."""
    _TWINS.setdefault(module, {})[kind] = (fingerprint(module), value)
    return value


def held(module: nn.Module, kind: Hashable):
    """The twin of `kind` if one is held for the module's current weights, else None."""
    entry = _TWINS.get(module, {}).get(kind)
    return entry[1] if entry is not None and entry[0] == fingerprint(module) else None


def drop(module: nn.Module, kind: Hashable) -> None:
    """Free `module`'s twin of `kind` (one that was not chosen, say)."""
    _TWINS.get(module, {}).pop(kind, None)
