"""The Medusa step and loop: candidates from the heads, one tree-verify forward, acceptance, commit.

Everything is batched with static shapes: each sequence accepts its own number of tokens per step, the
cache is donated, and the whole generation is one `lax.while_loop`. The step carries the next root
token (the "bonus" token the LM chose at the last accepted node) and the heads' top-k guesses from that
node, so no extra forward is needed between steps.

Acceptance rules (per parent node p with child candidate x):
  greedy     accept iff x == argmax logits[p]; output equals vanilla greedy decoding token for token.
  typical    accept iff prob(x) > min(epsilon, delta * exp(-entropy)) at temperature T (Medusa-2);
             among paths of equal accepted length the one with the highest sum of log-probs wins.
  rejection  lossless multi-candidate speculative sampling (SpecInfer): children are tried in rank
             order, each accepted with its probability under the residual target distribution, which
             loses the rejected token's mass and is renormalised; the bonus token is sampled from the
             residual at the node where the walk stops. The output distribution is the base model's
             at the given temperature / top-p.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .cache import KVCache
from .compile_cache import merge
from .sampling import filtered_logits
from .tree import TreeBuffers

ACCEPTANCES = ("greedy", "typical", "rejection")


class AcceptanceParams(NamedTuple):
    temperature: jax.Array
    top_p: jax.Array
    epsilon: jax.Array  # typical: posterior_threshold
    delta: jax.Array  # typical: posterior_alpha


class StepState(NamedTuple):
    cache: KVCache
    root: jax.Array  # [B] next root token (already chosen, emitted by the next step)
    head_top: jax.Array  # [B, K, tree.ranks_used] heads' best tokens at the last accepted node
    key: jax.Array


class StepOut(NamedTuple):
    tokens: jax.Array  # [B, max_depth + 1] emitted tokens (root first); valid up to count
    count: jax.Array  # [B] tokens emitted (accepted tree length + 1 for the root)


def choose_root(logits, key, params: AcceptanceParams, *, acceptance: str, use_top_p: bool):
    """The LM's next token at a node: argmax for greedy, a sample otherwise."""
    if acceptance == "greedy":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits, params.temperature, params.top_p, use_top_p)
                                  ).astype(jnp.int32)


TOP_K_CHUNK = 128
# On a CPU, k at most this many: k argmax passes. XLA:CPU's top-k custom call took 0.28 ms for 5 heads'
# 8192-token rows of the default model, a tenth of its decode step (bench/verify_breakdown.py on the 2-core CPU).
TOP_K_ARGMAX = 8


def top_k_indices(x: jax.Array, k: int, method: str | None = None) -> jax.Array:
    """lax.top_k's indices over the last axis (ties: lower index first) for finite x, computed the way the
    backend does fastest.

    GPU: XLA's top-k gives each row to one thread block, which walks a 32k vocabulary alone (0.15 ms for
    4 heads' rows on an H100). Splitting each row into chunks of TOP_K_CHUNK, taking every chunk's top k,
    then the top k of those keeps the result (and its tie order: chunk-major, stable within a chunk) and
    spreads the work over many blocks; the second stage recurses while its row is still long (4 heads'
    rows of 250 chunks x 10 went to XLA's one-block-per-row kernel: 67 us of an H200 verify step).
    CPU: for small k, k passes of argmax (first index of the maximum), each masking the index it took.
    `method` ("argmax", "chunked", "xla") overrides the choice (tests).
    """
    v = x.shape[-1]
    if method is None:
        method = ("argmax" if jax.default_backend() == "cpu" and k <= TOP_K_ARGMAX
                  else "xla" if v <= 8 * TOP_K_CHUNK or k > TOP_K_CHUNK else "chunked")
    if method == "argmax":
        picks = []
        for _ in range(k):
            i = jnp.argmax(x, axis=-1)
            picks.append(i)
            x = jnp.where(jnp.arange(v) == i[..., None], -jnp.inf, x)
        return jnp.stack(picks, axis=-1).astype(jnp.int32)
    if method == "xla":
        return jax.lax.top_k(x, k)[1]
    n = -(-v // TOP_K_CHUNK)
    pad = [(0, 0)] * (x.ndim - 1) + [(0, n * TOP_K_CHUNK - v)]
    chunks = jnp.pad(x, pad, constant_values=-jnp.inf).reshape(*x.shape[:-1], n, TOP_K_CHUNK)
    vals, idx = jax.lax.top_k(chunks, k)  # [..., n, k]
    idx = idx + (jnp.arange(n) * TOP_K_CHUNK)[:, None]
    pick = top_k_indices(vals.reshape(*x.shape[:-1], n * k), k)
    return jnp.take_along_axis(idx.reshape(*x.shape[:-1], n * k), pick, axis=-1)


@jax.named_scope("heads")
def heads_top_k(heads, lm, hidden: jax.Array, top_k: int) -> jax.Array:
    """[B, H] hidden -> [B, K, top_k] each head's best tokens."""
    logits = heads(hidden, lm.logits)  # [K, B, V]
    return jnp.transpose(top_k_indices(logits, top_k), (1, 0, 2)).astype(jnp.int32)


def _candidates(tree: TreeBuffers, root, head_top):
    cand = head_top[:, np.maximum(tree.head, 0), tree.rank]  # [B, T]
    return cand.at[:, 0].set(root)


def _path_posterior(tree: TreeBuffers, node_ok, node_score):
    """Best leaf path by accepted length (ties: highest score sum, then first). -> nodes [B, D+1], acc_len [B]."""
    paths = jnp.asarray(tree.paths)
    valid = paths[:, 1:] >= 0
    p = jnp.maximum(paths, 0)
    ok = node_ok[:, p[:, 1:]] & valid[None]  # [B, P, D]
    run = jnp.cumprod(ok.astype(jnp.int32), axis=-1)
    acc = run.sum(-1)  # [B, P]
    score = jnp.sum(jnp.where(run > 0, node_score[:, p[:, 1:]], 0.0), axis=-1)
    best_len = acc.max(-1, keepdims=True)
    best = jnp.argmax(jnp.where(acc == best_len, score, -jnp.inf), axis=-1)
    nodes = paths[best]  # [B, D+1]
    return nodes, jnp.take_along_axis(acc, best[:, None], axis=1)[:, 0]


def _rejection_walk(tree: TreeBuffers, cand, probs, key):
    """Lossless walk down the tree. probs [B, T, V] target distributions at each node.

    Returns nodes [B, D+1] (root first, -1 padded), acc_len [B], residual distribution [B, V] at the stop.
    """
    b = cand.shape[0]
    rows = jnp.arange(b)
    children = jnp.asarray(tree.children)
    cur = jnp.zeros((b,), jnp.int32)
    alive = jnp.ones((b,), bool)
    residual = probs[:, 0]
    nodes = jnp.full((b, tree.max_depth + 1), -1, jnp.int32).at[:, 0].set(0)
    acc_len = jnp.zeros((b,), jnp.int32)
    for d in range(tree.max_depth):
        kids = children[cur]  # [B, C]
        chosen = jnp.full((b,), -1, jnp.int32)
        for c in range(children.shape[1]):
            key, sub = jax.random.split(key)
            kid = kids[:, c]
            trying = alive & (kid >= 0) & (chosen < 0)
            tok = cand[rows, jnp.maximum(kid, 0)]
            p_tok = residual[rows, tok]
            accept = trying & (jax.random.uniform(sub, (b,)) < p_tok)
            chosen = jnp.where(accept, kid, chosen)
            reject = trying & ~accept
            dropped = residual.at[rows, tok].set(0.0)
            mass = dropped.sum(-1, keepdims=True)
            dropped = jnp.where(mass > 0, dropped / jnp.where(mass > 0, mass, 1.0), residual)
            residual = jnp.where(reject[:, None], dropped, residual)
        moved = chosen >= 0
        cur = jnp.where(moved, chosen, cur)
        residual = jnp.where(moved[:, None], probs[rows, cur], residual)
        nodes = nodes.at[:, d + 1].set(jnp.where(moved, chosen, -1))
        acc_len = acc_len + moved
        alive = moved
    return nodes, acc_len, residual


@jax.named_scope("acceptance")
def _accept(tree: TreeBuffers, cand, logits, params: AcceptanceParams, k_walk, k_root, *, acceptance: str,
            use_top_p: bool):
    """The acceptance rule over the verified tree: (nodes [B, D+1], accepted length [B], next root [B])."""
    rows = jnp.arange(cand.shape[0])
    parent = jnp.asarray(np.maximum(tree.parent, 0))
    if acceptance == "rejection":
        probs = jax.nn.softmax(filtered_logits(logits, params.temperature, params.top_p, use_top_p), axis=-1)
        nodes, acc_len, residual = _rejection_walk(tree, cand, probs, k_walk)
        return nodes, acc_len, jax.random.categorical(k_root, jnp.log(residual)).astype(jnp.int32)
    if acceptance == "greedy":
        ok = cand == jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, parent]
        score = jnp.zeros(cand.shape, jnp.float32)
    else:  # typical
        probs = jax.nn.softmax(logits / params.temperature, axis=-1)
        logp = jnp.log(jnp.maximum(probs, 1e-30))
        entropy = -jnp.sum(probs * logp, axis=-1)  # [B, T]
        threshold = jnp.minimum(params.epsilon, params.delta * jnp.exp(-entropy))
        p_cand = jnp.take_along_axis(probs[:, parent], cand[..., None], axis=-1)[..., 0]
        ok = p_cand > threshold[:, parent]
        score = jnp.log(jnp.maximum(p_cand, 1e-30))
    nodes, acc_len = _path_posterior(tree, ok, score)
    last = nodes[rows, acc_len]  # the bonus token comes from the LM at the last accepted node
    root = choose_root(logits[rows, last], k_root, params, acceptance=acceptance, use_top_p=use_top_p)
    return nodes, acc_len, root


@jax.named_scope("compaction")
def _compact_kv(cache: KVCache, nodes) -> KVCache:
    """Moves the accepted nodes' K/V from tree slots lengths + node to lengths + j (gather, then scatter)."""
    b, n = nodes.shape
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))
    src = cache.lengths[:, None] + jnp.maximum(nodes, 0)
    dst = cache.lengths[:, None] + jnp.arange(n)[None]
    k = cache.k.at[:, rows, dst].set(cache.k[:, rows, src], mode="drop", unique_indices=True,
                                     indices_are_sorted=True)
    v = cache.v.at[:, rows, dst].set(cache.v[:, rows, src], mode="drop", unique_indices=True,
                                     indices_are_sorted=True)
    return cache._replace(k=k, v=v)


def medusa_step(lm, heads, tree: TreeBuffers, state: StepState, params: AcceptanceParams, active, *,
                acceptance: str, use_top_p: bool, attn_impl=None) -> tuple[StepState, StepOut, jax.Array]:
    """One verify step for every sequence; `active` [B] sequences advance, the others stay put.

    Returns (state, emitted tokens, accepted tree length [B]).
    """
    cache = state.cache
    b = cache.batch
    rows = jnp.arange(b)
    with jax.named_scope("candidates"):
        cand = _candidates(tree, state.root, state.head_top)
        positions = cache.lengths[:, None] + jnp.asarray(tree.depth)[None]
    hidden, cache = lm(cand, positions, cache, jnp.asarray(tree.mask), attn_impl=attn_impl)
    logits = lm.logits(hidden)  # [B, T, V]
    key, k_walk, k_root = jax.random.split(state.key, 3)
    nodes, acc_len, root = _accept(tree, cand, logits, params, k_walk, k_root, acceptance=acceptance,
                                   use_top_p=use_top_p)
    count = jnp.where(active, acc_len + 1, 0)
    cache = _compact_kv(cache, nodes)
    cache = cache._replace(lengths=cache.lengths + count)
    last = nodes[rows, acc_len]  # heads read the hidden state of the last accepted node
    head_top = heads_top_k(heads, lm, hidden[rows, last], tree.ranks_used)
    tokens = cand[rows[:, None], jnp.maximum(nodes, 0)]
    new_state = StepState(cache=cache, root=jnp.where(active, root, state.root),
                          head_top=jnp.where(active[:, None, None], head_top, state.head_top), key=key)
    return new_state, StepOut(tokens=tokens, count=count), acc_len


def initial_state(lm, heads, tree: TreeBuffers, cache: KVCache, hidden, key, params: AcceptanceParams, *,
                  acceptance: str, use_top_p: bool) -> StepState:
    """The first step's state from the prefilled cache and the last prompt hidden state [B, H]."""
    key, k0 = jax.random.split(key)
    root = choose_root(lm.logits(hidden), k0, params, acceptance=acceptance, use_top_p=use_top_p)
    return StepState(cache=cache, root=root, head_top=heads_top_k(heads, lm, hidden, tree.ranks_used), key=key)


def commit_emitted(emitted: StepOut, active, n, done, eos_ids, max_new_tokens: int):
    """How many of this step's tokens each sequence keeps: up to its first EOS (included) and its budget.

    Returns (take [B], tokens so far n [B], done [B]).
    """
    width = emitted.tokens.shape[1]
    j = jnp.arange(width)[None]
    is_eos = jnp.any(emitted.tokens[..., None] == eos_ids[None, None], axis=-1) & (j < emitted.count[:, None])
    first_eos = jnp.where(jnp.any(is_eos, -1), jnp.argmax(is_eos, -1) + 1, width + 1)  # width + 1: none
    take = jnp.minimum(jnp.minimum(emitted.count, first_eos), max_new_tokens - n)
    take = jnp.where(active, take, 0)
    n = n + take
    done = done | (active & (first_eos <= emitted.count)) | (n >= max_new_tokens)
    return take, n, done


_STEP_STATIC = ("graphdef", "heads_graphdef", "tree", "acceptance", "use_top_p", "attn_impl")


@partial(jax.jit, static_argnames=_STEP_STATIC[:-1])
def medusa_start(state, heads_state, cache: KVCache, hidden, key, params: AcceptanceParams, *, graphdef,
                 heads_graphdef, tree: TreeBuffers, acceptance: str, use_top_p: bool) -> StepState:
    """initial_state() as its own jitted function, for stream()."""
    return initial_state(merge(graphdef, state), merge(heads_graphdef, heads_state), tree, cache, hidden,
                         key, params, acceptance=acceptance, use_top_p=use_top_p)


@partial(jax.jit, static_argnames=_STEP_STATIC + ("max_new_tokens",), donate_argnames=("s",))
def medusa_stream_step(state, heads_state, s: StepState, n, done, eos_ids, params: AcceptanceParams, *, graphdef,
                       heads_graphdef, tree: TreeBuffers, max_new_tokens: int, acceptance: str, use_top_p: bool,
                       attn_impl=None):
    """One Medusa step for stream(): (state, tokens [B, D + 1], take [B], n [B], done [B]). stream() compiles it
    through compile_cache.call_compiled with the verify loop's XLA options."""
    lm = merge(graphdef, state)
    heads = merge(heads_graphdef, heads_state)
    s, emitted, _ = medusa_step(lm, heads, tree, s, params, ~done, acceptance=acceptance, use_top_p=use_top_p,
                                attn_impl=attn_impl)
    take, n, done = commit_emitted(emitted, ~done, n, done, eos_ids, max_new_tokens)
    return s, emitted.tokens, take, n, done


class LoopStats(NamedTuple):
    steps: jax.Array  # [] loop iterations
    active_steps: jax.Array  # [B] steps each sequence was active
    histogram: jax.Array  # [D + 2] steps by tokens emitted (1 .. D + 1)
    depth_accepted: jax.Array  # [D] steps whose accepted length reached depth d + 1


@partial(jax.jit, static_argnames=("graphdef", "heads_graphdef", "tree", "max_new_tokens", "acceptance", "use_top_p",
                                   "attn_impl"), donate_argnames=("cache",))
def medusa_loop(state, heads_state, cache: KVCache, hidden, key, eos_ids, params: AcceptanceParams, *, graphdef,
                heads_graphdef, tree: TreeBuffers, max_new_tokens: int, acceptance: str, use_top_p: bool,
                attn_impl=None):
    """Whole Medusa generation on device from prefilled `cache` and the last prompt hidden state [B, H].

    Returns (tokens [B, max_new_tokens], counts [B], LoopStats, cache).
    """
    lm = merge(graphdef, state)
    heads = merge(heads_graphdef, heads_state)
    b = cache.batch
    width = tree.max_depth + 1
    s0 = initial_state(lm, heads, tree, cache, hidden, key, params, acceptance=acceptance, use_top_p=use_top_p)
    stats0 = LoopStats(jnp.int32(0), jnp.zeros((b,), jnp.int32), jnp.zeros((width + 1,), jnp.int32),
                       jnp.zeros((tree.max_depth,), jnp.int32))
    out0 = jnp.zeros((b, max_new_tokens + width), jnp.int32)
    n0 = jnp.zeros((b,), jnp.int32)
    done0 = jnp.zeros((b,), bool)

    def cond(carry):
        _, _, _, done, stats = carry
        return ~jnp.all(done) & (stats.steps < max_new_tokens)

    def body(carry):
        s, out, n, done, stats = carry
        active = ~done
        s, emitted, acc_len = medusa_step(lm, heads, tree, s, params, active, acceptance=acceptance,
                                          use_top_p=use_top_p, attn_impl=attn_impl)
        take, n, done = commit_emitted(emitted, active, n, done, eos_ids, max_new_tokens)
        j = jnp.arange(width)[None]
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, width))
        cols = jnp.where(j < take[:, None], (n - take)[:, None] + j, out.shape[1])  # out of range -> dropped
        out = out.at[rows, cols].set(emitted.tokens, mode="drop")
        acc = jnp.where(active, acc_len, -1)
        stats = LoopStats(
            steps=stats.steps + 1,
            active_steps=stats.active_steps + active,
            histogram=stats.histogram + jnp.sum(jax.nn.one_hot(acc + 1, width + 1, dtype=jnp.int32), axis=0),
            depth_accepted=stats.depth_accepted + jnp.sum(
                (acc[:, None] >= jnp.arange(1, width)[None]) & active[:, None], axis=0).astype(jnp.int32))
        return s, out, n, done, stats

    s, out, n, _, stats = jax.lax.while_loop(cond, body, (s0, out0, n0, done0, stats0))
    return out[:, :max_new_tokens], n, stats, s.cache
