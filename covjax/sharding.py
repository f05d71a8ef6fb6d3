"""Device mesh (data, fsdp, tensor), logical axis rules, and multi-host initialisation.

The model names every parameter and activation axis logically ("embed", "q_heads", "act_batch",
...); `LOGICAL_RULES` maps those names to mesh axes, so one model file serves every topology
(the MaxText pattern). A logical axis whose size is not divisible by its mesh axes stays
replicated, so tiny test models and odd head counts still run on any mesh.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (None = replicated). Parameters shard their "embed" dimension over
# fsdp (ZeRO-3 style, gathered per layer) and their head/mlp/vocab dimension over tensor
# (Megatron style); activations shard the batch over data x fsdp and heads/mlp over tensor.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_layers", None),
    ("cache_length", None),
)


def mesh_shape(
    data: int = 1, fsdp: int = -1, tensor: int = 1, num_devices: int | None = None
) -> tuple[int, int, int]:
    """Resolves (data, fsdp, tensor) with at most one -1 ("the rest") against the device count."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    sizes = [data, fsdp, tensor]
    for name, size in zip(MESH_AXES, sizes, strict=True):
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{name}={size!r}: use a positive int or -1 (the rest)")
    rest = [i for i, s in enumerate(sizes) if s == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh data={data}, fsdp={fsdp}, tensor={tensor}: at most one -1 allowed")
    known = math.prod(s for s in sizes if s != -1)
    if rest:
        if num_devices % known:
            raise ValueError(
                f"mesh data={data}, fsdp={fsdp}, tensor={tensor}: {num_devices} devices are not "
                f"divisible by {known}"
            )
        sizes[rest[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
            f"!= {num_devices} devices"
        )
    return tuple(sizes)


def mesh_shape_from_config(mesh_config, num_devices: int | None = None) -> tuple[int, int, int]:
    """(data, fsdp, tensor) from a config section with fields or keys data/fsdp/tensor (-1 = rest).

    Missing fields default to data=1, fsdp=-1, tensor=1.
    """
    defaults = {"data": 1, "fsdp": -1, "tensor": 1}

    def get(name):
        if isinstance(mesh_config, Mapping):
            return mesh_config.get(name, defaults[name])
        return getattr(mesh_config, name, defaults[name])

    return mesh_shape(*(get(n) for n in MESH_AXES), num_devices=num_devices)


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor"); -1 takes the remaining devices.

    `tensor` is the fastest-varying axis, so tensor-parallel groups sit on neighbouring devices
    (the same host / NVLink island).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, num_devices=len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh_axis_sizes: Mapping[str, int] | None = None,
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = LOGICAL_RULES,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    A mesh axis is used at most once (first come), and with `shape` and `mesh_axis_sizes` a
    dimension keeps only the mesh axes whose product divides it.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no rule in covjax.sharding.LOGICAL_RULES")
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept: list[str] = []
        for axis in axes:
            if axis in used:
                continue
            if mesh_axis_sizes is not None:
                if axis not in mesh_axis_sizes:
                    continue
                size = math.prod(mesh_axis_sizes[a] for a in kept) * mesh_axis_sizes[axis]
                if shape is not None and shape[dim] % size:
                    continue
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int]):
    """NamedSharding on `mesh` for an array of `shape` with the given logical axis names."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, dict(mesh.shape)))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Activation sharding constraint under the current mesh (`jax.set_mesh`); no mesh: no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    spec = logical_to_spec(logical_axes, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def _variable_axes(var: nnx.Variable) -> tuple:
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
        return (None,) * var.get_value().ndim
    return tuple(axes)


def model_shardings(model: nnx.Module, mesh: Mesh) -> nnx.State:
    """The NamedSharding of every variable of an nnx model (a State like `nnx.state(model)`)."""
    state = nnx.state(model)
    return jax.tree.map(
        lambda v: logical_sharding(mesh, _variable_axes(v), v.get_value().shape),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Places every variable of `model` on its sharding (in place; also returned)."""
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            value = var.get_value()
            var.set_value(
                jax.device_put(value, logical_sharding(mesh, _variable_axes(var), value.shape))
            )
    return model


def data_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, ...] batch: the batch over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins JAX's multi-controller runtime when the run spans several processes.

    Explicit arguments win; otherwise JAX's own cluster detection (Cloud TPU VMs, SLURM, Open MPI,
    Kubernetes) is used when the environment shows a multi-process launch, and always on a Cloud
    TPU VM (its worker list is in the metadata server, not necessarily in the environment of an
    ssh session). Otherwise a single process is a no-op. Must run before any JAX computation.
    Returns True when `jax.distributed.initialize` ran.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(a is not None for a in explicit):
        if num_processes is not None and num_processes < 1:
            raise ValueError(f"num_processes={num_processes} must be >= 1")
        if num_processes == 1:
            return False
        if coordinator_address is None or num_processes is None or process_id is None:
            raise ValueError(
                "initialize_distributed needs coordinator_address, num_processes and process_id "
                f"together; got {coordinator_address=}, {num_processes=}, {process_id=}"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} not in [0, num_processes={num_processes})")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if not _multi_process_environment():
        return False
    jax.distributed.initialize()
    return True


def _multi_process_environment() -> bool:
    """True when the environment shows a multi-process launch JAX can auto-detect."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    if "JAX_COORDINATOR_ADDRESS" in env:
        return True
    # GKE TPU pods list their workers in the environment.
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return True
    # A Cloud TPU VM reached by ssh (gcloud ... ssh --worker=all) need not have those variables:
    # JAX's own detection asks the VM's metadata server for the worker list (one worker: a
    # single-process run, which is harmless to initialise).
    return on_cloud_tpu_vm()


def on_cloud_tpu_vm() -> bool:
    """Whether this is a Cloud TPU VM whose TPUs JAX will use: JAX found TPU chips and libtpu
    (its own check, made at `import jax`, which also gates its metadata-server cluster
    detection) and jax_platforms, if set, includes tpu (JAX_PLATFORMS=cpu: a CPU run, e.g. the
    tests, on a TPU VM)."""
    platforms = jax.config.jax_platforms
    if platforms and "tpu" not in platforms.split(","):
        return False
    try:
        from jax._src import cloud_tpu_init
    except ImportError:  # a JAX without that module: no Cloud TPU support to detect
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


# ---------------------------------------------------------------------------------------------
# Host-side helpers of a multi-process run (each process holds a part of every global array)
# ---------------------------------------------------------------------------------------------


def host_gather(tree):
    """The whole value of every jax.Array of `tree`, as numpy on every process (collective in a
    multi-process run: every process must call it with arrays of the same global shapes)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def host_concat(x: np.ndarray) -> np.ndarray:
    """Every process's `x` (same shape on all), concatenated along axis 0 in process order
    (a single process: `x` itself)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on at least one (collective)."""
    return bool(host_concat(np.array([flag], bool)).any())


def process_rows(num_rows: int) -> np.ndarray:
    """The rows of [0, num_rows) this process works on: contiguous, ceil(num_rows / processes)
    per process in process order (the last ones get fewer, possibly none)."""
    per = -(-num_rows // jax.process_count())
    start = jax.process_index() * per
    return np.arange(start, min(start + per, num_rows))
