"""Bad settings and untrusted files fail with one clear line, before any work (issue #16's first items)."""

import json
import os

import pytest

import jaxmedusa
from jaxmedusa.cli import main
from jaxmedusa.loading import load_tokenizer

from conftest import random_lm, save_word_tokenizer


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(posterior_threshold=float("nan")), "posterior_threshold"),
    (dict(posterior_alpha=float("inf")), "posterior_alpha"), (dict(seed=2**64), "seed"), (dict(seed=-1), "seed"),
])
def test_generate_refuses_non_finite_settings(kwargs, field):
    model = jaxmedusa.Model(random_lm(seed=3), max_len=64)
    with pytest.raises(ValueError, match=field):
        jaxmedusa.generate(model, [[5, 6]], max_new_tokens=2, **kwargs)


def test_cli_bad_settings_are_one_line_exit_2(jax_model_dir, capsys):
    path = jax_model_dir(seed=4)
    for extra in (["--seed", str(2**70)], ["--temperature", "nan"]):
        assert main(["generate", "--model", path, "--ids", *extra, "5,6"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("jaxmedusa: error:"), err


def test_cli_ctrl_c_is_one_line_exit_2(jax_model_dir, capsys, monkeypatch):
    path = jax_model_dir(seed=4)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jaxmedusa, "generate", interrupted)
    assert main(["generate", "--model", path, "--ids", "5,6"]) == 2
    assert capsys.readouterr().err.strip() == "jaxmedusa: interrupted"


def test_tokenizer_code_in_a_model_directory_never_runs(tmp_path, monkeypatch):
    monkeypatch.setattr("builtins.input", lambda *a, **k: "y")  # a user who answers yes to any prompt
    path = str(tmp_path / "tok")
    save_word_tokenizer(path)
    marker = tmp_path / "ran"
    with open(os.path.join(path, "evil_tokenizer.py"), "w") as f:
        f.write(f"open({str(marker)!r}, 'w').write('x')\n"
                "from transformers import PreTrainedTokenizerFast\n"
                "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    cfg_path = os.path.join(path, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    cfg["tokenizer_class"] = "EvilTokenizer"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    try:
        load_tokenizer(path)
    except Exception:  # refusing is fine; running the file is not
        pass
    assert not marker.exists()
