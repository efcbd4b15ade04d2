"""The `jaxmedusa` CLI end to end on a tiny saved model with a tokenizer (no torch, no hub)."""

import json
import os
import subprocess
import sys

import pytest

import jaxmedusa
from jaxmedusa.cli import main


def save_word_tokenizer(path: str, vocab_size: int = 97) -> None:
    """A whitespace word-level tokenizer ('<unk>', '<s>', '</s>', w3 ... wN) that AutoTokenizer loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


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
