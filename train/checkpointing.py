"""Orbax checkpoints of the training state (params, optimiser state, step, RNG) plus the data position.

The state is stored as a flat mapping of its leaves (`00000`, `00001`, ...) with the leaves' key paths
kept in the JSON metadata: restoring rebuilds the live state's exact pytree (nnx.State, optax states)
from the same code, and a checkpoint written for another model or mode is refused with the first path
that differs rather than restored into the wrong slots.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
    """A checkpoint that does not belong to this run's state."""


def _paths(tree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _flat(tree) -> dict[str, Any]:
    return {f"{i:05d}": x for i, x in enumerate(jax.tree_util.tree_leaves(tree))}


class CheckpointDamaged(RuntimeError):
    """No checkpoint in the directory restores intact."""


@jax.jit
def _fingerprints(leaves):
    """One uint32 per leaf: sum_i word_i * w_i (mod 2^32) over the leaf's 32-bit (or narrower) words, with odd
    weights w_i, so any change confined to one word always changes the sum."""
    out = []
    for x in leaves:
        x = jnp.asarray(x)
        if x.dtype == jnp.bool_:
            w = x.astype(jnp.uint32)
        elif x.dtype.itemsize >= 4:
            w = jax.lax.bitcast_convert_type(x, jnp.uint32)
        else:
            w = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
        w = w.reshape(-1)
        weights = jnp.arange(w.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
        out.append(jnp.sum(w * weights, dtype=jnp.uint32))
    return out


def fingerprint(tree) -> list[int]:
    return [int(v) for v in jax.device_get(_fingerprints(jax.tree_util.tree_leaves(tree)))]


def _digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class Checkpointer:
    """Keeps the newest `keep` checkpoints in `directory`; saving is asynchronous (wait() to finish).

    Each checkpoint's metadata carries a fingerprint of every state leaf and a digest of itself; restore
    verifies both and falls back to the newest checkpoint that is intact, so a damaged file never trains on.
    """

    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True))
        self.skipped: list[str] = []  # damaged checkpoints passed over by the last restore

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        meta = dict(meta, paths=_paths(state), fingerprint=fingerprint(state))
        meta["digest"] = _digest(meta)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_flat(state)),
                                                        meta=ocp.args.JsonSave(meta)))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, like, shardings) -> tuple[Any, dict[str, Any]] | None:
        """(state shaped and sharded like `like`, metadata) from the newest intact checkpoint, or None if there
        is none. Damaged ones are skipped (named in self.skipped); if every one is damaged, CheckpointDamaged."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        self.skipped = []
        for step in steps:
            try:
                return self._restore(step, like, shardings)
            except CheckpointMismatch:
                raise
            except Exception as e:  # unreadable, truncated or altered: any failure means this one is damaged
                self.skipped.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        if steps:
            raise CheckpointDamaged(f"no intact checkpoint in {self.directory} ({'; '.join(self.skipped)}); "
                                    f"use --restart or another output_dir")
        return None

    def _restore(self, step: int, like, shardings):
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if "digest" in meta and meta["digest"] != _digest(meta):
            raise ValueError("its metadata does not match its digest")
        want = _paths(like)
        have = meta.get("paths", [])
        if have != want:
            diff = next((f"{a} vs {b}" for a, b in zip(have, want) if a != b),
                        f"{len(have)} leaves vs {len(want)}")
            raise CheckpointMismatch(f"checkpoint {step} in {self.directory} was written for a different model or "
                                     f"mode (first difference: {diff}); use another output_dir")
        abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                          like, shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_flat(abstract))))["state"]
        leaves = [restored[f"{i:05d}"] for i in range(len(want))]
        state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)
        if "fingerprint" in meta:
            got = fingerprint(state)
            bad = next((i for i, (a, b) in enumerate(zip(got, meta["fingerprint"])) if a != b), None)
            if bad is not None or len(got) != len(meta["fingerprint"]):
                raise ValueError(f"leaf {want[bad] if bad is not None else '?'} does not match its fingerprint")
        return state, meta

    def wait(self) -> None:
        self.manager.wait_until_finished()
