"""Residual add + RMSNorm in one Pallas kernel: (x + a, rmsnorm(x + a)) for the rows of a decode or verify step.

XLA runs `x = x + a; norm(x)` of a one-row decode step as three kernels (the add, the sum of squares, the
scaling), each 1.3-1.5 us of launch latency for 8 KB of data on an H200 (bench/verify_breakdown.py, 7B,
B = 1: 64 norms and 63 adds a step). Here one program per row reads x, a and the weight once and writes
both the new residual and the normalised row. The arithmetic is the reference's: the add rounded to x's
dtype, the mean of squares in float32, then either weight * y.astype(dtype) (HF Llama/Qwen/GLM) or
(weight * y).astype(dtype) (THUDM ChatGLM, scale_in_float32).

Measured on an H200 (7B, prompt 1k, bench/verify_breakdown.py with JAXMEDUSA_NORM=xla | pallas, 2026-12-02) the
kernel takes 2.3 us where XLA's add, reduce and scale take 4.6, yet the step barely moves (B = 1, T = 1: 4.45
-> 4.42 ms) or loses (T = 64: 5.07 -> 5.21 ms): a custom call ends XLA's fusions around it, so the o
projection's split-K partials need a reduce kernel of their own (1.25 us) at one row, and at 64 rows cuBLAS can
no longer fold the residual add into the o GEMM. The dispatcher keeps XLA; the kernel is the norm half of a
GEMM-epilogue fusion that would keep both.

Portable Pallas lowered to Triton, interpretable on CPU for tests. The row length must be a power of two
(a Triton block): 7B's 4096 is, 13B's 5120 is not (the dispatcher keeps XLA there).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def add_rms_norm_supports(hidden: int) -> bool:
    """Row lengths the kernel takes: a power of two >= 16."""
    return hidden >= 16 and hidden & (hidden - 1) == 0


def add_rms_norm_reference(x: jax.Array, a: jax.Array, weight: jax.Array, eps: float,
                           scale_in_float32: bool = False) -> tuple[jax.Array, jax.Array]:
    """(x + a, RMSNorm(x + a)) as layers.RMSNorm computes it: the ground truth."""
    s = x + a
    sf = s.astype(jnp.float32)
    y = sf * jax.lax.rsqrt(jnp.mean(sf * sf, axis=-1, keepdims=True) + eps)
    if scale_in_float32:
        return s, (weight.astype(jnp.float32) * y).astype(x.dtype)
    return s, weight * y.astype(x.dtype)


def _kernel(x_ref, a_ref, w_ref, s_ref, y_ref, *, eps: float, scale_in_float32: bool):
    s = (x_ref[...].astype(jnp.float32) + a_ref[...].astype(jnp.float32)).astype(s_ref.dtype)
    s_ref[...] = s
    sf = s.astype(jnp.float32)
    y = sf * jax.lax.rsqrt(jnp.mean(sf * sf) + eps)
    w = w_ref[...]
    if scale_in_float32:
        y_ref[...] = (w.astype(jnp.float32) * y).astype(y_ref.dtype)
    else:
        y_ref[...] = (w.astype(jnp.float32) * y.astype(s_ref.dtype).astype(jnp.float32)).astype(y_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "scale_in_float32", "num_warps", "interpret"))
def add_rms_norm(x: jax.Array, a: jax.Array, weight: jax.Array, *, eps: float, scale_in_float32: bool = False,
                 num_warps: int = 4, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """x, a [..., H] (same shape and dtype), weight [H] -> (x + a in x's dtype, RMSNorm(x + a) in the reference's
    dtype: x's, or x's promoted with the weight's when the weight scales outside float32)."""
    if x.shape != a.shape or x.dtype != a.dtype:
        raise ValueError(f"add_rms_norm takes x and a of one shape and dtype, got {x.shape} {x.dtype} and "
                         f"{a.shape} {a.dtype}")
    h = x.shape[-1]
    if not add_rms_norm_supports(h) or weight.shape != (h,):
        raise ValueError(f"add_rms_norm needs a power-of-two row length >= 16 and weight [{h}], got rows of {h} "
                         f"and weight {weight.shape}")
    rows = math.prod(x.shape[:-1])
    row = pl.BlockSpec((None, h), lambda i: (i, 0))
    out_dtype = x.dtype
    if not scale_in_float32 and weight.dtype != x.dtype:  # weight * y in the promoted dtype, as the reference
        out_dtype = jnp.promote_types(weight.dtype, x.dtype)
    s, y = pl.pallas_call(
        functools.partial(_kernel, eps=float(eps), scale_in_float32=scale_in_float32),
        grid=(rows,),
        in_specs=[row, row, pl.BlockSpec((h,), lambda i: (0,))],
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct((rows, h), x.dtype), jax.ShapeDtypeStruct((rows, h), out_dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="jaxmedusa_add_rms_norm",
    )(x.reshape(rows, h), a.reshape(rows, h), weight)
    return s.reshape(x.shape), y.reshape(x.shape)
