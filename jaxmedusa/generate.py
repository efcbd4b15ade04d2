"""Vanilla autoregressive generation: one jitted prefill, then the whole decode loop in one jitted
`lax.while_loop` with the cache donated. Ragged batches; each sequence stops at its own EOS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from functools import lru_cache, partial
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from .cache import KVCache
from .compile_cache import call_compiled, merge
from .kernels.dispatch import loop_compiler_options
from .loading import Model
from .memory import cache_bucket, check_request, clear_oom
from .medusa import ACCEPTANCES, AcceptanceParams, LoopStats, medusa_loop, medusa_start, medusa_stream_step
from . import sharding
from .sampling import choose_tokens
from .tree import DEFAULT_TOP_K, DEFAULT_TREE, TreeBuffers, build_tree, resolve_tree

PROMPT_BUCKET = 16  # prompts are padded to a multiple of this, so nearby lengths share a compilation


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]
    texts: list[str] | None
    stats: dict[str, Any]


def encode_prompts(model: Model, prompts) -> list[list[int]]:
    """Normalises prompts (one or many; strings or token-id lists) to a list of token-id lists."""
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and
                                    isinstance(prompts[0], (int, np.integer))):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if model.tokenizer is None:
                raise ValueError(f"prompt {i} is a string but the model has no tokenizer; pass token ids")
            ids = list(model.tokenizer(p)["input_ids"])
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty; at least one token is needed")
        bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {model.config.vocab_size})")
        out.append(ids)
    return out


def resolve_eos(model: Model, eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return tuple(model.eos_token_ids)
    return tuple(int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]))


def pad_prompts(prompts: list[list[int]], max_len: int, new_tokens: int,
                tree_slots: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads prompts into [B, L] (L a multiple of PROMPT_BUCKET) and checks the cache fits them."""
    lens = np.array([len(p) for p in prompts], np.int32)
    need = int(lens.max()) + new_tokens + tree_slots
    if need > max_len:
        tree = f" + {tree_slots} tree slots" if tree_slots else ""
        raise ValueError(f"prompt of {int(lens.max())} tokens + {new_tokens} new tokens{tree} needs {need} cache "
                         f"slots, but max_len is {max_len}; load with a larger max_len or generate fewer tokens")
    width = min(-(-int(lens.max()) // PROMPT_BUCKET) * PROMPT_BUCKET, max_len)
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return tokens, lens


@partial(jax.jit, static_argnames=("graphdef", "max_len", "attn_impl"))
def prefill(state, tokens: jax.Array, lens: jax.Array, *, graphdef, max_len: int, attn_impl: str | None = None):
    """Runs right-padded prompts [B, L] through a fresh cache. Returns (cache with lengths = lens, last
    prompt token's final-norm hidden [B, H])."""
    lm = merge(graphdef, state)
    b, width = tokens.shape
    cache = KVCache.create(lm.config, b, max_len, lm.dtype)
    mesh = sharding.current_mesh()
    if mesh is not None:  # the cache is split by KV head, as the attention that reads it
        spec = NamedSharding(mesh, sharding.cache_spec(lm.config.num_kv_heads, mesh))
        cache = cache._replace(k=jax.lax.with_sharding_constraint(cache.k, spec),
                               v=jax.lax.with_sharding_constraint(cache.v, spec))
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (b, width))
    causal = jnp.tril(jnp.ones((width, width), bool))
    hidden, cache = lm(tokens, positions, cache, causal, prefill=True, attn_impl=attn_impl)
    last = jnp.take_along_axis(hidden, (lens - 1)[:, None, None], axis=1)[:, 0]
    return cache._replace(lengths=lens.astype(jnp.int32)), last


def vanilla_step(lm, cache: KVCache, hidden, key, done, eos_ids, temperature, top_p, *, greedy: bool,
                 use_top_p: bool, attn_impl=None):
    """Chooses each sequence's next token from its last hidden state and feeds it through the model.

    Finished sequences (`done`) do not advance. Returns (cache, hidden [B, H], key, token [B], done).
    """
    key, sub = jax.random.split(key)
    tok = choose_tokens(lm.logits(hidden), sub, temperature, top_p, greedy=greedy, use_top_p=use_top_p)
    active = ~done
    done = done | jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
    h, cache = lm(tok[:, None], cache.lengths[:, None], cache, jnp.ones((1, 1), bool), attn_impl=attn_impl)
    cache = cache._replace(lengths=cache.lengths + active.astype(jnp.int32))
    return cache, h[:, 0], key, tok, done


@partial(jax.jit, static_argnames=("graphdef", "greedy", "use_top_p", "attn_impl"), donate_argnames=("cache",))
def vanilla_stream_step(state, cache: KVCache, hidden, key, done, eos_ids, temperature, top_p, *, graphdef,
                        greedy: bool, use_top_p: bool, attn_impl=None):
    """One vanilla step for stream(): (cache, hidden, key, token [B], done)."""
    return vanilla_step(merge(graphdef, state), cache, hidden, key, done, eos_ids, temperature, top_p,
                        greedy=greedy, use_top_p=use_top_p, attn_impl=attn_impl)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "use_top_p", "attn_impl"),
         donate_argnames=("cache",))
def decode_loop(state, cache: KVCache, hidden: jax.Array, key: jax.Array, eos_ids: jax.Array,
                temperature: jax.Array, top_p: jax.Array, *, graphdef, max_new_tokens: int, greedy: bool,
                use_top_p: bool, attn_impl: str | None = None):
    """Generates up to max_new_tokens per sequence on device.

    Returns (tokens [B, N], counts [B], steps, cache); the cache is returned so its donated buffers are
    updated in place and a caller may continue from it.
    """
    lm = merge(graphdef, state)
    b = cache.batch
    out0 = jnp.zeros((b, max_new_tokens), jnp.int32)

    def cond(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, hidden, out, done, key = carry
        cache, hidden, key, tok, new_done = vanilla_step(lm, cache, hidden, key, done, eos_ids, temperature, top_p,
                                                         greedy=greedy, use_top_p=use_top_p, attn_impl=attn_impl)
        out = out.at[:, step].set(jnp.where(done, 0, tok))
        return step + 1, cache, hidden, out, new_done, key

    done0 = jnp.zeros((b,), bool)
    start_lengths = cache.lengths
    step, cache, _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, hidden, out0, done0, key))
    return out, cache.lengths - start_lengths, step, cache


def generate(model: Model, prompts, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, eos_token_id=None, medusa: bool | None = None, tree=None, acceptance: str = "greedy",
             top_k: int = DEFAULT_TOP_K, posterior_threshold: float = 0.09, posterior_alpha: float = 0.3,
             attn_impl: str | None = None) -> GenerationResult:
    """Generates continuations for one prompt or a ragged batch (strings need the model's tokenizer).

    temperature 0 is greedy; otherwise sampling with temperature and top-p (nucleus). Each sequence
    stops at its own EOS (included in its tokens) or after max_new_tokens.

    Medusa: `medusa=None` uses the heads when the model has them, True requires them, False is vanilla.
    `tree` is a published tree's name, a JSON file or a list of paths (default: the heads' own tree,
    model.tree, when their config carries one, else mc_sim_7b_63 trimmed to the heads' depth).
    `acceptance` is greedy (output == vanilla greedy), typical (epsilon = posterior_threshold, delta =
    posterior_alpha) or rejection (lossless sampling). At temperature 0 every rule is greedy.
    """
    run = _prepare(model, prompts, max_new_tokens, temperature, top_p, seed, eos_token_id, medusa, tree,
                   acceptance, top_k, posterior_threshold, posterior_alpha)
    with traced_calls(model):
        return _generate(model, run, seed, max_new_tokens, temperature, top_p, attn_impl)


@contextlib.contextmanager
def traced_calls(model: Model) -> Iterator[None]:
    """What generate()'s and stream()'s jitted calls trace under: the model's mesh (tensor-parallel models
    trace their attention per device), and for a float32 model true float32 products. JAX's default lets a
    GPU round float32 GEMM and Pallas dot inputs to TF32; that ~1e-3 noise differs between the verify step's
    kernels and a decode step's, and flipped greedy near-ties of the default model on an H200."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(sharding.active(model.mesh))
        if jnp.dtype(model.dtype) == jnp.float32:
            stack.enter_context(jax.default_matmul_precision("highest"))
        yield


def verify_compiler_options(model: Model, run: "_Run") -> dict | None:
    """XLA options for the request's Medusa verify loop and stream step (kernels.dispatch.loop_compiler_options:
    cuBLAS GEMMs on a GPU from 64 rows, batch x tree nodes, unless the heads are int8)."""
    return loop_compiler_options(tree=True, rows=len(run.ids) * run.tree.size,
                                 quantized_heads=model.heads is not None and model.heads.quantized)


def _generate(model: Model, run: "_Run", seed: int, max_new_tokens: int, temperature: float, top_p: float,
              attn_impl) -> GenerationResult:
    t0 = time.perf_counter()
    cache, hidden, c1 = _run_prefill(run, attn_impl)
    t1 = time.perf_counter()
    fn, args, static, options = _loop_call(model, run, cache, hidden, seed, max_new_tokens, temperature, top_p,
                                           attn_impl)
    with clear_oom("the Medusa decode loop" if run.use_medusa else "the decode loop"):
        (out, counts, tally, _), c2 = call_compiled(fn, args, static, options)
        out, counts, tally = jax.device_get((out, counts, tally))  # tally: LoopStats (Medusa) or the step count
    medusa_stats = tally if run.use_medusa else None
    steps = tally.steps if run.use_medusa else tally
    t2 = time.perf_counter()
    compile_seconds = c1 + c2
    run_seconds = t2 - t0 - compile_seconds

    new = [out[i, :counts[i]].tolist() for i in range(len(run.ids))]
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(t, skip_special_tokens=True) for t in new]
    new_tokens = int(counts.sum())
    steps = int(steps)
    stats = {
        "batch": len(run.ids),
        "cache_slots": run.cache_len,
        "steps": steps,
        "new_tokens": new_tokens,
        # vanilla decoding emits exactly one token per active sequence per step
        "tokens_per_step": 1.0 if new_tokens else 0.0,
        "medusa": run.use_medusa,
        "prefill_seconds": t1 - t0 - c1,
        "decode_seconds": t2 - t1 - c2,
        "seconds": run_seconds,
        "compile_seconds": compile_seconds,
        "tokens_per_second": new_tokens / run_seconds if run_seconds > 0 else float("inf"),
    }
    if medusa_stats is not None:
        stats.update(medusa_summary(medusa_stats, counts, run.tree))
        stats["acceptance"] = static["acceptance"]
    return GenerationResult(tokens=new, texts=texts, stats=stats)


def _loop_call(model: Model, run: "_Run", cache: KVCache, hidden: jax.Array, seed: int, max_new_tokens: int,
               temperature: float, top_p: float, attn_impl) -> tuple[Any, tuple, dict, dict | None]:
    """The on-device loop a request runs after its prefill: (jitted loop, arguments, static arguments, XLA options)
    for call_compiled: medusa_loop with the heads, else decode_loop."""
    if run.use_medusa:
        heads_graphdef, heads_state = model.split_heads()
        args = (run.state, heads_state, cache, hidden, seed_key(seed), run.eos, run.params)
        static = dict(graphdef=run.graphdef, heads_graphdef=heads_graphdef, tree=run.tree,
                      max_new_tokens=max_new_tokens, acceptance=run.acceptance, use_top_p=top_p < 1.0,
                      attn_impl=attn_impl)
        return medusa_loop, args, static, verify_compiler_options(model, run)
    args = (run.state, cache, hidden, seed_key(seed), run.eos, run.params.temperature, run.params.top_p)
    static = dict(graphdef=run.graphdef, max_new_tokens=max_new_tokens, greedy=temperature == 0.0,
                  use_top_p=top_p < 1.0, attn_impl=attn_impl)
    return decode_loop, args, static, None


@dataclasses.dataclass
class _Run:
    """A validated generation request: padded prompts, tree, EOS ids, acceptance parameters."""

    ids: list[list[int]]
    tokens: np.ndarray
    lens: np.ndarray
    use_medusa: bool
    tree: TreeBuffers | None
    eos: jax.Array
    params: AcceptanceParams
    acceptance: str
    graphdef: Any
    state: Any
    cache_len: int  # KV-cache slots: the request's need rounded up to a bucket, at most model.max_len
    config: Any
    dtype: Any


@lru_cache(maxsize=64)
def request_values(temperature: float, top_p: float, posterior_threshold: float, posterior_alpha: float,
                   eos: tuple[int, ...]) -> tuple[AcceptanceParams, jax.Array]:
    """(AcceptanceParams, EOS ids) on the device, made once per set of values: in one device_put (jnp.float32(x)
    would run a conversion on the device for each, a round trip of ~0.5 ms apiece on the H200's host), and not
    again for the next request with the same values. Like seed_key's keys, they are never donated."""
    return jax.device_put((
        AcceptanceParams(np.float32(max(temperature, 1e-6)), np.float32(top_p), np.float32(posterior_threshold),
                         np.float32(posterior_alpha)),
        np.asarray(eos if eos else (-1,), np.int32)))


@lru_cache(maxsize=64)
def seed_key(seed: int) -> jax.Array:
    """jax.random.key(seed), made once per seed: making it runs a kernel and waits for it (~1 ms a call on the
    H200's host, measured inside generate()). Keys are immutable and never donated, so calls can share one."""
    return jax.random.key(seed)


def _run_prefill(run: _Run, attn_impl) -> tuple[KVCache, jax.Array, float]:
    """Prefills the request's cache, checked against free memory first. Returns (cache, hidden, compile s)."""
    b, width = run.tokens.shape
    check_request(run.config, run.dtype, b, run.cache_len, width)
    with clear_oom("the prefill"):
        (cache, hidden), seconds = call_compiled(
            prefill, (run.state, *jax.device_put((run.tokens, run.lens))),
            dict(graphdef=run.graphdef, max_len=run.cache_len, attn_impl=attn_impl))
        jax.block_until_ready(hidden)
    return cache, hidden, seconds


def _prepare(model, prompts, max_new_tokens, temperature, top_p, seed, eos_token_id, medusa, tree, acceptance,
             top_k, posterior_threshold, posterior_alpha) -> _Run:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):  # NaN fails every comparison: test it first
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    for name, value in (("posterior_threshold", posterior_threshold), ("posterior_alpha", posterior_alpha)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    use_medusa = model.heads is not None if medusa is None else bool(medusa)
    if use_medusa and model.heads is None:
        raise ValueError("medusa=True but the model has no Medusa heads; load them with load(..., heads=DIR)")
    if acceptance not in ACCEPTANCES:
        raise ValueError(f"acceptance {acceptance!r} is not one of {', '.join(ACCEPTANCES)}")
    tree_buf = resolve_model_tree(model, tree, top_k) if use_medusa else None
    ids = encode_prompts(model, prompts)
    eos = resolve_eos(model, eos_token_id)
    tree_slots = tree_buf.size if use_medusa else 0
    tokens, lens = pad_prompts(ids, model.max_len, max_new_tokens, tree_slots)
    need = int(lens.max()) + max_new_tokens + tree_slots
    cache_len = max(cache_bucket(need, model.max_len), tokens.shape[1])
    params, eos_ids = request_values(float(temperature), float(top_p), float(posterior_threshold),
                                     float(posterior_alpha), eos)
    graphdef, state = model.split()
    return _Run(ids=ids, tokens=tokens, lens=lens, use_medusa=use_medusa, tree=tree_buf, eos=eos_ids, params=params,
                acceptance=acceptance if temperature > 0 else "greedy", graphdef=graphdef, state=state,
                cache_len=cache_len, config=model.config, dtype=model.dtype)


def stream(model: Model, prompts, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
           seed: int = 0, eos_token_id=None, medusa: bool | None = None, tree=None, acceptance: str = "greedy",
           top_k: int = DEFAULT_TOP_K, posterior_threshold: float = 0.09, posterior_alpha: float = 0.3,
           attn_impl: str | None = None) -> Iterator[list[list[int]]]:
    """Like generate(), but yields after every step the new token ids of each sequence (possibly empty).

    A thin host loop over the same jitted step generate() runs inside its on-device loop, so the
    concatenated chunks equal generate()'s tokens for the same arguments. Each step is queued before the
    previous step's tokens are fetched and yielded, so the device never waits for the host's copy, dispatch
    or consumer; the one step queued after every sequence has stopped (at an EOS, or for Medusa at its budget,
    which the host cannot foresee) is discarded.
    """
    run = _prepare(model, prompts, max_new_tokens, temperature, top_p, seed, eos_token_id, medusa, tree,
                   acceptance, top_k, posterior_threshold, posterior_alpha)
    with traced_calls(model):  # around each traced call, never across a yield
        cache, hidden, _ = _run_prefill(run, attn_impl)
    b = len(run.ids)
    key = seed_key(seed)
    use_top_p = top_p < 1.0
    if run.use_medusa:
        heads_graphdef, heads_state = model.split_heads()
        static = dict(graphdef=run.graphdef, heads_graphdef=heads_graphdef, tree=run.tree, acceptance=run.acceptance,
                      use_top_p=use_top_p)
        with traced_calls(model):
            s, _ = call_compiled(medusa_start, (run.state, heads_state, cache, hidden, key, run.params), static)
        step_static = dict(static, max_new_tokens=max_new_tokens, attn_impl=attn_impl)
        options = verify_compiler_options(model, run)

        def medusa_step(carry):
            with traced_calls(model):
                (s, tokens, take, n, done), _ = call_compiled(
                    medusa_stream_step, (run.state, heads_state, *carry, run.eos, run.params), step_static, options)
            return (s, n, done), (tokens, take, done)

        # on the device, like the steps' own outputs: a host array would key a second compilation
        start = (s, *jax.device_put((np.zeros((b,), np.int32), np.zeros((b,), bool))))
        for tokens, take, done_h in _queued_ahead(medusa_step, start, None):
            yield [tokens[i, :take[i]].tolist() for i in range(b)]
            if np.all(done_h):  # tested on the host copy: jnp.all would launch a kernel and wait for it
                return
    else:
        step_static = dict(graphdef=run.graphdef, greedy=temperature == 0.0, use_top_p=use_top_p, attn_impl=attn_impl)

        def vanilla_step_call(carry):
            cache, hidden, key, done = carry
            with traced_calls(model):
                (cache, hidden, key, tok, done), _ = call_compiled(
                    vanilla_stream_step, (run.state, cache, hidden, key, done, run.eos, run.params.temperature,
                                          run.params.top_p), step_static)
            return (cache, hidden, key, done), (tok, done)

        was_done = np.zeros((b,), bool)
        for tok, done_h in _queued_ahead(vanilla_step_call, (cache, hidden, key, jax.device_put(was_done)),
                                         max_new_tokens):
            yield [[] if was_done[j] else [int(tok[j])] for j in range(b)]
            if np.all(done_h):
                return
            was_done = done_h


def _queued_ahead(step, carry, steps: int | None) -> Iterator[Any]:
    """Host copies of `step`'s outputs, step after step: `step(carry) -> (carry, outputs)` on device values only,
    so step k+1 is queued before step k's outputs are fetched and the device never waits for the host. Runs
    `steps` steps (None: until the caller stops); a caller that stops early drops the one step queued ahead."""
    carry, pending = step(carry)
    i = 1
    while pending is not None:
        queued = None
        if steps is None or i < steps:
            carry, queued = step(carry)
            i += 1
        yield jax.device_get(pending)
        pending = queued


def resolve_model_tree(model: Model, tree, top_k: int) -> TreeBuffers:
    """Builds the tree for the model's heads: `tree`, else the heads' own (model.tree), else the default
    published tree trimmed to the heads' depth."""
    k = model.heads.num_heads
    tree = model.tree if tree is None else tree
    if tree is None:
        return _default_tree(k, top_k)
    return build_tree(tree, num_heads=k, top_k=top_k)


@lru_cache(maxsize=16)
def _default_tree(num_heads: int, top_k: int) -> TreeBuffers:
    """The default published tree trimmed to the heads' depth, built once per (depth, top-k)."""
    return build_tree([p for p in resolve_tree(DEFAULT_TREE) if len(p) <= num_heads], num_heads=num_heads,
                      top_k=top_k)


def medusa_summary(st: LoopStats, counts: np.ndarray, tree: TreeBuffers) -> dict[str, Any]:
    """Acceptance statistics: tokens per step (mean, histogram) and per-head acceptance rates."""
    active = int(st.active_steps.sum())
    hist = st.histogram[1:].tolist()  # steps that emitted 1, 2, ..., max_depth + 1 tokens
    emitted = sum((i + 1) * h for i, h in enumerate(hist))
    return {
        "tree_nodes": tree.size,
        "mean_accepted_tokens_per_step": emitted / active if active else 0.0,
        "tokens_per_step": float(counts.sum() / active) if active else 0.0,
        "accepted_histogram": hist,
        "head_acceptance_rates": [int(x) / active if active else 0.0 for x in st.depth_accepted],
    }
