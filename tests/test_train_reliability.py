"""Training runs never continue on bad state or lose work (issue #16): non-finite settings and losses, one run
per output_dir (lock and settings manifest), damaged checkpoints, exports that would overwrite inputs,
metrics after a resume."""

import fcntl
import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxmedusa.train import TrainConfigError, Trainer, config_from_dict
from jaxmedusa.train.checkpointing import CheckpointDamaged
from jaxmedusa.train.run_dir import RunDirError
from jaxmedusa.train.trainer import NonFiniteLoss

from test_train import flat, make_cfg, run_dir  # noqa: F401  (run_dir is a fixture)


@pytest.mark.parametrize("key, value", [("learning_rate", float("inf")), ("head_decay", float("nan")),
                                        ("weight_decay", float("nan")), ("head_coefficient", float("inf"))])
def test_non_finite_settings_are_refused(run_dir, tmp_path, key, value):  # noqa: F811
    with pytest.raises(TrainConfigError, match=f"{key}: must be a finite number"):
        make_cfg(run_dir, str(tmp_path / "x"), **{key: value})


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(run_dir, tmp_path):  # noqa: F811
    cfg = make_cfg(run_dir, str(tmp_path / "nan"), steps=6, checkpoint_every=2, log_every=3)
    trainer = Trainer(cfg)
    real = trainer._step_fn

    def poisoned(joint):
        step = real(joint)

        def run(state, frozen, tokens, mask):
            state, metrics = step(state, frozen, tokens, mask)
            if int(state["step"]) == 3:  # one bad step between the checkpoints of steps 2 and 4
                metrics = dict(metrics, loss=metrics["loss"] * np.nan)
            return state, metrics
        return run

    trainer._step_fn = poisoned
    with pytest.raises(NonFiniteLoss, match="by step 3.*checkpoint of step 2"):
        trainer.run()
    assert trainer.checkpointer.latest_step() == 2
    assert not os.path.exists(os.path.join(cfg.output_dir, "heads"))  # nothing exported


def test_one_run_per_output_dir(run_dir, tmp_path):  # noqa: F811
    out = str(tmp_path / "run")
    first = Trainer(make_cfg(run_dir, out, steps=2)).run()
    # other hyperparameters: refused, naming them
    with pytest.raises(RunDirError, match=r"learning_rate: 0\.01 -> 0\.02.*seq_len: 32 -> 16"):
        Trainer(make_cfg(run_dir, out, steps=2, learning_rate=0.02, seq_len=16)).run()
    # fewer steps than the checkpoint it holds: refused rather than exporting the longer run's params
    with pytest.raises(TrainConfigError, match="checkpoint at step 2, past steps=1"):
        Trainer(make_cfg(run_dir, out, steps=1)).run()
    # more steps: a legitimate extension, resumed from step 2
    longer = Trainer(make_cfg(run_dir, out, steps=4)).run()
    assert longer.step == 4 and [r["step"] for r in longer.history] == [3, 4]
    # a second live process: refused while the first holds the lock
    with open(os.path.join(out, "run.lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunDirError, match="another process is training"):
            Trainer(make_cfg(run_dir, out, steps=4)).run()
    # --restart: starts over with the new settings (the first run's outputs removed, the inputs kept)
    fresh = Trainer(make_cfg(run_dir, out, steps=2, learning_rate=0.02), restart=True).run()
    assert fresh.step == 2 and [r["step"] for r in fresh.history] == [1, 2]
    assert not all(np.array_equal(a, b) for a, b in zip(flat(first.params), flat(fresh.params)))
    assert os.path.isfile(os.path.join(run_dir, "model", "config.json"))


def test_export_never_overwrites_the_runs_own_input_model(run_dir, tmp_path):  # noqa: F811
    out = tmp_path / "m2"
    shutil.copytree(os.path.join(run_dir, "model"), out / "model")
    with pytest.raises(TrainConfigError, match="where this run exports its trained model"):
        Trainer(make_cfg(run_dir, str(out), mode="medusa2", model=str(out / "model")))


def test_metrics_have_no_duplicate_rows_after_a_resume(run_dir, tmp_path):  # noqa: F811
    cfg = make_cfg(run_dir, str(tmp_path / "m"), steps=5)
    Trainer(cfg).run(until=3)  # logs steps 1-3; the checkpoint of step 2 survives the "kill"
    with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # killed in the middle of appending a row
    Trainer(cfg).run()
    rows = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def _checkpoint_files(out: str, step: int) -> list[str]:
    root = os.path.join(out, "checkpoints", str(step))
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)


@pytest.fixture(scope="module")
def two_checkpoints(run_dir, tmp_path_factory):  # noqa: F811
    """A run with checkpoints at steps 2 and 4, and the exact states it saved there."""
    out = str(tmp_path_factory.mktemp("ck") / "run")
    cfg = make_cfg(run_dir, out, steps=4, checkpoint_every=2, keep_checkpoints=3)
    trainer = Trainer(cfg)
    trainer.run(until=2)
    at2 = flat(trainer.state)
    trainer.run()
    at4 = flat(trainer.state)
    pristine = out + "-pristine"
    shutil.copytree(out, pristine)
    return cfg, pristine, {2: at2, 4: at4}


def _restored(cfg):
    trainer = Trainer(config_from_dict(dict(cfg.to_dict(), steps=6)))
    assert trainer.restore()
    return trainer


def _reset(cfg, pristine):
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    shutil.copytree(pristine, cfg.output_dir)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(two_checkpoints):
    cfg, pristine, states = two_checkpoints
    _reset(cfg, pristine)
    data = max(_checkpoint_files(cfg.output_dir, 4), key=os.path.getsize)  # the largest file: tensor data
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) // 2)
        f.write(bytes(64))  # 64 zeroed bytes, as in the audit
    trainer = _restored(cfg)
    assert trainer.step == 2 and trainer.checkpointer.skipped and "step 4" in trainer.checkpointer.skipped[0]
    for a, b in zip(states[2], flat(trainer.state)):
        np.testing.assert_array_equal(a, b)
    for step in (2, 4):  # truncate both: a clear error, not a traceback from inside Orbax
        path = max(_checkpoint_files(cfg.output_dir, step), key=os.path.getsize)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    with pytest.raises(CheckpointDamaged, match="no intact checkpoint"):
        _restored(cfg)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_single_corrupted_byte_restores_exactly_falls_back_or_fails_clearly(two_checkpoints, data):
    cfg, pristine, states = two_checkpoints
    _reset(cfg, pristine)
    files = _checkpoint_files(cfg.output_dir, 4)
    path = data.draw(st.sampled_from(files), label="file")
    size = os.path.getsize(path)
    if size == 0:
        return
    offset = data.draw(st.integers(0, size - 1), label="offset")
    flip = data.draw(st.integers(1, 255), label="xor")
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ flip]))
    try:
        trainer = _restored(cfg)
    except CheckpointDamaged:
        return  # a clear refusal
    assert trainer.step in (2, 4)
    for a, b in zip(states[trainer.step], flat(trainer.state)):
        np.testing.assert_array_equal(a, b)


def _chat_file(path, convs):
    with open(path, "w") as f:
        for turns in convs:
            f.write(json.dumps({"conversations": [{"from": r, "value": v} for r, v in turns]}) + "\n")


def test_distill_names_and_skips_or_truncates_what_does_not_fit(run_dir, tmp_path, capsys):  # noqa: F811
    from jaxmedusa.cli import main
    from jaxmedusa.train import load_conversations

    long = " ".join(f"w{3 + i % 20}" for i in range(150))
    data = tmp_path / "chat.jsonl"
    _chat_file(data, [[("human", "w3 w4 w5"), ("gpt", "w50")],
                      [("human", "w6 w7"), ("gpt", "w51"), ("human", long), ("gpt", "w52")],
                      [("human", long), ("gpt", "w53")],
                      [("human", "w8 w9"), ("gpt", "w54")]])
    out = tmp_path / "out.jsonl"
    base = ["distill", "--model", f"{run_dir}/model", "--data", str(data), "--out", str(out), "--max-new-tokens", "4",
            "--max-len", "128", "--batch-size", "2"]
    assert main(base) == 0
    err = capsys.readouterr().err
    assert f"{data}, conversation 2: left out" in err and f"{data}, conversation 3: left out" in err
    assert [c[0].content for c in load_conversations(str(out))] == ["w3 w4 w5", "w8 w9"]
    assert main(base + ["--too-long", "truncate"]) == 0
    err = capsys.readouterr().err
    assert f"{data}, conversation 2: truncated" in err and f"{data}, conversation 3: left out" in err
    got = load_conversations(str(out))
    assert [len(c) for c in got] == [2, 2, 2] and got[1][0].content == "w6 w7"


def test_distill_resumes_a_stopped_run_and_refuses_other_settings(run_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    """A run stopped in its second batch keeps the first batch's conversations in OUT.partial; the same command
    again generates only the rest and writes what an uninterrupted run writes; other settings are refused by
    name; --restart starts over."""
    from jaxmedusa.cli import main
    from jaxmedusa.train import distill as distill_module

    data = tmp_path / "chat.jsonl"
    long = " ".join(f"w{3 + i % 20}" for i in range(150))
    _chat_file(data, [[("human", f"w{3 + i} w{4 + i}"), ("gpt", "w50")] for i in range(4)]
               + [[("human", long), ("gpt", "w53")], [("human", "w9 w3"), ("gpt", "w51")]])
    real, calls = distill_module.generate, []

    def counted(*a, **k):
        calls.append(len(a[1]))
        if len(calls) == 2 and interrupt:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(distill_module, "generate", counted)
    args = ["distill", "--model", f"{run_dir}/model", "--data", str(data), "--max-new-tokens", "4", "--max-len", "128",
            "--batch-size", "2"]
    interrupt = False
    assert main(args + ["--out", str(tmp_path / "straight.jsonl")]) == 0
    straight = (tmp_path / "straight.jsonl").read_text()
    assert not os.path.exists(tmp_path / "straight.jsonl.partial")

    calls.clear()
    interrupt = True
    out = tmp_path / "out.jsonl"
    assert main(args + ["--out", str(out)]) == 2
    assert "2 finished conversations are kept in" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "out.jsonl.partial").exists()
    with open(tmp_path / "out.jsonl.partial", "a") as f:
        f.write('{"index": 3, "mess')  # a line torn by a kill mid-append counts for nothing

    assert main(args + ["--out", str(out), "--seed", "1"]) == 2
    assert "started with other settings (seed: 0 -> 1)" in capsys.readouterr().err

    calls.clear()
    interrupt = False
    assert main(args + ["--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "2 conversations finished, 0 left out, 4 to go" in err
    assert sum(calls) == 3  # conversations 3, 4 and 6 (5 does not fit and is named again)
    assert out.read_text() == straight and not (tmp_path / "out.jsonl.partial").exists()

    calls.clear()
    assert main(args + ["--out", str(out), "--restart"]) == 0 and sum(calls) == 5
