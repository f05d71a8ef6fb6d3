"""covjax.sharding on 8 fake CPU devices: mesh shapes, logical rules, placement, multi-host init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import TINY_SHAPE
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from covjax import multihost
from covjax.model import ModelConfig, Transformer
from covjax.multihost import initialize_distributed
from covjax.sharding import (
    constrain,
    data_sharding,
    logical_to_spec,
    make_mesh,
    mesh_shape,
    shard_model,
)

TINY = ModelConfig(architecture="qwen2", vocab_size=256, attention_bias=True, **TINY_SHAPE)


@pytest.mark.parametrize(
    "sizes, expected",
    [
        ((1, -1, 1), (1, 8, 1)),
        ((2, -1, 2), (2, 2, 2)),
        ((-1, 1, 1), (8, 1, 1)),
        ((1, 4, 2), (1, 4, 2)),
    ],
)
def test_mesh_shape_fills_the_rest(sizes, expected):
    assert mesh_shape(*sizes, num_devices=8) == expected


@pytest.mark.parametrize(
    "sizes, message",
    [
        ((3, -1, 1), "8 devices are not divisible by 3"),
        ((2, 2, 3), r"data=2 x fsdp=2 x tensor=3 = 12 != 8 devices"),
        ((-1, -1, 1), "at most one -1"),
        ((0, -1, 1), "mesh.data=0"),
    ],
)
def test_bad_mesh_shapes_name_the_numbers(sizes, message):
    with pytest.raises(ValueError, match=message):
        mesh_shape(*sizes, num_devices=8)


def test_make_mesh():
    assert jax.device_count() == 8
    mesh = make_mesh(data=2, fsdp=-1, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(fsdp=-1, devices=jax.devices()[:4]).shape)["fsdp"] == 4


def test_logical_rules():
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    assert logical_to_spec(("embed", "q_heads", "head_dim"), (64, 4, 16), sizes) == P(
        "fsdp", "tensor", None
    )
    # 3 heads do not split over tensor=2: that dimension stays replicated
    assert logical_to_spec(("embed", "q_heads", "head_dim"), (64, 3, 16), sizes) == P(
        "fsdp", None, None
    )
    assert logical_to_spec(("act_batch", "act_length"), (8, 5), sizes) == P(("data", "fsdp"), None)
    # a batch of 2 only splits over data
    assert logical_to_spec(("act_batch", "act_length"), (2, 5), sizes) == P("data", None)
    # a mesh axis is used once per array
    assert logical_to_spec(("vocab", "mlp")) == P("tensor", None)
    with pytest.raises(ValueError, match="'bogus'"):
        logical_to_spec(("bogus",))


def test_shard_model_places_parameters_by_their_logical_axes():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    before = np.asarray(model.layers.q_proj[...])
    mesh = make_mesh(fsdp=4, tensor=2)
    shard_model(model, mesh)
    q = model.layers.q_proj[...]  # [layers, embed, q_heads, head_dim]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    assert model.layers.down_proj[...].sharding.spec == P(None, "tensor", "fsdp")
    assert model.final_norm[...].sharding.spec == P(None)
    np.testing.assert_array_equal(np.asarray(q), before)


def test_data_sharding_and_activation_constraints():
    mesh = make_mesh(data=2, fsdp=4)
    assert data_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
    x = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
    assert constrain(x, ("act_batch", "act_embed")) is x  # no mesh set: no-op

    @jax.jit
    def f(x):
        return constrain(x * 2, ("act_batch", "act_embed"))

    with jax.set_mesh(mesh):
        y = f(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None)), 2)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)


@pytest.fixture
def recorded_init(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    for var in (
        "SLURM_NTASKS",
        "SLURM_JOB_ID",
        "OMPI_COMM_WORLD_SIZE",
        "JAX_COORDINATOR_ADDRESS",
        "TPU_WORKER_HOSTNAMES",
    ):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_initialize_distributed(recorded_init, monkeypatch):
    assert initialize_distributed() is False  # one process, nothing to join
    assert initialize_distributed("host:1234", 1, 0) is False
    assert recorded_init == []
    assert initialize_distributed("host:1234", 2, 1) is True
    assert recorded_init[-1] == (("host:1234", 2, 1), {})
    with pytest.raises(ValueError, match="process_id=2"):
        initialize_distributed("host:1234", 2, 2)
    with pytest.raises(ValueError, match="process_id=None"):
        initialize_distributed("host:1234", 2)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    assert initialize_distributed() is True  # JAX's own SLURM detection fills in the rest
    assert recorded_init[-1] == ((), {})


def test_tpu_pod_detection(recorded_init, monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0")
    assert multihost.initialize_distributed() is False
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
    assert multihost.initialize_distributed() is True
