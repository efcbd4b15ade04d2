"""Reading HF model directories: model.safetensors, sharded safetensors (with index), pytorch_model.bin.

Loading is declarative and loud: every tensor goes through the table in params.py; an unexpected,
duplicate or missing key, or a wrong shape, is an error that names it.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Iterator

import ml_dtypes
import numpy as np

from .atomic import read_json_object, write_json
from .models.params import IGNORED_KEY_SUFFIXES, ParamEntry
from .safetensors_io import iter_safetensors, save_safetensors


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the key and shapes."""


def weight_files(model_dir: str | os.PathLike) -> list[str]:
    """The weight files of an HF model directory, preferring safetensors over .bin."""
    model_dir = os.fspath(model_dir)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = os.path.join(model_dir, index_name)
        if os.path.isfile(index):
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map")
            files = sorted(set(weight_map.values()))
            root = os.path.realpath(model_dir)
            for name in files:
                inside = isinstance(name, str) and os.path.realpath(os.path.join(root, name)).startswith(root + os.sep)
                if not inside or os.path.isabs(name):
                    raise CheckpointError(f"{index} lists shard {name!r}, a path outside {model_dir}; shards must be "
                                          "files inside the model directory")
            missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
            if missing:
                raise CheckpointError(f"{index} lists shard {missing[0]!r}, which is not in {model_dir}")
            return [os.path.join(model_dir, f) for f in files]
        path = os.path.join(model_dir, single)
        if os.path.isfile(path):
            return [path]
    raise CheckpointError(f"no weights in {model_dir}: expected model.safetensors, "
                          "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json")


def _torch_to_numpy(t) -> np.ndarray:
    import torch  # only for .bin checkpoints

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def iter_bin(path: str) -> Iterator[tuple[str, np.ndarray]]:
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the environment
        raise CheckpointError(f"{path} is a PyTorch checkpoint; install torch (pip install 'jaxmedusa[torch]') "
                              "or convert it to safetensors") from None
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # the legacy (pre-1.6, non-zip) format cannot be memory-mapped
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():  # a class or function the file would have us import and run
            raise CheckpointError(f"{path} holds Python objects besides tensors, which jaxmedusa never unpickles; "
                                  f"convert it to safetensors with the code that wrote it") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__})")
    for key, t in state.items():
        yield key, _torch_to_numpy(t)


def iter_tensors(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) over all files, numpy arrays in their stored dtype."""
    for path in files:
        if path.endswith(".safetensors"):
            yield from iter_safetensors(path)
        else:
            yield from iter_bin(path)


def read_params(files: list[str], table: list[ParamEntry], dtype, *, optional: set[str] = frozenset(),
                claim=None, rename=None) -> dict[tuple, np.ndarray]:
    """Maps checkpoint tensors onto model paths (cast to dtype, transposed) following `table`.

    `claim(key, array) -> bool` lets a caller take keys the table does not cover (Medusa heads inside
    a full checkpoint); `rename(key) -> key` maps other spellings of a key onto the table's. Raises
    CheckpointError for unexpected, duplicate or missing keys and bad shapes.
    """
    by_key = {e.hf_key: e for e in table}
    widths: dict[tuple, int] = {}
    for e in table:
        if e.cols is not None:
            widths[e.path] = max(widths.get(e.path, 0), e.cols[1])
    out: dict[tuple, np.ndarray] = {}
    seen: set[str] = set()
    unexpected: list[str] = []
    for key, arr in iter_tensors(files):
        if rename is not None:
            key = rename(key)
        if key in seen:
            raise CheckpointError(f"key {key!r} appears twice in the checkpoint")
        seen.add(key)
        entry = by_key.get(key)
        if entry is None:
            if key.endswith(IGNORED_KEY_SUFFIXES) or key in optional or (claim is not None and claim(key, arr)):
                continue
            unexpected.append(key)
            continue
        if tuple(arr.shape) != entry.hf_shape:
            raise CheckpointError(f"key {key!r}: expected shape {entry.hf_shape}, found {tuple(arr.shape)}")
        value = np.asarray(arr).astype(dtype)
        value = value.T if entry.transpose else value
        if entry.cols is None:
            out[entry.path] = value
        else:
            if entry.path not in out:
                out[entry.path] = np.empty(value.shape[:-1] + (widths[entry.path],), value.dtype)
            out[entry.path][..., entry.cols[0]:entry.cols[1]] = value
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"unexpected key {unexpected[0]!r} in the checkpoint{more}")
    missing = [e.hf_key for e in table if e.hf_key not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing key {missing[0]!r} in the checkpoint{more}")
    return out


def export_params(flat_params: dict[tuple, np.ndarray], table: list[ParamEntry]) -> dict[str, np.ndarray]:
    """The inverse of read_params: model paths -> HF keys, transposed back to [out, in]."""
    out = {}
    for e in table:
        if e.path not in flat_params:
            raise CheckpointError(f"model has no parameter {'.'.join(map(str, e.path))} for key {e.hf_key!r}")
        value = np.asarray(flat_params[e.path])
        if e.cols is not None:
            value = value[..., e.cols[0]:e.cols[1]]
        out[e.hf_key] = np.ascontiguousarray(value.T if e.transpose else value)
    return out


def save_tensors(model_dir: str, tensors: dict[str, np.ndarray], max_shard_bytes: int | None = None) -> list[str]:
    """Writes model.safetensors, or shards + model.safetensors.index.json when over max_shard_bytes (the index
    last, so an interrupted write leaves no entry point to half a model). Returns the file names written."""
    total = sum(t.nbytes for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_safetensors(os.path.join(model_dir, "model.safetensors"), tensors, {"format": "pt"})
        return ["model.safetensors"]
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        if shards[-1] and size + tensors[key].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += tensors[key].nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(os.path.join(model_dir, name), shard, {"format": "pt"})
        weight_map.update({k: name for k in shard})
    write_json(os.path.join(model_dir, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": weight_map})
    return sorted(set(weight_map.values())) + ["model.safetensors.index.json"]


WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$"
                         r"|^(model\.safetensors|pytorch_model\.bin)\.index\.json$")


def is_weight_file(name: str) -> bool:
    """A file name transformers or jaxmedusa would read weights from in a model directory."""
    return bool(WEIGHT_FILE.match(name))
