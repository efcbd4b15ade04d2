"""Medusa decoding: greedy output equals vanilla greedy for any heads and tree; acceptance rules; trees."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import jaxmedusa
from jaxmedusa.tree import TreeError, build_tree, cartesian_tree, chain_tree, grow_tree, published_trees

from conftest import random_heads, random_lm


@pytest.fixture(scope="module")
def model():
    lm = random_lm(seed=41)
    return jaxmedusa.Model(lm, max_len=256, heads=random_heads(lm, 5, 1, seed=41))


def prompts_of(rng, lengths):
    return [rng.integers(3, 97, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "vicuna_7b_stage2", "zephyr_stage2"])
def test_greedy_medusa_equals_vanilla_published_trees(model, tree):
    prompts = prompts_of(np.random.default_rng(1), (1, 17, 60))
    vanilla = jaxmedusa.generate(model, prompts, max_new_tokens=30, medusa=False, eos_token_id=[])
    medusa = jaxmedusa.generate(model, prompts, max_new_tokens=30, tree=tree, eos_token_id=[])
    assert medusa.stats["medusa"] and not vanilla.stats["medusa"]
    assert medusa.tokens == vanilla.tokens
    assert all(len(t) == 30 for t in medusa.tokens)


@st.composite
def random_tree(draw):
    depth = draw(st.integers(1, 4))
    paths = set()
    for _ in range(draw(st.integers(1, 12))):
        n = draw(st.integers(1, depth))
        paths.add(tuple(draw(st.integers(0, 3)) for _ in range(n)))
    closed = {p[:i] for p in paths for i in range(1, len(p) + 1)}
    return [list(p) for p in sorted(closed)]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=random_tree(), seed=st.integers(0, 1000))
def test_greedy_medusa_equals_vanilla_random_trees_and_heads(tree, seed):
    lm = random_lm(seed=43)
    model = jaxmedusa.Model(lm, max_len=160, heads=random_heads(lm, 4, 2, seed=seed))
    prompts = prompts_of(np.random.default_rng(seed), (3, 29))
    vanilla = jaxmedusa.generate(model, prompts, max_new_tokens=20, medusa=False, eos_token_id=[])
    medusa = jaxmedusa.generate(model, prompts, max_new_tokens=20, tree=tree, top_k=4, eos_token_id=[])
    assert medusa.tokens == vanilla.tokens


def test_eos_inside_generation_matches_vanilla(model):
    prompts = prompts_of(np.random.default_rng(2), (4, 33))
    free = jaxmedusa.generate(model, prompts, max_new_tokens=24, medusa=False, eos_token_id=[]).tokens
    eos = free[1][9]
    vanilla = jaxmedusa.generate(model, prompts, max_new_tokens=24, medusa=False, eos_token_id=eos)
    medusa = jaxmedusa.generate(model, prompts, max_new_tokens=24, eos_token_id=eos)
    assert medusa.tokens == vanilla.tokens
    assert medusa.tokens[1][-1] == eos and len(medusa.tokens[1]) <= 10


def test_perfect_heads_accept_the_whole_chain():
    """A model whose final norm is zero predicts token 0 everywhere; zero-init heads on the base lm_head then
    guess token 0 at rank 0 too, so every node of a chain is accepted and the commit path is exercised fully."""
    import jax.numpy as jnp

    lm = random_lm(seed=44)
    lm.norm.weight.set_value(jnp.zeros_like(lm.norm.weight[...]))
    model = jaxmedusa.Model(lm, max_len=128, heads=random_heads(lm, 3, 1, seed=44, std=0.0))
    vanilla = jaxmedusa.generate(model, [7, 8, 9], max_new_tokens=24, medusa=False, eos_token_id=[]).tokens[0]
    assert vanilla == [0] * 24
    res = jaxmedusa.generate(model, [7, 8, 9], max_new_tokens=24, tree="chain-3", eos_token_id=[])
    assert res.tokens[0] == vanilla
    assert res.stats["steps"] == 6 and res.stats["mean_accepted_tokens_per_step"] == 4.0
    assert res.stats["head_acceptance_rates"] == [1.0, 1.0, 1.0]


def test_stats_are_consistent(model):
    prompts = prompts_of(np.random.default_rng(3), (5, 9))
    res = jaxmedusa.generate(model, prompts, max_new_tokens=16, eos_token_id=[])
    s = res.stats
    hist = s["accepted_histogram"]
    assert len(hist) == 5  # 1 .. depth + 1 tokens per step for the default tree trimmed to 4 levels
    assert sum(hist) >= s["steps"]
    rates = s["head_acceptance_rates"]
    assert all(0 <= r <= 1 for r in rates) and rates == sorted(rates, reverse=True)
    assert s["mean_accepted_tokens_per_step"] == pytest.approx(
        sum((i + 1) * h for i, h in enumerate(hist)) / sum(hist))


def test_typical_with_zero_threshold_accepts_every_node(model):
    res = jaxmedusa.generate(model, [5, 6, 7], max_new_tokens=20, tree="chain-4", acceptance="typical",
                             temperature=1.0, posterior_threshold=0.0, eos_token_id=[])
    assert res.stats["mean_accepted_tokens_per_step"] == pytest.approx(5.0)
    assert res.stats["head_acceptance_rates"] == [1.0, 1.0, 1.0, 1.0]


def test_rejection_sampling_is_lossless():
    """First two tokens' empirical joint distribution vs the exact base-model distribution (chi-square)."""
    import jax
    import jax.numpy as jnp

    from jaxmedusa.cache import KVCache

    vocab = 8
    lm = random_lm(seed=45, std=0.4, vocab_size=vocab, bos_token_id=0, eos_token_id=1)
    model = jaxmedusa.Model(lm, max_len=64, heads=random_heads(lm, 2, 1, seed=45, std=0.5))
    prompt = [2, 3, 4]
    n = 4000
    res = jaxmedusa.generate(model, [prompt] * n, max_new_tokens=2, temperature=1.0, acceptance="rejection",
                             tree=cartesian_tree([3, 2]), top_k=3, seed=7, eos_token_id=[])
    assert res.stats["mean_accepted_tokens_per_step"] > 1.0  # the tree is used, not bypassed
    counts = np.zeros((vocab, vocab))
    for t in res.tokens:
        counts[t[0], t[1]] += 1

    # the base model's next-token probabilities after the prompt and after prompt + [a], for every a, in one
    # forward pass over the vocab-many continuations (row a's last two positions)
    seqs = jnp.asarray([prompt + [a] for a in range(vocab)])
    t = seqs.shape[1]
    cache = KVCache.create(lm.config, vocab, t)
    h, _ = lm(seqs, jnp.broadcast_to(jnp.arange(t), seqs.shape), cache, jnp.tril(jnp.ones((t, t), bool)),
              prefill=True)
    probs = np.asarray(jax.nn.softmax(lm.logits(h[:, -2:]), axis=-1), np.float64)  # [a, position, b]
    p1, p2 = probs[0, 0], probs[:, 1]
    expected = p1[:, None] * p2 * n
    keep = expected > 5  # chi-square needs expected counts >= 5; pool the rest into one cell
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    rest_e, rest_o = expected[~keep].sum(), counts[~keep].sum()
    if rest_e > 0:
        chi2 += (rest_o - rest_e) ** 2 / rest_e
    dof = int(keep.sum()) + (rest_e > 0) - 1
    # stated bound: the 99.9% quantile of chi-square, via the Wilson-Hilferty approximation
    z = 3.09
    bound = dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < bound, (chi2, bound, dof)


@pytest.mark.parametrize("method", ["argmax", "chunked", "xla"])
def test_top_k_indices_equal_lax_top_k_with_ties(method):
    import jax
    import jax.numpy as jnp

    from jaxmedusa.medusa import top_k_indices

    rng = np.random.default_rng()
    x = rng.integers(-30, 30, size=(3, 2, 2500)).astype(np.float32)  # ~40 ties per value
    for k in (1, 3, 8):
        got = jax.jit(top_k_indices, static_argnums=(1, 2))(jnp.asarray(x), k, method)
        np.testing.assert_array_equal(got, jax.lax.top_k(x, k)[1])
    # a row long enough that the chunked method's second stage (157 chunks x 10) is chunked again
    x = rng.integers(-300, 300, size=(2, 20000)).astype(np.float32)
    got = jax.jit(top_k_indices, static_argnums=(1, 2))(jnp.asarray(x), 10, method)
    np.testing.assert_array_equal(got, jax.lax.top_k(x, 10)[1])


def test_tree_buffers_for_published_tree():
    tree = build_tree("mc_sim_7b_63", num_heads=5)
    assert tree.size == 64 and tree.max_depth == 4 and tree.paths.shape == (42, 5)
    assert (np.diag(tree.mask)).all() and tree.mask[:, 0].all()
    for row in tree.paths:  # each path is root -> leaf through parents
        nodes = [n for n in row if n >= 0]
        assert nodes[0] == 0 and all(tree.parent[b] == a for a, b in zip(nodes, nodes[1:]))
    assert len(published_trees()) == 9


def test_trees_are_built_once_and_shared_read_only():
    """generate() builds its tree on every call: equal plain-int trees give the same cached, read-only buffers;
    published_trees() hands out copies; invalid trees still fail on every call, bool ranks included."""
    a = build_tree([[0], [0, 0], [1]], num_heads=2)
    assert build_tree(((0,), (0, 0), (1,)), num_heads=2) is a
    assert build_tree([[0], [0, 0], [1]], num_heads=3) is not a  # the heads are part of the key
    with pytest.raises(ValueError, match="read-only"):
        a.mask[0, 1] = True
    named = published_trees()
    named["mc_sim_7b_63"].clear()
    assert len(published_trees()["mc_sim_7b_63"]) == 63
    for _ in range(2):
        with pytest.raises(TreeError, match="appears twice"):
            build_tree([[0], [0]], num_heads=1)
        with pytest.raises(TreeError, match="integer ranks"):
            build_tree([[True]], num_heads=1)


def test_tree_helpers():
    assert chain_tree(3) == [[0], [0, 0], [0, 0, 0]]
    assert cartesian_tree([2, 2]) == [[0], [1], [0, 0], [0, 1], [1, 0], [1, 1]]
    assert build_tree(cartesian_tree([2, 2]), num_heads=2).size == 7
    # the heads' top-k is taken as wide as the tree's largest rank + 1, not top_k wide
    assert build_tree([[0], [0, 0], [0, 3], [1]], num_heads=2).ranks_used == 4
    assert build_tree(chain_tree(3), num_heads=3).ranks_used == 1
    assert build_tree(published_trees()["mc_sim_7b_63"], num_heads=4).ranks_used == 10


def test_grow_tree_is_the_best_tree_of_its_size():
    import itertools

    rng = np.random.default_rng()
    acc = np.sort(rng.uniform(0.0, 0.6, size=(2, 3)), axis=1)[:, ::-1]  # [heads, ranks], decreasing per head

    def value(paths):  # expected tokens per step: 1 + the sum of each node's path probability
        return 1 + sum(np.prod([acc[d, r] for d, r in enumerate(p)]) for p in paths)

    every = [list(p) for d in (1, 2) for p in itertools.product(range(3), repeat=d)]
    for size in (2, 4, 7):
        paths, expected = grow_tree(acc, size)
        build_tree(paths, num_heads=2, top_k=3)  # prefix-closed, within the heads and the top-k
        assert len(paths) == size - 1 and len(expected) == size
        assert np.isclose(expected[-1], value(paths))
        closed = (c for c in itertools.combinations(every, size - 1) if all(len(p) == 1 or p[:1] in c for p in c))
        assert np.isclose(expected[-1], max(value(c) for c in closed))


@pytest.mark.parametrize("paths, message", [
    ([[0], [0, 0], [0, 0, 0]], "depth 3 but the model has 2 Medusa heads"),
    ([[0], [10]], "rank 10, outside the top-10"),
    ([[0], [1, 0]], r"not prefix-closed: \[1, 0\] is present but its parent \[1\] is not"),
    ([[0], [0]], "appears twice"),
    ("no_such_tree", "unknown tree 'no_such_tree'"),
])
def test_bad_trees_are_named(paths, message):
    with pytest.raises(TreeError, match=message):
        build_tree(paths, num_heads=2)


def test_int8_heads_are_close_lossless_and_inference_only(model, tmp_path):
    """quantize_heads: every projection within half a step of its column's scale, logits close to the float
    heads', greedy Medusa output still vanilla's, and no way to save or re-quantize them."""
    import jax.numpy as jnp

    from jaxmedusa.heads import Int8Projection

    q = jaxmedusa.quantize_heads(model.heads)
    assert q.quantized and not model.heads.quantized  # a copy: the model's heads are untouched
    for fh, qh in zip(model.heads.heads, q.heads):
        assert isinstance(qh.proj, Int8Projection) and qh.proj.qkernel[...].dtype == jnp.int8
        w = np.asarray(fh.proj.kernel[...])
        deq = np.asarray(qh.proj.qkernel[...], np.float32) * np.asarray(qh.proj.scale[...])
        assert np.all(np.abs(deq - w) <= np.asarray(qh.proj.scale[...]) / 2 * (1 + 1e-5))
    hidden = jnp.asarray(np.random.default_rng(5).standard_normal((3, model.config.embed_dim)), jnp.float32)
    want, got = model.heads(hidden, model.lm.logits), q(hidden, model.lm.logits)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 0.02

    prompts = prompts_of(np.random.default_rng(7), (5, 40))
    vanilla = jaxmedusa.generate(model, prompts, max_new_tokens=24, medusa=False, eos_token_id=[])
    int8 = jaxmedusa.generate(jaxmedusa.Model(model.lm, max_len=256, heads=q), prompts, max_new_tokens=24,
                              eos_token_id=[])
    assert int8.stats["medusa"] and int8.tokens == vanilla.tokens

    with pytest.raises(ValueError, match="already quantized"):
        jaxmedusa.quantize_heads(q)
    from jaxmedusa.heads_io import save_heads_vllm

    for save in (jaxmedusa.save_heads, save_heads_vllm):
        with pytest.raises(ValueError, match="inference only"):
            save(q, str(tmp_path / "heads"))
        assert not (tmp_path / "heads").exists()
    with pytest.raises(ValueError, match="share the base model's lm_head"):
        jaxmedusa.quantize_heads(random_heads(model.lm, 2, 1, shared_lm_head=True))


def test_medusa_requested_without_heads():
    model = jaxmedusa.Model(random_lm(seed=46), max_len=64)
    with pytest.raises(ValueError, match="no Medusa heads"):
        jaxmedusa.generate(model, [1, 2], medusa=True)
    with pytest.raises(ValueError, match="acceptance 'nope'"):
        jaxmedusa.generate(model, [1, 2], acceptance="nope")


@pytest.mark.parametrize("kw", [dict(), dict(acceptance="rejection", temperature=0.8, seed=3),
                                dict(medusa=False, temperature=0.8, top_p=0.9, seed=4)])
def test_stream_chunks_equal_generate(model, kw):
    prompts = prompts_of(np.random.default_rng(5), (4, 21))
    eos = jaxmedusa.generate(model, prompts, max_new_tokens=18, eos_token_id=[], **kw).tokens[0][7]
    want = jaxmedusa.generate(model, prompts, max_new_tokens=18, eos_token_id=eos, **kw).tokens
    chunks = list(jaxmedusa.stream(model, prompts, max_new_tokens=18, eos_token_id=eos, **kw))
    got = [sum((c[i] for c in chunks), []) for i in range(2)]
    assert got == want
    assert len(chunks) >= 1 and all(len(c) == 2 for c in chunks)


@pytest.mark.parametrize("medusa", [False, True])
def test_stream_of_one_and_two_tokens_and_left_early(model, medusa):
    """stream() queues each step before reading the last one: a budget of one step queues none past it, and a
    consumer that stops early leaves nothing behind that breaks the next call."""
    prompts = prompts_of(np.random.default_rng(9), (5, 11))
    for n in (1, 2):
        want = jaxmedusa.generate(model, prompts, max_new_tokens=n, eos_token_id=[], medusa=medusa).tokens
        chunks = list(jaxmedusa.stream(model, prompts, max_new_tokens=n, eos_token_id=[], medusa=medusa))
        assert [sum((c[i] for c in chunks), []) for i in range(2)] == want
    it = jaxmedusa.stream(model, prompts, max_new_tokens=12, eos_token_id=[], medusa=medusa)
    first = next(it)
    it.close()
    again = next(iter(jaxmedusa.stream(model, prompts, max_new_tokens=12, eos_token_id=[], medusa=medusa)))
    assert again == first and all(len(c) >= 1 for c in first)


def test_verify_loop_compiles_with_the_dispatchers_xla_options(model, monkeypatch):
    """generate()'s Medusa loop and stream()'s step are compiled with kernels.dispatch.loop_compiler_options
    (cuBLAS GEMMs: Triton's off); the options change the kernels, not the greedy tokens."""
    from jaxmedusa import compile_cache
    from jaxmedusa.kernels.dispatch import CUBLAS_OPTIONS
    from jaxmedusa.medusa import medusa_loop, medusa_stream_step

    prompts = prompts_of(np.random.default_rng(8), (6, 13))
    want = jaxmedusa.generate(model, prompts, max_new_tokens=12, eos_token_id=[], medusa=False).tokens
    monkeypatch.setenv("JAXMEDUSA_GEMM", "cublas")
    assert jaxmedusa.generate(model, prompts, max_new_tokens=12, eos_token_id=[]).tokens == want
    options = tuple(sorted(CUBLAS_OPTIONS.items()))
    assert any(key[0] is medusa_loop and key[-1] == options for key in compile_cache._CACHE)
    chunks = list(jaxmedusa.stream(model, prompts, max_new_tokens=12, eos_token_id=[]))
    assert [sum((c[i] for c in chunks), []) for i in range(2)] == want
    assert any(key[0] is medusa_stream_step and key[-1] == options for key in compile_cache._CACHE)


def test_greedy_medusa_equals_vanilla_with_norms_folded_in_few_row_steps(monkeypatch):
    """As on a GPU (kernels.fold_norm): steps of at most FOLD_MAX_ROWS rows (vanilla decode at B = 2) fold the
    norms into the products, prefill and the verify steps of a tree do not; greedy output is unchanged."""
    import jax

    from jaxmedusa import compile_cache
    from jaxmedusa.kernels.dispatch import FOLD_MAX_ROWS
    from jaxmedusa.models import decoder

    lm = random_lm(seed=43)
    model = jaxmedusa.Model(lm, max_len=128, heads=random_heads(lm, 4, 1, seed=43))
    prompts = prompts_of(np.random.default_rng(43), (5, 11))
    want = jaxmedusa.generate(model, prompts, max_new_tokens=16, eos_token_id=[], medusa=False).tokens
    rows = []
    monkeypatch.setattr(decoder, "fold_norm", lambda hidden, m: rows.append(m) or m <= FOLD_MAX_ROWS)
    monkeypatch.setattr(compile_cache, "_CACHE", {})
    jax.clear_caches()  # jit would reuse traces made without the patch
    try:
        assert jaxmedusa.generate(model, prompts, max_new_tokens=16, eos_token_id=[], medusa=False).tokens == want
        assert jaxmedusa.generate(model, prompts, max_new_tokens=16, eos_token_id=[]).tokens == want
    finally:
        jax.clear_caches()  # nor may later tests reuse the patched ones
    assert 2 in rows and max(rows) > FOLD_MAX_ROWS  # folded decode steps, unfolded prefill and verify


def test_float32_models_trace_true_float32_products(model):
    """generate() and stream() trace a float32 model's products at HIGHEST precision (no TF32 on a GPU, whose
    rounding differs between the verify and decode kernels); other dtypes keep JAX's default."""
    import jax
    import jax.numpy as jnp

    from jaxmedusa.generate import traced_calls
    from jaxmedusa.models import create_lm

    def product_jaxpr():
        return str(jax.make_jaxpr(lambda x: x @ x)(jnp.ones((2, 2), jnp.float32)))

    assert model.dtype == jnp.float32
    with traced_calls(model):
        assert "HIGHEST" in product_jaxpr()
    assert "HIGHEST" not in product_jaxpr()
    with traced_calls(jaxmedusa.Model(create_lm(model.config, dtype=jnp.bfloat16))):
        assert "HIGHEST" not in product_jaxpr()
