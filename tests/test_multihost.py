"""Multi-device and multi-process runs change nothing (issue 8).

- One update of covjax.train_step (Clip-Cov and KL-Cov, selection pre-pass over the mini-batch,
  two accumulated micro-batches, global-norm clipping) on 8 fake CPU devices laid out as fsdp=8,
  fsdp=4 x tensor=2 and data=2 x fsdp=4 gives the loss, the selected tokens and the updated
  parameters of one device. The step is plain SGD: Adam's first step moves each weight by about
  lr * sign(g), which turns float noise in a near-zero gradient into a whole lr, while
  SGD's change is the (clipped) gradient itself, compared tightly.
- `python -m covjax.train` as two processes joined by jax.distributed on localhost (gloo CPU
  collectives, 2 devices each) ends two toy steps with the parameters, metrics and covariance
  dump of one process with 4 devices (the same global mesh and batch), and writes its outputs
  once.
- The pieces without a second process: the per-process split of the responses, the mesh rule of
  multi-process runs, and jax.distributed's auto-detection on a Cloud TPU VM.
"""

import dataclasses
import functools
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import minibatch_selection, ragged_update_batch, recipes
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import load_file

from covjax import losses, multihost, sharding, train_step, trainer

REPO = pathlib.Path(__file__).resolve().parent.parent

B, P, R = 8, 2, 5  # rows, prompt length, response length
LR = 0.1
SMOKE = recipes().toy_config("clip_cov", "smoke")
TX = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(LR))


# ---------------------------------------------------------------------------------------------
# One update on three 8-device meshes against one device
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    """The toy's model as the trainer builds it: embed 64 splits over fsdp, its 4 heads, 2 kv
    heads and mlp 160 over tensor (vocab 61 stays replicated)."""
    return trainer.build_model(SMOKE, None)


@pytest.fixture(scope="module")
def batch(model):
    """Random sequences with ragged responses; old_logp = the policy's logp + noise (off-policy)."""
    return ragged_update_batch(
        model, rows=B, prompt_len=P, response_len=R, lengths=[5, 4, 5, 2, 5, 3, 1, 5], seed=1
    )


def step_config(method: str, **loss_fields) -> train_step.StepConfig:
    """SMOKE's step (no entropy or KL term, temperature 1) around `method`'s LossConfig, in
    micro-batches of B // 2 rows."""
    loss = losses.LossConfig(method, **loss_fields)
    step = train_step.StepConfig.from_config(SMOKE)
    return dataclasses.replace(step, loss=loss, micro_batch_size=B // 2)


CONFIGS = {
    "clip_cov": step_config(
        "clip_cov", clip_low=1.0, clip_high=1.0, clip_cov_ratio=0.2, clip_cov_lb=0.0,
        clip_cov_ub=50.0,
    ),
    "kl_cov": step_config("kl_cov", kl_cov_ratio=0.2),
}
MESHES = {"fsdp8": (1, 8, 1), "fsdp4_tensor2": (1, 4, 2), "data2_fsdp4": (2, 4, 1)}
_STEPS = {}


def _one_step(model, batch, method: str, shape: tuple[int, int, int]):
    """(new params, metrics, selected, logp) of one compiled update on a mesh of `shape`, as
    host arrays, plus the mesh axes the parameters are sharded over."""
    key = (method, shape)
    if key in _STEPS:
        return _STEPS[key]
    cfg = CONFIGS[method]
    mesh = sharding.make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, schedule = TX, optax.constant_schedule(LR)
    rng = jax.random.key(7)
    with jax.set_mesh(mesh):
        param_sharding = train_step.param_shardings(params, mesh)
        state = train_step.init_state(jax.tree.map(jnp.copy, params), tx)
        state_sharding = train_step.state_shardings(state, param_sharding, mesh)
        state = jax.device_put(state, state_sharding)
        batch_sharding = train_step.batch_shardings(batch, mesh)
        rows = sharding.data_sharding(mesh, 2)
        select = jax.jit(
            functools.partial(minibatch_selection, graphdef=graphdef, rest=rest, cfg=cfg),
            in_shardings=(param_sharding, batch_sharding, NamedSharding(mesh, PartitionSpec())),
            out_shardings=(rows, rows),
        )
        logp, selected = select(state.params, batch, train_step.update_rngs(rng)[0])
        update = train_step.CompiledUpdate(
            graphdef=graphdef, rest=rest, tx=tx, schedule=schedule, cfg=cfg,
            state_sharding=state_sharding, batch_sharding=batch_sharding, mesh=mesh,
        )
        new_state, metrics = update(state, batch, rng)
    axes = {  # the mesh axes of more than one device that split some parameter
        axis
        for s in jax.tree.leaves(param_sharding)
        for entry in s.spec if entry is not None
        for axis in ((entry,) if isinstance(entry, str) else entry) if mesh.shape[axis] > 1
    }
    _STEPS[key] = (
        jax.device_get(new_state.params), jax.device_get(metrics), np.asarray(selected),
        np.asarray(logp), axes,
    )
    return _STEPS[key]


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_update_is_the_same_on_every_mesh(model, batch, method, mesh_name):
    one, m1, sel1, logp1, _ = _one_step(model, batch, method, (1, 1, 1))
    ours, m, sel, logp, axes = _one_step(model, batch, method, MESHES[mesh_name])
    tensor = MESHES[mesh_name][2]
    assert "fsdp" in axes and ("tensor" in axes) == (tensor > 1)  # the layout really differs

    # The one-device selection is the one its update used: Eq. 10's covariance (NumPy) of the
    # selected tokens averages to the update's cov_selected_mean.
    mask = batch["mask"]
    lp, a = logp1[mask].astype(np.float64), batch["advantages"][mask].astype(np.float64)
    cov = np.zeros(mask.shape)
    cov[mask] = (lp - lp.mean()) * (a - a.mean())
    assert sel1.sum() == m1["num_selected"] >= 2  # floor(0.2 * 30 tokens) = 6 wanted
    np.testing.assert_allclose(cov[sel1].mean(), m1["cov_selected_mean"], rtol=1e-5)

    np.testing.assert_array_equal(sel, sel1)
    np.testing.assert_allclose(logp, logp1, rtol=1e-5, atol=1e-6)
    for name in ("loss", "grad_norm", "entropy", "cov_selected_mean", "num_selected"):
        np.testing.assert_allclose(m[name], m1[name], rtol=1e-5, err_msg=name)
    start = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    steps = [np.asarray(x) - x0 for x, x0 in zip(jax.tree.leaves(ours), start, strict=True)]
    steps1 = [np.asarray(x) - x0 for x, x0 in zip(jax.tree.leaves(one), start, strict=True)]
    largest = max(np.abs(s).max() for s in steps1)
    assert largest > 1e-3 * LR
    for s, s1 in zip(steps, steps1, strict=True):  # the parameter change: lr * clipped gradient
        np.testing.assert_allclose(s, s1, rtol=1e-4, atol=1e-5 * largest)


# ---------------------------------------------------------------------------------------------
# Two processes joined by jax.distributed == one process with the same global mesh
# ---------------------------------------------------------------------------------------------

WARM_START_STEPS = 100  # the smoke's 20 leave almost no right answers; 100: reward 0.08
TRAIN = [
    sys.executable, "-m", "covjax.train", "--config=configs/default.py:smoke",
    "--config.train.steps=2", "--config.mesh.fsdp=-1", "--config.train.eval_interval=0",
    f"--config.data.toy.warm_start_steps={WARM_START_STEPS}",
    # exports gathered by both processes; float32, as the weights are compared finer than bf16's
    # rounding
    "--config.train.export_interval=1", "--config.train.export_dtype=float32",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    flags = f"--xla_force_host_platform_device_count={devices}"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)


def _warm_start_cache(cache_dir) -> None:
    """The runs' toy warm start, computed once here and read from the cache by all of them.

    Shared because XLA:CPU's float results depend on the fake device count of the process
    (measured: the [2048, 64]^T x [2048, 160] weight-gradient matmul of the warm start differs in
    the last bits with 4 devices and with 2), and 100 Adam steps grow such bits into a different
    policy; the RL steps' own matmuls are small enough to agree."""
    config = SMOKE.copy_and_resolve_references()
    config.data.toy.warm_start_steps = WARM_START_STEPS
    config.data.toy.cache_dir = str(cache_dir)
    trainer.toy_warm_start(config, trainer.build_model(config, None))


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Starts the toy for 2 steps: one process with 4 CPU devices, and two processes with 2
    devices each (explicit coordinator flags, one workdir), all three at once."""
    root = tmp_path_factory.mktemp("multihost")
    _warm_start_cache(root / "cache")
    train = [*TRAIN, f"--config.data.toy.cache_dir={root / 'cache'}"]
    coordinator = f"localhost:{_free_port()}"
    jobs = {"single": ([*train, f"--workdir={root / 'single'}"], _env(4))}
    for i in range(2):
        flags = [f"--workdir={root / 'multi'}", f"--coordinator_address={coordinator}",
                 "--num_processes=2", f"--process_id={i}"]
        jobs[f"process{i}"] = ([*train, *flags], _env(2))
    procs = {}
    try:
        for name, (cmd, env) in jobs.items():
            with open(root / f"{name}.out", "w") as out, open(root / f"{name}.err", "w") as err:
                procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
        yield root, procs
    finally:
        for proc in procs.values():  # a process left waiting for a failed peer, or unwaited
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def runs(launched):
    """(single-process workdir, two-process workdir, {name: (stdout, stderr)}) once all ended."""
    root, procs = launched
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
        if any(p.poll() for p in procs.values()):
            break  # one failed: its peer would wait for it until jax.distributed times out
        time.sleep(0.5)
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    outputs = {
        name: ((root / f"{name}.out").read_text(), (root / f"{name}.err").read_text())
        for name in procs
    }
    for name, proc in procs.items():
        if proc.returncode != 0:
            raise AssertionError(f"{name} failed ({proc.returncode}):\n{outputs[name][1][-4000:]}")
    return root / "single", root / "multi", outputs


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one(runs):
    single, multi, outputs = runs
    for name in ("single", "process0"):
        assert "toy warm start (cached)" in outputs[name][1]
    one, two = _records(single), _records(multi)
    assert [r["step"] for r in two] == [0, 1]  # one line per step: written once
    for a, b in zip(one, two, strict=True):
        assert a["optim/grad_norm"] > 0 and a["cov/num_selected"] > 0  # both steps learn
        # functions of the sampled tokens and their rewards: exactly equal
        for key in ("reward/mean", "response_length/mean", "response_length/max",
                    "response_length/frac_truncated", "cov/num_selected", "optim/num_updates"):
            assert a[key] == b[key], key
        assert a.keys() == b.keys()
        for key in a.keys() - {"step"}:  # entropy, covariance, losses, ...: float rounding
            if not key.startswith(("time/", "throughput/")):
                np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-7, err_msg=key)
    # Eq. 10 covariance of every valid token of step 0's first mini-batch, in row order: the
    # same tokens were sampled (a different token changes its log-prob and its covariance)
    cov_one, cov_two = (np.load(w / "cov" / "step_000000.npy") for w in (single, multi))
    assert cov_one.shape == cov_two.shape
    np.testing.assert_allclose(cov_two, cov_one, rtol=1e-4, atol=1e-6)

    w_one = load_file(str(single / "hf_final" / "model.safetensors"))
    w_two = load_file(str(multi / "hf_final" / "model.safetensors"))
    assert w_one.keys() == w_two.keys()
    for name in w_one:  # 4 AdamW steps of lr 5e-4 (about lr each): agree to 1% of one
        np.testing.assert_allclose(w_two[name], w_one[name], rtol=0, atol=1e-2 * SMOKE.optim.lr,
                                   err_msg=name)


def test_two_processes_write_once(runs):
    _, multi, outputs = runs
    assert sorted(os.listdir(multi / "checkpoints")) == ["2"]  # orbax, both processes saving
    assert len(list((multi / "tensorboard").iterdir())) == 1
    assert (multi / "config.json").exists() and (multi / "tokenizer" / "tokenizer.json").exists()
    assert sorted(p.name for p in multi.glob("hf_*")) == ["hf_final", "hf_step_1"]
    assert "reward/mean" in outputs["process0"][0]  # the summary table, on process 0 only
    assert "reward/mean" not in outputs["process1"][0]
    assert "step 0:" in outputs["process0"][1] and "step 0:" not in outputs["process1"][1]


# ---------------------------------------------------------------------------------------------
# Pieces of the multi-process path, in one process
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_rows, processes, expected",
    [
        (10, 3, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]),
        (64, 2, [list(range(32)), list(range(32, 64))]),
        (2, 4, [[0], [1], [], []]),
    ],
)
def test_process_rows_split_responses_without_overlap(monkeypatch, num_rows, processes, expected):
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    got = []
    for index in range(processes):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        got.append(multihost.process_rows(num_rows).tolist())
    assert got == expected


def test_mesh_of_a_multi_process_run_uses_every_device(monkeypatch, tmp_path):
    config = recipes().toy_config("clip_cov", "smoke")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"data=1 x fsdp=1 x tensor=1 = 1 devices, but the 2 "
                                         r"processes have 8"):
        sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    monkeypatch.undo()
    config = recipes().toy_config("clip_cov", "smoke").unlock()
    config.mesh.data, config.mesh.fsdp = 4, 4
    with pytest.raises(ValueError, match=r"data=4 x fsdp=4 x tensor=1 = 16 != 8 devices"):
        trainer.train(config, str(tmp_path / "run"))  # before anything is written or compiled
    assert not (tmp_path / "run").exists()


def test_cloud_tpu_vm_uses_jax_auto_detection(monkeypatch):
    """An ssh session on a TPU VM worker may lack TPU_WORKER_HOSTNAMES: JAX's own detection
    (metadata server) must still run, with no arguments."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    for var in ("SLURM_NTASKS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS",
                "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        monkeypatch.delenv(var, raising=False)
    assert multihost.on_cloud_tpu_vm() is False  # this CPU machine
    assert multihost.initialize_distributed() is False and calls == []
    from jax._src import cloud_tpu_init

    monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)  # JAX saw TPU chips
    assert multihost.on_cloud_tpu_vm() is False  # ... but JAX_PLATFORMS=cpu: a CPU run
    platforms = jax.config.jax_platforms
    try:
        jax.config.update("jax_platforms", "tpu,cpu")  # read only: the backends already exist
        assert multihost.on_cloud_tpu_vm() is True
    finally:
        jax.config.update("jax_platforms", platforms)
    monkeypatch.setattr(multihost, "on_cloud_tpu_vm", lambda: True)
    assert multihost.initialize_distributed() is True
    assert calls == [((), {})]
    monkeypatch.setattr(multihost, "on_cloud_tpu_vm", lambda: False)
    monkeypatch.setenv("TPU_PROCESS_ADDRESSES", "10.0.0.1:8476,10.0.0.2:8476")  # GKE
    assert multihost.initialize_distributed() is True and len(calls) == 2
