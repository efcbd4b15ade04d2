"""Read and write .safetensors with numpy alone, bfloat16 included (the safetensors package's numpy
backend rejects bf16). The format: 8-byte little-endian header size, a JSON header, raw tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from .atomic import atomic_open

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    pass


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Returns (header without __metadata__, byte offset where tensor data starts), validated as the official
    library does: known dtypes, shapes of non-negative ints, and data offsets that tile the data section
    exactly (no negative, overlapping, gapped or past-the-end ranges). Errors name the file and tensor."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise SafetensorsError(f"{path}: header size {n} is implausible; not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    _check_layout(path, header, size - 8 - n)
    return header, 8 + n


def _check_layout(path, header: dict, data_bytes: int) -> None:
    spans = []
    for key, info in header.items():
        where = f"{path}: tensor {key!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise SafetensorsError(f"{where}: header entry lacks dtype, shape or data_offsets")
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise SafetensorsError(f"{where} has unsupported dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise SafetensorsError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise SafetensorsError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes:
            raise SafetensorsError(f"{where}: data_offsets {offsets} fall outside the file's {data_bytes} data bytes")
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise SafetensorsError(f"{where}: data_offsets {offsets} hold {end - begin} bytes, but shape {shape} "
                                   f"of {info['dtype']} needs {int(np.prod(shape, dtype=np.int64)) * dtype.itemsize}")
        spans.append((begin, end, key))
    pos = 0
    for begin, end, key in sorted(spans):
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap at byte {pos}"
            raise SafetensorsError(f"{path}: tensor {key!r} {what} (data_offsets [{begin}, {end}])")
        pos = end
    if pos != data_bytes:
        raise SafetensorsError(f"{path}: tensors cover {pos} of the file's {data_bytes} data bytes")


def iter_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, array) lazily from a memory map; arrays are read-only views."""
    header, start = read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for key, info in header.items():
        dtype = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        arr = mm[start + begin:start + end].view(dtype).reshape(info["shape"])
        yield key, arr


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Writes tensors (numpy arrays, any dtype in DTYPES) to path atomically, keys sorted, 8-byte aligned."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = {}
    for key in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[key]))
        if arr.dtype not in _NAMES:
            raise SafetensorsError(f"tensor {key!r}: dtype {arr.dtype} cannot be stored")
        header[key] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays[key] = arr
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key in sorted(arrays):
            f.write(arrays[key].tobytes())
