"""Attention over the KV cache (jaxmedusa.kernels): Pallas kernels, their pure-JAX references, and the
dispatcher the model calls."""

from .attention_pallas import decode_attention, kernel_supports, tree_attention
from .dispatch import IMPLS, attention, resolve_impl
from .reference import decode_attention_reference, tree_attention_reference

__all__ = ["IMPLS", "attention", "kernel_supports", "resolve_impl", "decode_attention", "tree_attention",
           "decode_attention_reference", "tree_attention_reference"]
