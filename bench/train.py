"""Training-step speed and memory at real model shapes: Medusa-1 heads on a frozen bf16 base, Medusa-2 with
LoRA (and full Medusa-2 where it fits), through the trainer's own step, against one bf16 forward of the base
and against the same Medusa-1 step in PyTorch (transformers + the official Medusa heads and loss), side by side.

    python bench/train.py                               # Llama-2-7B shapes, seq 2048, + PyTorch (subprocess)
    python bench/train.py --model llama2-13b --batch 4 8
    python bench/train.py --smoke                       # tiny shapes, any backend (checks the script)

Ours: `Trainer(cfg, models=models_for(cfg, random base), data=synthetic tokens)` and its jitted, donating step
(`Trainer._step_fn`), so the timed code is the trainer's: sharding, loss chunking, remat, AdamW. Weights are
random at the real shapes (no hub), tokens random with every position in the loss. Each row: best step time
of --steps after a compile, tokens/s, model FLOP/s and MFU against --peak-tflops (bf16 dense; H100/H200 SXM
989), the compiled step's temporary memory and the device's peak so far. "base forward" is one jitted forward
of the frozen base over the same batch (the floor a Medusa-1 step can approach); ratio = step / forward.
Model FLOPs count matmuls once (no remat recompute): base projections 2N per token and causal attention
2 x layers x q_dim x T per token in the forward; backward 2x (1x for a frozen base's input gradient);
heads 3 x K x (layers x 2H^2 + 2HV). PyTorch: the base under no_grad in bf16 with SDPA, the official
ResBlock heads in fp32 under bf16 autocast, the official loss (sum over heads of the shifted cross-entropy),
fused AdamW, torch.compile of the heads and loss when it works (reported), run first in its own process.
Before the rows, training attention (cuDNN on the GPU) and its gradients are checked against XLA's in float32.
Writes bench/results/train-MODEL-DATE-DEVICE.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

MODES = ("medusa1", "medusa2-lora", "medusa2")


def flops_per_token(cfg, mode: str, heads: int, head_layers: int, seq_len: int) -> float:
    """Model FLOPs of one training step per token (see the module docstring)."""
    h, i, layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    proj = 2 * layers * (2 * h * qd + 2 * h * kvd + 3 * h * i)
    attn = 2 * layers * qd * seq_len  # causal: QK^T and PV over T/2 keys on average, 2 FLOPs per MAC
    head = 3 * heads * (head_layers * 2 * h * h + 2 * h * v)
    lm_head = 2 * h * v
    if mode == "medusa1":
        return proj + attn + head
    if mode == "medusa2-lora":  # frozen weights: forward + input gradient; attention forward + backward
        return 2 * proj + 3 * attn + 2 * lm_head + head
    return 3 * (proj + attn + lm_head) + head


def run_torch(args) -> dict:
    """The Medusa-1 step in PyTorch: transformers' model (bf16, SDPA, frozen) + the official heads and loss."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from e2e import hf_config_dict

    d = hf_config_dict(args.model)
    d.pop("architectures")
    cfg = AutoConfig.for_model(d.pop("model_type", "llama"), **d)
    dev = "cuda"
    torch.manual_seed(0)
    with torch.device(dev):
        base = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(torch.bfloat16).eval()
    base.requires_grad_(False)
    h, vocab = cfg.hidden_size, cfg.vocab_size

    class ResBlock(nn.Module):  # Medusa's official head block: x + SiLU(Linear(x)), zero-initialised
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(h, h)
            nn.init.zeros_(self.linear.weight)
            self.act = nn.SiLU()

        def forward(self, x):
            return x + self.act(self.linear(x))

    heads = nn.ModuleList([nn.Sequential(*[ResBlock() for _ in range(args.head_layers)],
                                         nn.Linear(h, vocab, bias=False)) for _ in range(args.heads)]).to(dev)
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-3, fused=True)

    def loss_fn(hidden, labels):  # the official Medusa-1 loss (train_legacy.py compute_loss)
        loss = 0.0
        for k, head in enumerate(heads):
            logits = head(hidden)[:, :-(2 + k)].reshape(-1, vocab)
            loss = loss + nn.functional.cross_entropy(logits.float(), labels[:, 2 + k:].reshape(-1))
        return loss

    compiled = loss_fn
    notes = []
    try:
        compiled = torch.compile(loss_fn)
    except Exception as e:  # noqa: BLE001 (reported, eager is the fallback)
        notes.append(f"torch.compile failed: {str(e).splitlines()[0][:200]}")

    def step(ids, fn):
        with torch.no_grad():
            hidden = base.model(input_ids=ids).last_hidden_state
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(hidden, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    rows = []
    for b in args.batch:
        ids = torch.randint(3, vocab, (b, args.seq_len), device=dev)
        for name, fn in (("compiled", compiled), ("eager", loss_fn)):
            if name == "compiled" and fn is loss_fn:
                continue
            row = dict(batch=b, variant=name)
            try:
                torch.cuda.reset_peak_memory_stats()
                step(ids, fn)
                torch.cuda.synchronize()
                best = float("inf")
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    step(ids, fn)
                    torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - t0)
                row.update(step_ms=best * 1e3, tokens_per_s=b * args.seq_len / best,
                           peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            except torch.OutOfMemoryError as e:
                row["error"] = "out of memory: " + str(e).splitlines()[0][:160]
            except Exception as e:  # noqa: BLE001 (a failed variant is a result; the other still runs)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            torch.cuda.empty_cache()
            rows.append(row)
            print(f"pytorch medusa1 [{name}] B={b}: {row.get('step_ms', float('nan')):.1f} ms/step, "
                  f"{row.get('tokens_per_s', float('nan')):.0f} tok/s{'  ' + row['error'] if 'error' in row else ''}",
                  flush=True)
    return dict(torch=torch.__version__, rows=rows, notes=notes)


def run_torch_subprocess(args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-only", "--model", args.model, "--batch",
           *map(str, args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--heads",
           str(args.heads), "--head-layers", str(args.head_layers)]
    from decode import json_subprocess

    return json_subprocess(cmd, "{")


def train_config(args, mode: str, batch: int, remat: bool):
    from jaxmedusa.train import config_from_dict

    raw = dict(model="(random weights)", data=["(synthetic tokens)"], mode="medusa2" if mode != "medusa1" else mode,
               heads=args.heads, head_layers=args.head_layers, seq_len=args.seq_len, batch_size=batch, steps=1000,
               compute_dtype=args.dtype, loss_chunk=args.loss_chunk, output_dir="/tmp/jaxmedusa-bench-train",
               progress=False, gradient_checkpointing=remat, learning_rate=1e-4)
    if mode == "medusa2-lora":
        raw["lora"] = dict(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
    return config_from_dict(raw)


def check_training_attention() -> list[dict]:
    """training_attention (cuDNN on the GPU) against XLA's attention in float32: outputs and the gradients of
    a random projection of them, for q, k and v, on random inputs (GQA and MHA, odd length)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxmedusa.kernels import training_attention

    out = []
    rng = np.random.default_rng()
    for b, t, h, kvh, dtype in [(2, 1000, 32, 32, jnp.bfloat16), (1, 2046, 32, 8, jnp.bfloat16),
                                (1, 2047, 32, 8, jnp.bfloat16)]:  # odd: padded by one position for cuDNN
        q, k, v, w = (jnp.asarray(rng.standard_normal((b, t, n, 128)), dtype) for n in (h, kvh, kvh, h))

        def loss(fn, q, k, v):
            return jnp.sum(fn(q, k, v).astype(jnp.float32) * w.astype(jnp.float32))

        def reference(q, k, v):
            return jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                                v.astype(jnp.float32), is_causal=True)

        got = jax.jit(jax.value_and_grad(lambda *a: loss(training_attention, *a), argnums=(0, 1, 2)))(q, k, v)
        want = jax.jit(jax.value_and_grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2)))(q, k, v)
        errs = [float(jnp.abs(g.astype(jnp.float32) - r).max() / jnp.abs(r).max())
                for g, r in zip(got[1], want[1])]
        row = dict(batch=b, t=t, heads=h, kv_heads=kvh, dtype=jnp.dtype(dtype).name,
                   loss_rel_err=float(abs(got[0] - want[0]) / abs(want[0])), grad_rel_err=dict(zip("qkv", errs)))
        out.append(row)
        print(f"training attention vs XLA f32 B={b} T={t} H={h} KVH={kvh}: loss {row['loss_rel_err']:.1e}, "
              f"grads q {errs[0]:.1e} k {errs[1]:.1e} v {errs[2]:.1e}", flush=True)
    return out


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from e2e import MODELS
    from jaxmedusa.models import ModelConfig, create_lm
    from jaxmedusa.train.data import TokenizedData

    check = None if args.smoke else check_training_attention()
    mcfg = ModelConfig.from_hf_dict(MODELS[args.model])
    dtype = jnp.dtype(args.dtype)
    base = create_lm(mcfg, dtype=dtype, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    n_rows = max(args.batch) * 2
    data = TokenizedData(tokens=rng.integers(3, mcfg.vocab_size, (n_rows, args.seq_len)).astype(np.int32),
                         mask=np.ones((n_rows, args.seq_len), bool))
    dev = jax.devices()[0]

    def peak_gib():
        stats = dev.memory_stats() or {}
        return stats.get("peak_bytes_in_use", 0) / 2**30

    def best_of(fn):
        jax.block_until_ready(fn())
        best = float("inf")
        for _ in range(args.steps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            best = min(best, time.perf_counter() - t0)
        return best

    rows = []
    graphdef, state = nnx.split(base)

    @jax.jit
    def forward(state, tokens):
        lm = nnx.merge(graphdef, state)
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return jnp.sum(lm(tokens, pos, None, None)[0].astype(jnp.float32))

    fwd_ms = {}
    for b in args.batch:
        tokens = jnp.asarray(data.tokens[:b])
        try:
            fwd_ms[b] = best_of(lambda: forward(state, tokens)) * 1e3
            base_flops = flops_per_token(mcfg, "medusa1", 0, 0, args.seq_len)
            rows.append(dict(mode="base forward", batch=b, step_ms=fwd_ms[b],
                             tokens_per_s=b * args.seq_len / fwd_ms[b] * 1e3,
                             tflops=base_flops * b * args.seq_len / fwd_ms[b] / 1e9))
        except Exception as e:  # noqa: BLE001 (out of memory is a result)
            rows.append(dict(mode="base forward", batch=b, error=str(e).splitlines()[0][:300]))
        print(_fmt(rows[-1], args.peak_tflops), flush=True)

    cases = [(mode, b, remat) for mode in args.modes for b in args.batch
             for remat in ([False] if mode == "medusa1" else [r == "on" for r in args.remat])]
    for mode, b, remat in cases:
        row = dict(mode=mode, batch=b, seq_len=args.seq_len, heads=args.heads, remat=remat)
        try:
            row.update(time_step(train_config(args, mode, b, remat), mode, graphdef, state, data, best_of))
            flops = flops_per_token(mcfg, mode, args.heads, args.head_layers, args.seq_len)
            row.update(tokens_per_s=b * args.seq_len / row["step_ms"] * 1e3,
                       tflops=flops * b * args.seq_len / row["step_ms"] / 1e9, peak_gib=peak_gib())
            if b in fwd_ms:
                row["vs_base_forward"] = row["step_ms"] / fwd_ms[b]
        except Exception as e:  # noqa: BLE001 (out of memory is a result)
            row["error"] = str(e).splitlines()[0][:300]
        rows.append(row)
        print(_fmt(row, args.peak_tflops), flush=True)
    for row in rows:
        if "tflops" in row:
            row["mfu"] = row["tflops"] / args.peak_tflops
    return dict(rows=rows, params=sum(x.size for x in jax.tree_util.tree_leaves(state)), attention_check=check)


def time_step(cfg, mode: str, graphdef, state, data, best_of) -> dict:
    """The trainer's compiled step on a random base (`state`, never donated): best time, compile time,
    the step's temporary memory, and the loss after the timed steps."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxmedusa.train import Trainer
    from jaxmedusa.train.trainer import models_for

    # a trained base is float32 master weights, copied: the step donates them
    cast = (lambda x: jnp.array(x, jnp.float32, copy=True)) if mode == "medusa2" else (lambda x: x)
    trainer = Trainer(cfg, models=models_for(cfg, nnx.merge(graphdef, jax.tree_util.tree_map(cast, state))),
                      data=data)
    tokens, mask = trainer.batch(0)
    t0 = time.perf_counter()
    compiled = trainer._step_fn(True).lower(trainer.state, trainer.frozen, tokens, mask).compile()
    out = dict(compile_s=time.perf_counter() - t0)
    mem = compiled.memory_analysis()
    if mem is not None:
        out["temp_gib"] = mem.temp_size_in_bytes / 2**30

    def one():
        trainer.state, metrics = compiled(trainer.state, trainer.frozen, tokens, mask)
        return metrics["loss"]

    out["step_ms"] = best_of(one) * 1e3
    out["loss"] = float(one())
    out["finite"] = bool(np.isfinite(out["loss"]))
    return out


def _name(row: dict) -> str:
    return f"{row['mode'] + (' remat' if row.get('remat') else ''):>19}"


def _fmt(row: dict, peak: float) -> str:
    if "error" in row:
        return f"{_name(row)} B={row['batch']}: {row['error']}"
    extra = f", {row['vs_base_forward']:.2f}x base fwd" if "vs_base_forward" in row else ""
    mem = f", temp {row['temp_gib']:.1f} GiB, peak {row['peak_gib']:.1f} GiB" if "temp_gib" in row else ""
    return (f"{_name(row)} B={row['batch']}: {row['step_ms']:.1f} ms, {row['tokens_per_s']:.0f} tok/s, "
            f"{row['tflops']:.0f} TFLOP/s (MFU {row['tflops'] / peak:.0%}){extra}{mem}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=["medusa1", "medusa2-lora"])
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=5)
    ap.add_argument("--head-layers", type=int, default=1)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--remat", nargs="+", choices=["on", "off"], default=["on"],
                    help="gradient checkpointing of the base in the medusa2 modes (one row each)")
    ap.add_argument("--loss-chunk", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row (best is reported)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any backend")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.torch_only:
        print(json.dumps(run_torch(args)))
        return
    if args.smoke:
        args.model, args.batch, args.seq_len, args.steps, args.no_torch = "smoke", [2], 64, 2, True
        args.dtype, args.modes = "float32", list(MODES)
    torch_result = None if args.no_torch else run_torch_subprocess(args)  # before JAX holds the GPU
    import jax

    from decode import device_name, write_result

    result = dict(date=datetime.date.today().isoformat(), device=device_name(), jax=jax.__version__,
                  model=args.model, args={k: v for k, v in vars(args).items() if k != "out"},
                  jax_rows=run_jax(args), pytorch=torch_result)
    write_result(result, f"train-{args.model}", args.out)


if __name__ == "__main__":
    main()
