"""Checkpoint tables: each family maps its checkpoint keys to model parameter paths, with the shape each must have.

Loading, saving and (later) sharding rules read this table, so they cannot drift apart. HF stores
Linear weights as [out, in]; NNX kernels are [in, out], hence `transpose`. Several HF tensors may fill
one parameter side by side (`cols`): the model keeps q/k/v as one qkv_proj and gate/up as one
gate_up_proj, so a decode or verify step streams each layer's input-side weights in one GEMM (measured
on an H100: bench/gemm_layers.py, 7B shapes, 64 rows, 7.30 -> 5.79 ms for all layers' projections).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """One checkpoint tensor: its key, the model parameter it fills, its stored shape and how it is laid in."""

    hf_key: str
    path: tuple  # path in nnx.state(model)
    hf_shape: tuple[int, ...]
    transpose: bool = False
    cols: tuple[int, int] | None = None  # the slice of the parameter's last axis this tensor fills


def fused_linear_entries(parts: list[tuple[str, int]], path: tuple, in_dim: int, bias: bool) -> list[ParamEntry]:
    """HF Linears [out_i, in] (+ biases) that share an input, as one NNX kernel [in, sum(out_i)] (+ bias),
    each filling its columns in order."""
    entries, start = [], 0
    for hf, out_dim in parts:
        cols = (start, start + out_dim)
        entries.append(ParamEntry(f"{hf}.weight", path + ("kernel",), (out_dim, in_dim), transpose=True, cols=cols))
        if bias:
            entries.append(ParamEntry(f"{hf}.bias", path + ("bias",), (out_dim,), cols=cols))
        start += out_dim
    return entries


# Buffers some checkpoints carry that are not parameters (recomputed from the config).
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")


def linear_entries(hf: str, path: tuple, out_dim: int, in_dim: int, bias: bool) -> list[ParamEntry]:
    """An HF Linear [out, in] (+ bias) as NNX kernel [in, out] (+ bias)."""
    entries = [ParamEntry(f"{hf}.weight", path + ("kernel",), (out_dim, in_dim), transpose=True)]
    if bias:
        entries.append(ParamEntry(f"{hf}.bias", path + ("bias",), (out_dim,)))
    return entries
