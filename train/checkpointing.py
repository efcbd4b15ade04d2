"""Orbax checkpoints of the training state (params, optimiser state, step, RNG) plus the data position.

The state is stored as a flat mapping of its leaves (`00000`, `00001`, ...) with the leaves' key paths
kept in the JSON metadata: restoring rebuilds the live state's exact pytree (nnx.State, optax states)
from the same code, and a checkpoint written for another model or mode is refused with the first path
that differs rather than restored into the wrong slots.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
    """A checkpoint that does not belong to this run's state."""


def _paths(tree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _flat(tree) -> dict[str, Any]:
    return {f"{i:05d}": x for i, x in enumerate(jax.tree_util.tree_leaves(tree))}


class Checkpointer:
    """Keeps the newest `keep` checkpoints in `directory`; saving is asynchronous (wait() to finish)."""

    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True))

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        meta = dict(meta, paths=_paths(state))
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_flat(state)),
                                                        meta=ocp.args.JsonSave(meta)))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, like, shardings) -> tuple[Any, dict[str, Any]] | None:
        """(state shaped and sharded like `like`, metadata) from the newest checkpoint, or None if none."""
        step = self.manager.latest_step()
        if step is None:
            return None
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
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
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves), meta

    def wait(self) -> None:
        self.manager.wait_until_finished()
