"""Ahead-of-time compilation with a cache, so callers can report compile time apart from run time."""

from __future__ import annotations

import time
import weakref
from typing import Any, Callable

import jax
from flax import nnx

_CACHE: dict[Any, Any] = {}


class Hashed:
    """A static argument of a jitted function, hashed once. jit hashes its static arguments on every call, and
    a flax GraphDef hashes by content: ~0.3 ms on the H200's host for a 32-layer model (1.2 ms on a slow CPU),
    paid on every generate() call and every stream() step. Equal when the values are (identity first)."""

    __slots__ = ("value", "_hash")

    def __init__(self, value: Any) -> None:
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Hashed) and (other.value is self.value or
                                              (other._hash == self._hash and other.value == self.value))

    def __repr__(self) -> str:
        return f"Hashed({self.value!r})"


def unwrap(value: Any) -> Any:
    """The value inside a Hashed, or the value itself."""
    return value.value if isinstance(value, Hashed) else value


def merge(graphdef: Any, state: Any) -> Any:
    """nnx.merge for a graphdef given as is or Hashed (what Model.split() returns)."""
    return nnx.merge(unwrap(graphdef), state)


def _leaves_signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((x.shape, x.dtype, x.sharding) if isinstance(x, jax.Array) else
                          (getattr(x, "shape", None), str(getattr(x, "dtype", type(x)))) for x in leaves)


# id -> (weak reference, signature) of the model states seen: Model.split() makes a model's state once and every
# call passes that same object, whose ~200 leaves cost ~1.3 ms to flatten and describe on the H200's host.
_STATE_SIGNATURES: dict[int, tuple[weakref.ref, tuple]] = {}


def _argument_signature(x: Any) -> tuple:
    """_leaves_signature(x), remembered for an nnx.State (the model's weights: one object per Model.split())."""
    if not isinstance(x, nnx.State):
        return _leaves_signature(x)
    hit = _STATE_SIGNATURES.get(id(x))
    if hit is not None and hit[0]() is x:
        return hit[1]
    sig = _leaves_signature(x)
    _STATE_SIGNATURES[id(x)] = (weakref.ref(x, lambda _, i=id(x): _STATE_SIGNATURES.pop(i, None)), sig)
    return sig


def _signature(args: tuple) -> tuple:
    """Shapes, dtypes and shardings: the same shapes on one device and split across a mesh compile apart."""
    return tuple(_argument_signature(x) for x in args)


def cache_key(fn: Callable, args: tuple, static: dict[str, Any], compiler_options: dict | None = None) -> tuple:
    """What identifies one compilation: the function, its static arguments, the arguments' signature and the
    XLA options it is compiled with."""
    return (fn, tuple(sorted(static.items(), key=lambda kv: kv[0])), _signature(args),
            tuple(sorted((compiler_options or {}).items())))


def call_compiled(fn: Callable, args: tuple, static: dict[str, Any],
                  compiler_options: dict | None = None) -> tuple[Any, float]:
    """Runs jitted `fn(*args, **static)` through a cached `lower().compile(compiler_options)`.

    Returns (outputs, seconds spent compiling in this call, 0.0 on a cache hit).
    """
    key = cache_key(fn, args, static, compiler_options)
    compiled = _CACHE.get(key)
    seconds = 0.0
    if compiled is None:
        t0 = time.perf_counter()
        compiled = fn.lower(*args, **static).compile(compiler_options=compiler_options)
        seconds = time.perf_counter() - t0
        _CACHE[key] = compiled
    return compiled(*args), seconds
