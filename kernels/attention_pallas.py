"""Pallas kernels for attention over the KV cache: split-K decode attention and tree-verify attention.

Backend choice: these are portable Pallas kernels lowered to Triton (ref indexing, `plgpu.load` for
masked loads, `jnp.dot` inside the kernel). That lowering works on jax 0.10.2 and 0.11.x alike (it is
deprecated in 0.11 in favour of Mosaic GPU, which interprets on CPU only on 0.11) and every kernel runs
on CPU with `interpret=True`, which is how the tests check them.

One kernel serves both entry points. For each (sequence, KV head) it takes all query rows that share
that KV head (T tree tokens x G grouped query heads = M rows) and streams the live cache prefix
[0, length) through them in blocks of `block_k` slots: a [M, D] x [D, block_k] GEMM per block, so the
cache is read once whatever T is (FlashDecoding++'s flat GEMM). The prefix is split into `num_splits`
chunks sized by the live length (not the cache capacity), each program writing a float32 partial; the
tree's own T x T block is one more program per (sequence, KV head, row tile) in the same launch, masked
per row by the tree, and everything is merged at the end by one log-sum-exp (a plain sum under the
unified max).

Unified max (FlashDecoding++): with `unified_max=phi` every partial accumulates exp(s - phi) against one
fixed reference instead of its own running maximum, so partials from different splits (and the tree
block) add up with no rescale. A row whose running maximum leaves [phi - M, phi + M] (M =
UNIFIED_MAX_MARGIN, where exp would overflow or underflow) falls back, inside the kernel, to the exact
scheme: its reference becomes its running maximum and what it accumulated is rescaled once. Each partial
reports the reference it used, so one merge serves both: partial i is scaled by exp(r_i - max r), which is
exactly 1 everywhere in the common case. `unified_max=None` is the exact online softmax throughout, and
float16 inputs always use it: p = exp(s - phi) meets the P.V GEMM in the cache's dtype, and float16
overflows at e^11, well within the margin (bfloat16 and float32 have float32's range).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

UNIFIED_MAX_MARGIN = 50.0  # exp(50) * 32k slots * |v| stays far below float32's max; exp(-50) is a normal float
_NEG = -1e30


def _pow2_at_least_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def kernel_supports(head_dim: int) -> bool:
    """Whether the Pallas kernels take this head size (a power of two >= 16)."""
    return _pow2_at_least_16(head_dim)


def _load_q(q_ref, cos_ref, sin_ref, h, mt, *, block_m: int, group: int, rope: tuple | None):
    """Row tile mt of KV head h: q_ref [T, NQ, D] rows gathered per (token, grouped head), rotated when `rope`,
    zero past the T x group real rows."""
    t, _, d = q_ref.shape
    rows = mt * block_m + jnp.arange(block_m, dtype=jnp.int32)
    tok = jnp.minimum(rows // group, t - 1)[:, None]  # clamped: the rows past the end are zeroed below
    head = (h * group + rows % group)[:, None]
    dims = jnp.arange(d, dtype=jnp.int32)
    q = q_ref[tok, head, dims[None, :]]
    if rope is not None:  # x * cos + rotate(x) * sin, rotate(x)[j] = +-x[pair(j)]; the signs are in sin_ref
        rotary, interleaved = rope
        if interleaved:
            pair = jnp.where(dims < rotary, dims + 1 - 2 * (dims % 2), dims)
        else:
            half = rotary // 2
            pair = jnp.where(dims < half, dims + half, jnp.where(dims < rotary, dims - half, dims))
        partner = q_ref[tok, head, pair[None, :]]
        cos, sin = cos_ref[tok, dims[None, :]], sin_ref[tok, dims[None, :]]
        q = (q.astype(jnp.float32) * cos + partner.astype(jnp.float32) * sin).astype(q.dtype)
    return jnp.where((rows < t * group)[:, None], q, jnp.zeros_like(q))


def _rope_tables(cos: jax.Array, sin: jax.Array, d: int, dtype, interleaved: bool) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, R] -> the kernel's [B, T, D] float32 tables: rounded to q's dtype first (as the model's
    apply_rope multiplies), rotate_half's signs folded into sin, and cos 1 / sin 0 on the D - R unrotated dims."""
    r = cos.shape[-1]
    dims = jnp.arange(r)
    sign = jnp.where(dims % 2 == 0, -1.0, 1.0) if interleaved else jnp.where(dims < r // 2, -1.0, 1.0)
    cos = cos.astype(dtype).astype(jnp.float32)
    sin = sin.astype(dtype).astype(jnp.float32) * sign
    pad = [(0, 0)] * (cos.ndim - 1) + [(0, d - r)]
    return jnp.pad(cos, pad, constant_values=1.0), jnp.pad(sin, pad)


def _prefix_kernel(len_ref, q_ref, k_ref, v_ref, *refs, block_m: int, block_k: int, num_splits: int,
                   sm_scale: float, phi: float | None, tree_slots: int | None, group: int, rope: tuple | None):
    """One (sequence, KV head, row tile, split): partial attention of block_m rows over its part of the cache.

    Row r of KV head h is query token r // group, query head h * group + r % group of q_ref [T, NQ, D] (read in
    place, so the fused q/k/v product's columns need no copy); with `rope` = (rotary dims, interleaved) the row
    is rotated here by cos_ref/sin_ref [T, D] (see _rope_tables). Splits 0 .. num_splits - 1 cover the prefix
    [0, length); with a tree (tree_slots = T), split num_splits covers the tree slots [length, length + T),
    visible per row as m_ref [block_m, Tp] says (the T x T tree block fused into the same kernel: no separate
    gather, GEMMs or concatenation).
    Writes acc = sum_j exp(s_j - r) v_j, l = sum_j exp(s_j - r) and the reference r used per row.
    """
    cos_ref, sin_ref, refs = (refs[0], refs[1], refs[2:]) if rope else (None, None, refs)
    m_ref, (o_ref, r_ref, l_ref) = (refs[0], refs[1:]) if tree_slots else (None, refs)
    split = pl.program_id(3)
    length = len_ref[()]
    q = _load_q(q_ref, cos_ref, sin_ref, pl.program_id(1), pl.program_id(2), block_m=block_m, group=group, rope=rope)
    d = q.shape[1]
    cols = jnp.arange(block_k, dtype=jnp.int32)

    def attend(start, end, tree: bool):
        def body(i, carry):
            acc, r, mx, l = carry
            off = start + i * block_k
            valid = off + cols < end
            k = plgpu.load(k_ref.at[pl.ds(off, block_k), :], mask=valid[:, None], other=0.0)
            v = plgpu.load(v_ref.at[pl.ds(off, block_k), :], mask=valid[:, None], other=0.0)
            s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * sm_scale
            visible = valid[None, :]
            if tree:
                visible = visible & (m_ref[:, pl.ds(i * block_k, block_k)] != 0)
            s = jnp.where(visible, s, -jnp.inf)
            mx = jnp.maximum(mx, jnp.max(s, axis=1))  # running max of the true scores
            if phi is None:  # exact online softmax: the reference is the running max
                r_new = mx
            else:  # unified max: keep the fixed reference while the running max stays near it
                r_new = jnp.where(jnp.abs(mx - r) > UNIFIED_MAX_MARGIN, mx, r)
            alpha = jnp.exp(r - r_new)  # 1 wherever the reference did not move
            p = jnp.exp(s - r_new[:, None])
            l = l * alpha + jnp.sum(p, axis=1)
            acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            return acc, r_new, mx, l

        r0 = jnp.full((block_m,), _NEG if phi is None else phi, jnp.float32)
        init = (jnp.zeros((block_m, d), jnp.float32), r0, jnp.full((block_m,), _NEG, jnp.float32),
                jnp.zeros((block_m,), jnp.float32))
        n_blocks = pl.cdiv(jnp.maximum(end - start, 0), block_k)
        acc, r, _, l = lax.fori_loop(0, n_blocks, body, init)
        o_ref[...] = acc
        r_ref[...] = r
        l_ref[...] = l

    chunk = pl.cdiv(pl.cdiv(length, num_splits), block_k) * block_k
    start = jnp.minimum(split, num_splits - 1) * chunk
    if not tree_slots:
        attend(start, jnp.minimum(start + chunk, length), False)
        return

    @pl.when(split < num_splits)
    def _prefix():
        attend(start, jnp.minimum(start + chunk, length), False)

    @pl.when(split == num_splits)
    def _tree():
        attend(length, length + tree_slots, True)


def _prefix_partials(q, k, v, lengths, tree_rows=None, tree_slots=None, rope_tables=None, *, group, kv_heads, sm_scale,
                     phi, rope, block_m, block_k, num_splits, num_warps, num_stages, interpret, layer):
    """q [B, T, NQ, D] (query head h * group + g of KV head h, read in place; NQ may hold more heads than the
    queries) over cache k/v [B, S, KVH, D] slots [0, lengths) (or layer `layer` of a stacked cache
    [L, B, S, KVH, D], read in place: slicing the layer out first would copy it every call), plus, with
    tree_rows [Mp, Tp] (int32, which tree slot each row sees; Tp = tree_slots T padded to block_k), one more
    partial over the tree slots [lengths, lengths + T). rope_tables: (cos, sin) [B, T, D] for in-kernel RoPE.

    Returns float32 partials o [B, KVH, P, Mp, D], r (reference), l [B, KVH, P, Mp], P = splits (+ 1), where
    row t * group + g is token t's query head g of the KV head; Mp = T x group padded to block_m.
    """
    b, t, nq, d = q.shape
    s = k.shape[-3]
    mp = pl.cdiv(t * group, block_m) * block_m
    parts = num_splits + (tree_rows is not None)
    grid = (b, kv_heads, mp // block_m, parts)
    kernel = functools.partial(_prefix_kernel, block_m=block_m, block_k=block_k, num_splits=num_splits,
                               sm_scale=sm_scale, phi=phi, tree_slots=tree_slots, group=group, rope=rope)
    if layer is None:
        kv_spec = pl.BlockSpec((None, s, None, d), lambda bi, h, mt, sp: (bi, 0, h, 0))
    else:
        kv_spec = pl.BlockSpec((None, None, s, None, d), lambda bi, h, mt, sp: (layer, bi, 0, h, 0))
    in_specs = [
        pl.BlockSpec((None,), lambda bi, h, mt, sp: (bi,)),
        pl.BlockSpec((None, t, nq, d), lambda bi, h, mt, sp: (bi, 0, 0, 0)),
        kv_spec,
        kv_spec,
    ]
    args = [lengths.astype(jnp.int32), q, k, v]
    if rope_tables is not None:
        in_specs += [pl.BlockSpec((None, t, d), lambda bi, h, mt, sp: (bi, 0, 0))] * 2
        args += list(rope_tables)
    if tree_rows is not None:
        in_specs.append(pl.BlockSpec((block_m, tree_rows.shape[1]), lambda bi, h, mt, sp: (mt, 0)))
        args.append(tree_rows)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, block_m, d), lambda bi, h, mt, sp: (bi, h, sp, mt, 0)),
            pl.BlockSpec((None, None, None, block_m), lambda bi, h, mt, sp: (bi, h, sp, mt)),
            pl.BlockSpec((None, None, None, block_m), lambda bi, h, mt, sp: (bi, h, sp, mt)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kv_heads, parts, mp, d), jnp.float32),
            jax.ShapeDtypeStruct((b, kv_heads, parts, mp), jnp.float32),
            jax.ShapeDtypeStruct((b, kv_heads, parts, mp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxmedusa_prefix_attention",
    )(*args)


def _merge(o, r, l):
    """Merges partials stacked on axis 2: o [B, KVH, P, ..., D], r/l [B, KVH, P, ...], each relative to
    its own reference r. With a shared unified max every scale is exactly 1: the merge is a plain sum."""
    scale = jnp.exp(r - jnp.max(r, axis=2, keepdims=True))
    num = jnp.sum(o * scale[..., None], axis=2)
    den = jnp.sum(l * scale, axis=2)
    return num / jnp.where(den > 0, den, 1.0)[..., None]


def _check_tuning(d: int, block_m: int, block_k: int, num_splits: int) -> None:
    if not kernel_supports(d):
        raise ValueError(f"head_dim must be a power of two >= 16 for the Pallas kernels, got {d}")
    if not _pow2_at_least_16(block_m):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    if not _pow2_at_least_16(block_k):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")


def default_num_splits(batch: int, kv_heads: int, row_tiles: int, num_slots: int, block_k: int,
                       block_m: int = 16) -> int:
    """Splits of the prefix per (sequence, KV head, row tile), from a sweep on an H100 (bench/tune_tree.py
    --sweep splits, 2026-11-25): about one wave of programs (128) for small row tiles, fewer (96) for
    tiles of 64+ rows, whose programs are heavier and whose partials cost more to merge; at least one
    split per 2048 slots for long caches, but at most two waves; never more than the cache has blocks."""
    programs = batch * kv_heads * row_tiles
    target = 128 if block_m <= 32 else 96
    splits = min(max(pl.cdiv(target, programs), pl.cdiv(num_slots, 2048)), pl.cdiv(264, programs))
    return max(1, min(splits, pl.cdiv(num_slots, block_k), 64))


def default_tiling(block_m: int) -> tuple[int, int]:
    """(block_k, num_stages) when the caller gives none. Tiles of up to 64 rows stream the cache in 64-slot
    blocks three stages deep. Over 32 layers' caches on an H200 (bench/tune_tree.py --sweep layers, 3
    interleaved repeats) an MHA tree layer took 14.9 instead of 17.7 us at T = 64 and 11.0 instead of 12.3 at
    T = 16; decode layers (--sweep decode, 2026-12-02) 10.8 instead of 12.3 us at B = 1 and S = 1k, 24.6
    instead of 28.8 at B = 4, 40.3 instead of 48.0 at S = 8k (GQA within noise). 128-row GQA tree tiles stay
    best at 128 slots / 2 stages (18.8 vs 21.3 us)."""
    return (64, 3) if block_m <= 64 else (128, 2)


def _attend(q, k, v, lengths, tree_mask, *, num_heads, cos, sin, rope_interleaved, sm_scale, unified_max, block_m,
            block_k, num_splits, num_warps, num_stages, interpret, layer=None):
    """q [B, T, NQ, D] whose first num_heads heads are the queries (RoPE'd here when cos/sin [B, T, R] are
    given): prefix kernel (+ tree block when tree_mask is given), merged -> [B, T, num_heads, D] float32."""
    b, t, nq, d = q.shape
    kvh = k.shape[-2]
    h = num_heads or nq
    if h > nq or h % kvh:
        raise ValueError(f"num_heads {h} must be at most q's {nq} heads and a multiple of the cache's {kvh} KV heads")
    g = h // kvh
    rows = t * g
    block_m = block_m or min(128, max(16, pl.next_power_of_2(rows)))
    tiling = default_tiling(block_m)
    block_k = block_k or tiling[0]
    num_stages = num_stages or tiling[1]
    mp = pl.cdiv(rows, block_m) * block_m
    # bench/tune_tree.py on an H100: 8 warps pay off only for the largest tile
    num_warps = num_warps or (8 if block_m >= 128 and block_k >= 128 else 4)
    num_splits = num_splits or default_num_splits(b, kvh, mp // block_m, k.shape[-3], block_k, block_m)
    _check_tuning(d, block_m, block_k, num_splits)
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    rope, rope_tables = None, None
    if cos is not None:
        rotary = cos.shape[-1]
        if cos.shape != sin.shape or cos.shape[:-1] != (b, t) or rotary % 2 or rotary > d:
            raise ValueError(f"cos/sin must both be [B, T, R] = [{b}, {t}, R] with R even and <= {d}, got "
                             f"{cos.shape} and {sin.shape}")
        rope = (rotary, bool(rope_interleaved))
        rope_tables = _rope_tables(cos, sin, d, q.dtype, rope[1])

    # exp(s - phi) is cast to v's dtype for the P.V dot: float16 tops out at e^11, far inside the margin
    # (scores of a real fp16 model reach it), so float16 takes the exact softmax, where p <= 1 always.
    phi = None if unified_max is None or v.dtype == jnp.float16 else float(unified_max)
    tree_rows = None
    if tree_mask is not None:  # row t * G + g sees tree slot u iff tree_mask[t, u]; padded to [Mp, Tp]
        tp = pl.cdiv(t, block_k) * block_k
        tree_rows = jnp.repeat(tree_mask.astype(jnp.int32), g, axis=0)
        tree_rows = jnp.pad(tree_rows, ((0, mp - rows), (0, tp - t)))
    o, r, l = _prefix_partials(q, k, v, lengths, tree_rows, None if tree_rows is None else t, rope_tables, group=g,
                               kv_heads=kvh, sm_scale=sm_scale, phi=phi, rope=rope, block_m=block_m, block_k=block_k,
                               num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                               interpret=interpret, layer=layer)
    parts = o.shape[2]
    o = o[:, :, :, :rows].reshape(b, kvh, parts, t, g, d)
    r = r[:, :, :, :rows].reshape(b, kvh, parts, t, g)
    l = l[:, :, :, :rows].reshape(b, kvh, parts, t, g)
    return jnp.transpose(_merge(o, r, l), (0, 2, 1, 3, 4)).reshape(b, t, h, d)


_STATIC = ("sm_scale", "unified_max", "block_m", "block_k", "num_splits", "num_warps", "num_stages", "interpret",
           "layer", "num_heads", "rope_interleaved")


@functools.partial(jax.jit, static_argnames=_STATIC)
def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *, sm_scale: float | None = None,
                     unified_max: float | None = 0.0, block_m: int | None = None, block_k: int | None = None,
                     num_splits: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                     interpret: bool = False, layer: int | None = None, num_heads: int | None = None,
                     cos: jax.Array | None = None, sin: jax.Array | None = None,
                     rope_interleaved: bool = False) -> jax.Array:
    """q [B, H, D] over k/v [B, S, KVH, D] slots [0, lengths) -> [B, H, D]; GQA by grouping heads per KV head.

    layer: k/v are a stacked cache [L, B, S, KVH, D] and this layer is read in place. num_heads: the first
    num_heads of q's heads are the queries (default: all), so the fused q/k/v product's output can be passed whole
    and only its query heads are read. cos/sin [B, R] (float32, R even, <= D): q is rotated in the kernel first
    (HF's split halves on the first R dims, or interleaved pairs with rope_interleaved), as the model's
    apply_rope would, so q needs no RoPE pass of its own.
    """
    b, nq, d = q.shape
    out = _attend(q[:, None], k, v, lengths.astype(jnp.int32), None, num_heads=num_heads,
                  cos=None if cos is None else cos[:, None], sin=None if sin is None else sin[:, None],
                  rope_interleaved=rope_interleaved, sm_scale=sm_scale, unified_max=unified_max, block_m=block_m,
                  block_k=block_k, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                  interpret=interpret, layer=layer)
    return out[:, 0].astype(q.dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def tree_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, tree_mask: jax.Array, *,
                   sm_scale: float | None = None, unified_max: float | None = 0.0, block_m: int | None = None,
                   block_k: int | None = None, num_splits: int | None = None, num_warps: int | None = None,
                   num_stages: int | None = None, interpret: bool = False, layer: int | None = None,
                   num_heads: int | None = None, cos: jax.Array | None = None, sin: jax.Array | None = None,
                   rope_interleaved: bool = False) -> jax.Array:
    """q [B, T, H, D] for T tree tokens whose K/V sit at slots [lengths, lengths + T): each sees the prefix
    [0, lengths) and the tree slots tree_mask [T, T] allows -> [B, T, H, D]. `layer`, `num_heads` and
    `rope_interleaved` as in decode_attention; cos/sin [B, T, R].
    """
    out = _attend(q, k, v, lengths.astype(jnp.int32), tree_mask.astype(bool), num_heads=num_heads, cos=cos, sin=sin,
                  rope_interleaved=rope_interleaved, sm_scale=sm_scale, unified_max=unified_max, block_m=block_m,
                  block_k=block_k, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
                  interpret=interpret, layer=layer)
    return out.astype(q.dtype)
