"""Device mesh, sharding rules and multi-host start-up for training.

Mesh axes ("data", "fsdp", "tensor"): the batch is split over data and fsdp; with tensor > 1 every
parameter (and the optimiser state of the same shape) is first split over "tensor" by the inference
layout (jaxmedusa.sharding: heads, MLP columns, vocabulary), then over "fsdp" along its largest other
dimension that divides evenly, and replicated where none does. The same code runs on one CPU device, a forced multi-device CPU
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
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all), -1 filling the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    tensor = cfg.tensor
    if len(devices) % tensor:
        raise TrainConfigError(f"mesh.tensor={tensor} does not divide the {len(devices)} devices")
    n = len(devices) // tensor
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
        raise TrainConfigError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {data * fsdp * tensor} "
                               f"devices, {len(devices)} are present")
    return Mesh(np.array(devices).reshape(data, fsdp, tensor), BATCH_AXES + ("tensor",))


def param_spec(shape: tuple[int, ...], fsdp: int, tensor_dim: int | None = None) -> P:
    """`tensor_dim` (if any) over "tensor", then the largest other evenly divisible dimension over "fsdp";
    replicated otherwise (and for scalars)."""
    spec: list = [None] * len(shape)
    if tensor_dim is not None:
        spec[tensor_dim] = "tensor"
    if fsdp > 1:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if dim != tensor_dim and shape[dim] % fsdp == 0:
                spec[dim] = "fsdp"
                break
    return P(*spec)


def _names(path) -> tuple:
    """A jax key path as the names nnx state paths use (dict keys and attributes as str, indices as int)."""
    out = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
    while out and out[-1] in ("value", "raw_value"):  # an nnx Variable's own leaf
        out.pop()
    return tuple(out)


def tree_shardings(mesh: Mesh, tree):
    """NamedShardings for every leaf of a pytree of arrays (or ShapeDtypeStructs): the tensor rule by the
    leaf's path (optimiser states mirror the parameters' paths), then the fsdp rule."""
    from jaxmedusa.sharding import TENSOR, param_spec as tensor_spec

    fsdp, tensor = mesh.shape["fsdp"], mesh.shape.get("tensor", 1)

    def one(path, x):
        shape = tuple(x.shape)
        dim = None
        if tensor > 1 and shape:
            names = _names(path)
            spec = tensor_spec(names, shape, tensor) if any(isinstance(n, str) for n in names) else P()
            dim = next((i for i, s in enumerate(spec) if s == TENSOR), None)
        return NamedSharding(mesh, param_spec(shape, fsdp, dim))

    return jax.tree_util.tree_map_with_path(one, tree)


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
