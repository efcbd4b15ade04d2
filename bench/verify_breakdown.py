"""Where the time of one Medusa verify step goes, next to one vanilla step: a per-op-family breakdown.

    python bench/verify_breakdown.py                       # Llama-2-7B shapes, bf16, GPU
    python bench/verify_breakdown.py --smoke               # tiny shapes, any backend (checks the script)
    python bench/verify_breakdown.py --model default --dtype float32 --prompts 128 --tree-sizes 1 8 16
                                                           # the embedded default model's shapes

For each (batch, prompt, tree size T) it runs the jitted on-device loop generate() runs (T = 1: the
vanilla `decode_loop`; T > 1: `medusa_loop` with random heads, so every step verifies the whole tree),
times it in the loop (best of --repeats, per step), then records one run with the JAX profiler and sums
the device time of every kernel by op family. A kernel's family comes from the named scope its HLO
instruction was traced under (jax.named_scope in the model and the Medusa step: qkv_proj, rope,
kv_write, attention, o_proj, mlp, norm, lm_head, sampling, candidates, acceptance, compaction, heads);
"other" is everything outside those scopes (loop bookkeeping), and "idle" is the step time no kernel
covers: the loop's step time less the profiled run's kernel time. XLA runs a loop op by op, without its
command buffers (CUDA graphs), while a profiler records, so the two runs differ in launches but not in kernels.
`--gaps N` prints where the profiled run's stream waits, summed by the pair of kernels around each wait (also
in the JSON's "gaps"); its ~1 ms a step between the while loop's predicate copy (MemcpyD2H) and the next
step's first kernel is the profiled run's host round trip, which the timed run does not pay in full (H200,
2026-12-02: `--xla-option xla_enable_command_buffers_during_profiling=true` left it and every kernel time as
they were). Each row also lists its kernels with their calls per step (XLA reuses one kernel for identical
fusions, so a name can cover every layer); `--dump DIR` writes the optimized HLO of each configuration, to
read what a fusion holds. `--gemm-impls xla cublas pallas` runs
every row once per GEMM implementation (JAXMEDUSA_GEMM while it traces and compiles, with the XLA options
generate() would use: kernels.dispatch.loop_compiler_options): the in-model A/B of XLA's autotuned GEMMs,
cuBLAS alone, and the flat GEMM. Writes bench/results/verify-breakdown-DATE-DEVICE.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import glob
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

FAMILIES = ("heads", "candidates", "acceptance", "compaction", "sampling", "lm_head", "kv_write", "attention",
            "qkv_proj", "rope", "o_proj", "mlp", "norm")
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s.*?op_name="([^"]*)"')


def scope_map(hlo_text: str) -> dict[str, str]:
    """HLO instruction name (and its kernel-style spelling, '.' -> '_') -> op family."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        parts = m.group(2).split("/")
        fam = next((p for p in parts if p in FAMILIES), "other")
        out[m.group(1)] = fam
        out[m.group(1).replace(".", "_")] = fam
    return out


def kernel_events(trace_dir: str):
    """(name, duration ns, hlo_op or None, stream, start ns) of every device kernel in the newest trace under
    trace_dir; on CPU, the host's XLA op events."""
    from jax.profiler import ProfileData

    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    data = ProfileData.from_file(path)
    gpu = [p for p in data.planes if p.name.startswith("/device:GPU")]
    events, lines = [], []
    for plane in gpu or [p for p in data.planes if p.name == "/host:CPU"]:
        for line in plane.lines:
            lines.append(f"{plane.name}:{line.name}")
            if gpu and "stream" not in line.name.lower():
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                if not gpu and "hlo_op" not in stats:
                    continue
                events.append((ev.name, float(ev.duration_ns), stats.get("hlo_op"), f"{plane.name}:{line.name}",
                               float(ev.start_ns)))
    return events, lines


def short_kernel(name: str) -> str:
    """A kernel name without the numeric suffix XLA and Pallas add per instance (a name per kind of kernel)."""
    return re.sub(r"_+\d+$", "", name or "")


def gap_table(events, steps: int, scopes: dict[str, str], top: int = 12) -> tuple[float, list[dict]]:
    """Where a stream waits: the time between one kernel's end and the next kernel's start on the same stream,
    summed by (kernel before, kernel after). Returns (gap ms per step, the `top` pairs with their ms and count
    per step): the idle column's account, to tell launch gaps from a loop's host round trip."""
    by_stream = collections.defaultdict(list)
    for name, ns, hlo_op, stream, start in events:
        by_stream[stream].append((start, start + ns, name, hlo_op))
    pairs = collections.Counter()
    counts = collections.Counter()
    total = 0.0
    for evs in by_stream.values():
        evs.sort()
        end = evs[0][1]
        for (s0, e0, n0, h0), (s1, e1, n1, h1) in zip(evs, evs[1:]):
            gap = s1 - max(end, e0)
            end = max(end, e1)
            if gap <= 0:
                continue
            key = (f"{family_of(n0, h0, scopes)}:{short_kernel(n0)}", f"{family_of(n1, h1, scopes)}:{short_kernel(n1)}")
            pairs[key] += gap / 1e6 / steps
            counts[key] += 1 / steps
            total += gap / 1e6 / steps
    return total, [dict(before=k[0], after=k[1], ms=v, count=counts[k]) for k, v in pairs.most_common(top)]


def family_of(name: str, hlo_op: str | None, scopes: dict[str, str]) -> str:
    for key in (hlo_op, name, re.sub(r"_(\d+)$", r".\1", name or "")):
        if key and key in scopes:
            return scopes[key]
    low = (name or "").lower()
    if "attention" in low:
        return "attention"
    if any(s in low for s in ("gemm", "xmma", "nvjet", "cutlass", "gemv")):
        return "gemm (unattributed)"
    return "unattributed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama2-7b",
                    help="a bench/e2e.py shape name, or `default`: the embedded default model's config")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                    help="default: bfloat16 (float32 with --smoke)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--prompts", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--tree-sizes", type=int, nargs="+", default=[1, 16, 32, 64])
    ap.add_argument("--heads", choices=["own", "shared", "own-int8"], nargs="+", default=["own", "shared"],
                    help="Medusa-1 heads with their own vocab projections, heads sharing the lm_head, and/or own "
                         "projections stored as int8 (quantize_heads)")
    ap.add_argument("--precision", choices=["default", "highest"], default="default",
                    help="float32 products: JAX's default (TF32 on a GPU) or true float32, as generate() runs a "
                         "float32 model")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--kernels", type=int, default=0, metavar="N",
                    help="also print each configuration's N costliest kernels (ms a step, calls, us a call)")
    ap.add_argument("--gemm-impls", nargs="+", choices=["auto", "xla", "cublas", "pallas", "interpret"],
                    default=None,
                    help="run each row once per GEMM implementation (default: JAXMEDUSA_GEMM or auto only); xla: "
                         "XLA's autotuned pick (Triton or cuBLAS) per GEMM, cublas: Triton GEMMs off")
    ap.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                    help="an XLA debug option to compile every row with, on top of generate()'s (repeatable), e.g. "
                         "xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN")
    ap.add_argument("--gaps", type=int, default=0, metavar="N",
                    help="print each row's N largest waits between kernels (by kernel before -> kernel after)")
    ap.add_argument("--dump", default=None, metavar="DIR",
                    help="also write each configuration's optimized HLO (gzipped) under DIR, to read what a fusion holds")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.batch, args.prompts, args.tree_sizes, args.steps = "smoke", [2], [64], [1, 16], 4

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from e2e import MODELS, device_name, tree_of_size
    from jaxmedusa.models import ModelConfig, create_lm
    from jaxmedusa.cache import KVCache
    from jaxmedusa.generate import decode_loop
    from jaxmedusa.heads import MedusaHeads, quantize_heads
    from jaxmedusa.kernels.dispatch import loop_compiler_options
    from jaxmedusa.medusa import AcceptanceParams, medusa_loop
    from jaxmedusa.tree import build_tree

    if args.model == "default":
        from jaxmedusa.loading import default_model_paths
        from jaxmedusa.atomic import read_json_object
        cfg = ModelConfig.from_hf_dict(read_json_object(os.path.join(default_model_paths()[0], "config.json")))
    else:
        cfg = ModelConfig.from_hf_dict(MODELS[args.model])
    dtype = jnp.dtype(args.dtype or ("float32" if args.smoke else "bfloat16"))
    lm = create_lm(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(lm)
    heads = {}
    for kind in args.heads:
        h = MedusaHeads.for_model(lm, 4, 1, shared_lm_head=kind == "shared", rngs=nnx.Rngs(1))
        heads[kind] = nnx.split(quantize_heads(h) if kind == "own-int8" else h)
    extra_options = dict(parse_option(o) for o in args.xla_option)
    n = args.steps
    key = jax.random.key(0)
    eos = jnp.asarray([-1], jnp.int32)
    params = AcceptanceParams(jnp.float32(1.0), jnp.float32(1.0), jnp.float32(0.09), jnp.float32(0.3))
    rows = []
    result = dict(date=datetime.date.today().isoformat(), device=device_name(), jax=jax.__version__,
                  model=args.model, dtype=str(jnp.dtype(dtype)), steps=n, precision=args.precision,
                  attention=os.environ.get("JAXMEDUSA_ATTENTION", "auto"),
                  gemm=os.environ.get("JAXMEDUSA_GEMM", "auto"), norm=os.environ.get("JAXMEDUSA_NORM", "auto"),
                  xla_options=extra_options)
    out = args.out or os.path.join(HERE, "results", f"verify-breakdown-{result['date']}-"
                                                    f"{result['device'].replace(' ', '_')}.json")
    trace_root = tempfile.mkdtemp(prefix="verify-trace-")
    for b in args.batch:
        max_len = max(args.prompts) + n * 5 + max(args.tree_sizes) + 16
        shape = (cfg.num_layers, b, max_len, cfg.num_kv_heads, cfg.head_dim)
        cache = KVCache(jax.random.normal(key, shape, dtype), jax.random.normal(jax.random.key(1), shape, dtype),
                        jnp.zeros((b,), jnp.int32))
        hidden = jax.random.normal(key, (b, cfg.embed_dim), dtype)
        for p in args.prompts:
            for t in args.tree_sizes:
                for kind, gemm in [(kind, g) for kind in (["-"] if t == 1 else args.heads)
                                   for g in (args.gemm_impls or [None])]:
                    c = cache._replace(lengths=jnp.full((b,), p, jnp.int32))
                    if t == 1:
                        fn, fargs = decode_loop, (state, c, hidden, key, eos, jnp.float32(1.0), jnp.float32(1.0))
                        static = dict(graphdef=graphdef, max_new_tokens=n, greedy=True, use_top_p=False)
                    else:
                        hg, hs = heads[kind]
                        fn, fargs = medusa_loop, (state, hs, c, hidden, key, eos, params)
                        static = dict(graphdef=graphdef, heads_graphdef=hg, tree=build_tree(tree_of_size(t), num_heads=4),
                                      max_new_tokens=n, acceptance="greedy", use_top_p=False)
                    if gemm:
                        jax.clear_caches()  # jit reuses a trace of the same arguments: JAXMEDUSA_GEMM would not apply
                    with jax.default_matmul_precision(args.precision), gemm_impl(gemm):
                        options = loop_compiler_options(tree=t > 1, rows=b * t, quantized_heads=kind == "own-int8")
                        options = {**(options or {}), **extra_options} or None
                        compiled = fn.lower(*fargs, **static).compile(compiler_options=options)
                    hlo = compiled.as_text()
                    scopes = scope_map(hlo)
                    if args.dump:
                        import gzip
                        from jaxmedusa.atomic import atomic_open
                        os.makedirs(args.dump, exist_ok=True)
                        name = f"hlo-b{b}-p{p}-t{t}-{kind}" + (f"-{gemm}" if gemm else "")
                        with atomic_open(os.path.join(args.dump, name + ".txt.gz"), "wb") as f:
                            f.write(gzip.compress(hlo.encode()))

                    def run(cache_in):
                        a = (fargs[0], cache_in) + fargs[2:] if t == 1 else fargs[:2] + (cache_in,) + fargs[3:]
                        out = compiled(*a)
                        jax.block_until_ready(out)
                        steps = int(out[2]) if t == 1 else int(out[2].steps)
                        return out[-1], steps

                    c, steps = run(c)  # warm-up
                    best = float("inf")
                    for _ in range(args.repeats):
                        c = c._replace(lengths=jnp.full((b,), p, jnp.int32))
                        t0 = time.perf_counter()
                        c, steps = run(c)
                        best = min(best, time.perf_counter() - t0)
                    trace_dir = os.path.join(trace_root, f"b{b}-p{p}-t{t}-{kind}-{gemm}")
                    c = c._replace(lengths=jnp.full((b,), p, jnp.int32))
                    jax.profiler.start_trace(trace_dir)
                    c, steps = run(c)
                    jax.profiler.stop_trace()
                    cache = c
                    events, lines = kernel_events(trace_dir)
                    fam = collections.Counter()
                    groups = collections.Counter()  # (family, kernel): XLA reuses one kernel for identical fusions
                    group_calls = collections.Counter()
                    group_op = {}
                    for name, ns, hlo_op, _, _ in events:
                        f = family_of(name, hlo_op, scopes)
                        fam[f] += ns / 1e6 / steps
                        groups[(f, name)] += ns / 1e6 / steps
                        group_calls[(f, name)] += 1 / steps
                        group_op.setdefault((f, name), hlo_op or "")
                    step_ms = best / steps * 1e3
                    busy = sum(fam.values())
                    gap_ms, gaps = gap_table(events, steps, scopes)
                    row = dict(batch=b, prompt=p, tree_nodes=t, heads=kind, gemm=gemm or result["gemm"],
                               step_ms=step_ms, kernel_ms=busy,
                               idle_ms=max(0.0, step_ms - busy), gap_ms=gap_ms, gaps=gaps, families=dict(fam),
                               kernels=[dict(family=f, kernel=k, ms=v, calls=group_calls[(f, k)], hlo_op=group_op[(f, k)])
                                        for (f, k), v in groups.most_common(80)],
                               kernels_per_step=len(events) / steps, trace_lines=sorted(set(lines))[:20],
                               attributed_by_hlo_op=sum(1 for e in events if e[2]) / max(1, len(events)))
                    rows.append(row)
                    save(dict(result, rows=rows), out)  # after every row: a run cut short keeps what it measured
                    print(f"B={b} P={p} T={t} heads={kind} gemm={row['gemm']}: {step_ms:.3f} ms/step, kernels {busy:.3f} ms "
                          f"({row['kernels_per_step']:.0f}/step), idle {row['idle_ms']:.3f} ms (gaps between kernels "
                          f"{gap_ms:.3f} ms)", flush=True)
                    for g in gaps[:args.gaps]:
                        print(f"    gap {g['ms'] * 1e3:7.1f} us/step over {g['count']:5.1f} gaps: "
                              f"{g['before'][:50]} -> {g['after'][:50]}", flush=True)
        del cache
    result["rows"] = rows
    save(result, out)
    print_table(result)
    if args.kernels:
        print_kernels(result, args.kernels)
    print(f"wrote {out}")


def parse_option(text: str) -> tuple[str, object]:
    """NAME=VALUE -> (name, bool | int | str), as XLA's compile options take them."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--xla-option {text!r}: expected NAME=VALUE")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    return name, int(value) if value.lstrip("-").isdigit() else value


@contextlib.contextmanager
def gemm_impl(impl: str | None):
    """JAXMEDUSA_GEMM=impl while the block runs (the dispatcher reads it at trace time); None leaves it be."""
    old = os.environ.get("JAXMEDUSA_GEMM")
    if impl is not None:
        os.environ["JAXMEDUSA_GEMM"] = impl
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("JAXMEDUSA_GEMM", None)
        else:
            os.environ["JAXMEDUSA_GEMM"] = old


def save(result: dict, out: str) -> None:
    from jaxmedusa.atomic import write_json

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(out, result, indent=2)


def print_table(result: dict) -> None:
    """ms per step by family, one column per configuration; the vanilla column first within each group."""
    rows = result["rows"]
    fams = sorted({f for r in rows for f in r["families"]}, key=lambda f: (FAMILIES + ("other",)).index(f)
                  if f in FAMILIES + ("other",) else 99)
    for b in sorted({r["batch"] for r in rows}):
        for p in sorted({r["prompt"] for r in rows if r["batch"] == b}):
            group = [r for r in rows if r["batch"] == b and r["prompt"] == p]
            base = next((r for r in group if r["tree_nodes"] == 1), None)
            heads = [f"T={r['tree_nodes']}{'' if r['heads'] == '-' else '/' + r['heads']}"
                     + (f"/{r['gemm']}" if r.get("gemm", "auto") != "auto" else "") for r in group]
            print(f"\n{result['model']} B={b} prompt={p} ({result['device']}), ms per step")
            print(f"{'family':<22}" + "".join(f"{h:>12}" for h in heads))
            for f in fams:
                print(f"{f:<22}" + "".join(f"{r['families'].get(f, 0.0):>12.3f}" for r in group))
            for label, key in (("kernels (sum)", "kernel_ms"), ("idle", "idle_ms"), ("step", "step_ms")):
                print(f"{label:<22}" + "".join(f"{r[key]:>12.3f}" for r in group))
            if base:
                print(f"{'ratio to vanilla':<22}" + "".join(f"{r['step_ms'] / base['step_ms']:>12.3f}" for r in group))


def print_kernels(result: dict, n: int) -> None:
    """The n costliest kernels of each configuration; the Pallas kernels, compiled once per layer, summed."""
    for r in result["rows"]:
        merged: dict = {}
        for k in r["kernels"]:
            name = short_kernel(k["kernel"]) if k["kernel"].startswith("jaxmedusa_") else k["kernel"]
            ms, calls = merged.get((k["family"], name), (0.0, 0.0))
            merged[(k["family"], name)] = (ms + k["ms"], calls + k["calls"])
        print(f"\nB={r['batch']} P={r['prompt']} T={r['tree_nodes']} heads={r['heads']} gemm={r.get('gemm', 'auto')}: "
              f"{r['step_ms']:.3f} ms/step")
        print(f"{'family':<20}{'kernel':<48}{'ms/step':>9}{'calls':>7}{'us/call':>9}")
        for (fam, name), (ms, calls) in sorted(merged.items(), key=lambda kv: -kv[1][0])[:n]:
            print(f"{fam:<20}{name[:46]:<48}{ms:>9.3f}{calls:>7.1f}{ms * 1e3 / max(calls, 1e-9):>9.2f}")


if __name__ == "__main__":
    main()
