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


# id -> (weak reference, signature, variables) of the model states seen: Model.split() makes a model's state once and
# every call passes that same object, whose ~200 leaves cost ~1.3 ms to flatten and describe on the H200's host.
_STATES: dict[int, tuple[weakref.ref, tuple, tuple | None]] = {}


def _state_record(x: nnx.State) -> tuple[weakref.ref, tuple, tuple | None]:
    """(weak reference, signature, its Variables in leaf order) of a state, made once per State object. The
    Variables are None where one does not hold a single array (then the state is flattened on every call)."""
    hit = _STATES.get(id(x))
    if hit is not None and hit[0]() is x:
        return hit
    sig = _leaves_signature(x)
    variables = tuple(jax.tree_util.tree_leaves(x, is_leaf=lambda v: isinstance(v, nnx.Variable)))
    if len(variables) != len(sig[1]) or not all(
            isinstance(v, nnx.Variable) and isinstance(v.get_raw_value(), jax.Array) for v in variables):
        variables = None
    # Hashed: a compile-cache lookup hashes its key, and a tuple re-hashes its ~200 shapes and shardings every time
    record = (weakref.ref(x, lambda _, i=id(x): _STATES.pop(i, None)), Hashed(sig), variables)
    _STATES[id(x)] = record
    return record


def _argument_signature(x: Any) -> tuple:
    """_leaves_signature(x), remembered for an nnx.State (the model's weights: one object per Model.split())."""
    return _state_record(x)[1] if isinstance(x, nnx.State) else _leaves_signature(x)


def _argument_leaves(args: tuple) -> list:
    """jax.tree_util.tree_leaves(args), a model state's leaves read from its remembered Variables: flattening a
    State runs Python for each Variable (~0.25 ms a call for 200 on a 2-core host), on every call and stream step.
    Reading the Variables on every call keeps what a call sees current when a weight is assigned in place."""
    leaves: list = []
    for x in args:
        variables = _state_record(x)[2] if isinstance(x, nnx.State) else None
        if variables is not None:
            leaves.extend([v.get_raw_value() for v in variables])
        else:
            leaves.extend(jax.tree_util.tree_leaves(x))
    return leaves


def _signature(args: tuple) -> tuple:
    """Shapes, dtypes and shardings: the same shapes on one device and split across a mesh compile apart."""
    return tuple(_argument_signature(x) for x in args)


def cache_key(fn: Callable, args: tuple, static: dict[str, Any], compiler_options: dict | None = None) -> tuple:
    """What identifies one compilation: the function, its static arguments, the arguments' signature and the
    XLA options it is compiled with."""
    return (fn, tuple(sorted(static.items(), key=lambda kv: kv[0])), _signature(args),
            tuple(sorted((compiler_options or {}).items())))


def _compile(fn: Callable, args: tuple, static: dict[str, Any], compiler_options: dict | None):
    """`fn(*args, **static)` compiled as a function of the arguments' leaves, donating the leaves fn donates."""
    treedef = jax.tree_util.tree_structure(args)
    donated = tuple(i for i, info in enumerate(jax.tree_util.tree_leaves(fn.trace(*args, **static).args_info[0]))
                    if info.donated)

    def on_leaves(*leaves):
        return fn(*jax.tree_util.tree_unflatten(treedef, leaves), **static)

    on_leaves.__name__ = getattr(fn, "__name__", "on_leaves")  # profiles and HLO dumps name fn's module
    return jax.jit(on_leaves, donate_argnums=donated).lower(*_argument_leaves(args)).compile(
        compiler_options=compiler_options)


def call_compiled(fn: Callable, args: tuple, static: dict[str, Any],
                  compiler_options: dict | None = None) -> tuple[Any, float]:
    """Runs jitted `fn(*args, **static)` through a cached compilation of it with `compiler_options`.

    The compiled function takes the arguments' leaves (_argument_leaves), so a model state is not flattened
    again on every call. Returns (outputs, seconds spent compiling in this call, 0.0 on a cache hit).
    """
    key = cache_key(fn, args, static, compiler_options)
    compiled = _CACHE.get(key)
    seconds = 0.0
    if compiled is None:
        t0 = time.perf_counter()
        compiled = _compile(fn, args, static, compiler_options)
        seconds = time.perf_counter() - t0
        _CACHE[key] = compiled
    return compiled(*_argument_leaves(args)), seconds
