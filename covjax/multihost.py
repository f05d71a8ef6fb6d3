"""Several processes, one mesh: joining the runtime and the host-side helpers of such a run.

In a multi-process run each process holds a part of every global array; these helpers gather
results to every host, split host work (scoring) over processes, and build global arrays from
the same host data on every process. With one process each is the obvious local operation.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


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


def global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from the same host data `x` on every process, laid out by `sharding`."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
