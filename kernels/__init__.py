"""jaxmedusa.kernels: attention over the KV cache, prompt prefill attention, the flat GEMM and the fused residual
add + RMSNorm, as Pallas kernels (or cuDNN) with their pure-JAX references, and the dispatchers the model calls."""

from .attention_pallas import decode_attention, kernel_supports, tree_attention
from .dispatch import (IMPLS, add_rms_norm, attention, cudnn_supports, fold_norm, matmul, prefill_attention,
                       q_rope_in_kernel, resolve_gemm_impl, resolve_impl, resolve_norm_impl, resolve_prefill_impl,
                       training_attention)
from .gemm_pallas import flat_gemm, flat_gemm_reference
from .norm_pallas import add_rms_norm_reference
from .reference import causal_attention_blockwise, decode_attention_reference, tree_attention_reference

__all__ = ["IMPLS", "attention", "decode_attention", "tree_attention", "kernel_supports", "resolve_impl",
           "decode_attention_reference", "tree_attention_reference",
           "prefill_attention", "resolve_prefill_impl", "cudnn_supports", "causal_attention_blockwise",
           "training_attention", "matmul", "resolve_gemm_impl", "flat_gemm", "flat_gemm_reference",
           "add_rms_norm", "add_rms_norm_reference", "resolve_norm_impl", "fold_norm", "q_rope_in_kernel"]
