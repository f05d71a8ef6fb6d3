"""covjax.checkpointing: which config changes a resume allows, and how they are named; the
fallback past a corrupt checkpoint, a failed save on a full disk, the workdir lock, and a
workdir on an object store."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from helpers import fake_object_store
from helpers import load_config as load

from covjax import checkpointing
from covjax import config as config_lib


def test_resume_refuses_a_changed_experiment_and_names_every_change():
    saved = json.loads(config_lib.to_json(load("default")))
    checkpointing.check_resume(saved, load("default"), "run/config.json")  # the same config
    go_on = load("default")
    go_on.train.steps, go_on.mesh.fsdp, go_on.train.micro_batch_size = 600, 2, 64
    checkpointing.check_resume(saved, go_on, "run/config.json")  # run longer, on another mesh
    other = load("toy_kl_cov", "hard")
    other.seed, other.train.steps = 3, 600
    with pytest.raises(ValueError) as error:
        checkpointing.check_resume(saved, other, "run/config.json")
    message = str(error.value)
    assert message.startswith("run/config.json holds a checkpointed run of another config")
    for change in ("config.loss.method: 'clip_cov' -> 'kl_cov'", "config.seed: 0 -> 3",
                   "config.data.toy.variant: 'easy' -> 'hard'"):
        assert change in message
    assert "config.train.steps" not in message.split(": resume")[0]
    older = dict(saved, loss={k: v for k, v in saved["loss"].items() if k != "method"})
    kl_cov = load("default")
    kl_cov.loss.method = "kl_cov"
    checkpointing.check_resume(older, kl_cov, "run/config.json")  # a key it lacks is not compared


def test_resume_compares_local_paths_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "d.jsonl").write_text("")
    saved = load("qwen2_5_7b_grpo")
    saved.model.path, saved.data.train_files = str(tmp_path / "m"), str(tmp_path / "d.jsonl")
    saved.data.eval_files = f"math500={tmp_path / 'd.jsonl'}"
    same = load("qwen2_5_7b_grpo")
    same.model.path, same.data.train_files = "~/m", "~/d.jsonl"
    same.data.eval_files = "math500=~/./d.jsonl"
    checkpointing.check_resume(json.loads(config_lib.to_json(saved)), same, "run/config.json")
    same.data.eval_files = "aime=~/d.jsonl"
    with pytest.raises(ValueError, match="config.data.eval_files: 'math500="):
        checkpointing.check_resume(json.loads(config_lib.to_json(saved)), same, "run/config.json")


def test_every_key_a_resume_may_change_is_a_config_key():
    assert set(checkpointing.RESUME_MAY_CHANGE) <= set(config_lib.flat_schema())


def _state(value: float):
    return {"w": jnp.full((64,), value, jnp.float32)}


def _saved(directory, steps):
    """A checkpoint manager over `directory` holding a tiny state at each step (w = step)."""
    manager = checkpointing.make_manager(directory)
    for step in steps:
        checkpointing.save(manager, step, _state(step), {"step": step})
    manager.wait_until_finished()
    return manager


def _truncate(folder):
    for path in folder.rglob("*"):
        if path.is_file():
            path.write_bytes(b"")


def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_that_restores(tmp_path, caplog):
    _saved(tmp_path, [2, 4]).close()
    _truncate(tmp_path / "checkpoints" / "4")  # a crash cut its files short
    manager = checkpointing.make_manager(tmp_path)
    with caplog.at_level("WARNING"):
        state, meta = checkpointing.restore_newest(manager, _state(0.0))
    assert meta == {"step": 2} and np.all(np.asarray(state["w"]) == 2.0)
    assert f"{tmp_path / 'checkpoints'}/4 does not restore (" in caplog.text
    assert manager.all_steps() == [2] and (tmp_path / "checkpoints" / "4.unrestorable").is_dir()
    checkpointing.save(manager, 4, _state(4.0), {"step": 4})  # the resumed run saves 4 again
    manager.wait_until_finished()
    assert checkpointing.restore_newest(manager, _state(0.0))[1] == {"step": 4}
    manager.close()


def test_a_checkpoint_that_fails_on_another_process_is_skipped_on_every_one(
    tmp_path, monkeypatch, caplog
):
    _saved(tmp_path, [2, 4]).close()
    votes = iter([True, False])  # another process failed to restore 4; every process restores 2
    monkeypatch.setattr(checkpointing.multihost, "any_process", lambda failed: next(votes))
    manager = checkpointing.make_manager(tmp_path)
    with caplog.at_level("WARNING"):
        state, meta = checkpointing.restore_newest(manager, _state(0.0))
    assert meta == {"step": 2} and np.all(np.asarray(state["w"]) == 2.0)
    assert "/4 does not restore (it does not restore on another process)" in caplog.text
    assert manager.all_steps() == [2] and (tmp_path / "checkpoints" / "4.unrestorable").is_dir()
    manager.close()


def test_no_checkpoint_that_restores_is_one_error(tmp_path):
    _saved(tmp_path, [2]).close()
    _truncate(tmp_path / "checkpoints" / "2")
    with pytest.raises(checkpointing.CheckpointError) as error:
        checkpointing.restore_newest(checkpointing.make_manager(tmp_path), _state(0.0))
    assert str(error.value).startswith(f"{tmp_path / 'checkpoints'}: no checkpoint restores "
                                       "(checkpoint 2: ")
    assert "\n" not in str(error.value)


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder on a file system with no space left: a 1 MiB tmpfs filled up where this process
    may mount one (CI runs as root); elsewhere a folder whose checkpoint writes fail as orbax
    reports a full disk."""
    mount = tmp_path / "small"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]
    if shutil.which("mount") and subprocess.run(command, capture_output=True).returncode == 0:
        with open(mount / "filler", "wb") as f, contextlib.suppress(OSError):
            f.write(b"\0" * (2 << 20))
        yield mount
        subprocess.run(["umount", str(mount)], check=True)
        return

    def fail(self, *args, **kwargs):
        raise ValueError(f"RESOURCE_EXHAUSTED: Error writing in {mount}: No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", fail)
    yield mount


def test_a_failed_background_save_raises_naming_the_folder(full_disk):
    manager = checkpointing.make_manager(full_disk)
    with contextlib.suppress(checkpointing.CheckpointError):  # or it fails in the background
        checkpointing.save(manager, 1, {"w": jnp.arange(4096.0)}, {"step": 1})
    with pytest.raises(checkpointing.CheckpointError) as error:
        checkpointing.raise_save_errors(manager, wait=True)
    assert str(error.value).startswith(f"{full_disk / 'checkpoints'}: saving a checkpoint failed")
    assert "No space left on device" in str(error.value)
    assert manager.all_steps() == []


_HOLD_LOCK = """
import sys, pathlib
from covjax import checkpointing
with checkpointing.workdir_lock(pathlib.Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_workdir_lock_held_by_another_process_is_refused_and_taken_over_once_it_dies(
    tmp_path, caplog
):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(config_lib.ConfigError) as error, checkpointing.workdir_lock(tmp_path):
        pass
    assert f"another run is using this workdir (host {socket.gethostname()}, pid {holder.pid})" in (
        str(error.value)
    )
    holder.kill()  # as SIGKILL or a preemption would: the file stays, its flock goes
    holder.wait()
    lock = tmp_path / checkpointing.LOCK_FILE
    with caplog.at_level("WARNING"), checkpointing.workdir_lock(tmp_path):
        assert json.loads(lock.read_text()) == {"host": socket.gethostname(), "pid": os.getpid()}
    assert (f"taking over a stale lock (host {socket.gethostname()}, pid {holder.pid} no longer "
            "holds it)") in caplog.text
    assert not lock.exists()  # released


def test_of_contenders_for_a_stale_lock_exactly_one_wins(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = {"host": socket.gethostname(), "pid": dead.pid}
    (tmp_path / checkpointing.LOCK_FILE).write_text(json.dumps(stale))
    contenders = 8
    barrier, won, refused = threading.Barrier(contenders), [], []

    def contend():
        barrier.wait()
        try:
            with checkpointing.workdir_lock(tmp_path):
                won.append(1)
                time.sleep(0.5)  # held while the others try
        except config_lib.ConfigError:
            refused.append(1)

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(won), len(refused)) == (1, contenders - 1)


def test_on_an_object_store_the_workdir_is_not_locked_and_its_config_is_checked(
    monkeypatch, caplog
):
    workdir = epath.Path(fake_object_store(monkeypatch)) / "run"
    workdir.mkdir(parents=True)
    with caplog.at_level("INFO"), checkpointing.workdir_lock(workdir):
        assert not (workdir / checkpointing.LOCK_FILE).exists()
    assert f"{workdir}: not locked (an object store has no locks)" in caplog.text
    config = load("default")
    checkpointing.write_config(workdir, config)
    assert [p.name for p in workdir.iterdir()] == ["config.json"]
    checkpointing.check_workdir(workdir, config, latest=2)  # the same config resumes
    config.seed = 3
    with pytest.raises(config_lib.ConfigError) as error:
        checkpointing.check_workdir(workdir, config, latest=2)
    assert str(error.value).startswith(
        "gs://bucket/run/config.json holds a checkpointed run of another config (config.seed: "
        "0 -> 3)"
    )


def test_storage_errors_are_one_line_naming_the_workdir_and_bugs_keep_their_traceback(caplog):
    workdir = "gs://bucket/run"
    with caplog.at_level("INFO"), pytest.raises(config_lib.ConfigError) as error:
        with checkpointing.storage_errors(workdir):
            raise PermissionError("Anonymous caller does not have access.\nPermission denied.")
    assert str(error.value) == (
        "workdir gs://bucket/run: PermissionError: Anonymous caller does not have access."
    )
    assert "Permission denied." in caplog.text  # the whole error, at INFO
    for bug in (TypeError("f() takes 1 argument"), AttributeError("no x"), KeyError("k"),
                AssertionError("shape"), config_lib.ConfigError("config.x: bad")):
        with pytest.raises(type(bug)) as error, checkpointing.storage_errors(workdir):
            raise bug
        assert error.value is bug
