"""`Model` (base LM + tokenizer + generation settings) and `load()` for local HF model directories."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .atomic import atomic_open, read_json_object, write_json
from .checkpoint import CheckpointError, export_params, is_weight_file, read_params, save_tensors, weight_files
from .compile_cache import Hashed
from .heads_io import configured_layers, configured_tree, heads_from_state_dict, read_heads_tensors
from . import sharding
from .models import CausalLM, ConfigError, ModelConfig, abstract_lm, normalize_key, optional_keys, param_table
from .tree import TreeError, build_tree

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "default")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


@dataclasses.dataclass
class Model:
    """What generate() runs: the NNX language model, its config, the cache size, and optional tokenizer."""

    lm: CausalLM
    max_len: int = 2048
    tokenizer: Any = None
    eos_token_ids: tuple[int, ...] = ()
    path: str | None = None
    heads: Any = None  # MedusaHeads, when the model has them
    tree: list[list[int]] | None = None  # the heads' default tree (medusa_choices); None: mc_sim_7b_63 trimmed
    mesh: Any = None  # a jax Mesh with a `tensor` axis when the model is tensor-parallel (sharding.py)

    def __post_init__(self) -> None:
        if self.max_len <= 0:
            raise ValueError(f"max_len must be positive, got {self.max_len}")
        self._split = None
        self._heads_split = None

    @property
    def config(self) -> ModelConfig:
        return self.lm.config

    @property
    def dtype(self):
        return self.lm.dtype

    def split(self):
        """(graphdef, state), computed once: jitted functions take the state as an argument and the graphdef,
        hashed once (compile_cache.Hashed), as a static one."""
        if self._split is None:
            graphdef, state = nnx.split(self.lm)
            self._split = (Hashed(graphdef), state)
        return self._split

    def split_heads(self):
        """(graphdef, state) of the Medusa heads, computed once per heads object; the graphdef Hashed too."""
        if self._heads_split is None or self._heads_split[0] is not self.heads:
            graphdef, state = nnx.split(self.heads)
            self._heads_split = (self.heads, (Hashed(graphdef), state))
        return self._heads_split[1]


def default_dtype(checkpoint_dtype: str | None):
    """float32 on CPU (bf16 matmuls are slow there); on accelerators the checkpoint's dtype."""
    if jax.default_backend() == "cpu" or not checkpoint_dtype:
        return jnp.float32
    return {"bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(str(checkpoint_dtype), jnp.float32)


def build_model(cfg: ModelConfig, params: dict[tuple, np.ndarray], dtype, mesh=None) -> CausalLM:
    """The config's model whose parameters are exactly `params` (path -> array), with no random init; with a
    mesh, each parameter goes from host memory straight into its shards (sharding.place)."""
    abstract = abstract_lm(cfg, dtype)
    if mesh is not None:  # each device's q/k/v (gate/up) columns side by side, so no part crosses devices
        params = sharding.interleave_fused(abstract, params, mesh.shape[sharding.TENSOR])
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    missing = [path for path, _ in flat if path not in params]
    if missing:
        raise ConfigError(f"internal: no value for parameter {'.'.join(map(str, missing[0]))}")
    placed = sharding.place({path: params[path] for path, _ in flat}, mesh) if mesh is not None else None
    for path, var in flat:
        var.set_value(placed[path] if placed is not None else jnp.asarray(params[path]))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _param_count(cfg: ModelConfig) -> int:
    return sum(int(np.prod(e.hf_shape, dtype=object)) for e in param_table(cfg))


def _check_config_fits(cfg: ModelConfig, files: list[str], model_dir: str) -> None:
    """Refuses a config that asks for more parameters than its weight files could hold (at one byte each),
    before anything is sized by it: a crafted num_hidden_layers of 10^8 fails here, not after minutes."""
    one, two = (_param_count(dataclasses.replace(cfg, num_layers=n)) for n in (1, 2))
    need = one + (cfg.num_layers - 1) * (two - one)
    have = sum(os.path.getsize(f) for f in files)
    if need > have:
        raise ConfigError(f"{model_dir}/config.json describes {need:,} parameters ({cfg.num_layers} layers, hidden "
                          f"{cfg.hidden_size}, vocab {cfg.vocab_size}) but its weight files hold {have:,} bytes")


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> list[jax.Array]:
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def check_finite(module: nnx.Module, source: str) -> None:
    """Refuses NaN or infinite parameters (a damaged or badly converted file), naming the first one."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    ok = jax.device_get(_all_finite([v.get_value() for _, v in flat]))
    bad = [".".join(map(str, path)) for (path, _), good in zip(flat, ok) if not good]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(f"{source}: parameter {bad[0]} holds NaN or infinity{more}")


def _eos_ids(model_dir: str, cfg: ModelConfig) -> tuple[int, ...]:
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
        eos = read_json_object(path).get("eos_token_id")
        if eos is not None:
            return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    return cfg.eos_token_ids


def load_tokenizer(model_dir: str):
    """transformers' AutoTokenizer from local files, or None when the directory has no tokenizer."""
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in _TOKENIZER_FILES):
        return None
    if "transformers" not in sys.modules:  # its import-time "PyTorch was not found" advice, on a plain install
        quiet = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
        os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
        try:
            import transformers  # noqa: F401
        finally:
            if quiet is None:
                del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
            else:
                os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = quiet
    from transformers import AutoTokenizer

    # never run code from a model directory: a tokenizer_config.json with an auto_map is refused, not executed
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hf_cache_dir() -> str:
    """The Hugging Face hub cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub (read at call
    time, so a changed environment is honoured)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def resolve_dir(path_or_id: str | os.PathLike, *, revision: str | None = None, what: str = "model") -> str:
    """A local directory as given, or the snapshot of a hub id (`org/name`) in the local Hugging Face cache.

    Nothing is ever downloaded: a hub id that is not cached is an error saying how to get it there.
    """
    path = os.fspath(path_or_id)
    if os.path.isdir(path):
        return path
    if not _HUB_ID.match(path):
        raise FileNotFoundError(f"{what} directory {path!r} does not exist")
    from huggingface_hub import snapshot_download

    cache = hf_cache_dir()
    try:
        return snapshot_download(path, revision=revision, cache_dir=cache, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError and friends: not cached (or an unknown revision)
        rev = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(f"{what} {path!r}{rev} is neither a local directory nor in the Hugging Face cache "
                                f"({cache}); jaxmedusa never downloads: fetch it once with `hf download {path}`"
                                f"{' --revision ' + revision if revision else ''}, or pass a directory") from None


def default_model_paths() -> tuple[str, str]:
    """(model dir, heads dir) of the embedded default model shipped in the package (jaxmedusa/assets)."""
    model_dir, heads_dir = os.path.join(DEFAULT_MODEL_DIR, "model"), os.path.join(DEFAULT_MODEL_DIR, "heads")
    if not (os.path.isfile(os.path.join(model_dir, "config.json")) and os.path.isdir(heads_dir)):
        raise FileNotFoundError(f"the embedded default model is missing from this installation ({DEFAULT_MODEL_DIR});"
                                f" rebuild it with `python configs/default-model/build.py` or pass a model directory")
    return model_dir, heads_dir


def load(path: str | os.PathLike | None = None, *, heads: str | os.PathLike | None = None, dtype=None,
         max_len: int | None = None, revision: str | None = None, mesh=None) -> Model:
    """Loads a local model directory (config.json + safetensors or .bin weights) of any architecture in
    SUPPORTED_ARCHITECTURES: Llama, Mistral, Qwen2/2.5, Qwen3, GLM (HF and THUDM ChatGLM layouts), OPT.

    path: a model directory, or a hub id (`lmsys/vicuna-7b-v1.3`) already in the local Hugging Face cache
    (HF_HUB_CACHE / HF_HOME; `revision` picks a branch, tag or commit, default main); never downloads.
    path None: the embedded default model (a small Llama trained on the Python standard library, with its
    Medusa heads, tree and tokenizer), which needs no download.
    heads: a Medusa heads-only directory (medusa_lm_head.safetensors/.pt + config.json). A full Medusa-2
    directory (medusa_head.* tensors inside the model weights) brings its heads without this argument.
    A `medusa_choices` list in the heads' config becomes the model's default tree.
    dtype: parameter/compute dtype; None means float32 on CPU and the checkpoint's dtype elsewhere. A float32
    model multiplies in true float32 under generate() (no TF32 on a GPU).
    mesh: tensor parallelism, a device count or a jax Mesh with a `tensor` axis (sharding.tensor_mesh): each
    parameter is loaded straight into its shards, and generate() runs split across the devices.
    max_len: the most KV-cache slots a sequence may use (prompt + generated tokens + one tree); None: the
    model's max_position_embeddings (capped by a sliding window). Each request's cache is sized to what it
    needs (rounded up to a bucket), so a large max_len costs nothing until a request uses it.
    """
    if path is None:
        path, default_heads = default_model_paths()
        heads = default_heads if heads is None else heads
    model_dir = resolve_dir(path, revision=revision)
    heads = None if heads is None else resolve_dir(heads, what="heads")
    cfg = ModelConfig.from_json(model_dir)
    if max_len is None:
        max_len = min(cfg.max_position_embeddings, cfg.sliding_window or cfg.max_position_embeddings)
    if cfg.sliding_window is not None and max_len > cfg.sliding_window:
        raise ConfigError(f"max_len {max_len} exceeds the model's sliding_window {cfg.sliding_window}; "
                          f"sliding-window attention is not implemented, use max_len <= {cfg.sliding_window}")
    if cfg.family == "opt" and max_len > cfg.max_position_embeddings:
        raise ConfigError(f"max_len {max_len} exceeds the OPT model's max_position_embeddings "
                          f"{cfg.max_position_embeddings} (its learned positions end there)")
    raw = read_json_object(os.path.join(model_dir, "config.json"))
    dtype = jnp.dtype(dtype) if dtype is not None else default_dtype(raw.get("torch_dtype") or raw.get("dtype"))
    embedded: dict[str, np.ndarray] = {}

    def claim(key: str, arr) -> bool:  # Medusa-2 checkpoints keep their heads beside the model weights
        if key.startswith("medusa_head."):
            embedded[key[len("medusa_head."):]] = np.asarray(arr)
            return True
        return False

    files = weight_files(model_dir)
    _check_config_fits(cfg, files, model_dir)
    if isinstance(mesh, int):
        mesh = sharding.tensor_mesh(mesh)
    params = read_params(files, param_table(cfg), dtype, optional=optional_keys(cfg),
                         claim=claim, rename=lambda key: normalize_key(cfg, key))
    lm = build_model(cfg, params, dtype, mesh)
    check_finite(lm, f"the weights in {model_dir}")
    medusa_heads, tree = None, None
    if heads is not None:
        tensors, heads_cfg = read_heads_tensors(os.fspath(heads))
        source = f"heads file in {os.fspath(heads)}"
    elif embedded:
        tensors, heads_cfg, source = embedded, raw, f"medusa_head.* tensors of {model_dir}"
    if heads is not None or embedded:
        medusa_heads = heads_from_state_dict(tensors, hidden=cfg.embed_dim, vocab=cfg.vocab_size, dtype=dtype,
                                             num_layers=configured_layers(heads_cfg), source=source)
        check_finite(medusa_heads, f"the {source}")
        if mesh is not None:
            medusa_heads = sharding.shard_module(medusa_heads, mesh)
        tree = configured_tree(heads_cfg, source)
        if tree is not None:
            try:
                build_tree(tree, num_heads=medusa_heads.num_heads)
            except TreeError as e:
                raise ConfigError(f"{source}: medusa_choices is not a valid tree for these heads: {e}") from None
    return Model(lm=lm, max_len=max_len, tokenizer=load_tokenizer(model_dir),
                 eos_token_ids=_eos_ids(model_dir, cfg), path=model_dir, heads=medusa_heads, tree=tree, mesh=mesh)


SAVE_MANIFEST = "jaxmedusa_save.json"  # the files a save() wrote, so the next save into the directory may replace them


def _previous_save(model_dir: str) -> set[str]:
    path = os.path.join(model_dir, SAVE_MANIFEST)
    if not os.path.isfile(path):
        return set()
    files = read_json_object(path).get("files")
    if not isinstance(files, list):
        raise CheckpointError(f"{path} has no list of files; save into a new directory")
    return {os.path.basename(str(n)) for n in files}


def save(model: Model | CausalLM, path: str | os.PathLike, *, dtype=None,
         max_shard_bytes: int | None = None) -> None:
    """Writes an HF model directory (config.json + safetensors, the tokenizer and generation_config.json of a
    loaded Model) that load() and transformers both read.

    Every file is written atomically. The directory must be new or empty, or hold an earlier save(): a model
    jaxmedusa did not write is never overwritten, and the files of an earlier save that this one does not
    rewrite (another shard count, the other of single file / index) are removed, so no stale weights shadow
    the new ones. The earlier save's entry point (index or single file) goes first, so an interrupted save
    leaves a directory that fails to load, never one that loads a mix of old and new weights.
    """
    lm = model.lm if isinstance(model, Model) else model
    model_dir = os.fspath(path)
    os.makedirs(model_dir, exist_ok=True)
    previous = _previous_save(model_dir)
    flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(lm, nnx.Param))}
    tensors = export_params(sharding.checkpoint_order(lm, flat), param_table(lm.config))
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    cfg = lm.config.to_hf_dict()
    cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype)
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".save-") as staging:
        # the tokenizer files and generation_config.json are staged first, so their names are known
        if isinstance(model, Model) and model.tokenizer is not None:
            model.tokenizer.save_pretrained(staging)
        gen = os.path.join(model.path, "generation_config.json") if isinstance(model, Model) and model.path else None
        if gen and os.path.isfile(gen):
            shutil.copyfile(gen, os.path.join(staging, "generation_config.json"))
        extras = sorted(os.listdir(staging))
        ours = {"config.json", SAVE_MANIFEST, *extras}
        foreign = [n for n in sorted(os.listdir(model_dir))
                   if (is_weight_file(n) or n in ours) and n not in previous and n != SAVE_MANIFEST]
        if foreign:
            raise CheckpointError(f"{model_dir} already holds {foreign[0]}, which jaxmedusa.save did not write; "
                                  f"save into a new or empty directory")
        for name in sorted(previous):  # the old entry points first: never a loadable mix of old and new
            if name.endswith(".index.json") or name in ("model.safetensors", "pytorch_model.bin"):
                _remove(os.path.join(model_dir, name))
        write_json(os.path.join(model_dir, "config.json"), cfg)
        written = save_tensors(model_dir, tensors, max_shard_bytes)
        for name in extras:
            with open(os.path.join(staging, name), "rb") as src, atomic_open(os.path.join(model_dir, name), "wb") as dst:
                shutil.copyfileobj(src, dst)
    files = {"config.json", *written, *extras}
    for name in sorted(previous - files):
        _remove(os.path.join(model_dir, name))
    write_json(os.path.join(model_dir, SAVE_MANIFEST), {"files": sorted(files)})


def _remove(path: str) -> None:
    if os.path.isfile(path):
        os.remove(path)
