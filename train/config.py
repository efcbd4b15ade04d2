"""TrainConfig: a training run described by a YAML file (configs/train/*.yaml), validated once.

Unknown keys are errors; `--set key=value` overrides are parsed as YAML scalars and checked the same way.
Input paths (model, tokenizer, data, eval_data) are relative to the YAML file's folder; output_dir is
relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import yaml

MODES = ("medusa1", "medusa2", "pretrain")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("constant", "sine")
TEMPLATES = ("auto", "plain", "vicuna")
LORA_EXPORTS = ("merged", "adapter", "both")


class TrainConfigError(ValueError):
    """A training config that cannot run; the message names the key."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape. -1 in one axis takes the devices left over."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA on the base's projections (medusa2 / pretrain): the base stays frozen in the compute dtype and
    only the adapters (float32) train; the exported model has them merged in."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ()  # transformers' projection names (q_proj, ..., down_proj); empty: all
    export: str = "both"  # merged (output_dir/model) | adapter (output_dir/adapter, PEFT's layout) | both


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # model: an HF model directory, or `model_init` (an HF config.json dict) to start from random weights
    model: str | None = None
    model_init: Mapping[str, Any] | None = None
    tokenizer: str | None = None  # default: the model directory
    mode: str = "medusa1"  # medusa1 (heads only, base frozen) | medusa2 (joint) | pretrain (base LM only)
    heads: int = 4  # K Medusa heads
    head_layers: int = 1  # ResBlocks per head
    shared_lm_head: bool = False  # "version 2" heads reuse the base lm_head
    # data: ShareGPT-style JSON/JSONL files
    data: tuple[str, ...] = ()
    eval_data: tuple[str, ...] = ()
    chat_template: str = "auto"  # auto: the tokenizer's template when it has one, else plain
    seq_len: int = 512
    packing: bool = True
    batch_size: int = 8  # global, per optimizer step
    grad_accum: int = 1  # micro-batches per step (batch_size must divide by it)
    steps: int = 1000
    epochs: float = 0.0  # > 0: steps = ceil(epochs x examples / batch_size) once the data is read (not with steps)
    seed: int = 0
    # optimisation: AdamW, linear warm-up then cosine decay, global-norm clipping
    learning_rate: float = 1e-3  # heads in medusa1; the base in medusa2 / pretrain
    heads_lr_multiplier: float = 4.0  # medusa2: heads' lr = this x learning_rate
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # losses: sum_k head_coefficient * head_decay^k * L_k (+ L_LM or KL in medusa2)
    head_coefficient: float = 1.0
    head_decay: float = 0.8
    coefficient_schedule: str = "constant"  # constant | sine (ramped from 0 to head_coefficient)
    heads_warmup_steps: int = 0  # medusa2: heads only for this many steps, then joint
    distill_kl: bool = False  # medusa2: KL to the frozen original model instead of L_LM
    compute_dtype: str = "float32"  # trained weights are kept in float32 either way
    gradient_checkpointing: bool = False  # recompute the base's layers in the backward pass (medusa2 / pretrain)
    lora: LoRAConfig | None = None  # medusa2 / pretrain: train LoRA adapters instead of the whole base
    loss_chunk: int = 512  # positions per chunk of the vocabulary projections in the losses (0: all at once)
    mesh: MeshConfig = MeshConfig()
    output_dir: str = "runs/medusa"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        def fail(key: str, msg: str):
            raise TrainConfigError(f"{key}: {msg}")

        for f in dataclasses.fields(self):  # inf/nan pass every comparison below, so refuse them first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                fail(f.name, f"must be a finite number, got {value!r}")
        if self.mode not in MODES:
            fail("mode", f"{self.mode!r} is not one of {', '.join(MODES)}")
        if (self.model is None) == (self.model_init is None):
            fail("model", "give exactly one of model (an HF model directory) or model_init (a config dict)")
        if self.model_init is not None and self.mode == "medusa1":
            fail("model_init", "medusa1 trains heads on a trained base; a fresh base needs mode medusa2 or pretrain")
        if not self.data:
            fail("data", "at least one training data file is needed")
        for key in ("heads", "seq_len", "batch_size", "grad_accum", "steps", "checkpoint_every",
                    "keep_checkpoints", "log_every"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                fail(key, f"must be a positive integer, got {getattr(self, key)!r}")
        if not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
            fail("loss_chunk", f"must be a non-negative integer, got {self.loss_chunk!r}")
        if not isinstance(self.head_layers, int) or self.head_layers < 0:
            fail("head_layers", f"must be a non-negative integer, got {self.head_layers!r}")
        if self.batch_size % self.grad_accum:
            fail("grad_accum", f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")
        if self.seq_len < self.heads + 2:
            fail("seq_len", f"{self.seq_len} leaves no target for head {self.heads - 1} (needs >= heads + 2)")
        for key in ("learning_rate", "grad_clip"):
            if not getattr(self, key) > 0:
                fail(key, f"must be > 0, got {getattr(self, key)!r}")
        for key in ("warmup_ratio", "min_lr_ratio"):
            if not 0 <= getattr(self, key) <= 1:
                fail(key, f"must be in [0, 1], got {getattr(self, key)!r}")
        for key in ("weight_decay", "head_coefficient", "head_decay", "heads_lr_multiplier"):
            if getattr(self, key) < 0:
                fail(key, f"must be >= 0, got {getattr(self, key)!r}")
        if self.coefficient_schedule not in SCHEDULES:
            fail("coefficient_schedule", f"{self.coefficient_schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.chat_template not in TEMPLATES:
            fail("chat_template", f"{self.chat_template!r} is not one of {', '.join(TEMPLATES)}")
        if self.compute_dtype not in DTYPES:
            fail("compute_dtype", f"{self.compute_dtype!r} is not one of {', '.join(DTYPES)}")
        if not 0 <= self.heads_warmup_steps <= self.steps:
            fail("heads_warmup_steps", f"must be in [0, steps={self.steps}], got {self.heads_warmup_steps}")
        if self.heads_warmup_steps and self.mode != "medusa2":
            fail("heads_warmup_steps", "only medusa2 trains the base after a heads-only warm-up")
        if self.distill_kl and self.mode != "medusa2":
            fail("distill_kl", "only medusa2 trains the base (medusa1 keeps it frozen)")
        if self.model_init is not None and self.distill_kl:
            fail("distill_kl", "a randomly initialised base has no original distribution to distil")
        if self.epochs < 0:
            fail("epochs", f"must be >= 0, got {self.epochs!r}")
        if self.lora is not None:
            if self.mode == "medusa1":
                fail("lora", "medusa1 keeps the base frozen; LoRA adapts the base in medusa2 or pretrain")
            if self.model_init is not None:
                fail("lora", "LoRA adapts a trained base; a randomly initialised one (model_init) trains whole")
            if not isinstance(self.lora.rank, int) or self.lora.rank < 1:
                fail("lora.rank", f"must be a positive integer, got {self.lora.rank!r}")
            if not self.lora.alpha > 0:
                fail("lora.alpha", f"must be > 0, got {self.lora.alpha!r}")
            if self.lora.export not in LORA_EXPORTS:
                fail("lora.export", f"{self.lora.export!r} is not one of {', '.join(LORA_EXPORTS)}")
        if not isinstance(self.mesh.tensor, int) or self.mesh.tensor < 1:
            fail("mesh.tensor", f"must be a positive integer, got {self.mesh.tensor!r}")
        sizes = (self.mesh.data, self.mesh.fsdp)
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            fail("mesh", f"axis sizes must be positive, with at most one -1; got data={self.mesh.data}, "
                         f"fsdp={self.mesh.fsdp}")

    @property
    def trains_heads(self) -> bool:
        return self.mode in ("medusa1", "medusa2")

    @property
    def trains_base(self) -> bool:
        return self.mode in ("medusa2", "pretrain")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"], d["eval_data"] = list(self.data), list(self.eval_data)
        d["model_init"] = dict(self.model_init) if self.model_init is not None else None
        if self.lora is not None:
            d["lora"]["targets"] = list(self.lora.targets)
        return d


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_MESH_FIELDS = {f.name for f in dataclasses.fields(MeshConfig)}
_LORA_FIELDS = {f.name for f in dataclasses.fields(LoRAConfig)}
_INPUT_PATHS = ("model", "tokenizer")
_INPUT_LISTS = ("data", "eval_data")


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise TrainConfigError(f"--set {key}: {p} is not a mapping")
    cur[parts[-1]] = value


def _coerce(key: str, value: Any, expected: type) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool):
        raise TrainConfigError(f"{key}: expected true or false, got {value!r}")
    if expected in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TrainConfigError(f"{key}: expected a number, got {value!r}")
    if expected is int and not isinstance(value, int):
        raise TrainConfigError(f"{key}: expected an integer, got {value!r}")
    if expected is str and not isinstance(value, str):
        raise TrainConfigError(f"{key}: expected a string, got {value!r}")
    return value


_TYPES = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)
          if isinstance(f.default, (bool, int, float, str))}


def config_from_dict(raw: Mapping[str, Any]) -> TrainConfig:
    """Builds a TrainConfig from a parsed YAML mapping; unknown keys and wrong types are errors."""
    if not isinstance(raw, Mapping):
        raise TrainConfigError("a training config must be a YAML mapping of keys to values")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise TrainConfigError(f"unknown key {unknown[0]!r}; known keys: {', '.join(sorted(_FIELDS))}")
    if raw.get("epochs") and "steps" in raw:
        raise TrainConfigError("epochs: give steps or epochs, not both (--set epochs=0 lets steps count)")
    kw: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "mesh":
            if not isinstance(value, Mapping):
                raise TrainConfigError("mesh: expected a mapping like {data: -1, fsdp: 1}")
            bad = sorted(set(value) - _MESH_FIELDS)
            if bad:
                raise TrainConfigError(f"unknown key 'mesh.{bad[0]}'; known: {', '.join(sorted(_MESH_FIELDS))}")
            kw["mesh"] = MeshConfig(**{k: _coerce(f"mesh.{k}", v, int) for k, v in value.items()})
        elif key == "lora":
            kw["lora"] = None if value is None else _lora_config(value)
        elif key in _INPUT_LISTS:
            items = [value] if isinstance(value, str) else list(value or [])
            if not all(isinstance(x, str) for x in items):
                raise TrainConfigError(f"{key}: expected a path or a list of paths")
            kw[key] = tuple(os.path.expanduser(x) for x in items)
        elif key in _INPUT_PATHS:
            kw[key] = None if value is None else os.path.expanduser(_coerce(key, value, str))
        elif key == "model_init":
            if value is not None and not isinstance(value, Mapping):
                raise TrainConfigError("model_init: expected a mapping (the fields of an HF config.json)")
            kw[key] = value
        else:
            expected = _TYPES.get(key)
            kw[key] = _coerce(key, value, expected) if expected is not None else value
    return TrainConfig(**kw)


def _lora_config(value: Any) -> LoRAConfig:
    if not isinstance(value, Mapping):
        raise TrainConfigError("lora: expected a mapping like {rank: 16, alpha: 32, targets: [q_proj, v_proj]}")
    bad = sorted(set(value) - _LORA_FIELDS)
    if bad:
        raise TrainConfigError(f"unknown key 'lora.{bad[0]}'; known: {', '.join(sorted(_LORA_FIELDS))}")
    kw: dict[str, Any] = {}
    if "rank" in value:
        kw["rank"] = _coerce("lora.rank", value["rank"], int)
    if "alpha" in value:
        kw["alpha"] = _coerce("lora.alpha", value["alpha"], float)
    if "export" in value:
        kw["export"] = _coerce("lora.export", value["export"], str)
    if "targets" in value:
        targets = value["targets"]
        targets = [targets] if isinstance(targets, str) else list(targets or [])
        if not all(isinstance(t, str) for t in targets):
            raise TrainConfigError("lora.targets: expected a list of projection names like [q_proj, v_proj]")
        kw["targets"] = tuple(targets)
    return LoRAConfig(**kw)


def _resolve(path: str, base_dir: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings (values read as YAML scalars; dotted keys for mesh.*) into a nested dict."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise TrainConfigError(f"--set {pair!r}: expected key=value")
        key, text = pair.split("=", 1)
        _set_dotted(out, key.strip(), yaml.safe_load(text) if text else "")
    return out


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Reads a YAML training config and applies `--set key=value` overrides.

    Input paths written in the file are relative to its folder; those given with --set to the working
    directory.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TrainConfigError(f"no training config at {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise TrainConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{path}: a training config must be a YAML mapping")
    base_dir = os.path.dirname(os.path.abspath(path))
    for key in _INPUT_PATHS + _INPUT_LISTS:
        if raw.get(key) is not None:
            raw[key] = _resolve_any(key, raw[key], base_dir)
    for key, value in parse_overrides(overrides).items():
        if key in ("mesh", "lora") and isinstance(value, dict):
            raw[key] = {**(raw.get(key) or {}), **value}
        else:
            raw[key] = value
    return config_from_dict(raw)


def _resolve_any(key: str, value: Any, base_dir: str) -> Any:
    if isinstance(value, str):
        return _resolve(value, base_dir)
    if key in _INPUT_LISTS and isinstance(value, list):
        return [_resolve(v, base_dir) if isinstance(v, str) else v for v in value]
    return value
