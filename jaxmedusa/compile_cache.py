"""Ahead-of-time compilation with a cache, so callers can report compile time apart from run time."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax

_CACHE: dict[Any, Any] = {}


def _signature(args) -> tuple:
    """Shapes, dtypes and shardings: the same shapes on one device and split across a mesh compile apart."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return treedef, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x))),
                           getattr(x, "sharding", None) if isinstance(x, jax.Array) else None) for x in leaves)


def call_compiled(fn: Callable, args: tuple, static: dict[str, Any]) -> tuple[Any, float]:
    """Runs jitted `fn(*args, **static)` through a cached `lower().compile()`.

    Returns (outputs, seconds spent compiling in this call, 0.0 on a cache hit).
    """
    key = (fn, tuple(sorted(static.items(), key=lambda kv: kv[0])), _signature(args))
    compiled = _CACHE.get(key)
    seconds = 0.0
    if compiled is None:
        t0 = time.perf_counter()
        compiled = fn.lower(*args, **static).compile()
        seconds = time.perf_counter() - t0
        _CACHE[key] = compiled
    return compiled(*args), seconds
