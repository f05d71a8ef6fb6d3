"""Checkpoints: what a run saves, how it resumes, and which config changes a resume allows.

A checkpoint (orbax, in WORKDIR/checkpoints/<steps done>) holds the train state (fp32 master
parameters, optimizer state, update count), the frozen reference policy when the KL loss needs
one, and a JSON record of the step, the task's data position and the seed: everything a step
derives its randomness and its prompts from, so a resumed run repeats what an uninterrupted one
would have done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from covjax.config import ConfigError, flatten, to_json
from covjax.data import split_files, split_named_files


def make_manager(workdir: Path) -> ocp.CheckpointManager:
    """The run's checkpoint manager: the two newest checkpoints are kept."""
    return ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
        item_names=("state", "meta"),
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves `state` (a pytree of arrays) and the JSON `meta` as checkpoint `step`."""
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )


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


# Keys a resumed run may change: how the run is executed, not what it computes. Its parameters,
# optimizer state and data position come from the checkpoint; the mesh, the micro-batch split and
# the remat policy change the memory and the summation order, not the experiment.
RESUME_MAY_CHANGE = (
    "train.steps",
    "train.checkpoint_interval",
    "train.eval_interval",
    "train.log_interval",
    "train.cov_dump_interval",
    "train.entropy_check_interval",
    "train.micro_batch_size",
    "train.logprob_chunk_size",
    "train.length_granularity",
    "mesh.data",
    "mesh.fsdp",
    "mesh.tensor",
    "model.remat",
    "data.toy.cache_dir",
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


def write_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """WORKDIR/config.json, replaced whole (other processes may be reading it)."""
    partial = workdir / "config.json.partial"
    partial.write_text(to_json(config))
    os.replace(partial, workdir / "config.json")


def check_workdir(workdir: Path, config: ml_collections.ConfigDict, latest: int | None) -> None:
    """A workdir with a checkpoint resumes only under the config it was started with."""
    saved = workdir / "config.json"
    if latest is not None and saved.exists():
        check_resume(json.loads(saved.read_text()), config, str(saved))
