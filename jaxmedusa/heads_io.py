"""Medusa heads in the official PyTorch formats (FasterDecoding/Medusa), both directions.

Heads-only checkpoint: config.json (`medusa_num_heads`, `medusa_num_layers`, `base_model_name_or_path`)
plus medusa_lm_head.safetensors or medusa_lm_head.pt with keys `{i}.{j}.linear.weight [H, H]`,
`{i}.{j}.linear.bias [H]` for layers j < L and `{i}.{L}.weight [V, H]`; "version 2" files drop the last
and reuse the base lm_head. Released configs under-report the head count, so the weights decide. Files
written by the reference code, which repeats one block object L times, carry only layer 0's keys: those
are accepted and copied into every layer. Full Medusa-2 model directories carry the same tensors inside
the model weights as `medusa_head.{i}...`.
"""

from __future__ import annotations

import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .atomic import atomic_open, read_json_object, write_json
from .checkpoint import CheckpointError, iter_bin
from .heads import MedusaHeads
from .safetensors_io import iter_safetensors, save_safetensors

HEADS_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt", "medusa_lm_head.bin")
MAX_HEAD_LAYERS = 64  # residual blocks per head; published heads have 1
_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


def read_heads_tensors(heads_dir: str) -> tuple[dict[str, np.ndarray], dict]:
    """(state dict with official keys, config.json contents) from a heads-only directory, in the official
    (FasterDecoding) layout or vLLM's (config model_type "medusa", model.safetensors; see from_vllm)."""
    if not os.path.isdir(heads_dir):
        raise FileNotFoundError(f"heads directory {heads_dir!r} does not exist")
    cfg_path = os.path.join(heads_dir, "config.json")
    config = {}
    if os.path.isfile(cfg_path):
        config = read_json_object(cfg_path)
    names = HEADS_FILES + (VLLM_FILES if config.get("model_type") == "medusa" else ())
    for name in names:
        path = os.path.join(heads_dir, name)
        if os.path.isfile(path):
            it = iter_safetensors(path) if name.endswith(".safetensors") else iter_bin(path)
            tensors = {k: np.asarray(v) for k, v in it}
            return (from_vllm(tensors, config, path), config) if name in VLLM_FILES else (tensors, config)
    raise CheckpointError(f"no Medusa heads in {heads_dir}: expected one of {', '.join(HEADS_FILES)}, or a vLLM "
                          f"Medusa directory (config.json model_type 'medusa' + {' or '.join(VLLM_FILES)})")


# vLLM's Medusa draft model (vllm/model_executor/models/medusa.py, configs/medusa.py): config.json with
# model_type "medusa", num_heads, num_hidden_layers, hidden_size, vocab_size, truncated_vocab_size,
# medusa_fc_bias, original_lm_head; tensors blocks.{i}.layers.{j}.weight (+ .bias with medusa_fc_bias) and
# lm_heads.{i}.weight, or only lm_heads.0.weight (the base's LM head) with original_lm_head. vLLM proposes
# each head's top-1 token only (a chain), so it uses none of a tree.
VLLM_FILES = ("model.safetensors", "pytorch_model.bin")


def from_vllm(tensors: dict[str, np.ndarray], config: dict, source: str) -> dict[str, np.ndarray]:
    """vLLM Medusa tensors -> official keys (missing biases, with medusa_fc_bias false, become zeros)."""
    if int(config.get("truncated_vocab_size") or config.get("vocab_size", 0)) < int(config.get("vocab_size", 0)):
        raise CheckpointError(f"{source}: heads with a truncated vocabulary (token_map) are not supported")
    layers = int(config.get("num_hidden_layers", config.get("medusa_num_layers", 1)))
    shared = bool(config.get("original_lm_head", False))
    out: dict[str, np.ndarray] = {}
    for key, arr in tensors.items():
        key = key.removeprefix("medusa_heads.")
        m = _VLLM_KEY.match(key)
        if m is None:
            raise CheckpointError(f"{source}: unexpected key {key!r} for vLLM Medusa heads")
        if m.group(1) == "blocks":
            out[f"{m.group(2)}.{m.group(3)}.linear.{m.group(4)}"] = arr
        elif not shared:
            out[f"{m.group(6)}.{layers}.weight"] = arr
    for key, arr in list(out.items()):
        if key.endswith(".linear.weight") and key.replace("weight", "bias") not in out:
            out[key.replace("weight", "bias")] = np.zeros(arr.shape[0], arr.dtype)
    return out


_VLLM_KEY = re.compile(r"^(?:(blocks)\.(\d+)\.layers\.(\d+)\.(weight|bias)|(lm_heads)\.(\d+)\.weight)$")


def configured_layers(config: dict) -> int | None:
    """`medusa_num_layers` from a config.json dict, or None when it is absent (the weights decide)."""
    layers = config.get("medusa_num_layers")
    return None if layers is None else int(layers)


def configured_tree(config: dict, source: str) -> list[list[int]] | None:
    """`medusa_choices` from a config.json dict: the tree the heads were tuned with, or None when absent.

    The official configs do not carry one; jaxmedusa writes it so a heads release can ship its own tree.
    """
    tree = config.get("medusa_choices")
    if tree is None:
        return None
    if not (isinstance(tree, list) and all(isinstance(p, list) and p and all(isinstance(r, int) for r in p)
                                           for p in tree)):
        raise CheckpointError(f"{source}: medusa_choices must be a list of non-empty lists of integer ranks")
    return [list(p) for p in tree]


def heads_from_state_dict(tensors: dict[str, np.ndarray], *, hidden: int, vocab: int, dtype,
                          num_layers: int | None = None, source: str = "heads file") -> MedusaHeads:
    """Builds MedusaHeads from official keys, checking every key and shape (errors name them)."""
    parsed: dict[tuple[int, int, str], np.ndarray] = {}
    for key, arr in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise CheckpointError(f"unexpected key {key!r} in the {source}; expected '{{head}}.{{layer}}.linear."
                                  "weight|bias' or '{head}.{layers}.weight'")
        parsed[(int(m.group(1)), int(m.group(2)), m.group(3))] = arr
    if not parsed:
        raise CheckpointError(f"the {source} holds no tensors")
    head_ids = sorted({i for i, _, _ in parsed})  # checked before anything is sized by them
    if head_ids != list(range(len(head_ids))):
        missing = next(i for i in range(len(head_ids) + 1) if i not in head_ids)
        raise CheckpointError(f"the {source} has keys for heads {head_ids[:6]}{'...' if len(head_ids) > 6 else ''} "
                              f"but none for head {missing}; heads are numbered 0..n-1")
    num_heads = len(head_ids)
    proj_idx = {j for _, j, kind in parsed if kind == "weight"}
    if len(proj_idx) > 1:
        raise CheckpointError(f"heads in the {source} disagree on their layer count (projections at {sorted(proj_idx)})")
    if proj_idx:
        layers = proj_idx.pop()
        if num_layers is not None and num_layers != layers:
            raise CheckpointError(f"config says medusa_num_layers={num_layers} but the {source} has {layers}")
    else:
        linear_idx = {j for _, j, kind in parsed if kind != "weight"}
        layers = num_layers if num_layers is not None else (max(linear_idx) + 1 if linear_idx else 0)
    if not 0 <= layers <= MAX_HEAD_LAYERS:
        raise CheckpointError(f"the {source} asks for {layers} layers per head (medusa_num_layers or the key "
                              f"numbering); more than {MAX_HEAD_LAYERS} is not a Medusa head")
    shared = not any(kind == "weight" for _, _, kind in parsed)
    heads = nnx.eval_shape(lambda: MedusaHeads(hidden, vocab, num_heads, layers, shared_lm_head=shared,
                                               dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(heads)
    flat = nnx.to_flat_state(state)
    values = {}
    for i in range(num_heads):
        for j in range(layers):
            for kind, shape in (("linear.weight", (hidden, hidden)), ("linear.bias", (hidden,))):
                arr = parsed.get((i, j, kind))
                if arr is None and (i, 0, kind) in parsed and not any((i, jj, kind) in parsed
                                                                      for jj in range(1, layers)):
                    arr = parsed[(i, 0, kind)]  # the reference code's aliased block: one set of weights
                if arr is None:
                    raise CheckpointError(f"missing key '{i}.{j}.{kind}' in the {source}")
                if tuple(arr.shape) != shape:
                    raise CheckpointError(f"key '{i}.{j}.{kind}': expected shape {shape}, found {tuple(arr.shape)}")
                leaf = "kernel" if kind.endswith("weight") else "bias"
                values[("heads", i, "blocks", j, "linear", leaf)] = arr.T if leaf == "kernel" else arr
        if not shared:
            arr = parsed.get((i, layers, "weight"))
            if arr is None:
                raise CheckpointError(f"missing key '{i}.{layers}.weight' in the {source}")
            if tuple(arr.shape) != (vocab, hidden):
                raise CheckpointError(f"key '{i}.{layers}.weight': expected shape {(vocab, hidden)}, "
                                      f"found {tuple(arr.shape)}")
            values[("heads", i, "proj", "kernel")] = arr.T
    for path, var in flat:
        var.set_value(jnp.asarray(np.asarray(values[path]).astype(dtype)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def heads_state_dict(heads: MedusaHeads) -> dict[str, np.ndarray]:
    """MedusaHeads -> official keys ([out, in] weights), every layer written out. Quantized heads are refused:
    no format takes them, and writing them dequantized would pass lossy weights off as the originals."""
    if heads.quantized:
        raise ValueError("quantized heads (quantize_heads) are for inference only and are not saved; save the "
                         "heads they were made from")
    out = {}
    for i, head in enumerate(heads.heads):
        for j, block in enumerate(head.blocks):
            out[f"{i}.{j}.linear.weight"] = np.ascontiguousarray(np.asarray(block.linear.kernel[...]).T)
            out[f"{i}.{j}.linear.bias"] = np.asarray(block.linear.bias[...])
        if head.proj is not None:
            out[f"{i}.{heads.num_layers}.weight"] = np.ascontiguousarray(np.asarray(head.proj.kernel[...]).T)
    return out


def load_heads(heads_dir: str, *, hidden: int, vocab: int, dtype) -> MedusaHeads:
    tensors, config = read_heads_tensors(heads_dir)
    return heads_from_state_dict(tensors, hidden=hidden, vocab=vocab, dtype=dtype,
                                 num_layers=configured_layers(config), source=f"heads file in {heads_dir}")


def save_heads(heads: MedusaHeads, heads_dir: str, *, base_model: str | None = None, dtype=None,
               tree: list[list[int]] | None = None, pt: bool = False) -> None:
    """Writes the official heads-only layout: medusa_lm_head.safetensors (or .pt) + config.json, atomically.

    tree: the heads' default tree, written as `medusa_choices` (load() makes it the model's default).
    pt: write medusa_lm_head.pt (needs torch). The other format's heads file, which would shadow or be
    shadowed by the new one, is removed. A directory whose config.json is not a heads config (a model
    directory) is refused rather than overwritten.
    """
    tensors = heads_state_dict(heads)  # first: it refuses quantized heads before anything is created
    os.makedirs(heads_dir, exist_ok=True)
    _refuse_model_config(heads_dir)
    if dtype is not None:
        tensors = {k: np.asarray(v).astype(dtype) for k, v in tensors.items()}
    name = "medusa_lm_head.pt" if pt else "medusa_lm_head.safetensors"
    if pt:
        import torch

        sd = {k: torch.from_numpy(np.asarray(v, np.float32)).to(_torch_dtype(torch, v.dtype))
              for k, v in tensors.items()}
        with atomic_open(os.path.join(heads_dir, name), "wb") as f:
            torch.save(sd, f)
    else:
        save_safetensors(os.path.join(heads_dir, name), tensors, {"format": "pt"})
    for other in HEADS_FILES:
        if other != name and os.path.isfile(os.path.join(heads_dir, other)):
            os.remove(os.path.join(heads_dir, other))
    config = {"medusa_num_heads": heads.num_heads, "medusa_num_layers": heads.num_layers,
              "base_model_name_or_path": base_model or "", "hidden_size": heads.hidden, "vocab_size": heads.vocab}
    if tree is not None:
        config["medusa_choices"] = [list(map(int, p)) for p in tree]
    write_json(os.path.join(heads_dir, "config.json"), config)


def _refuse_model_config(heads_dir: str) -> None:
    """Heads are never written over another kind of config.json (a model directory's)."""
    cfg_path = os.path.join(heads_dir, "config.json")
    if not os.path.isfile(cfg_path):
        return
    try:
        config = read_json_object(cfg_path)
    except (OSError, ValueError):
        config = {}
    if "medusa_num_heads" not in config and config.get("model_type") != "medusa":
        raise CheckpointError(f"{cfg_path} is not a Medusa heads config; write heads into their own directory")


def save_heads_vllm(heads: MedusaHeads, heads_dir: str, *, lm_head: np.ndarray | None = None, dtype=None) -> None:
    """Writes heads in vLLM's Medusa layout (config.json + model.safetensors, atomically; see VLLM_FILES).

    Heads that share the base LM head need it (`lm_head` [vocab, hidden], as HF stores lm_head.weight):
    vLLM keeps it in the draft file as lm_heads.0.weight with original_lm_head.
    """
    if heads.shared_lm_head and lm_head is None:
        raise CheckpointError("these heads share the base model's LM head, which vLLM's layout stores with them; "
                              "pass the base model (--model) to export it")
    official = heads_state_dict(heads)  # first: it refuses quantized heads before anything is created
    os.makedirs(heads_dir, exist_ok=True)
    _refuse_model_config(heads_dir)
    tensors = {}
    for i in range(heads.num_heads):
        for j in range(heads.num_layers):
            tensors[f"blocks.{i}.layers.{j}.weight"] = official[f"{i}.{j}.linear.weight"]
            tensors[f"blocks.{i}.layers.{j}.bias"] = official[f"{i}.{j}.linear.bias"]
        if not heads.shared_lm_head:
            tensors[f"lm_heads.{i}.weight"] = official[f"{i}.{heads.num_layers}.weight"]
    if heads.shared_lm_head:
        tensors["lm_heads.0.weight"] = np.asarray(lm_head)
    if dtype is not None:
        tensors = {k: np.asarray(v).astype(dtype) for k, v in tensors.items()}
    save_safetensors(os.path.join(heads_dir, "model.safetensors"), tensors, {"format": "pt"})
    write_json(os.path.join(heads_dir, "config.json"), {
        "model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": heads.hidden,
        "vocab_size": heads.vocab, "num_heads": heads.num_heads, "num_hidden_layers": heads.num_layers,
        "max_paths": 64, "topk": 10, "truncated_vocab_size": heads.vocab, "medusa_fc_bias": True,
        "original_lm_head": heads.shared_lm_head})


def _torch_dtype(torch, dtype):
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(np.dtype(dtype)), torch.float32)
