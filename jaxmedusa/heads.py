"""Medusa heads: K heads, each L residual blocks `x + SiLU(W x + b)` then a vocab projection.

Heads read the base model's last hidden state after the final norm; head k (0-indexed) predicts the
token k + 2 positions ahead (the LM head predicts + 1). The projection is the head's own Linear(H, V)
(Medusa-1 release format) or, with `shared_lm_head=True`, the base model's lm_head ("version 2").
Each layer has its own weights (the reference code aliases one block across layers by accident).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class ResBlock(nnx.Module):
    def __init__(self, hidden: int, dtype, rngs: nnx.Rngs):
        # zero-initialised weight: a fresh block is the identity, as in the reference implementation
        self.linear = nnx.Linear(hidden, hidden, use_bias=True, dtype=dtype, param_dtype=dtype, rngs=rngs,
                                 kernel_init=nnx.initializers.zeros)

    def __call__(self, x):
        return x + jax.nn.silu(self.linear(x))


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
