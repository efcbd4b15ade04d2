"""Flat GEMM for the few-row products of a verify step (FlashDecoding++'s flat GEMM), as a Pallas kernel.

x [M, K] @ w [K, N] with M small (a tree's B * T rows, 16 .. 128): the product is bound by streaming w,
so what matters is that enough programs stream it at once. Each program owns a panel of block_n output
columns and walks the whole K dimension in block_k steps (a [Mp, block_k] x [block_k, block_n] tensor-core
dot per step, float32 accumulate), with Triton pipelining the w tiles num_stages deep; x (a few hundred KB)
is re-read by every program from L2. No split-K: a second pass to add partials would cost more launches
than it saves at these sizes. Portable Pallas lowered to Triton, like the attention kernels, and
interpretable on CPU for tests. `flat_gemm_reference` is the ground truth (jnp.dot, float32 accumulate).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _kernel(x_ref, w_ref, o_ref, *, block_k: int, k: int):
    mp, bn = o_ref.shape

    def body(i, acc):
        x = x_ref[:, pl.ds(i * block_k, block_k)]
        w = w_ref[pl.ds(i * block_k, block_k), :]
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, k // block_k, body, jnp.zeros((mp, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def default_block_n(n: int) -> int:
    """The widest column panel that still gives about one program per SM of an H100 (132) or more."""
    for bn in (128, 64, 32):
        if n % bn == 0 and n // bn >= 128:
            return bn
    return 16


def flat_gemm_supports(m: int, k: int, n: int, block_k: int = 128) -> bool:
    """Shapes the kernel takes: 1 <= M <= 128, K a multiple of block_k, N a multiple of 16."""
    return 1 <= m <= 128 and k % block_k == 0 and n % 16 == 0


def flat_gemm_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "num_warps", "num_stages", "interpret"))
def flat_gemm(x: jax.Array, w: jax.Array, *, block_n: int | None = None, block_k: int = 128,
              num_warps: int = 4, num_stages: int = 4, interpret: bool = False) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] in x's dtype (float32 accumulate)."""
    m, k = x.shape
    n = w.shape[1]
    if not flat_gemm_supports(m, k, n, block_k):
        raise ValueError(f"flat_gemm takes M <= 128, K a multiple of block_k={block_k} and N a multiple of 16; "
                         f"got M={m}, K={k}, N={n}")
    block_n = block_n or default_block_n(n)
    if n % block_n:
        raise ValueError(f"block_n={block_n} does not divide N={n}")
    mp = max(16, pl.next_power_of_2(m))
    xp = jnp.pad(x, ((0, mp - m), (0, 0)))
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, k=k),
        grid=(n // block_n,),
        in_specs=[pl.BlockSpec((mp, k), lambda j: (0, 0)), pl.BlockSpec((k, block_n), lambda j: (0, j))],
        out_specs=pl.BlockSpec((mp, block_n), lambda j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((mp, n), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxmedusa_flat_gemm",
    )(xp, w.astype(x.dtype))
    return out[:m]
