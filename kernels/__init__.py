"""Attention for the KV cache: pure-JAX references and the dispatcher the model calls (jaxmedusa.kernels)."""

from .dispatch import IMPLS, attention, resolve_impl
from .reference import decode_attention_reference, tree_attention_reference

__all__ = ["IMPLS", "attention", "resolve_impl", "decode_attention_reference", "tree_attention_reference"]
