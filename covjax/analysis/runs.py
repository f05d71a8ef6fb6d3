"""Reading what a training run wrote into its workdir (docs/metrics.md).

metrics.jsonl holds one JSON object per step; cov/step_SSSSSS.npy the per-token covariances
(Eq. 10) of the valid tokens of the step's batch, from the rollout policy's log-probs, centred per
mini-batch; config.json the config the run trained with. File and metric names: covjax.metrics.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from covjax import metrics

CONFIG_FILE = "config.json"
# what a covariance histogram marks for a run without a config.json: the paper's Clip-Cov band and
# the 7B recipe's KL-Cov ratio (docs/ALGORITHMS.md section 7)
PAPER_MARKS = {"clip_cov_lb": 1.0, "clip_cov_ub": 5.0, "kl_cov_ratio": 2e-3}

Record = Mapping[str, float]


def read_metrics(workdir: str) -> list[dict]:
    """The records of `workdir`/metrics.jsonl, sorted by "step"."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist or is not a directory")
    path = os.path.join(workdir, metrics.METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics file {path!r} not found (the trainer writes it)")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path!r} line {line_number}: not JSON ({e})") from e
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError(f"{path!r} line {line_number}: no 'step' field: {line.strip()!r}")
            records.append(record)
    if not records:
        raise ValueError(f"metrics file {path!r} is empty")
    return sorted(records, key=lambda r: r["step"])


def read_loss_config(workdir: str) -> dict:
    """The `loss` settings a run trained with, from the config.json the trainer wrote into its
    workdir."""
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)["loss"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path!r} not found: the trainer writes it at the start of a run"
                                ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path!r} holds no trainer config with a 'loss' section ({e!r})") from e


def histogram_marks(workdir: str, *, require_config: bool = False,
                    **given: float | None) -> dict[str, float]:
    """The Clip-Cov band and KL-Cov ratio to mark on a run's covariance histogram: each of
    clip_cov_lb, clip_cov_ub, kl_cov_ratio as given, else the run's own (its config.json), else
    PAPER_MARKS when the workdir has no config.json (an error instead with require_config).
    The histogram's log axis needs 0 < lb < ub and 0 < kl_cov_ratio <= 1."""
    unknown = set(given) - set(PAPER_MARKS)
    if unknown:
        raise ValueError(f"unknown histogram marks {sorted(unknown)}; known: {list(PAPER_MARKS)}")
    marks = {key: given.get(key) for key in PAPER_MARKS}
    if any(value is None for value in marks.values()):
        path = os.path.join(workdir, CONFIG_FILE)
        own = (read_loss_config(workdir) if require_config or os.path.isfile(path)
               else PAPER_MARKS)
        try:
            marks = {key: float(own[key]) if value is None else float(value)
                     for key, value in marks.items()}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path!r}: its 'loss' section lacks a number for {e!s}") from e
    lb, ub, ratio = (marks[key] for key in PAPER_MARKS)
    if not (0 < lb < ub < math.inf and 0 < ratio <= 1):
        raise ValueError(f"histogram marks of {workdir!r} need 0 < clip_cov_lb < clip_cov_ub and "
                         f"0 < kl_cov_ratio <= 1, got {marks}")
    return marks


def resolve_accuracy_key(records: Sequence[Record], accuracy_key: str | None = None) -> str:
    """The accuracy metric: `accuracy_key` if given, else val/average_accuracy (the mean over
    several evaluation sets), else the first (sorted) val/<set>/accuracy present, else
    accuracy/mean (the training batch's accuracy)."""
    keys = set().union(*(r.keys() for r in records))
    if accuracy_key is not None:
        if accuracy_key not in keys:
            raise ValueError(f"accuracy_key {accuracy_key!r} not in the metrics; "
                             f"have {sorted(keys)}")
        return accuracy_key
    if metrics.VAL_AVERAGE_ACCURACY in keys:
        return metrics.VAL_AVERAGE_ACCURACY
    val_keys = sorted(k for k in keys if metrics.VAL_ACCURACY_RE.match(k))
    if val_keys:
        return val_keys[0]
    if metrics.ACCURACY_MEAN in keys:
        return metrics.ACCURACY_MEAN
    raise ValueError(f"no accuracy metric ({metrics.VAL_AVERAGE_ACCURACY!r}, val/<set>/accuracy "
                     f"or {metrics.ACCURACY_MEAN!r}) in the metrics; have {sorted(keys)}")


def is_filtered(record: Record) -> bool:
    """True on steps where every group's rewards agreed (the trainer logs kept_group_frac == 0)."""
    return record.get(metrics.FILTER_KEPT_GROUP_FRAC) == 0


def series(records: Sequence[Record], keys: Sequence[str], *, skip_filtered: bool = False
           ) -> tuple[np.ndarray, ...]:
    """(steps, values of keys[0], values of keys[1], ...) over the records holding every key with
    a finite value; `skip_filtered` drops the steps where all rewards agreed."""
    rows = [(r["step"], *(r[k] for k in keys)) for r in records
            if all(k in r and r[k] is not None and math.isfinite(r[k]) for k in keys)
            and not (skip_filtered and is_filtered(r))]
    columns = np.asarray(rows, dtype=np.float64).reshape(len(rows), 1 + len(keys)).T
    return (columns[0].astype(np.int64), *columns[1:])


def cov_dump_paths(workdir: str, records: Sequence[Record] | None = None) -> dict[int, str]:
    """{step: path} of `workdir`/cov/step_*.npy in step order (empty if none were dumped); with
    `records`, leaving out the steps where all rewards agreed (all cov are 0 there)."""
    cov_dir = os.path.join(workdir, metrics.COV_DIR)
    if not os.path.isdir(cov_dir):
        return {}
    filtered = {r["step"] for r in records if is_filtered(r)} if records is not None else set()
    matches = ((metrics.COV_FILE_RE.match(name), name) for name in os.listdir(cov_dir))
    paths = {int(m.group(1)): os.path.join(cov_dir, name) for m, name in matches if m}
    return {step: paths[step] for step in sorted(paths) if step not in filtered}


def load_cov(path: str) -> np.ndarray:
    """The per-token covariances of one dump, flattened."""
    return np.load(path).reshape(-1)


def entropy_check_series(records: Sequence[Record]) -> tuple[np.ndarray, ...]:
    """(predicted natural, predicted vanilla, measured) entropy change over the steps the live
    entropy check ran on (empty arrays if it never ran)."""
    _, *columns = series(records, [metrics.CHECK_PREDICTED_NATURAL,
                                   metrics.CHECK_PREDICTED_VANILLA, metrics.CHECK_MEASURED])
    return tuple(columns)
