"""Rotary position embeddings: HF's split-halves layout (Llama, Qwen) or interleaved pairs over part of each head
(GLM, ChatGLM), with linear, dynamic-NTK and Llama-3 scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import RopeConfig


def base_inv_freq(theta: float, dim: int) -> np.ndarray:
    """1 / theta^(2i/dim), computed in float32 like transformers."""
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)


def static_inv_freq(rope: RopeConfig, dim: int) -> np.ndarray:
    """Inverse frequencies that do not depend on the sequence (all types but "dynamic")."""
    inv = base_inv_freq(rope.theta, dim)
    if rope.type == "linear":
        return (inv / np.float32(rope.factor)).astype(np.float32)
    if rope.type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def inv_freq(rope: RopeConfig, dim: int, max_position_embeddings: int, positions: jax.Array) -> jax.Array:
    """[dim/2] inverse frequencies for this forward; dynamic NTK grows the base past the trained length.

    Dynamic NTK follows transformers: the base is set from the longest position in the forward
    (max(positions) + 1), unchanged while that stays within max_position_embeddings.
    """
    if rope.type != "dynamic":
        return jnp.asarray(static_inv_freq(rope, dim))
    seq_len = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1.0, float(max_position_embeddings))
    base = rope.theta * ((rope.factor * seq_len / max_position_embeddings) - (rope.factor - 1)) ** (dim / (dim - 2))
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (base ** exponents)


def rope_cos_sin(inv: jax.Array, positions: jax.Array, interleaved: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., rotary_dim] for integer positions [...], in float32.

    Split halves: frequency i at dims i and i + rotary_dim/2. Interleaved: at dims 2i and 2i+1.
    """
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.repeat(freqs, 2, axis=-1) if interleaved else jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool = False) -> jax.Array:
    """x [B, T, heads, D] rotated by cos/sin [B, T, R] on its first R dims (R = D but for partial rotary).

    Split halves is HF's rotate_half; interleaved rotates each pair (x[2i], x[2i+1]) as GLM does.
    """
    rot, rest = (x, None) if cos.shape[-1] == x.shape[-1] else (x[..., :cos.shape[-1]], x[..., cos.shape[-1]:])
    if interleaved:
        pairs = rot.reshape(rot.shape[:-1] + (-1, 2))
        rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(rot.shape)
    else:
        half = rot.shape[-1] // 2
        rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    out = rot * cos + rotated * sin
    return out if rest is None else jnp.concatenate([out, rest], axis=-1)
