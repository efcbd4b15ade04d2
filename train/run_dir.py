"""An output_dir belongs to one run: a lock while it trains, and a manifest (run.json) of the settings it
was started with, so a second run with other settings cannot silently resume it or overwrite its exports."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from typing import Any, Iterator

from jaxmedusa.atomic import write_json

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
# settings a resumed run may change: extending a run is legitimate, and these only change how it reports
RESUMABLE_CHANGES = ("steps", "progress", "log_every", "checkpoint_every", "keep_checkpoints")
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", RUN_FILE, "train_config.json", "heads", "model")


class RunDirError(ValueError):
    """output_dir is in use by another process, or holds a run with other settings."""


def _normal(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config))


def setting_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every setting that differs, but those a resume may change."""
    old, new = _normal(old), _normal(new)
    keys = sorted((old.keys() | new.keys()) - set(RESUMABLE_CHANGES))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


@contextlib.contextmanager
def claim(output_dir: str, config: dict[str, Any], *, restart: bool = False, inputs: tuple[str, ...] = ()
          ) -> Iterator[None]:
    """Holds output_dir for one run: refuses a second live process, a resume with other settings, and (with
    restart) first removes what an earlier run wrote there (checkpoints, metrics, exports, manifest), but
    never a path that holds one of the run's `inputs`."""
    os.makedirs(output_dir, exist_ok=True)
    lock = open(os.path.join(output_dir, LOCK_FILE), "a")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(f"another process is training in {output_dir} (it holds {LOCK_FILE}); "
                              f"wait for it or use another output_dir") from None
        if restart:
            held = [os.path.realpath(p) for p in inputs if p]
            for name in RUN_OUTPUTS:
                path = os.path.join(output_dir, name)
                real = os.path.realpath(path)
                if any(h == real or h.startswith(real + os.sep) for h in held):
                    continue
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        manifest = os.path.join(output_dir, RUN_FILE)
        if os.path.isfile(manifest):
            try:
                with open(manifest) as f:
                    old = json.load(f)["config"]
            except (OSError, ValueError, KeyError, TypeError):
                raise RunDirError(f"{manifest} is damaged; use --restart or another output_dir") from None
            changes = setting_changes(old, config)
            if changes:
                raise RunDirError(f"{output_dir} holds a run started with other settings ({'; '.join(changes)}); "
                                  f"resume with the same settings (only {', '.join(RESUMABLE_CHANGES)} may change), "
                                  f"or use --restart or another output_dir")
        write_json(manifest, {"config": config})
        yield
    finally:
        lock.close()  # releases the lock
