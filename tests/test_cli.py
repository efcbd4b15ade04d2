"""The `jaxmedusa` CLI end to end on a tiny saved model with a tokenizer (no torch, no hub)."""

import json
import os
import subprocess
import sys

import pytest

import jaxmedusa
from jaxmedusa.cli import main

from conftest import save_word_tokenizer


@pytest.fixture
def model_dir(jax_model_dir):
    path = jax_model_dir(seed=21)
    save_word_tokenizer(path)
    return path


def test_generate_text_prompt_through_tokenizer(model_dir, capsys):
    model = jaxmedusa.load(model_dir, max_len=64)
    assert model.tokenizer is not None
    expected = jaxmedusa.generate(model, "w5 w6 w7", max_new_tokens=6, eos_token_id=[])
    assert expected.texts[0] == model.tokenizer.decode(expected.tokens[0], skip_special_tokens=True)

    rc = main(["generate", "--model", model_dir, "--max-new-tokens", "6", "--max-len", "64", "--json", "w5 w6 w7"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["new_tokens"] == len(out["tokens"][0])
    n = len(out["tokens"][0])
    assert out["tokens"][0] == expected.tokens[0][:n]  # the CLI honours the model's EOS (2), which may stop early
    assert out["texts"] == [model.tokenizer.decode(out["tokens"][0], skip_special_tokens=True)]


def test_generate_ids_plain_output(model_dir, capsys):
    rc = main(["generate", "--model", model_dir, "--ids", "--max-new-tokens", "4", "--max-len", "32", "3,4,5", "9"])
    assert rc == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2
    model = jaxmedusa.load(model_dir, max_len=32)
    expected = jaxmedusa.generate(model, [[3, 4, 5], [9]], max_new_tokens=4).texts
    assert lines == expected
    assert "tokens/s" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/nonexistent/dir", "x"], "model directory '/nonexistent/dir' does not exist"),
    (["generate", "--ids", "--model", "{model}", "1,b"], "not a comma-separated list of integers"),
    (["generate", "--model", "{model}", "--max-len", "8", "--max-new-tokens", "20", "w3"], "needs"),
    (["generate", "--model", "{model}", "--top-p", "0", "w3"], "top_p must be in"),
])
def test_bad_input_is_one_line_exit_2(model_dir, capsys, argv, message):
    rc = main([a.replace("{model}", model_dir) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("jaxmedusa: error:") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_console_script_runs(model_dir):
    exe = os.path.join(os.path.dirname(sys.executable), "jaxmedusa")
    proc = subprocess.run([exe, "generate", "--model", model_dir, "--ids", "--max-new-tokens", "3", "--max-len", "32",
                           "--json", "3,4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["tokens"][0]) <= 3


@pytest.fixture
def heads_dir(model_dir, tmp_path):
    from conftest import random_heads

    model = jaxmedusa.load(model_dir, max_len=32)
    path = str(tmp_path / "heads")
    jaxmedusa.save_heads(random_heads(model.lm, 3, 1, seed=22), path, base_model=model_dir)
    return path


def test_generate_with_heads_compare(model_dir, heads_dir, capsys):
    rc = main(["generate", "--model", model_dir, "--heads", heads_dir, "--tree", "chain-3", "--ids",
               "--max-new-tokens", "12", "--max-len", "64", "--compare", "--json", "3,4,5"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["medusa"] and not out["vanilla"]["stats"]["medusa"]
    assert out["tokens"] == out["vanilla"]["tokens"]  # greedy Medusa == vanilla greedy
    assert out["stats"]["tree_nodes"] == 4 and out["stats"]["mean_accepted_tokens_per_step"] >= 1.0

    rc = main(["generate", "--model", model_dir, "--heads", heads_dir, "--ids", "--max-new-tokens", "12",
               "--max-len", "96", "--compare", "3,4,5"])
    err = capsys.readouterr().err
    assert rc == 0 and "speedup" in err and "identical tokens" in err


def test_cli_tree_and_compare_errors(model_dir, heads_dir, capsys):
    rc = main(["generate", "--model", model_dir, "--heads", heads_dir, "--tree", "[[0],[0,0],[0,0,0],[0,0,0,0]]",
               "--ids", "3"])
    assert rc == 2 and "unknown tree" in capsys.readouterr().err
    rc = main(["generate", "--model", model_dir, "--heads", heads_dir, "--tree", "chain-4", "--ids", "3"])
    assert rc == 2 and "depth 4 but the model has 3 Medusa heads" in capsys.readouterr().err
    rc = main(["generate", "--model", model_dir, "--compare", "--ids", "3"])
    assert rc == 2 and "--compare needs Medusa heads" in capsys.readouterr().err


def test_convert_heads_and_model(model_dir, heads_dir, tmp_path, capsys):
    import numpy as np
    from jaxmedusa.safetensors_io import iter_safetensors

    out = str(tmp_path / "heads2")
    assert main(["convert", "heads", heads_dir, out, "--dtype", "bfloat16"]) == 0
    a = dict(iter_safetensors(os.path.join(heads_dir, "medusa_lm_head.safetensors")))
    b = dict(iter_safetensors(os.path.join(out, "medusa_lm_head.safetensors")))
    assert sorted(a) == sorted(b) and all(str(v.dtype) == "bfloat16" for v in b.values())
    np.testing.assert_allclose(np.asarray(b["0.0.linear.weight"], np.float32), a["0.0.linear.weight"], rtol=1e-2)

    assert main(["convert", "model", model_dir, str(tmp_path / "m2"), "--heads", heads_dir,
                 "--heads-out", str(tmp_path / "h3")]) == 0
    m = jaxmedusa.load(str(tmp_path / "m2"), heads=str(tmp_path / "h3"), max_len=128)
    orig = jaxmedusa.load(model_dir, heads=heads_dir, max_len=128)
    assert m.heads.num_heads == 3
    assert jaxmedusa.generate(m, [3, 4], max_new_tokens=6).tokens == \
        jaxmedusa.generate(orig, [3, 4], max_new_tokens=6).tokens


def test_cache_size_defaults():
    from jaxmedusa.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["generate", "x"]).max_len is None  # generate sizes the cache to the request
    assert parser.parse_args(["distill", "--model", "m", "--data", "d", "--out", "o"]).max_len == 2048
