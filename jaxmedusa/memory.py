"""Device memory for a generation request: cache sizes by bucket, an estimate of what a request needs, a
check against free memory before anything is allocated, and one clear error for out-of-memory."""

from __future__ import annotations

import contextlib
import os

import jax
import numpy as np

from jaxmedusa.kernels import cudnn_supports
from jaxmedusa.kernels.reference import prefill_block_rows

from .models.config import ModelConfig

MIN_CACHE_SLOTS = 64


class InsufficientMemoryError(MemoryError):
    """A request does not fit the device's free memory; the message names the numbers and what to lower."""


def cache_bucket(slots: int, limit: int) -> int:
    """`slots` rounded up to a bucket (4 per octave: 64, 80, 96, 112, 128, 160, ...), at most `limit`.

    Nearby requests share a bucket, and so a compilation, while no cache is more than 25% larger than
    the request needs.
    """
    slots = max(int(slots), MIN_CACHE_SLOTS)
    step = max(1, 1 << max(0, slots.bit_length() - 3))  # a quarter of the octave slots lies in
    return min(-(-slots // step) * step, int(limit))


def cache_bytes(cfg: ModelConfig, dtype, batch: int, slots: int) -> int:
    """Bytes of a KV cache: K and V, [layers, batch, slots, kv_heads, head_dim]."""
    return 2 * cfg.num_layers * batch * slots * cfg.num_kv_heads * cfg.head_dim * np.dtype(dtype).itemsize


def prefill_workspace_bytes(cfg: ModelConfig, dtype, batch: int, tokens: int) -> int:
    """A generous estimate of the temporaries of one prefill forward: a layer's activations (residual,
    norm, q/k/v, attention output, three MLP intermediates) twice over, plus the blockwise attention's
    float32 score block where that path runs."""
    item = np.dtype(dtype).itemsize
    per_token = 4 * cfg.embed_dim + cfg.hidden_size + 2 * cfg.num_kv_heads * cfg.head_dim + 3 * cfg.intermediate_size
    total = 2 * batch * tokens * per_token * item
    if not cudnn_supports(dtype, cfg.head_dim):
        rows = min(tokens, prefill_block_rows(batch, cfg.num_heads, tokens))
        total += 3 * 4 * batch * cfg.num_heads * rows * tokens
    return int(total)


def free_bytes(device=None) -> int | None:
    """Free memory of `device` (accelerators: the allocator's limit minus what is in use; CPU: the host's
    available memory), or None when it cannot be told."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if device.platform == "cpu":
        return _host_available_bytes()
    return None


def _host_available_bytes() -> int | None:
    """The kernel's MemAvailable (free + reclaimable page cache); MemFree alone would refuse requests that
    fit once the page cache is dropped."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_request(cfg: ModelConfig, dtype, batch: int, cache_slots: int, prompt_tokens: int,
                  free: int | None = None) -> None:
    """Refuses, before allocating, a request whose cache + prefill temporaries exceed free device memory."""
    free = free_bytes() if free is None else free
    if free is None:
        return
    cache = cache_bytes(cfg, dtype, batch, cache_slots)
    work = prefill_workspace_bytes(cfg, dtype, batch, prompt_tokens)
    if cache + work > free:
        raise InsufficientMemoryError(
            f"this request needs about {_gib(cache + work)} of device memory (KV cache {_gib(cache)} for batch "
            f"{batch} x {cache_slots} slots, prefill {_gib(work)} for {prompt_tokens} prompt tokens) but only "
            f"{_gib(free)} is free; lower the batch, the prompt length, max_new_tokens or max_len")


@contextlib.contextmanager
def clear_oom(what: str):
    """Turns XLA's RESOURCE_EXHAUSTED (at compile or run time) into one InsufficientMemoryError line."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
        first = next((line for line in msg.splitlines() if line.strip()), msg)[:300]
        raise InsufficientMemoryError(f"out of device memory in {what} ({first}); lower the batch, the prompt "
                                      f"length, max_new_tokens or max_len") from None
