"""What a run logs: the metric names, the files they go to, the writer and the step summaries.

The trainer writes these names and covjax.analysis reads them, both from here; docs/metrics.md
says what each one means. A workdir holds metrics.jsonl (one JSON object per RL step: "step",
0-based, and the metrics, a non-finite value as null), the same scalars as TensorBoard events,
and every `train.cov_dump_interval` steps cov/step_SSSSSS.npy, the per-token covariances
(Eq. 10) of the step's valid tokens. With `config.log.wandb=PROJECT` the same scalars also go to a
Weights & Biases run, whose id wandb_id keeps so that a resumed run continues it.

NumPy and etils.epath only at import: covjax.analysis reads the names without JAX.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from etils import epath

from covjax import storage

# ----------------------------------------------------------------------------- files

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id"  # the W&B run id of the workdir's run
COV_DIR = "cov"
COV_FILE = "step_%06d.npy"  # COV_FILE % step: one step's covariance dump in COV_DIR
COV_FILE_RE = re.compile(r"^step_(\d+)\.npy$")  # matches COV_FILE's names; group 1 the step

# ----------------------------------------------------------------------------- names
# Rollout: the step's first generation round (the policy's own performance, before the
# dynamic-sampling filter).
REWARD_MEAN = "reward/mean"
ACCURACY_MEAN = "accuracy/mean"  # fraction of responses with reward > 0.5
RESPONSE_LENGTH_MEAN = "response_length/mean"
CODE_PASS_FRAC = "reward/code_pass_frac"  # code task: mean fraction of a program's tests passed
# Dynamic sampling: kept_group_frac == 0 marks a step where every group's rewards agreed.
FILTER_KEPT_GROUP_FRAC = "filter/kept_group_frac"
FILTER_GEN_ROUNDS = "filter/gen_rounds"
FILTER_PADDED_GROUP_FRAC = "filter/padded_group_frac"

# Training batch.
ENTROPY_TOKEN_MEAN = "entropy/token_mean"  # verl's actor/entropy
ENTROPY_SEQ_MEAN = "entropy/seq_mean"  # the paper's Eq. 5
COV_MEAN = "cov/mean"  # Eq. 10, centred within each mini-batch
COV_P99 = "cov/p99"
COV_SELECTED_MEAN = "cov/selected_mean"  # tokens Clip-Cov detached or KL-Cov penalised
COV_NUM_SELECTED = "cov/num_selected"
COV_FRAC_SELECTED = "cov/frac_selected"
PPO_CLIP_FRAC = "ppo/clip_frac"
PPO_KL = "ppo/kl"
OPTIM_GRAD_NORM = "optim/grad_norm"
OPTIM_LR = "optim/lr"
OPTIM_LOSS = "optim/loss"
OPTIM_NUM_UPDATES = "optim/num_updates"

# The live check of the covariance theory (docs/ALGORITHMS.md section 2).
CHECK_PREDICTED_NATURAL = "entropy_check/predicted_natural"  # -eta Cov(log pi, A)
CHECK_PREDICTED_VANILLA = "entropy_check/predicted_vanilla"  # -eta Cov(log pi, pi A)
CHECK_MEASURED = "entropy_check/measured"

# Evaluation.
VAL_AVERAGE_ACCURACY = "val/average_accuracy"  # mean over the evaluation sets
VAL_ACCURACY_RE = re.compile(r"^val/(.+)/accuracy$")  # matches val_accuracy's names

TIME_STEP = "time/step"

# The headline metrics the trainer logs every log_interval steps and prints at the end.
SUMMARY_KEYS = (
    REWARD_MEAN,
    ACCURACY_MEAN,
    ENTROPY_TOKEN_MEAN,
    COV_MEAN,
    COV_FRAC_SELECTED,
    RESPONSE_LENGTH_MEAN,
    TIME_STEP,
)


def val_accuracy(set_name: str) -> str:
    """The accuracy metric of one evaluation set: val/<set>/accuracy (avg@k on sampled sets)."""
    return f"val/{set_name}/accuracy"


def cov_file(step: int) -> str:
    """The name of one step's covariance dump in COV_DIR."""
    return COV_FILE % step


# ----------------------------------------------------------------------------- per-step values


def token_covariance_np(logp: np.ndarray, adv: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Eq. 10 over the valid tokens of the arrays (float64 means), valid entries only [n]."""
    lp, a = logp[mask].astype(np.float64), adv[mask].astype(np.float64)
    return ((lp - lp.mean()) * (a - a.mean())).astype(np.float32) if lp.size else lp


def entropy_metrics(entropy: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """entropy/token_mean (verl) and entropy/seq_mean (the paper's Eq. 5) over non-empty rows."""
    rows = mask.any(axis=1)
    per_seq = (entropy * mask).sum(1)[rows] / mask.sum(1)[rows]
    return {
        ENTROPY_TOKEN_MEAN: float(entropy[mask].mean()) if mask.any() else math.nan,
        ENTROPY_SEQ_MEAN: float(per_seq.mean()) if rows.any() else math.nan,
    }


def summarize_updates(updates: list[dict[str, float]]) -> dict[str, float]:
    """Per-step metrics from the mini-batch updates, weighted by their token counts."""
    if not updates:
        return {}
    tokens = np.array([u["num_tokens"] for u in updates])
    selected = np.array([u["num_selected"] for u in updates])

    def weighted(key, w):
        return float((np.array([u[key] for u in updates]) * w).sum() / max(w.sum(), 1.0))

    return {
        COV_SELECTED_MEAN: weighted("cov_selected_mean", selected),
        COV_NUM_SELECTED: float(selected.sum()),
        COV_FRAC_SELECTED: float(selected.sum() / max(tokens.sum(), 1.0)),
        PPO_CLIP_FRAC: weighted("ppo_clip_frac", tokens),
        PPO_KL: weighted("ppo_kl", tokens),
        OPTIM_GRAD_NORM: float(np.mean([u["grad_norm"] for u in updates])),
        OPTIM_LR: float(updates[-1]["lr"]),
        OPTIM_LOSS: float(np.mean([u["loss"] for u in updates])),
        OPTIM_NUM_UPDATES: float(len(updates)),
    }


# ----------------------------------------------------------------------------- writing


class MetricsWriter:
    """metrics.jsonl (one JSON object per step) + TensorBoard events in the workdir, a local folder
    or an object store (covjax.storage: there each write rewrites the file whole), and with a
    `wandb_project` the same scalars in a W&B run whose config is `run_config`.

    Both files are written synchronously by the calling thread, so a failed write (a full disk)
    raises at once instead of stalling a writer queue; the OSError names the file. A W&B run that
    cannot start raises ValueError naming config.log.wandb.
    """

    def __init__(self, workdir: epath.PathLike, resume_step: int, *, wandb_project: str = "",
                 run_config: Mapping[str, Any] | None = None):
        # imported here, not at the top: covjax.analysis imports this module and runs without JAX
        import jax
        from tensorboardX import record_writer
        from tensorboardX.event_file_writer import EventsWriter

        workdir = epath.Path(workdir)
        self.path = workdir / METRICS_FILE
        self.enabled = jax.process_index() == 0  # one writer in a multi-host run
        self.tb = None
        self.wandb = None
        if not self.enabled:
            return
        if self.path.exists():  # drop steps logged after the checkpoint
            keep = [ln for ln, record in _read_lines(self.path) if record["step"] < resume_step]
            partial = workdir / (METRICS_FILE + ".partial")
            partial.write_text("".join(ln + "\n" for ln in keep))
            partial.replace(self.path)
        self.file = storage.AppendFile(self.path)
        tb_dir = workdir / "tensorboard"
        tb_dir.mkdir(exist_ok=True)
        if not storage.is_local(tb_dir):
            scheme = os.fspath(tb_dir).partition("://")[0]
            record_writer.register_writer_factory(scheme, _EventsThroughEpath())
        with _naming(tb_dir):
            self.tb = EventsWriter(os.fspath(tb_dir / "events"))
        if wandb_project:
            self.wandb = _start_wandb(workdir, wandb_project, dict(run_config or {}), resume_step)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Appends the step's record; an OSError (naming the file) if it cannot be written."""
        if not self.enabled:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        record = {"step": step, **{k: _json_number(v) for k, v in sorted(metrics.items())}}
        with _naming(self.path):
            self.file.write((json.dumps(record) + "\n").encode())
            self.file.flush()
        with _naming(self.path.parent / "tensorboard"):
            for k, v in metrics.items():
                if v is not None and math.isfinite(v):
                    self.tb.write_event(
                        Event(wall_time=time.time(), step=step, summary=scalar(k, v))
                    )
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(workdir: epath.Path, project: str, run_config: dict[str, Any], resume_step: int):
    """wandb.init of the workdir's W&B run: a new run from step 0 (its id written to
    WANDB_ID_FILE), else the run of that id, resumed. Where the run stores its files: the
    workdir when it is local, else WANDB_DIR or the working directory; WANDB_MODE=offline logs
    without a network. ValueError naming config.log.wandb when W&B refuses to start."""
    import wandb

    id_file = workdir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume_step > 0 and id_file.exists() else None
    try:
        run = wandb.init(
            project=project, id=run_id, resume="allow" if run_id else "never", config=run_config,
            dir=os.fspath(workdir) if storage.is_local(workdir) else None,
            allow_val_change=True,  # a resume may change the keys RESUME_MAY_CHANGE lists
        )
    except wandb.Error as error:
        raise ValueError(f"config.log.wandb={project!r}: W&B did not start: {error}") from error
    if run_id is None:
        with _naming(id_file):
            id_file.write_text(run.id + "\n")
    return run


class _EventsThroughEpath:
    """tensorboardX's writer factory for an object store's URL scheme: its events files as
    storage.AppendFile, through etils.epath like every other file of the run (tensorboardX's own
    gs:// and s3:// writers would need google-cloud-storage or boto3 and their credentials)."""

    def open(self, path: str) -> storage.AppendFile:
        return storage.AppendFile(epath.Path(path))

    def directory_check(self, path: str) -> None:
        """Nothing to make: an object store has no folders."""


@contextlib.contextmanager
def _naming(path: epath.PathLike) -> Iterator[None]:
    """Re-raises an OSError of the block as one that names `path` (a failed write of an open
    file, e.g. ENOSPC, names none)."""
    try:
        yield
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error


def _read_lines(path: epath.Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every line of a metrics.jsonl. A torn last line (a crash mid-write) is
    dropped with a warning; any other line that is not JSON raises ValueError naming the line (its
    number in the file, blank lines counted)."""
    lines = [(n, ln) for n, ln in enumerate(path.read_text().splitlines(), start=1) if ln.strip()]
    out = []
    for number, line in lines:
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError as error:
            if number < lines[-1][0]:
                raise ValueError(f"{path}: line {number} is not JSON ({error})") from error
            logging.warning("%s: its last line %d is torn (%s); dropped", path, number, error)
    return out


def _json_number(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def summary_table(records: list[dict[str, Any]]) -> str:
    """First and last value of the headline metrics, as a small text table."""
    lines = [f"{'metric':<26}{'first':>12}{'last':>12}"]
    for key in SUMMARY_KEYS:
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            lines.append(f"{key:<26}{values[0]:>12.4g}{values[-1]:>12.4g}")
    return "\n".join(lines)
