"""Device mesh (data, fsdp, tensor), logical axis rules and sharding constraints.

The model names every parameter and activation axis logically ("embed", "q_heads", "act_batch",
...); `LOGICAL_RULES` maps those names to mesh axes, so one model file serves every topology
(the MaxText pattern). A logical axis whose size is not divisible by its mesh axes stays
replicated, so tiny test models and odd head counts still run on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
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


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor"); -1 takes the remaining devices.

    Without `devices`, one process without a -1 uses the first data*fsdp*tensor devices; several
    processes must use all of them (a process without a device in the mesh could not take part).
    `tensor` is the fastest-varying axis, so tensor-parallel groups sit on neighbouring devices
    (the same host / NVLink island).
    """
    if devices is None:
        devices = jax.devices()
        size = data * fsdp * tensor
        if -1 not in (data, fsdp, tensor) and size != len(devices) and jax.process_count() > 1:
            raise ValueError(
                f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {size} devices, but the "
                f"{jax.process_count()} processes have {len(devices)}: a multi-process run uses "
                "every device (set one axis to -1)"
            )
        if -1 not in (data, fsdp, tensor) and size > 0:
            devices = devices[:size]
    devices = list(devices)
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
