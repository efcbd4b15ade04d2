"""Flat GEMM for the few-row products of a verify step (FlashDecoding++'s flat GEMM), as a Pallas kernel.

x [M, K] @ w [K, N] with M small (a tree's B * T rows, 16 .. 128): the product is bound by streaming w,
so what matters is that enough programs stream it at once. Each program owns a panel of block_n output
columns and walks K in block_k steps (a [Mp, block_k] x [block_k, block_n] tensor-core dot per step,
float32 accumulate), with Triton pipelining the w tiles num_stages deep; x (a few hundred KB) is re-read by
every program from L2.

split_k > 1 also splits K: program (j, s) walks the s-th of split_k ranges of K steps and adds its partial
panel into a zeroed float32 output with atomic adds, so there is one GEMM launch (after a zero fill) and no
[split_k, M, N] partials for a later kernel to read back. Float atomics make the sum's order, and so its last
bits, vary from run to run. Measured on an H200 (bench/gemm_layers.py --per-gemm --split-k 1 2 4 8,
2026-12-02) every split lost to split_k = 1 at every 7B shape and M = 1, 16, 64 (at 64 rows by 1.3-3x: the
float32 atomics of many programs on one panel serialise), so the dispatcher never splits; the option stays
for experiments on other chips.

Portable Pallas lowered to Triton, like the attention kernels, and interpretable on CPU for tests.
`flat_gemm_reference` is the ground truth (jnp.dot, float32 accumulate).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _kernel(x_ref, w_ref, *refs, block_k: int, k: int, split_k: int):
    o_ref = refs[-1]  # with split_k > 1, refs[0] is the zeroed float32 input the output aliases
    mp, bn = o_ref.shape

    def body(i, acc):
        x = x_ref[:, pl.ds(i * block_k, block_k)]
        w = w_ref[pl.ds(i * block_k, block_k), :]
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    steps = k // block_k
    if split_k == 1:
        acc = lax.fori_loop(0, steps, body, jnp.zeros((mp, bn), jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)
        return
    # every program runs the same static trip count, so Triton can pipeline the loop (a loop with traced
    # bounds lowers to a while loop, which it does not); the steps past K in the last range (K steps not a
    # multiple of split_k) re-read the last tile and add nothing
    per = -(-steps // split_k)
    lo = pl.program_id(1) * per

    def split_body(j, acc):
        i = jnp.minimum(lo + j, steps - 1)
        x = x_ref[:, pl.ds(i * block_k, block_k)]
        x = jnp.where(lo + j < steps, x, jnp.zeros_like(x))
        w = w_ref[pl.ds(i * block_k, block_k), :]
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, per, split_body, jnp.zeros((mp, bn), jnp.float32))
    plgpu.atomic_add(o_ref, (slice(None), slice(None)), acc)


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


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "split_k", "num_warps", "num_stages",
                                             "interpret"))
def flat_gemm(x: jax.Array, w: jax.Array, *, block_n: int | None = None, block_k: int = 128, split_k: int = 1,
              num_warps: int = 4, num_stages: int = 4, interpret: bool = False) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] in x's dtype (float32 accumulate); split_k > 1 splits K too (atomic adds).
    block_n defaults to default_block_n(N) without a split, else 128 (wide panels, fewer of them)."""
    m, k = x.shape
    n = w.shape[1]
    if not flat_gemm_supports(m, k, n, block_k):
        raise ValueError(f"flat_gemm takes M <= 128, K a multiple of block_k={block_k} and N a multiple of 16; "
                         f"got M={m}, K={k}, N={n}")
    if not 1 <= split_k <= k // block_k:
        raise ValueError(f"split_k={split_k} must be in [1, K / block_k = {k // block_k}]")
    block_n = block_n or (default_block_n(n) if split_k == 1 or n % 128 else 128)
    if n % block_n:
        raise ValueError(f"block_n={block_n} does not divide N={n}")
    mp = max(16, pl.next_power_of_2(m))
    xp = jnp.pad(x, ((0, mp - m), (0, 0)))
    panel = pl.BlockSpec((mp, block_n), lambda j, s: (0, j))
    split = split_k > 1
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, k=k, split_k=split_k),
        grid=(n // block_n, split_k),
        in_specs=[pl.BlockSpec((mp, k), lambda j, s: (0, 0)), pl.BlockSpec((k, block_n), lambda j, s: (0, j))]
        + ([panel] if split else []),
        out_specs=panel,
        out_shape=jax.ShapeDtypeStruct((mp, n), jnp.float32 if split else x.dtype),
        input_output_aliases={2: 0} if split else {},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxmedusa_flat_gemm_split_k" if split else "jaxmedusa_flat_gemm",
    )(xp, w.astype(x.dtype), *([jnp.zeros((mp, n), jnp.float32)] if split else []))
    return out[:m].astype(x.dtype)
