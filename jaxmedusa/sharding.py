"""Tensor-parallel inference over a 1-D `tensor` mesh axis (Megatron layout, partitioned by GSPMD).

Attention heads and MLP columns are split (q/k/v, gate/up and vocabulary projections column-parallel),
the output and down projections are row-parallel (XLA adds one all-reduce each), the embedding table and
LM head are split by vocabulary, and the KV cache by KV head. The attention kernels run per device on their
heads under shard_map. A dimension the mesh does not divide stays replicated (correct, only slower).
`load(..., mesh=...)` places each parameter's shards on their devices straight from host memory.

The fused q/k/v and gate/up kernels are split in contiguous column blocks. Laid out as in the checkpoint
(all of q, then k, then v), a device's block would hold other devices' parts, and XLA would reshard every
layer's q, k, v, gate and up (11 collective-permutes a layer in the compiled decode step of a 4-way
host mesh). `load(..., mesh=)` therefore interleaves their columns per device (`interleave_fused`: device
d's q heads, k heads and v heads side by side, then device d + 1's), and the modules split their output
the same way (layers.split_columns, `shards`); `save` restores the checkpoint order. What the mesh does not
divide by whole heads stays in checkpoint order.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

TENSOR = "tensor"
_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("jaxmedusa_mesh", default=None)

# the last one or two path names of a parameter -> which axis is split over TENSOR (None: replicated)
_COLUMN = ("qkv_proj", "gate_up_proj", "q_proj", "k_proj", "v_proj", "fc1", "lm_head", "proj")
_ROW = ("o_proj", "down_proj", "out_proj", "fc2")


def tensor_mesh(n: int, devices=None) -> Mesh:
    """A 1-D mesh of n devices named `tensor` (the first n of `devices`, default jax.devices())."""
    devices = list(jax.devices() if devices is None else devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"tensor parallelism {n} needs {n} devices; {len(devices)} available")
    return Mesh(np.array(devices[:n]), (TENSOR,))


def param_spec(path: tuple, shape: tuple[int, ...], n: int) -> P:
    """The PartitionSpec of the parameter at `path` (an nnx state path) with `shape`, for a mesh of n."""
    names = [p for p in path if isinstance(p, str)]
    owner, leaf = (names[-2] if len(names) > 1 else ""), names[-1]
    axis = None
    if owner == "embed_tokens" and leaf == "embedding":
        axis = 0  # [vocab, hidden]
    elif owner in _COLUMN:
        axis = len(shape) - 1  # kernel [in, out] and bias [out]: split the outputs
    elif owner in _ROW and leaf == "kernel":
        axis = 0  # [in, out]: split the inputs; the bias is added after the all-reduce
    if axis is None or shape[axis] % n:
        return P()
    return P(*[TENSOR if i == axis else None for i in range(len(shape))])


def interleave_order(widths: tuple[int, ...], n: int) -> np.ndarray:
    """Column order putting each device's share of every part side by side: new[:, j] = old[:, order[j]]."""
    starts = np.cumsum((0,) + tuple(widths[:-1]))
    return np.concatenate([np.arange(s + d * w // n, s + (d + 1) * w // n)
                           for d in range(n) for s, w in zip(starts, widths)])


def _fused_modules(lm) -> list[tuple[tuple, nnx.Module]]:
    """(path, module) of every module with a fused product of parts (Attention's qkv, MLP's gate_up)."""
    return [(path, m) for path, m in nnx.iter_modules(lm) if hasattr(m, "fused_parts")]


def interleave_fused(lm, params: dict[tuple, np.ndarray], n: int) -> dict[tuple, np.ndarray]:
    """Sets `shards = n` on the fused modules of `lm` (a model or an abstract one about to be built) whose parts
    split into whole heads (whole columns for gate/up) over n devices, and returns `params` (path -> host or
    device array, in the checkpoint's column order) with those products' kernel and bias columns in
    interleave_order."""
    out = dict(params)
    for path, module in _fused_modules(lm):
        widths, unit = module.fused_parts()
        if n == 1 or any(w % (n * unit) for w in widths):
            continue
        module.shards = n
        order = interleave_order(widths, n)
        for leaf in ("kernel", "bias"):
            key = path + (module.fused, leaf)
            if key in out:
                out[key] = out[key][..., order]
    return out


def checkpoint_order(lm, flat: dict[tuple, np.ndarray]) -> dict[tuple, np.ndarray]:
    """The inverse of interleave_fused: `flat` (path -> array of `lm`'s state) in the checkpoint's column order."""
    out = dict(flat)
    for path, module in _fused_modules(lm):
        if module.shards == 1:
            continue
        inverse = np.argsort(interleave_order(module.fused_parts()[0], module.shards))
        for leaf in ("kernel", "bias"):
            key = path + (module.fused, leaf)
            if key in out:
                out[key] = out[key][..., inverse]
    return out


def place(module_state_flat, mesh: Mesh):
    """{path: host array} -> {path: jax.Array} split across `mesh` by param_spec (no device holds it whole)."""
    n = mesh.shape[TENSOR]
    return {path: jax.device_put(value, NamedSharding(mesh, param_spec(path, np.shape(value), n)))
            for path, value in module_state_flat.items()}


def shard_module(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    """The same module with every parameter placed across `mesh` by param_spec."""
    graphdef, state = nnx.split(module)
    flat = nnx.to_flat_state(state)
    placed = place({path: var.get_value() for path, var in flat}, mesh)
    for path, var in flat:
        var.set_value(placed[path])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def cache_spec(num_kv_heads: int, mesh: Mesh) -> P:
    """The KV cache [layers, batch, slots, kv_heads, head_dim] is split by KV head."""
    return P(None, None, None, TENSOR, None) if num_kv_heads % mesh.shape[TENSOR] == 0 else P()


@contextlib.contextmanager
def active(mesh: Mesh | None) -> Iterator[None]:
    """Traces inside this block see `mesh` (current_mesh()); generate() enters it for a sharded model."""
    token = _MESH.set(mesh)
    try:
        yield
    finally:
        _MESH.reset(token)


def current_mesh() -> Mesh | None:
    return _MESH.get()


def by_heads(fn, q: jax.Array, k: jax.Array, v: jax.Array, *rest: jax.Array, stacked_cache: bool):
    """fn(q, k, v, *rest) run per device on its heads under shard_map when a mesh is active and divides the
    heads (q [B, T, H, D]; k/v [B, S, KVH, D], or the stacked cache [L, B, S, KVH, D]); else fn as is."""
    mesh = current_mesh()
    kv_heads = k.shape[-2]
    if mesh is None or q.shape[2] % mesh.shape[TENSOR] or kv_heads % mesh.shape[TENSOR]:
        return fn(q, k, v, *rest)
    qs = P(None, None, TENSOR, None)
    kvs = P(None, None, None, TENSOR, None) if stacked_cache else qs
    return jax.shard_map(fn, mesh=mesh, in_specs=(qs, kvs, kvs) + (P(),) * len(rest), out_specs=qs,
                         check_vma=False)(q, k, v, *rest)
