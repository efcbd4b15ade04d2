"""The one attention entry point the model calls; it picks the implementation.

Implementations:
  "reference"  pure JAX (XLA), any backend; the ground truth.
  "pallas"     the Pallas kernels (kernels/attention_pallas.py), compiled for the GPU.
  "interpret"  the same Pallas kernels in interpret mode (CPU); slow, for tests.
  "auto"       "pallas" on GPU, "reference" elsewhere (the default); also "reference" for float32 queries
               traced under true float32 products (jax.default_matmul_precision "highest", as generate() runs
               a float32 model): Triton's IEEE float32 dots made the tree kernel 10x slower than XLA at 64
               nodes on an H200 (1.57 vs 0.15 ms a step), and no faster at 1 node.
Choose with `impl=` (the model's `attn_impl`) or the JAXMEDUSA_ATTENTION environment variable.

Prompt prefill (a causal block of T tokens over an empty cache) is flash attention on the fresh K/V,
never reading the cache: cuDNN's fused kernel (`jax.nn.dot_product_attention(implementation="cudnn")`)
on a GPU for float16/bfloat16, else the blockwise reference (query blocks, O(T * block) memory, never
[T, T] scores). JAXMEDUSA_PREFILL=auto|cudnn|blockwise overrides the choice (for benchmarks).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp

from . import attention_pallas, reference
from .attention_pallas import kernel_supports
from .gemm_pallas import flat_gemm, flat_gemm_supports
from .norm_pallas import add_rms_norm_reference, add_rms_norm_supports
from .norm_pallas import add_rms_norm as add_rms_norm_pallas

IMPLS = ("auto", "reference", "pallas", "interpret")
ENV_VAR = "JAXMEDUSA_ATTENTION"
PREFILL_IMPLS = ("auto", "cudnn", "blockwise")
PREFILL_ENV_VAR = "JAXMEDUSA_PREFILL"
Q_ROPE_ENV_VAR = "JAXMEDUSA_Q_ROPE"


def resolve_impl(impl: str | None = None, dtype=None) -> str:
    """Returns the implementation to use: explicit argument, then the environment variable, then auto
    (which, given the queries' dtype, keeps float32 traced under true float32 products on XLA)."""
    choice = impl or os.environ.get(ENV_VAR) or "auto"
    if choice not in IMPLS:
        raise ValueError(f"attention impl {choice!r} ({ENV_VAR} or impl=) is not one of {', '.join(IMPLS)}")
    if choice == "auto":
        if jax.default_backend() != "gpu":
            return "reference"
        exact_f32 = dtype is not None and jnp.dtype(dtype) == jnp.float32 and exact_float32_products()
        return "reference" if exact_f32 else "pallas"
    return choice


def exact_float32_products() -> bool:
    """Whether dots traced now take true float32 inputs (jax.default_matmul_precision "highest"/"float32")."""
    return str(jax.config.jax_default_matmul_precision or "").lower() in ("highest", "float32", "f32_f32_f32")


def q_rope_in_kernel(impl: str | None, dtype, head_dim: int) -> bool:
    """Whether attention() takes q un-rotated (with cos/sin) as the fused q/k/v product whole, for the Pallas
    kernels to read the query heads in place and rotate them: only with JAXMEDUSA_Q_ROPE=kernel ("auto" and
    "xla": no). It removes the kernel that rotated and laid out q (31 fewer kernels a step at 7B) but the attention
    kernel's gathers cost about as much: in the model on an H200 (7B, prompt 1k, 2026-12-02,
    verify-breakdown-q-rope-{xla,kernel}-...json) the rope row went 0.050 -> 0 ms and the attention row 0.465 ->
    0.512 ms at B=1 T=64, kernel time 4.894 -> 4.850 ms, steps within noise (B=1 T=1 4.311 -> 4.283, T=64 5.040 ->
    5.064; B=4 T=1 4.383 -> 4.502, T=64 7.769 -> 7.784)."""
    choice = os.environ.get(Q_ROPE_ENV_VAR) or "auto"
    if choice not in ("auto", "kernel", "xla"):
        raise ValueError(f"{Q_ROPE_ENV_VAR}={choice!r} is not one of auto, kernel, xla")
    return choice == "kernel" and resolve_impl(impl, dtype) in ("pallas", "interpret") and kernel_supports(head_dim)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, tree_mask: jax.Array, *,
              sm_scale: float | None = None, impl: str | None = None, layer: int | None = None,
              num_heads: int | None = None, cos: jax.Array | None = None, sin: jax.Array | None = None,
              rope_interleaved: bool = False) -> jax.Array:
    """Attention of T new tokens q [B, T, H, D] whose K/V were already written at slots [lengths, lengths+T).

    Each query sees the cache prefix [0, lengths) and the new slots tree_mask [T, T] allows (a causal
    mask for a prompt chunk, ancestors + self for a Medusa tree). With `layer`, k/v are the whole stacked
    cache [L, B, S, KVH, D] and the kernels read that layer in place (no per-call copy of it). A prompt
    over an empty cache goes to prefill_attention instead, which never reads the cache.
    num_heads: only q's first num_heads heads are queries (q may be the whole fused q/k/v output). cos/sin
    [B, T, R]: q is not rotated yet and the kernel rotates it (only where q_rope_in_kernel() said so).
    """
    chosen = resolve_impl(impl, q.dtype)
    t = q.shape[1]
    if chosen in ("pallas", "interpret") and not kernel_supports(q.shape[-1]):
        if impl or os.environ.get(ENV_VAR):
            raise ValueError(f"attention impl {chosen!r} needs head_dim a power of two >= 16, got {q.shape[-1]}")
        chosen = "reference"
    if cos is not None and chosen == "reference":
        raise ValueError("attention() was given cos/sin to rotate q in the kernel, but the reference runs here: "
                         "rotate q first where q_rope_in_kernel() is False")
    if chosen == "reference":
        q = q if num_heads is None else q[:, :, :num_heads]
        if layer is not None:
            k, v = k[layer], v[layer]
        if t == 1:
            return reference.decode_attention_reference(q[:, 0], k, v, lengths + 1, sm_scale=sm_scale)[:, None]
        return reference.tree_attention_reference(q, k, v, lengths, tree_mask, sm_scale=sm_scale)
    interpret = chosen == "interpret"
    q_layout = dict(num_heads=num_heads, rope_interleaved=rope_interleaved)
    if t == 1:
        return attention_pallas.decode_attention(q[:, 0], k, v, lengths + 1, sm_scale=sm_scale, interpret=interpret,
                                                 layer=layer, cos=None if cos is None else cos[:, 0],
                                                 sin=None if sin is None else sin[:, 0], **q_layout)[:, None]
    return attention_pallas.tree_attention(q, k, v, lengths, tree_mask, sm_scale=sm_scale, interpret=interpret,
                                           layer=layer, cos=cos, sin=sin, **q_layout)


def cudnn_supports(dtype, head_dim: int) -> bool:
    """Whether cuDNN's fused attention takes this case (GPU, float16/bfloat16, head_dim <= 128, multiple of 8)."""
    return (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16)
            and head_dim <= 128 and head_dim % 8 == 0)


def resolve_prefill_impl(dtype, head_dim: int, impl: str | None = None) -> str:
    """"cudnn" or "blockwise" for a prompt prefill; `impl` is the model's attn_impl ("reference" and
    "interpret" mean the reference), JAXMEDUSA_PREFILL overrides."""
    choice = os.environ.get(PREFILL_ENV_VAR) or "auto"
    if choice not in PREFILL_IMPLS:
        raise ValueError(f"prefill impl {choice!r} ({PREFILL_ENV_VAR}) is not one of {', '.join(PREFILL_IMPLS)}")
    if choice == "cudnn" and not cudnn_supports(dtype, head_dim):
        raise ValueError(f"{PREFILL_ENV_VAR}=cudnn needs a GPU, float16/bfloat16 and head_dim <= 128 (a multiple "
                         f"of 8); got {jax.default_backend()}, {jnp.dtype(dtype).name}, head_dim {head_dim}")
    if choice != "auto":
        return choice
    if resolve_impl(impl) in ("reference", "interpret"):
        return "blockwise"
    return "cudnn" if cudnn_supports(dtype, head_dim) else "blockwise"


def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, sm_scale: float | None = None,
                      impl: str | None = None) -> jax.Array:
    """Causal attention of a (right-padded) prompt q [B, T, H, D] over its own k/v [B, T, KVH, D]."""
    chosen = resolve_prefill_impl(q.dtype, q.shape[-1], impl)
    if chosen == "cudnn":
        scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale, implementation="cudnn")
    return reference.causal_attention_blockwise(q, k, v, sm_scale=sm_scale)


def training_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal self-attention of a training batch q [B, T, H, D] over its own k/v [B, T, KVH, D], with a
    backward pass: cuDNN's flash attention where it applies (never [T, T] scores, forward or backward), else
    XLA's. cuDNN's backward takes even lengths only (jax raises "Unsupported sequence length" for odd T), so an
    odd T gets one zero position appended and dropped: causal rows never see a later position, so the T real
    rows are unchanged. JAXMEDUSA_PREFILL=blockwise keeps XLA on the GPU too (for comparisons)."""
    if os.environ.get(PREFILL_ENV_VAR) == "blockwise" or not cudnn_supports(q.dtype, q.shape[-1]):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    t = q.shape[1]
    if t % 2:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (q, k, v))
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")[:, :t]


GEMM_IMPLS = ("auto", "xla", "cublas", "pallas", "interpret")
GEMM_ENV_VAR = "JAXMEDUSA_GEMM"
# Rows (M = batch x new tokens) for which "auto" picks the flat GEMM; None: never. In the model's loop on an
# H200 (bench/verify_breakdown.py --gemm-impls xla pallas, 7B, 2026-12-02) the flat GEMM lost to XLA at every
# B x T tried (B=1 T=1: 5.00 vs 4.51 ms, T=64: 6.01 vs 5.37; B=4 T=16: 6.13 vs 5.73), as it did on an H100;
# its one win in isolation is the fused QKV product at 16-64 rows (bench/gemm_layers.py --per-gemm).
FLAT_GEMM_ROWS: tuple[int, int] | None = None
# XLA's options that turn its Triton GEMM emitter off for one compilation: every GEMM goes to cuBLAS.
CUBLAS_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
# GEMM rows (batch x tree nodes) from which "auto" compiles a verify step with CUBLAS_OPTIONS on a GPU.
CUBLAS_MIN_ROWS = 64
# XLA options for every Medusa verify loop or step on a GPU. XLA's DotMerger joins GEMMs that share their input
# by concatenating their weights: the heads' residual blocks all read one hidden state, so each step copied
# K x H x H of weights (two 64 MB copies for 4 heads at 7B, 66 us of a 5.1 ms step on the H200) before one
# GEMM read them again. Without it (bench/verify_breakdown.py --xla-option xla_disable_hlo_passes=dot-merger,
# 7B, prompt 1k, H200, 2026-12-02): B=1 T=64 5.13 -> 5.07 ms, B=4 T=64 8.03 -> 7.97 ms; the base model's
# q/k/v are one stored matrix already, so nothing else changes.
VERIFY_OPTIONS = {"xla_disable_hlo_passes": "dot-merger"}


def _gemm_choice(impl: str | None) -> str:
    choice = impl or os.environ.get(GEMM_ENV_VAR) or "auto"
    if choice not in GEMM_IMPLS:
        raise ValueError(f"gemm impl {choice!r} ({GEMM_ENV_VAR} or impl=) is not one of {', '.join(GEMM_IMPLS)}")
    return choice


def resolve_gemm_impl(m: int, k: int, n: int, dtype, impl: str | None = None) -> str:
    """"xla" or "pallas"/"interpret" for x [M, K] @ w [K, N]: explicit argument, then JAXMEDUSA_GEMM, then
    auto (the flat GEMM on a GPU for M within FLAT_GEMM_ROWS and bf16/fp16, today never; XLA's GEMM
    elsewhere). "cublas" is XLA's GEMM here (loop_compiler_options picks the library). A Pallas choice falls
    back to XLA for shapes the kernel does not take."""
    choice = _gemm_choice(impl)
    if choice == "auto":
        low, high = FLAT_GEMM_ROWS or (1, 0)
        choice = ("pallas" if jax.default_backend() == "gpu" and low <= m <= high
                  and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla")
    if choice == "cublas":
        return "xla"
    if choice in ("pallas", "interpret") and not flat_gemm_supports(m, k, n):
        return "xla"
    return choice


def loop_compiler_options(tree: bool, rows: int = 0, *, quantized_heads: bool = False,
                          impl: str | None = None) -> dict | None:
    """XLA options to compile a decode loop (tree=False) or a Medusa verify loop/step (tree=True) with, whose
    GEMMs have `rows` rows (batch x tree nodes).

    "cublas" (JAXMEDUSA_GEMM or impl=) sends every GEMM of the compilation to cuBLAS; "auto" does so for a
    verify step of CUBLAS_MIN_ROWS rows or more on a GPU. There XLA's autotuner, timing each GEMM alone,
    picks Triton GEMMs whose split-K partials then cost a residual add of 4 us each, while cuBLAS fuses the
    residual into the GEMM (its "badd" kernels). In the model's loop (7B, prompt 1k, H200, 2026-12-02,
    bench/verify_breakdown.py --gemm-impls xla cublas) the step took, XLA's pick -> cuBLAS: B=1 T=64 5.37 ->
    5.16 ms (shared-lm_head heads 5.05 -> 4.91), B=4 T=16 5.73 -> 5.62, B=4 T=32 6.07 -> 5.97; but B=1 T=16
    4.63 -> 5.02, T=32 5.02 -> 5.11, and one-row decode 4.51 -> 4.62 (B=4: 4.77 -> 5.34), where it is left.
    Not with int8 heads: cuBLAS cannot take the int8 operand, so XLA writes the dequantized [H, V] matrix
    out first (B=1 T=64 6.13 instead of 5.31 ms). Every verify loop on a GPU also gets VERIFY_OPTIONS."""
    choice = _gemm_choice(impl)
    gpu = jax.default_backend() == "gpu"
    options = dict(VERIFY_OPTIONS) if tree and gpu else {}
    if choice == "cublas" or (choice == "auto" and tree and rows >= CUBLAS_MIN_ROWS and not quantized_heads and gpu):
        options.update(CUBLAS_OPTIONS)
    return options or None


def matmul(x: jax.Array, w: jax.Array, *, impl: str | None = None) -> jax.Array:
    """x [..., K] @ w [K, N] in x's dtype, through XLA or the Pallas flat GEMM (few rows)."""
    k, n = w.shape
    m = math.prod(x.shape[:-1])
    chosen = resolve_gemm_impl(m, k, n, x.dtype, impl)
    if chosen == "xla":
        return jnp.dot(x, w.astype(x.dtype))
    y = _flat_gemm_diff(x.reshape(m, k), w.astype(x.dtype), chosen == "interpret")
    return y.reshape(*x.shape[:-1], n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _flat_gemm_diff(x, w, interpret):
    """The flat GEMM with XLA's products as its gradient (pallas_call itself has no autodiff rule)."""
    return flat_gemm(x, w, interpret=interpret)


def _flat_gemm_fwd(x, w, interpret):
    return flat_gemm(x, w, interpret=interpret), (x, w)


def _flat_gemm_bwd(interpret, res, g):
    x, w = res
    return jnp.dot(g, w.T).astype(x.dtype), jnp.dot(x.T, g).astype(w.dtype)


_flat_gemm_diff.defvjp(_flat_gemm_fwd, _flat_gemm_bwd)


NORM_IMPLS = ("auto", "xla", "pallas", "interpret", "fold")
NORM_ENV_VAR = "JAXMEDUSA_NORM"
# Rows (batch x new tokens) up to which "auto" folds a decoder layer's norms into the products after them on a GPU
# (fold_norm). In the model's loop on an H200 (bench/verify_breakdown.py, 7B, prompt 1k, 2026-12-02): B = 1 T = 1
# 528 instead of 592 kernels a step; interleaved in one call, kernels 4.31 -> 4.25 ms and the step 4.305 -> 4.235 ms
# (means of 3 processes each); over all 16 processes of the day 4.289 -> 4.239 ms. B = 4 T = 1 (4 rows) within
# noise (4.41-4.44 either way). Not folded beyond: a 64-node step was no faster (5.02 against 5.01-5.04 ms, 32 more
# kernels) and B = 4 T = 64 slower (8.22 against 7.94), as cuBLAS's GEMMs leave the factor a kernel of its own.
FOLD_MAX_ROWS = 4


def resolve_norm_impl(hidden: int, impl: str | None = None, rows: int | None = None) -> str:
    """"xla", "pallas"/"interpret" or "fold" for a decoder layer's RMSNorms over `rows` rows of `hidden`: explicit
    argument, then JAXMEDUSA_NORM, then auto: "fold" on a GPU for at most FOLD_MAX_ROWS rows, else XLA (the fused
    add + norm kernel, faster alone, made the model's step no faster at one row and slower at 64:
    kernels/norm_pallas.py has the numbers). "fold": the norm's weight multiplies the next product's input and
    its per-row factor the product's output (models.layers.RMSNorm.fold): XLA fuses both into the kernels around
    them, so no kernel normalises. A Pallas choice falls back to XLA for row lengths the kernel does not take."""
    choice = impl or os.environ.get(NORM_ENV_VAR) or "auto"
    if choice not in NORM_IMPLS:
        raise ValueError(f"norm impl {choice!r} ({NORM_ENV_VAR} or impl=) is not one of {', '.join(NORM_IMPLS)}")
    if choice == "auto":
        gpu = jax.default_backend() == "gpu"
        return "fold" if gpu and rows is not None and rows <= FOLD_MAX_ROWS else "xla"
    if choice in ("pallas", "interpret") and not add_rms_norm_supports(hidden):
        return "xla"
    return choice


def fold_norm(hidden: int, rows: int, impl: str | None = None) -> bool:
    """Whether a decoder layer of `rows` rows folds its RMSNorms into the products after them (resolve_norm_impl)."""
    return resolve_norm_impl(hidden, impl, rows) == "fold"


def add_rms_norm(x: jax.Array, a: jax.Array, weight: jax.Array, *, eps: float, scale_in_float32: bool = False,
                 impl: str | None = None) -> tuple[jax.Array, jax.Array]:
    """(x + a, RMSNorm(x + a)): a residual add and the norm after it, through XLA or one Pallas kernel."""
    chosen = resolve_norm_impl(x.shape[-1], impl)
    if chosen in ("xla", "fold"):  # a folded norm is the decoder layer's to apply; alone it is the reference
        return add_rms_norm_reference(x, a, weight, eps, scale_in_float32)
    return _add_rms_norm_diff(x, a, weight, float(eps), scale_in_float32, chosen == "interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _add_rms_norm_diff(x, a, weight, eps, scale_in_float32, interpret):
    """The fused kernel with the reference's gradient (pallas_call itself has no autodiff rule)."""
    return add_rms_norm_pallas(x, a, weight, eps=eps, scale_in_float32=scale_in_float32, interpret=interpret)


def _add_rms_norm_fwd(x, a, weight, eps, scale_in_float32, interpret):
    return _add_rms_norm_diff(x, a, weight, eps, scale_in_float32, interpret), (x, a, weight)


def _add_rms_norm_bwd(eps, scale_in_float32, interpret, res, g):
    _, vjp = jax.vjp(lambda x, a, w: add_rms_norm_reference(x, a, w, eps, scale_in_float32), *res)
    return vjp(g)


_add_rms_norm_diff.defvjp(_add_rms_norm_fwd, _add_rms_norm_bwd)
