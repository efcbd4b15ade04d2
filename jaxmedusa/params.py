"""One table from HF checkpoint keys to model parameter paths, with the shape each must have.

Loading, saving and (later) sharding rules read this table, so they cannot drift apart. HF stores
Linear weights as [out, in]; NNX kernels are [in, out], hence `transpose`. Several HF tensors may fill
one parameter side by side (`cols`): the model keeps q/k/v as one qkv_proj and gate/up as one
gate_up_proj, so a decode or verify step streams each layer's input-side weights in one GEMM (measured
on an H100: bench/gemm_layers.py, 7B shapes, 64 rows, 7.30 -> 5.79 ms for all layers' projections).
"""

from __future__ import annotations

import dataclasses

from .config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamEntry:
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
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)


def linear_entries(hf: str, path: tuple, out_dim: int, in_dim: int, bias: bool) -> list[ParamEntry]:
    """An HF Linear [out, in] (+ bias) as NNX kernel [in, out] (+ bias)."""
    entries = [ParamEntry(f"{hf}.weight", path + ("kernel",), (out_dim, in_dim), transpose=True)]
    if bias:
        entries.append(ParamEntry(f"{hf}.bias", path + ("bias",), (out_dim,)))
    return entries


def llama_param_table(cfg: ModelConfig) -> list[ParamEntry]:
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qd, kvd = cfg.num_heads * d, cfg.num_kv_heads * d
    table = [ParamEntry("model.embed_tokens.weight", ("embed_tokens", "embedding"), (cfg.vocab_size, h))]

    def linear(hf: str, path: tuple, out_dim: int, in_dim: int, bias: bool) -> None:
        table.extend(linear_entries(hf, path, out_dim, in_dim, bias))

    for n in range(cfg.num_layers):
        p, hp = ("layers", n), f"model.layers.{n}"
        table.append(ParamEntry(f"{hp}.input_layernorm.weight", p + ("input_layernorm", "weight"), (h,)))
        table.append(ParamEntry(f"{hp}.post_attention_layernorm.weight",
                                p + ("post_attention_layernorm", "weight"), (h,)))
        table.extend(fused_linear_entries([(f"{hp}.self_attn.{n}", w) for n, w in (("q_proj", qd), ("k_proj", kvd),
                                                                                   ("v_proj", kvd))],
                                          p + ("self_attn", "qkv_proj"), h, cfg.attention_bias))
        linear(f"{hp}.self_attn.o_proj", p + ("self_attn", "o_proj"), h, qd, cfg.attention_bias)
        table.extend(fused_linear_entries([(f"{hp}.mlp.gate_proj", i), (f"{hp}.mlp.up_proj", i)],
                                          p + ("mlp", "gate_up_proj"), h, cfg.mlp_bias))
        linear(f"{hp}.mlp.down_proj", p + ("mlp", "down_proj"), h, i, cfg.mlp_bias)
    table.append(ParamEntry("model.norm.weight", ("norm", "weight"), (h,)))
    if not cfg.tie_word_embeddings:
        table.append(ParamEntry("lm_head.weight", ("lm_head", "kernel"), (cfg.vocab_size, h), transpose=True))
    return table


def opt_param_table(cfg: ModelConfig) -> list[ParamEntry]:
    h, e, f = cfg.hidden_size, cfg.embed_dim, cfg.intermediate_size
    d = "model.decoder"
    table = [ParamEntry(f"{d}.embed_tokens.weight", ("embed_tokens", "embedding"), (cfg.vocab_size, e)),
             ParamEntry(f"{d}.embed_positions.weight", ("embed_positions", "embedding"),
                        (cfg.max_position_embeddings + 2, h))]

    def linear(hf: str, path: tuple, out_dim: int, in_dim: int, bias: bool) -> None:
        table.extend(linear_entries(hf, path, out_dim, in_dim, bias))

    def norm(hf: str, path: tuple) -> None:
        if cfg.layer_norm_affine:
            table.append(ParamEntry(f"{hf}.weight", path + ("scale",), (h,)))
            table.append(ParamEntry(f"{hf}.bias", path + ("bias",), (h,)))

    if cfg.word_embed_proj_dim is not None:
        linear(f"{d}.project_in", ("project_in",), h, e, False)
        linear(f"{d}.project_out", ("project_out",), e, h, False)
    for n in range(cfg.num_layers):
        p, hp = ("layers", n), f"{d}.layers.{n}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(f"{hp}.self_attn.{name}", p + ("self_attn", name), h, h, cfg.attention_bias)
        norm(f"{hp}.self_attn_layer_norm", p + ("self_attn_layer_norm",))
        linear(f"{hp}.fc1", p + ("fc1",), f, h, cfg.mlp_bias)
        linear(f"{hp}.fc2", p + ("fc2",), h, f, cfg.mlp_bias)
        norm(f"{hp}.final_layer_norm", p + ("final_layer_norm",))
    if cfg.final_layer_norm:
        norm(f"{d}.final_layer_norm", ("final_layer_norm",))
    if not cfg.tie_word_embeddings:
        table.append(ParamEntry("lm_head.weight", ("lm_head", "kernel"), (cfg.vocab_size, e), transpose=True))
    return table


def param_table(cfg: ModelConfig) -> list[ParamEntry]:
    """The checkpoint table of the config's architecture family."""
    return opt_param_table(cfg) if cfg.family == "opt" else llama_param_table(cfg)


def normalize_key(cfg: ModelConfig, key: str) -> str:
    """Checkpoint key spellings that mean a table key: OPT checkpoints saved from OPTModel (the released
    facebook/opt-* files among them) lack the `model.` prefix."""
    if cfg.family == "opt" and key.startswith("decoder."):
        return "model." + key
    return key


def optional_keys(cfg: ModelConfig) -> set[str]:
    """Keys a checkpoint may carry beyond the table without being wrong (tied lm_head saved anyway)."""
    return {"lm_head.weight"} if cfg.tie_word_embeddings else set()
