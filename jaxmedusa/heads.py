"""Medusa heads: K heads, each L residual blocks `x + SiLU(W x + b)` then a vocab projection.

Heads read the base model's last hidden state after the final norm; head k (0-indexed) predicts the
token k + 2 positions ahead (the LM head predicts + 1). The projection is the head's own Linear(H, V)
(Medusa-1 release format) or, with `shared_lm_head=True`, the base model's lm_head ("version 2").
Each layer has its own weights (the reference code aliases one block across layers by accident).

quantize_heads() stores the heads' own vocab projections as int8 (one scale per vocab column): they are most
of what a Medusa-1 step reads beyond the base model (4 x H x V, 1 GB at 7B in bf16), and heads only
propose candidates, so the verify step keeps greedy output exactly vanilla's whatever their precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec


class ResBlock(nnx.Module):
    def __init__(self, hidden: int, dtype, rngs: nnx.Rngs):
        # zero-initialised weight: a fresh block is the identity, as in the reference implementation
        self.linear = nnx.Linear(hidden, hidden, use_bias=True, dtype=dtype, param_dtype=dtype, rngs=rngs,
                                 kernel_init=nnx.initializers.zeros)

    def __call__(self, x):
        return x + jax.nn.silu(self.linear(x))


class Quantized(nnx.Variable):
    """An inference-only weight (int8 values or their scales): not an nnx.Param, so optimizers never see it."""


class Int8Projection(nnx.Module):
    """x [..., H] @ W [H, V] from W stored as int8 with a float32 scale per column (symmetric, max-abs):
    |W - dequantized W| <= scale / 2 element-wise. Float32 logits, accumulated in float32."""

    def __init__(self, kernel: jax.Array):
        w = jnp.asarray(kernel, jnp.float32)
        scale = jnp.max(jnp.abs(w), axis=0) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero column stays zero
        qkernel = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
        sharding = getattr(kernel, "sharding", None)
        if isinstance(sharding, NamedSharding):  # a tensor-parallel kernel: keep its vocab split
            spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
            qkernel = jax.device_put(qkernel, sharding)
            scale = jax.device_put(scale, NamedSharding(sharding.mesh, PartitionSpec(spec[1])))
        self.qkernel = Quantized(qkernel)
        self.scale = Quantized(scale)

    def __call__(self, x):
        y = jnp.dot(x, self.qkernel[...].astype(x.dtype), preferred_element_type=jnp.float32)
        return y * self.scale[...]


class MedusaHead(nnx.Module):
    def __init__(self, hidden: int, vocab: int, num_layers: int, shared_lm_head: bool, dtype, rngs: nnx.Rngs):
        self.blocks = nnx.List([ResBlock(hidden, dtype, rngs) for _ in range(num_layers)])
        self.proj = None if shared_lm_head else nnx.Linear(hidden, vocab, use_bias=False, dtype=dtype,
                                                           param_dtype=dtype, rngs=rngs)

    def features(self, x):
        """The hidden state after this head's residual blocks (what its vocab projection reads)."""
        for block in self.blocks:
            x = block(x)
        return x

    def __call__(self, x, lm_logits):
        x = self.features(x)
        return lm_logits(x) if self.proj is None else self.proj(x).astype(jnp.float32)

    @property
    def quantized(self) -> bool:
        return isinstance(self.proj, Int8Projection)


class MedusaHeads(nnx.Module):
    """K heads. `__call__(hidden [..., H], lm_logits) -> [K, ..., V]` float32 logits."""

    def __init__(self, hidden: int, vocab: int, num_heads: int, num_layers: int = 1, *,
                 shared_lm_head: bool = False, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        if num_heads < 1 or num_layers < 0:
            raise ValueError(f"need num_heads >= 1 and num_layers >= 0, got {num_heads} and {num_layers}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.shared_lm_head = shared_lm_head
        self.hidden = hidden
        self.vocab = vocab
        self.heads = nnx.List([MedusaHead(hidden, vocab, num_layers, shared_lm_head, dtype, rngs)
                               for _ in range(num_heads)])

    @property
    def quantized(self) -> bool:
        """Whether the vocab projections are int8 (quantize_heads): for inference only."""
        return any(head.quantized for head in self.heads)

    def __call__(self, hidden: jax.Array, lm_logits) -> jax.Array:
        if self.shared_lm_head:  # one projection for all heads: the lm_head is read once, not K times
            return lm_logits(jnp.stack([head.features(hidden) for head in self.heads]))
        return jnp.stack([head(hidden, lm_logits) for head in self.heads])

    @classmethod
    def for_model(cls, lm, num_heads: int, num_layers: int = 1, *, shared_lm_head: bool = False,
                  rngs: nnx.Rngs | None = None) -> "MedusaHeads":
        """Heads sized for `lm`, each projection initialised from the base lm_head (the usual recipe)."""
        cfg = lm.config
        heads = cls(cfg.embed_dim, cfg.vocab_size, num_heads, num_layers, shared_lm_head=shared_lm_head,
                    dtype=lm.dtype, rngs=rngs)
        if not shared_lm_head:
            base = lm.embed_tokens.embedding[...].T if lm.lm_head is None else lm.lm_head.kernel[...]
            for head in heads.heads:
                head.proj.kernel.set_value(jnp.array(base))
        return heads


def quantize_heads(heads: MedusaHeads) -> MedusaHeads:
    """A copy of `heads` whose own vocab projections are int8 (Int8Projection); the residual blocks stay as they
    are. Halves the bytes a Medusa-1 step streams for its heads (a quarter of float32's). Shared-lm_head heads
    have no projection of their own to quantize: ValueError."""
    if heads.shared_lm_head:
        raise ValueError("these heads share the base model's lm_head: they have no vocab projection of their own "
                         "to quantize")
    if heads.quantized:
        raise ValueError("these heads are already quantized")
    out = nnx.clone(heads)
    for head in out.heads:
        head.proj = Int8Projection(head.proj.kernel[...])
    return out
