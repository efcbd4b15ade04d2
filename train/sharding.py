"""Device mesh, sharding rules and multi-host start-up for training.

Mesh axes ("data", "fsdp"): the batch is split over both; every parameter (and the optimiser state of
the same shape) is split over "fsdp" along its largest dimension that divides evenly, and replicated
where none does. The same code runs on one CPU device, a forced multi-device CPU
(XLA_FLAGS=--xla_force_host_platform_device_count=N) and GPU clusters.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import MeshConfig, TrainConfigError

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed() -> bool:
    """Calls jax.distributed.initialize() when a multi-process launch is detected.

    Detected: an explicit coordinator (JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID),
    or a SLURM job step with more than one task (jax reads SLURM's variables itself).
    Returns whether it initialised.
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        try:
            jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                       num_processes=int(env["JAX_NUM_PROCESSES"]),
                                       process_id=int(env["JAX_PROCESS_ID"]))
        except KeyError as e:
            raise TrainConfigError(f"JAX_COORDINATOR_ADDRESS is set but {e.args[0]} is not") from None
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 and env.get("SLURM_STEP_ID") is not None:
        jax.distributed.initialize()
        return True
    return False


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all), -1 filling the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data, fsdp = cfg.data, cfg.fsdp
    if data == -1:
        if n % fsdp:
            raise TrainConfigError(f"mesh.fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    elif fsdp == -1:
        if n % data:
            raise TrainConfigError(f"mesh.data={data} does not divide the {n} devices")
        fsdp = n // data
    if data * fsdp != n:
        raise TrainConfigError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, {n} are present")
    return Mesh(np.array(devices).reshape(data, fsdp), BATCH_AXES)


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest evenly divisible dimension over "fsdp"; replicate otherwise (and for scalars)."""
    if fsdp == 1 or not shape:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            return P(*(("fsdp" if d == dim else None) for d in range(len(shape))))
    return P()


def tree_shardings(mesh: Mesh, tree):
    """NamedShardings for every leaf of a pytree of arrays (or ShapeDtypeStructs), by the fsdp rule."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)), tree)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """The batch dimension over ("data", "fsdp"), the rest replicated."""
    spec = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def global_batch(mesh: Mesh, array: np.ndarray, batch_axis: int = 0) -> jax.Array:
    """Places this process's rows of a global batch (all rows when single-process) as one global array."""
    sharding = batch_sharding(mesh, array.ndim, batch_axis)
    if jax.process_count() == 1:
        return jax.device_put(array, sharding)
    n = array.shape[batch_axis]
    per = n // jax.process_count()
    local = np.take(array, np.arange(jax.process_index() * per, (jax.process_index() + 1) * per), axis=batch_axis)
    return jax.make_array_from_process_local_data(sharding, local, array.shape)


def check_batch(mesh: Mesh, batch_size: int, grad_accum: int) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = batch_size // grad_accum
    if micro % shards:
        raise TrainConfigError(f"batch_size / grad_accum = {micro} rows per micro-batch do not split over the "
                               f"{shards} data x fsdp shards of the mesh")
