"""LoRA adapters on a model's projections (Medusa-2 on a frozen base), and their exact merge.

An adapter adds `scale * (x @ A) @ B` to a Linear's product (scale = alpha / rank, A [in, rank] random,
B [rank, out] zero, so a fresh adapter changes nothing). Targets are named as transformers names the
projections (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; OPT: q_proj, k_proj, v_proj,
out_proj, fc1, fc2): where this project fuses q/k/v or gate/up into one product, each named part gets an
adapter of its own over its columns, as it would on the unfused model. The adapters are `nnx.LoRAParam`s,
so `nnx.split(lm, nnx.LoRAParam, ...)` separates them from the frozen base. `merged_state` folds them into
the weights; `save_peft_adapter` writes them as a PEFT LoRA adapter for transformers.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .layers import Linear


class LoRA(nnx.Module):
    """The low-rank update of one Linear [in, out]: one rank-r adapter per column range in `parts`."""

    def __init__(self, in_dim: int, out_dim: int, parts: Sequence[tuple[int, int]], rank: int, alpha: float, *,
                 rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(in_dim)  # PEFT's default A init (kaiming-uniform, a = sqrt(5))
        self.a = nnx.LoRAParam(jax.random.uniform(rngs.params(), (in_dim, len(parts) * rank), jnp.float32,
                                                  -bound, bound))
        self.b = nnx.List([nnx.LoRAParam(jnp.zeros((rank, end - start), jnp.float32)) for start, end in parts])
        self.parts = tuple((int(s), int(e)) for s, e in parts)
        self.out_dim, self.rank, self.scale = out_dim, rank, alpha / rank

    def b_full(self, dtype) -> jax.Array:
        """[len(parts) * rank, out]: part j's B at rows j*rank.. and its columns, zero elsewhere."""
        r = self.rank
        full = jnp.zeros((len(self.parts) * r, self.out_dim), dtype)
        for j, ((start, end), b) in enumerate(zip(self.parts, self.b)):
            full = full.at[j * r:(j + 1) * r, start:end].set(b[...].astype(dtype))
        return full

    def delta(self) -> jax.Array:
        """The kernel update [in, out] in float32."""
        return self.scale * (self.a[...].astype(jnp.float32) @ self.b_full(jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.scale * ((x @ self.a[...].astype(x.dtype)) @ self.b_full(x.dtype))


def _projections(lm) -> list[tuple[tuple, Linear, tuple[tuple[str, int, int], ...]]]:
    """(path, Linear, parts) of every projection inside the decoder layers; parts are (target name, first
    column, end column): a fused product's parts from its module (fused_names, fused_parts), else one."""
    modules = list(nnx.iter_modules(lm))
    fused = {}
    for path, m in modules:
        if hasattr(m, "fused_parts"):
            ends = np.cumsum(m.fused_parts()[0])
            fused[path + (m.fused,)] = tuple(zip(m.fused_names, (0, *ends[:-1].tolist()), ends.tolist()))
    return [(path, m, fused.get(path, ((str(path[-1]), 0, m.kernel.shape[1]),))) for path, m in modules
            if isinstance(m, Linear) and "layers" in path]


_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2")


def lora_target_names(lm) -> list[str]:
    """The names `add_lora` accepts for this model (transformers' projection names), attention first."""
    names = {p[0] for _, _, parts in _projections(lm) for p in parts}
    return sorted(names, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))


def add_lora(lm, rank: int, alpha: float, targets: Sequence[str] = (), *, rngs: nnx.Rngs) -> int:
    """Adds adapters (in place) to every layer's projections named in `targets` (empty: all of them).
    Returns the number of adapter parameters. Unknown names are a ValueError naming the known ones."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if any(getattr(m, "shards", 1) != 1 for _, m in nnx.iter_modules(lm)):
        raise ValueError("LoRA is added to a model in its checkpoint layout: load it without a mesh")
    known = lora_target_names(lm)
    wanted = set(targets or known)
    unknown = sorted(wanted - set(known))
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a projection of this model; known: {', '.join(known)}")
    count = 0
    for _, lin, parts in _projections(lm):
        cols = [(s, e) for name, s, e in parts if name in wanted]
        if cols:
            lin.lora = LoRA(lin.kernel.shape[0], lin.kernel.shape[1], cols, rank, alpha, rngs=rngs)
            count += lin.kernel.shape[0] * len(cols) * rank + rank * sum(e - s for s, e in cols)
    return count


def merged_state(lm) -> nnx.State:
    """The model's state without adapters, each adapted kernel replaced by W + scale * A @ B computed in
    float32 (cast to the kernel's dtype): the state of the model with the same parameters and no LoRA."""
    _, _, base = nnx.split(lm, nnx.LoRAParam, ...)
    deltas = {path + ("kernel",): lin.lora.delta() for path, lin, _ in _projections(lm) if lin.lora is not None}
    flat = []
    for path, var in nnx.to_flat_state(base):
        if path in deltas:
            w = var.get_value()
            var = var.replace(value=(w.astype(jnp.float32) + deltas[path]).astype(w.dtype))
        flat.append((path, var))
    return nnx.from_flat_state(flat)


PEFT_PREFIX = "base_model.model."


def peft_adapter_tensors(lm) -> tuple[dict[str, np.ndarray], list[str]]:
    """The adapters as PEFT saves a LoRA adapter: `base_model.model.<module>.lora_A.weight` [rank, in] and
    `lora_B.weight` [out, rank] per adapted checkpoint projection, named by the family's checkpoint table.
    Returns (tensors, target module names). A part this model fuses that the checkpoint also stores fused
    (GLM's gate_up_proj) has no PEFT equivalent: a ValueError names it."""
    from . import param_table

    by_cols = {(e.path, e.cols): e.hf_key for e in param_table(lm.config) if e.transpose}
    tensors: dict[str, np.ndarray] = {}
    targets: list[str] = []
    for path, lin, parts in _projections(lm):
        if lin.lora is None:
            continue
        a, r, out = np.asarray(lin.lora.a[...], np.float32), lin.lora.rank, lin.kernel.shape[1]
        for j, ((start, end), b) in enumerate(zip(lin.lora.parts, lin.lora.b)):
            key = path + ("kernel",)
            hf = by_cols.get((key, (start, end))) or (by_cols.get((key, None)) if (start, end) == (0, out) else None)
            if hf is None:
                name = next(n for n, s, e in parts if (s, e) == (start, end))
                raise ValueError(f"the {name} adapter of {'.'.join(map(str, path))} has no tensor of its own in "
                                 f"this family's checkpoints, so no PEFT adapter can hold it; export merged")
            module = hf[:-len(".weight")]
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a[:, j * r:(j + 1) * r].T)
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b[...], np.float32).T)
            if module.rsplit(".", 1)[-1] not in targets:
                targets.append(module.rsplit(".", 1)[-1])
    return tensors, targets


def save_peft_adapter(lm, path: str, *, base_model: str | None = None) -> None:
    """Writes the model's adapters as a PEFT LoRA adapter directory (adapter_model.safetensors and
    adapter_config.json, float32), which `peft.PeftModel.from_pretrained(base, path)` loads onto the
    transformers model of the same checkpoint."""
    from ..atomic import write_json
    from ..safetensors_io import save_safetensors

    tensors, targets = peft_adapter_tensors(lm)
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save")
    lora = next(lin.lora for _, lin, _ in _projections(lm) if lin.lora is not None)
    os.makedirs(path, exist_ok=True)
    save_safetensors(os.path.join(path, "adapter_model.safetensors"), tensors, {"format": "pt"})
    write_json(os.path.join(path, "adapter_config.json"), {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.scale * lora.rank,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "modules_to_save": None, "base_model_name_or_path": base_model or ""})
