"""Vanilla greedy decoding throughput of a random Llama-shaped model (any backend).

    python bench/decode.py --layers 4 --hidden 256 --batch 1 4 --prompt 64 --new 128

Prints a table and writes bench/results/decode-<date>-<device>.json. Random weights: decoding speed
does not depend on their values. Compile time is reported apart from run time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxmedusa
from jaxmedusa.atomic import write_json
from jaxmedusa.models import ModelConfig


def device_name() -> str:
    d = jax.devices()[0]
    return d.device_kind if d.platform != "cpu" else f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def write_result(result: dict, name: str, out: str | None = None) -> str:
    """Writes a benchmark's JSON to `out`, or bench/results/NAME-DATE-DEVICE.json; returns the path."""
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                              f"{name}-{result['date']}-{result['device'].replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    write_json(out, result, indent=1)
    print(f"wrote {out}")
    return out


def json_subprocess(cmd: list[str], marker: str) -> dict | list:
    """Runs a benchmark half in its own process (so PyTorch and JAX never share the GPU's memory): echoes its
    output and returns its last line starting with `marker`, parsed as JSON, or {"error": stderr's tail}."""
    import subprocess
    import sys

    proc = subprocess.run(cmd, capture_output=True, text=True)
    print("\n".join(line for line in proc.stdout.splitlines() if not line.startswith(marker)), flush=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(marker)]
    if not lines:
        sys.stderr.write(proc.stderr[-3000:])
        return {"error": proc.stderr[-2000:]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/decode-DATE-DEVICE.json)")
    args = ap.parse_args()

    cfg = ModelConfig.from_hf_dict(dict(
        architectures=["LlamaForCausalLM"], vocab_size=args.vocab, hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 32 * 32, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096))
    model = jaxmedusa.Model(jaxmedusa.LlamaForCausalLM(cfg, dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(0)),
                            max_len=args.prompt + args.new + 16)
    rng = np.random.default_rng(0)
    rows = []
    for b in args.batch:
        prompts = [rng.integers(0, args.vocab, size=args.prompt).tolist() for _ in range(b)]
        runs = [jaxmedusa.generate(model, prompts, max_new_tokens=args.new, eos_token_id=[]).stats
                for _ in range(args.repeats + 1)]
        best = min(runs[1:], key=lambda s: s["decode_seconds"])
        rows.append(dict(batch=b, prompt=args.prompt, new_tokens_per_seq=args.new,
                         decode_tokens_per_s=best["new_tokens"] / best["decode_seconds"],
                         steps_per_s=best["steps"] / best["decode_seconds"],
                         prefill_s=best["prefill_seconds"], compile_s=runs[0]["compile_seconds"]))
    print(f"model: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, "
          f"vocab {args.vocab}, {args.dtype}; device {device_name()}; jax {jax.__version__}")
    print(f"{'batch':>5} {'prompt':>6} {'new':>5} {'tok/s':>10} {'steps/s':>9} {'prefill s':>10} {'compile s':>10}")
    for r in rows:
        print(f"{r['batch']:>5} {r['prompt']:>6} {r['new_tokens_per_seq']:>5} {r['decode_tokens_per_s']:>10.1f} "
              f"{r['steps_per_s']:>9.1f} {r['prefill_s']:>10.4f} {r['compile_s']:>10.2f}")
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"decode-{date}-{device_name().replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    write_json(out, dict(date=date, device=device_name(), jax=jax.__version__, config=vars(args), rows=rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
