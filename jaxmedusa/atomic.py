"""File I/O helpers. Atomic writes: every file jaxmedusa writes goes to a temporary sibling, is fsynced, then
renamed over the destination, so a reader (or a crash) sees the old file or the new one, never half of one.
JSON reads: a file that is not a JSON object fails with the file named."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import IO, Any, Iterator


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO[Any]]:
    """open() for writing whose result appears at `path` only when the block ends without an exception."""
    path = os.fspath(path)
    if "w" not in mode:
        raise ValueError(f"atomic_open writes a whole new file; mode {mode!r} is not 'w' or 'wb'")
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    f = open(tmp, mode, **kwargs)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """json.dump to `path`, atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in `path`; a ValueError naming the file when it is not valid JSON or not an object."""
    with open(path) as f:
        try:
            obj = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{os.fspath(path)} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{os.fspath(path)} holds a JSON {type(obj).__name__}, not an object")
    return obj
