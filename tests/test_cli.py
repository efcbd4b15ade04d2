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


def test_generate_with_int8_heads(model_dir, heads_dir, capsys):
    rc = main(["generate", "--model", model_dir, "--heads", heads_dir, "--heads-int8", "--ids", "--max-new-tokens",
               "10", "--max-len", "96", "--compare", "--json", "3,4,5"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["medusa"] and out["tokens"] == out["vanilla"]["tokens"]
    rc = main(["generate", "--model", model_dir, "--heads-int8", "--ids", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "--heads-int8 needs Medusa heads" in err and len(err.strip().splitlines()) == 1


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


def test_vicuna_template_is_fastchats_v1_1(model_dir):
    from jaxmedusa.train.data import VICUNA_SYSTEM, ChatRenderer, Message

    tok = jaxmedusa.load(model_dir, max_len=32).tokenizer
    r = ChatRenderer(tok, "vicuna")
    convo = [Message("user", "hi"), Message("assistant", "hello"), Message("user", "w5")]
    assert r.prompt(convo) == f"<s>{VICUNA_SYSTEM} USER: hi ASSISTANT: hello</s>USER: w5 ASSISTANT:"
    text, spans = r.render(convo[:2])
    assert text[spans[0][0]:spans[0][1]] == " hello</s>"


def test_chat_streams_replies_with_history_reset_and_stats(model_dir, heads_dir):
    import io

    from jaxmedusa.chat import chat, renderer_for
    from jaxmedusa.train.data import Message

    model = jaxmedusa.load(model_dir, heads=heads_dir, max_len=256)
    out, err = io.StringIO(), io.StringIO()
    assert chat(model, lines=["w5 w6", "/stats", "w7 w8", "/reset", "w7 w8", "/quit", "never read"], out=out,
                err=err, max_new_tokens=6) == 0
    replies = out.getvalue().split("\n")[:3]
    renderer = renderer_for(model.tokenizer)

    def expected(messages):
        ids = model.tokenizer(renderer.prompt(messages), add_special_tokens=False)["input_ids"]
        toks = jaxmedusa.generate(model, [ids], max_new_tokens=6, medusa=False).tokens[0]
        return model.tokenizer.decode(toks, skip_special_tokens=True)

    first = expected([Message("user", "w5 w6")])
    assert replies[0] == first
    assert replies[1] == expected([Message("user", "w5 w6"), Message("assistant", first.strip()),
                                   Message("user", "w7 w8")])  # the history is in the prompt
    assert replies[2] == expected([Message("user", "w7 w8")])  # after /reset it is not
    lines = err.getvalue().splitlines()
    assert "accepted tokens/step" in lines[0] and lines[1] == lines[0]  # the status line, then /stats repeats it
    assert "[conversation cleared]" in lines


def test_generate_stream_and_chat_flags(model_dir, heads_dir, capsys):
    from jaxmedusa.chat import renderer_for
    from jaxmedusa.train.data import Message

    base = ["generate", "--model", model_dir, "--heads", heads_dir, "--max-new-tokens", "6", "--max-len", "256"]
    assert main(base + ["w5 w6 w7"]) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--stream", "w5 w6 w7"]) == 0
    streamed = capsys.readouterr()
    assert streamed.out == plain and "tokens/s" in streamed.err
    assert main(base + ["--chat", "w5 w6"]) == 0
    model = jaxmedusa.load(model_dir, max_len=64)
    ids = model.tokenizer(renderer_for(model.tokenizer).prompt([Message("user", "w5 w6")]),
                          add_special_tokens=False)["input_ids"]
    assert capsys.readouterr().out.strip() == jaxmedusa.generate(model, [ids], max_new_tokens=6).texts[0].strip()
    assert main(base + ["--stream", "w5", "w6"]) == 2
    assert "give one prompt" in capsys.readouterr().err
