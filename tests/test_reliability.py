"""Bad settings and untrusted files fail with one clear line, before any work (issue #16's first items)."""

import json
import os

import numpy as np
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


# --- conversion and loading: no stale weights, no foreign overwrites, no crafted or damaged file accepted ---

def _logits(model, ids):
    from test_hf_parity import jax_full_logits

    return jax_full_logits(model, np.asarray(ids))


def test_save_over_an_earlier_sharded_save_loads_the_new_model(tmp_path):
    """A single-file save into a directory holding an earlier sharded save must not leave the old index (which
    the loader prefers) or its shards behind; and the reverse."""
    old, new = random_lm(seed=1), random_lm(seed=2)
    out = tmp_path / "m"
    jaxmedusa.save(old, out, max_shard_bytes=30_000)
    assert os.path.isfile(out / "model.safetensors.index.json")
    jaxmedusa.save(new, out)
    assert sorted(os.listdir(out)) == ["config.json", "jaxmedusa_save.json", "model.safetensors"]
    ids = [[3, 9, 27, 4]]
    np.testing.assert_array_equal(_logits(jaxmedusa.load(out, max_len=16), ids), _logits(jaxmedusa.Model(new), ids))
    jaxmedusa.save(old, out, max_shard_bytes=30_000)  # and back: no model.safetensors shadowing the index
    assert not os.path.exists(out / "model.safetensors")
    np.testing.assert_array_equal(_logits(jaxmedusa.load(out, max_len=16), ids), _logits(jaxmedusa.Model(old), ids))


def test_save_never_overwrites_a_model_it_did_not_write(jax_model_dir, tmp_path, capsys):
    src = jax_model_dir(seed=3)
    os.remove(os.path.join(src, "jaxmedusa_save.json"))  # as a directory from elsewhere looks
    before = {n: open(os.path.join(src, n), "rb").read() for n in os.listdir(src)}
    with pytest.raises(jaxmedusa.CheckpointError, match="which jaxmedusa.save did not write"):
        jaxmedusa.save(random_lm(seed=4), src)
    assert main(["convert", "model", src, src]) == 2  # in place
    assert "did not write" in capsys.readouterr().err
    assert {n: open(os.path.join(src, n), "rb").read() for n in os.listdir(src)} == before


def test_convert_model_keeps_generation_config_and_the_heads_tree(jax_model_dir, tmp_path):
    from conftest import random_heads

    src = jax_model_dir(seed=5)
    with open(os.path.join(src, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 7], "bos_token_id": 1}, f)
    heads_dir = tmp_path / "heads"
    tree = [[0], [1], [0, 0]]
    jaxmedusa.save_heads(random_heads(jaxmedusa.load(src, max_len=16).lm, num_heads=2), heads_dir, tree=tree)
    dst, heads_out = tmp_path / "dst", tmp_path / "heads_out"
    assert main(["convert", "model", src, str(dst), "--heads", str(heads_dir), "--heads-out", str(heads_out)]) == 0
    assert jaxmedusa.load(dst, max_len=16).eos_token_ids == (2, 7)
    with open(heads_out / "config.json") as f:
        assert json.load(f)["medusa_choices"] == tree
    assert main(["convert", "heads", str(heads_dir), str(heads_dir)]) == 0  # in place keeps the tree
    with open(heads_dir / "config.json") as f:
        assert json.load(f)["medusa_choices"] == tree


def test_heads_are_never_written_over_a_model_config(jax_model_dir):
    from conftest import random_heads

    src = jax_model_dir(seed=6)
    with pytest.raises(jaxmedusa.CheckpointError, match="not a Medusa heads config"):
        jaxmedusa.save_heads(random_heads(jaxmedusa.load(src, max_len=16).lm), src)
    assert "medusa_num_heads" not in json.load(open(os.path.join(src, "config.json")))


def _rewrite_header(path, edit):
    import struct

    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["model.norm.weight"].update(data_offsets=[-4, h["model.norm.weight"]["data_offsets"][1]]),
     "outside the file"),
    (lambda h: h["model.norm.weight"].update(data_offsets=[0, h["model.norm.weight"]["data_offsets"][1]
                                                              - h["model.norm.weight"]["data_offsets"][0]]),
     "overlaps|gap"),
    (lambda h: h["model.norm.weight"].update(data_offsets=[10**12, 10**12 + 256]), "outside the file"),
    (lambda h: h["model.norm.weight"].update(shape=[32, 64]), "needs"),
    (lambda h: h["model.norm.weight"].update(dtype="F8_E9"), "unsupported dtype"),
])
def test_crafted_safetensors_offsets_are_refused_naming_file_and_tensor(jax_model_dir, edit, message):
    src = jax_model_dir(seed=7)
    _rewrite_header(os.path.join(src, "model.safetensors"), edit)
    with pytest.raises(ValueError, match=message) as e:
        jaxmedusa.load(src, max_len=16)
    assert "model.safetensors: tensor '" in str(e.value)  # the file, and the tensor at fault (or the one it overlaps)


def test_index_shard_outside_the_model_directory_is_refused(tmp_path):
    out = tmp_path / "m"
    jaxmedusa.save(random_lm(seed=8), out, max_shard_bytes=30_000)
    index = json.load(open(out / "model.safetensors.index.json"))
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../elsewhere/model-00001-of-00002.safetensors"
    json.dump(index, open(out / "model.safetensors.index.json", "w"))
    with pytest.raises(jaxmedusa.CheckpointError, match="outside"):
        jaxmedusa.load(out, max_len=16)


def test_config_asking_for_more_than_the_files_hold_fails_at_once(jax_model_dir):
    import time

    src = jax_model_dir(seed=9)
    cfg = json.load(open(os.path.join(src, "config.json")))
    json.dump(dict(cfg, num_hidden_layers=10**8), open(os.path.join(src, "config.json"), "w"))
    t0 = time.perf_counter()
    with pytest.raises(jaxmedusa.ConfigError, match="100000000 layers"):
        jaxmedusa.load(src, max_len=16)
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("key", ["1000000000.0.linear.bias", "3.0.linear.weight"])
def test_crafted_heads_numbering_is_refused_before_sizing(jax_model_dir, tmp_path, key):
    from conftest import random_heads
    from jaxmedusa.safetensors_io import iter_safetensors, save_safetensors

    src = jax_model_dir(seed=10)
    heads_dir = tmp_path / "heads"
    jaxmedusa.save_heads(random_heads(jaxmedusa.load(src, max_len=16).lm, num_heads=2), heads_dir)
    path = heads_dir / "medusa_lm_head.safetensors"
    tensors = {k: np.array(v) for k, v in iter_safetensors(path)}
    tensors[key] = tensors["0.0.linear.bias" if key.endswith("bias") else "0.0.linear.weight"]
    save_safetensors(path, tensors)
    with pytest.raises(jaxmedusa.CheckpointError, match="heads are numbered 0..n-1"):
        jaxmedusa.load(src, heads=heads_dir, max_len=16)


def test_implausible_medusa_num_layers_is_refused(jax_model_dir, tmp_path):
    from conftest import random_heads

    src = jax_model_dir(seed=11)
    heads_dir = tmp_path / "heads"
    jaxmedusa.save_heads(random_heads(jaxmedusa.load(src, max_len=16).lm, shared_lm_head=True), heads_dir)
    cfg = json.load(open(heads_dir / "config.json"))
    json.dump(dict(cfg, medusa_num_layers=10**9), open(heads_dir / "config.json", "w"))
    with pytest.raises(jaxmedusa.CheckpointError, match="1000000000 layers per head"):
        jaxmedusa.load(src, heads=heads_dir, max_len=16)


def test_nan_weights_and_bad_norm_settings_are_refused(jax_model_dir, tmp_path):
    from jaxmedusa.safetensors_io import iter_safetensors, save_safetensors

    src = jax_model_dir(seed=12)
    path = os.path.join(src, "model.safetensors")
    tensors = {k: np.array(v) for k, v in iter_safetensors(path)}
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = np.nan
    save_safetensors(path, tensors)
    with pytest.raises(jaxmedusa.CheckpointError, match=r"layers\.1\.mlp\.down_proj\.kernel holds NaN"):
        jaxmedusa.load(src, max_len=16)
    cfg = json.load(open(os.path.join(src, "config.json")))
    for field, value in (("rms_norm_eps", -1e-6), ("rope_theta", -10000.0), ("rope_theta", float("nan"))):
        bad = dict(cfg, **{field: value})
        bad.pop("rope_parameters", None)
        with pytest.raises(jaxmedusa.ConfigError, match=field):
            jaxmedusa.ModelConfig.from_hf_dict(bad)


def test_writes_are_atomic(tmp_path, monkeypatch):
    """An interrupted write leaves the previous file whole, with no temporary file left behind."""
    from jaxmedusa import safetensors_io
    from jaxmedusa.atomic import atomic_open

    path = tmp_path / "f.bin"
    path.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_open(path, "wb") as f:
            f.write(b"new but only ha")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old contents" and os.listdir(tmp_path) == ["f.bin"]

    out = tmp_path / "m"
    jaxmedusa.save(random_lm(seed=13), out)
    before = (out / "model.safetensors").read_bytes()

    def disk_full(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io.struct, "pack", disk_full)  # fails inside the write
    with pytest.raises(OSError, match="disk full"):
        jaxmedusa.save(random_lm(seed=14), out)
    monkeypatch.undo()
    # the earlier save's entry point went first: the directory now fails loudly rather than loading old weights
    # under the new config (or half a file)
    assert not (out / "model.safetensors").exists()
    with pytest.raises(jaxmedusa.CheckpointError, match="no weights"):
        jaxmedusa.load(out, max_len=16)
    assert not [n for n in os.listdir(out) if ".tmp-" in n or n.startswith(".save-")]
    jaxmedusa.save(random_lm(seed=13), out)  # and the next save into it works
    assert (out / "model.safetensors").read_bytes() == before


class Payload:
    """Any Python object but a tensor: a pickle that would run code on load."""


@pytest.mark.torch
def test_pytorch_files_legacy_loads_garbage_and_pickles_are_one_line(tmp_path, capsys):
    import torch

    from conftest import random_heads

    lm = random_lm(seed=15)
    src = tmp_path / "legacy"
    jaxmedusa.save(lm, src)
    from jaxmedusa.safetensors_io import iter_safetensors

    sd = {k: torch.from_numpy(np.array(v)) for k, v in iter_safetensors(src / "model.safetensors")}
    os.remove(src / "model.safetensors")
    torch.save(sd, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # pre-1.6 format
    ids = [[3, 9, 27]]
    np.testing.assert_array_equal(_logits(jaxmedusa.load(src, max_len=16), ids), _logits(jaxmedusa.Model(lm), ids))

    heads_dir = tmp_path / "heads"
    jaxmedusa.save_heads(random_heads(lm), heads_dir)
    os.remove(heads_dir / "medusa_lm_head.safetensors")

    torch.save({"0.0.linear.weight": Payload()}, heads_dir / "medusa_lm_head.pt")
    assert main(["generate", "--model", str(src), "--heads", str(heads_dir), "--ids", "3,4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "never unpickles" in err and "weights_only" not in err
    (heads_dir / "medusa_lm_head.pt").write_bytes(b"not a checkpoint" * 8)
    assert main(["generate", "--model", str(src), "--heads", str(heads_dir), "--ids", "3,4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable PyTorch checkpoint" in err


def test_json_files_that_are_not_objects_are_one_line(jax_model_dir, capsys):
    src = jax_model_dir(seed=16)
    with open(os.path.join(src, "generation_config.json"), "w") as f:
        json.dump([1, 2], f)
    assert main(["generate", "--model", src, "--ids", "3,4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "generation_config.json holds a JSON list, not an object" in err
