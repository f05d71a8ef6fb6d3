"""Checkpoints: what a run saves, how it resumes, and which config changes a resume allows.

A checkpoint (orbax, in WORKDIR/checkpoints/<steps done>) holds the train state (fp32 master
parameters, optimizer state, update count), the frozen reference policy when the KL loss needs
one, and a JSON record of the step, the task's data position and the seed: everything a step
derives its randomness and its prompts from, so a resumed run repeats what an uninterrupted one
would have done.

WORKDIR is a local folder or an object store's URL (gs://..., covjax.storage): orbax writes the
checkpoints there directly, every other file goes through etils.epath, and a storage layer that
refuses the workdir (no credentials, no such bucket, gcsfs not installed) stops the run at set-up
with one line (`storage_errors`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from covjax import multihost, storage
from covjax.config import ConfigError, flatten, to_json
from covjax.data import split_files, split_named_files


def make_manager(workdir: epath.Path) -> ocp.CheckpointManager:
    """The run's checkpoint manager: the two newest checkpoints are kept."""
    return ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
        item_names=("state", "meta"),
    )


LOCK_FILE = "lock"  # WORKDIR/lock: {"host", "pid"} of the run writing the workdir


class CheckpointError(OSError):
    """A checkpoint that could not be saved, or a workdir none of whose checkpoints restores:
    the message names the folder and the cause."""


@contextlib.contextmanager
def storage_errors(workdir: epath.Path) -> Iterator[None]:
    """Re-raises a failure of the storage layer in the block (storage.is_storage_error: no
    credentials, no such bucket, an uninstalled backend such as gcsfs) as config.ConfigError: one
    line naming the workdir, with the storage layer's own message. A ConfigError of the block,
    and a programming error, pass through."""
    with storage.storage_errors_as(
        lambda error: ConfigError(f"workdir {workdir}: {storage.one_line(error)}"),
        passing=(ConfigError,),
    ):
        yield


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves `state` (a pytree of arrays) and the JSON `meta` as checkpoint `step` (in the
    background); a save that failed before, or fails to start, raises CheckpointError."""
    raise_save_errors(manager)
    try:
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
    except Exception as error:  # noqa: BLE001 - orbax and tensorstore raise many types
        raise CheckpointError(
            f"{manager.directory}: saving checkpoint {step} failed: {storage.one_line(error)}"
        ) from error


def raise_save_errors(manager: ocp.CheckpointManager, *, wait: bool = False) -> None:
    """Raises CheckpointError if a background save has failed (a full disk, say), so the run
    stops within a step of it instead of training on without checkpoints. Without `wait` a save
    still running is not waited for."""
    try:
        if wait or not manager.is_saving_in_progress():
            manager.wait_until_finished()  # re-raises the failure of the last save
    except Exception as error:  # noqa: BLE001 - orbax and tensorstore raise many types
        raise CheckpointError(
            f"{manager.directory}: saving a checkpoint failed: {storage.one_line(error)}"
        ) from error


def restore(manager: ocp.CheckpointManager, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
    """(state, meta) of checkpoint `step`, the state laid out as the arrays of `like`."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
    )
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
    )
    return restored.state, restored.meta


def restore_newest(manager: ocp.CheckpointManager, like: Any) -> tuple[Any, dict[str, Any]]:
    """(state, meta) of the newest checkpoint that restores on every process. A newer one that
    does not (files cut short by a crash) is skipped with a warning naming its step and why, and
    moved aside to <step>.unrestorable so the resumed run can save that step again; every
    process decides each step together (collective), so all resume from the same one.
    CheckpointError if none restores."""
    skipped = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored, why = restore(manager, step, like), ""
        except Exception as error:  # noqa: BLE001 - whatever the cause, an older one may restore
            restored, why = None, storage.one_line(error)
        if not multihost.any_process(bool(why)):
            return restored
        why = why or "it does not restore on another process"
        skipped.append(f"checkpoint {step}: {why}")
        logging.warning("%s/%d does not restore (%s): skipped", manager.directory, step, why)
        if jax.process_index() == 0:
            directory = epath.Path(manager.directory)
            (directory / str(step)).replace(directory / f"{step}.unrestorable")
        if jax.process_count() > 1:  # no process lists the step again before it is moved
            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        manager.reload()
    raise CheckpointError(
        f"{manager.directory}: no checkpoint restores ({'; '.join(skipped)}); "
        "pass a new --workdir to start afresh"
    )


@contextlib.contextmanager
def workdir_lock(workdir: epath.Path) -> Iterator[None]:
    """Holds WORKDIR/lock while the block runs (process 0 of a run), so two runs never write one
    local workdir. The lock is an exclusive flock on the file, which the kernel releases when its
    holder dies however it dies; the file's {"host", "pid"} only names the holder. A held lock
    raises config.ConfigError naming its host and pid; a file left by a holder that died is taken
    over with a warning naming it. An object store has no locks: a workdir there is not locked
    (said in an INFO line), and keeping to one run per workdir is the user's to do."""
    if jax.process_index() != 0:
        yield
        return
    if not storage.is_local(workdir):
        logging.info("%s: not locked (an object store has no locks): start one run per workdir",
                     workdir)
        yield
        return
    path = Path(workdir) / LOCK_FILE
    fd, left = _acquire(path)
    try:
        if left:
            logging.warning("%s: taking over a stale lock (host %s, pid %s no longer holds it)",
                            path, left.get("host"), left.get("pid"))
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked, so no contender locks a removed file
        os.close(fd)


def _acquire(path: Path) -> tuple[int, dict[str, Any]]:
    """(descriptor of `path` holding its flock, the {"host", "pid"} a dead holder left in it);
    config.ConfigError naming the holder if another process holds it."""
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _lock_holder(path)
            raise ConfigError(
                f"{path}: another run is using this workdir (host {holder.get('host')}, pid "
                f"{holder.get('pid')}); wait for it to end"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd, _lock_holder(path)
        os.close(fd)  # its holder released and removed it while this one waited: open it anew


def _lock_holder(path: Path) -> dict[str, Any]:
    """The lock file's {"host", "pid"}; {} while its holder is still writing it."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


# Keys a resumed run may change: how the run is executed, not what it computes. Its parameters,
# optimizer state and data position come from the checkpoint; the mesh, the micro-batch split,
# the length granularity, the remat policy, the rollout slot count and the sandbox's worker count
# change the memory, speed and summation order, not the tokens sampled (log-probs may differ in
# the last bit). Under loss.cov_scope="microbatch" the micro-batch size also changes the selection.
# log.wandb only adds a place the metrics go.
RESUME_MAY_CHANGE = (
    "train.steps",
    "train.checkpoint_interval",
    "train.eval_interval",
    "train.log_interval",
    "train.cov_dump_interval",
    "train.entropy_check_interval",
    "train.export_interval",
    "train.export_dtype",
    "train.micro_batch_size",
    "train.logprob_chunk_size",
    "train.length_granularity",
    "rollout.slots_per_device",
    "data.code.workers",
    "mesh.data",
    "mesh.fsdp",
    "mesh.tensor",
    "model.remat",
    "data.toy.cache_dir",
    "log.wandb",
)


def _comparable(flat: dict[str, Any]) -> dict[str, Any]:
    """The flat config with its local paths resolved ("~/m" and "/home/u/m" are one folder)."""
    def resolve(path: str) -> str:
        return os.path.realpath(os.path.expanduser(path)) if path else path

    out = dict(flat)
    for key in ("model.path", "model.tokenizer_path"):
        if isinstance(out.get(key), str):
            out[key] = resolve(out[key])
    if isinstance(out.get("data.train_files"), str):
        out["data.train_files"] = [resolve(p) for p in split_files(out["data.train_files"])]
    if isinstance(out.get("data.eval_files"), str):
        named = split_named_files(out["data.eval_files"])
        out["data.eval_files"] = {name: resolve(p) for name, p in named.items()}
    return out


def check_resume(saved: Mapping[str, Any], config: ml_collections.ConfigDict, source: str) -> None:
    """Raises config.ConfigError naming every key outside RESUME_MAY_CHANGE whose value differs
    between the config a checkpointed run was started with (`saved`, read from `source`) and
    `config`, so a reused workdir never continues one experiment under another's settings. Local
    paths are compared resolved; keys that only one of them has (a config written by another
    covjax version) are not compared."""
    old = flatten(saved)
    new = flatten(json.loads(to_json(config)))  # as config.json holds it
    old_cmp, new_cmp = _comparable(old), _comparable(new)
    changed = [
        f"config.{key}: {old[key]!r} -> {new[key]!r}"
        for key in sorted(old.keys() & new.keys())
        if key not in RESUME_MAY_CHANGE and old_cmp[key] != new_cmp[key]
    ]
    if changed:
        raise ConfigError(
            f"{source} holds a checkpointed run of another config ({'; '.join(changed)}): "
            "resume it with the config it was started with (only "
            f"{', '.join(RESUME_MAY_CHANGE)} may change), or pass a new --workdir"
        )


def write_config(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
    """WORKDIR/config.json, replaced whole (other processes may be reading it)."""
    partial = workdir / "config.json.partial"
    partial.write_text(to_json(config))
    partial.replace(workdir / "config.json")


def check_workdir(
    workdir: epath.Path, config: ml_collections.ConfigDict, latest: int | None
) -> None:
    """A workdir with a checkpoint resumes only under the config it was started with."""
    saved = workdir / "config.json"
    if latest is not None and saved.exists():
        check_resume(json.loads(saved.read_text()), config, str(saved))
