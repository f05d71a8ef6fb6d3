"""Entropy dynamics analysis: the entropy-performance law, covariance concentration, plots.

Reads what the trainer writes into a workdir (docs/metrics.md): metrics.jsonl
(one JSON object per step) and cov/step_{step:06d}.npy (the per-token covariances, Eq. 10, of the
valid tokens of the step's batch, from the rollout policy's log-probs, centred per mini-batch).
NumPy, SciPy and matplotlib only; no JAX, so it runs anywhere.

The entropy-performance law (ALGORITHMS.md section 1): R = -a * exp(H) + b, with the predicted
ceiling R(H=0) = b - a. Given exp(H) the model is linear in (a, b), so SciPy's linear least
squares on the design [-exp(H), 1] is the exact least-squares fit (no iterative optimiser needed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
# what a covariance histogram marks for a run without a config.json: the paper's Clip-Cov band and
# the 7B recipe's KL-Cov ratio (ALGORITHMS.md section 7)
PAPER_MARKS = {"clip_cov_lb": 1.0, "clip_cov_ub": 5.0, "kl_cov_ratio": 2e-3}
COV_DIR = "cov"
ENTROPY_KEY = "entropy/token_mean"
REWARD_KEY = "reward/mean"
TRAIN_ACCURACY_KEY = "accuracy/mean"
AVERAGE_ACCURACY_KEY = "val/average_accuracy"  # the trainer's mean over its evaluation sets
MIN_LAW_POINTS = 10  # fewer (entropy, accuracy) pairs: summary.md says the fit says little
FILTER_KEY = "filter/kept_group_frac"
NUM_SELECTED_KEY = "cov/num_selected"
CHECK_NATURAL_KEY = "entropy_check/predicted_natural"
CHECK_VANILLA_KEY = "entropy_check/predicted_vanilla"
CHECK_MEASURED_KEY = "entropy_check/measured"
_VAL_ACCURACY = re.compile(r"^val/.+/accuracy$")
_COV_FILE = re.compile(r"^step_(\d+)\.npy$")

Record = Mapping[str, float]


# ----------------------------------------------------------------------------- reading


def read_metrics(workdir: str) -> list[dict]:
    """The records of `workdir`/metrics.jsonl, sorted by "step"."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist or is not a directory")
    path = os.path.join(workdir, METRICS_FILE)
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
    """The accuracy metric: `accuracy_key` if given, else "val/average_accuracy" (the mean over
    several evaluation sets), else the first (sorted) "val/<set>/accuracy" present, else
    "accuracy/mean" (the training batch's accuracy)."""
    keys = set().union(*(r.keys() for r in records))
    if accuracy_key is not None:
        if accuracy_key not in keys:
            raise ValueError(f"accuracy_key {accuracy_key!r} not in the metrics; "
                             f"have {sorted(keys)}")
        return accuracy_key
    if AVERAGE_ACCURACY_KEY in keys:
        return AVERAGE_ACCURACY_KEY
    val_keys = sorted(k for k in keys if _VAL_ACCURACY.match(k))
    if val_keys:
        return val_keys[0]
    if TRAIN_ACCURACY_KEY in keys:
        return TRAIN_ACCURACY_KEY
    raise ValueError(f"no accuracy metric ({AVERAGE_ACCURACY_KEY!r}, val/<set>/accuracy or "
                     f"{TRAIN_ACCURACY_KEY!r}) in the "
                     f"metrics; have {sorted(keys)}")


def is_filtered(record: Record) -> bool:
    """True on steps where every group's rewards agreed (the trainer logs kept_group_frac == 0)."""
    return record.get(FILTER_KEY) == 0


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
    cov_dir = os.path.join(workdir, COV_DIR)
    if not os.path.isdir(cov_dir):
        return {}
    filtered = {r["step"] for r in records if is_filtered(r)} if records is not None else set()
    matches = ((_COV_FILE.match(name), name) for name in os.listdir(cov_dir))
    paths = {int(m.group(1)): os.path.join(cov_dir, name) for m, name in matches if m}
    return {step: paths[step] for step in sorted(paths) if step not in filtered}


def load_cov(path: str) -> np.ndarray:
    """The per-token covariances of one dump, flattened."""
    return np.load(path).reshape(-1)


# ----------------------------------------------------------------------------- the law


@dataclasses.dataclass(frozen=True)
class LawFit:
    """R = -a * exp(H) + b fitted by least squares; r2 is the coefficient of determination."""

    a: float
    b: float
    r2: float
    num_points: int

    @property
    def ceiling(self) -> float:
        """The predicted accuracy at zero entropy, R(H=0) = b - a."""
        return self.b - self.a

    def predict(self, entropy: np.ndarray) -> np.ndarray:
        return -self.a * np.exp(entropy) + self.b


def r_squared(y: np.ndarray, y_hat: np.ndarray) -> float:
    """1 - SS_res / SS_tot (nan when y is constant)."""
    ss_tot = float(np.sum((y - np.mean(y)) ** 2))
    ss_res = float(np.sum((y - y_hat) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan


def fit_law(entropy: np.ndarray, accuracy: np.ndarray) -> LawFit:
    """Least-squares fit of R = -a * exp(H) + b (ALGORITHMS.md section 1) to (H, R) pairs."""
    entropy = np.asarray(entropy, dtype=np.float64)
    accuracy = np.asarray(accuracy, dtype=np.float64)
    if entropy.shape != accuracy.shape or entropy.ndim != 1:
        raise ValueError(f"entropy {entropy.shape} and accuracy {accuracy.shape} must be equal 1-D")
    if len(np.unique(entropy)) < 2:
        raise ValueError(f"the law needs at least 2 distinct entropies, got {len(entropy)} points "
                         f"with {len(np.unique(entropy))} distinct")
    design = np.stack([-np.exp(entropy), np.ones_like(entropy)], axis=1)
    (a, b), *_ = scipy.linalg.lstsq(design, accuracy)
    fit = LawFit(a=float(a), b=float(b), r2=math.nan, num_points=len(entropy))
    return dataclasses.replace(fit, r2=r_squared(accuracy, fit.predict(entropy)))


def bin_means(steps: np.ndarray, *values: np.ndarray, bin_steps: int) -> tuple[np.ndarray, ...]:
    """Means of each series over bins of `bin_steps` consecutive steps (bin = step // bin_steps)."""
    if bin_steps < 1:
        raise ValueError(f"bin_steps must be >= 1, got {bin_steps}")
    bins, index = np.unique(np.asarray(steps) // bin_steps, return_inverse=True)
    counts = np.bincount(index, minlength=len(bins))
    return tuple(np.bincount(index, weights=v, minlength=len(bins)) / counts for v in values)


def fit_law_binned(steps: np.ndarray, entropy: np.ndarray, accuracy: np.ndarray, *,
                   bin_steps: int) -> LawFit:
    """The law fitted to the bin means of (H, R) over bins of `bin_steps` steps (less noise)."""
    return fit_law(*bin_means(steps, entropy, accuracy, bin_steps=bin_steps))


@dataclasses.dataclass(frozen=True)
class Extrapolation:
    """The law fitted on the first steps, predicting the accuracy of the remaining steps."""

    fit: LawFit
    num_fit: int
    num_test: int
    mae: float
    rmse: float


def extrapolate(steps: np.ndarray, entropy: np.ndarray, accuracy: np.ndarray, *,
                fit_fraction: float) -> Extrapolation:
    """Fit on the first `fit_fraction` of the points (in step order), predict the rest from their
    entropies and report the mean absolute and root-mean-square errors."""
    if not 0.0 < fit_fraction < 1.0:
        raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    order = np.argsort(steps, kind="stable")
    entropy, accuracy = np.asarray(entropy)[order], np.asarray(accuracy)[order]
    num_fit = int(math.floor(fit_fraction * len(order)))
    if num_fit < 2 or num_fit >= len(order):
        raise ValueError(f"fit_fraction {fit_fraction} of {len(order)} points leaves {num_fit} to "
                         f"fit and {len(order) - num_fit} to predict; need >= 2 and >= 1")
    fit = fit_law(entropy[:num_fit], accuracy[:num_fit])
    error = fit.predict(entropy[num_fit:]) - accuracy[num_fit:]
    return Extrapolation(fit=fit, num_fit=num_fit, num_test=len(error),
                         mae=float(np.mean(np.abs(error))), rmse=float(np.sqrt(np.mean(error**2))))


# ----------------------------------------------------------------------------- covariance


def covariance_concentration(cov: np.ndarray, *, top_fraction: float = 0.01) -> float:
    """Mean covariance of the top `top_fraction` tokens (at least one) over the mean |cov| of all
    tokens (the paper's ~1800x for the top 0.02%, ALGORITHMS.md section 2)."""
    cov = np.asarray(cov, dtype=np.float64).reshape(-1)
    if cov.size == 0:
        raise ValueError("cov is empty")
    k = max(int(math.floor(top_fraction * cov.size)), 1)
    top = np.partition(cov, cov.size - k)[cov.size - k:]
    mean_abs = float(np.mean(np.abs(cov)))
    return float(np.mean(top)) / mean_abs if mean_abs > 0 else math.nan


def concentration_by_step(workdir: str, records: Sequence[Record], *, top_fraction: float = 0.01
                          ) -> dict[int, float]:
    """{step: concentration} over the non-empty cov dumps, leaving out steps where all rewards
    agreed (one dump in memory at a time)."""
    covs = ((step, load_cov(path)) for step, path in cov_dump_paths(workdir, records).items())
    return {step: covariance_concentration(cov, top_fraction=top_fraction)
            for step, cov in covs if cov.size}


def kl_cov_threshold(cov: np.ndarray, kl_cov_ratio: float) -> float:
    """The smallest covariance KL-Cov penalises: the k-th largest, k = max(floor(ratio*N), 1)."""
    cov = np.asarray(cov).reshape(-1)
    k = max(int(math.floor(kl_cov_ratio * cov.size)), 1)
    return float(np.partition(cov, cov.size - k)[cov.size - k])


# ----------------------------------------------------------------------------- equal reward


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first window-1 points average what is there)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    cumsum = np.cumsum(np.concatenate([[0.0], np.asarray(x, dtype=np.float64)]))
    ends = np.arange(1, len(x) + 1)
    starts = np.maximum(ends - window, 0)
    return (cumsum[ends] - cumsum[starts]) / (ends - starts)


def entropy_at_reward(steps: np.ndarray, reward: np.ndarray, entropy: np.ndarray, *, level: float,
                      window: int) -> tuple[int, float] | None:
    """(step, entropy) where the moving-average reward first reaches `level`; entropy is averaged
    over the same window. None if the run never reaches it."""
    smoothed = moving_average(reward, window)
    reached = np.flatnonzero(smoothed >= level)
    if reached.size == 0:
        return None
    i = int(reached[0])
    return int(steps[i]), float(moving_average(entropy, window)[i])


# ----------------------------------------------------------------------------- entropy check


@dataclasses.dataclass(frozen=True)
class CheckAgreement:
    """Predicted (covariance) against measured entropy change over the checked steps. slope is the
    least-squares measured ~ slope * predicted through the origin: the effective step size relative
    to the learning rate (not 1 under Adam)."""

    num_steps: int
    correlation: float
    sign_agreement: float
    slope: float


def check_agreement(predicted: np.ndarray, measured: np.ndarray) -> CheckAgreement:
    """Correlation, fraction of equal signs, slope through the origin of measured on predicted."""
    predicted = np.asarray(predicted, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    n = len(predicted)
    both_vary = n > 1 and np.std(predicted) > 0 and np.std(measured) > 0
    correlation = float(np.corrcoef(predicted, measured)[0, 1]) if both_vary else math.nan
    sign = float(np.mean(np.sign(predicted) == np.sign(measured))) if n else math.nan
    denominator = float(np.sum(predicted**2))
    slope = float(np.sum(predicted * measured)) / denominator if denominator > 0 else math.nan
    return CheckAgreement(num_steps=n, correlation=correlation, sign_agreement=sign, slope=slope)


# ----------------------------------------------------------------------------- plots


def _save(fig: plt.Figure, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_entropy_and_reward(runs: Mapping[str, Sequence[Record]], path: str, *,
                            entropy_key: str = ENTROPY_KEY, reward_key: str = REWARD_KEY) -> str:
    """Entropy (top) and reward (bottom) against step, one line per run."""
    fig, (ax_h, ax_r) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name, records in runs.items():
        steps, entropy = series(records, [entropy_key])
        ax_h.plot(steps, entropy, label=name)
        steps, reward = series(records, [reward_key])
        ax_r.plot(steps, reward, label=name)
    ax_h.set_ylabel(entropy_key)
    ax_r.set_ylabel(reward_key)
    ax_r.set_xlabel("step")
    ax_h.legend(fontsize="small")
    return _save(fig, path)


def plot_law_fit(points: Mapping[str, tuple[np.ndarray, np.ndarray, LawFit | None]], path: str, *,
                 accuracy_label: str = "accuracy") -> str:
    """Entropy-accuracy scatter of each run with its fitted curve R = -a exp(H) + b."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, (entropy, accuracy, fit) in points.items():
        scatter = ax.scatter(entropy, accuracy, s=10, alpha=0.6, label=name)
        if fit is not None:
            grid = np.linspace(min(0.0, float(np.min(entropy))), float(np.max(entropy)), 200)
            ax.plot(grid, fit.predict(grid), color=scatter.get_facecolor()[0][:3],
                    label=f"{name}: a={fit.a:.3g} b={fit.b:.3g} R²={fit.r2:.3f}")
    ax.set_xlabel("entropy H")
    ax.set_ylabel(accuracy_label)
    ax.set_title("R = -a exp(H) + b")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_cov_histogram(covs: Mapping[str, np.ndarray], path: str, *, clip_cov_lb: float,
                       clip_cov_ub: float, kl_cov_ratio: float) -> str:
    """Histogram of log10 |cov| per token, positive and negative covariances apart (count on a log
    scale); the Clip-Cov band [lb, ub] is shaded, the KL-Cov top-k threshold a dashed line."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    all_abs = np.abs(np.concatenate([np.ones(1) * clip_cov_lb, *covs.values()]))
    all_abs = all_abs[all_abs > 0]
    low = math.floor(min(np.log10(all_abs.min()), math.log10(clip_cov_lb)))
    high = math.ceil(max(np.log10(all_abs.max()), math.log10(clip_cov_ub)))
    bins = np.linspace(low, high, 10 * (high - low) + 1)
    ax.axvspan(math.log10(clip_cov_lb), math.log10(clip_cov_ub), color="tab:green", alpha=0.15,
               label=f"Clip-Cov band [{clip_cov_lb:g}, {clip_cov_ub:g}]")
    for i, (name, cov) in enumerate(covs.items()):
        color = f"C{i}"
        positive, negative = cov[cov > 0], -cov[cov < 0]
        ax.hist(np.log10(positive), bins=bins, histtype="step", color=color,
                label=f"{name}: cov > 0 ({positive.size})")
        ax.hist(np.log10(negative), bins=bins, histtype="step", linestyle=":", color=color,
                label=f"{name}: cov < 0 ({negative.size})")
        threshold = kl_cov_threshold(cov, kl_cov_ratio)
        if threshold > 0:
            ax.axvline(math.log10(threshold), color=color, linestyle="--",
                       label=f"{name}: KL-Cov top {kl_cov_ratio:g} ≥ {threshold:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("log10 |cov| (token covariance, Eq. 10)")
    ax.set_ylabel("tokens")
    ax.legend(fontsize="x-small")
    return _save(fig, path)


def _span(values: Sequence[np.ndarray]) -> tuple[float, float]:
    """The range of the values and 0, with a 5% margin."""
    joined = np.concatenate([np.zeros(1), *values])
    low, high = float(joined.min()), float(joined.max())
    margin = 0.05 * (high - low) or 1e-12
    return low - margin, high + margin


def plot_entropy_check(checks: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                       path: str) -> str:
    """Predicted (natural and vanilla forms) against measured entropy change per checked step:
    the line y = x (solid) and each run's least-squares line through the origin (dashed). Axes
    follow the data, since under Adam the slope is far from 1."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, form, column in ((axes[0], "natural", 0), (axes[1], "vanilla", 1)):
        for i, (name, columns) in enumerate(checks.items()):
            predicted, measured = columns[column], columns[2]
            agreement = check_agreement(predicted, measured)
            ax.scatter(predicted, measured, s=12, alpha=0.7, color=f"C{i}",
                       label=f"{name}: corr {agreement.correlation:.2f}, "
                             f"slope {agreement.slope:.3g}")
            if math.isfinite(agreement.slope):
                ends = np.array(_span([predicted]))
                ax.plot(ends, agreement.slope * ends, color=f"C{i}", linestyle="--",
                        linewidth=0.8)
        x_span = _span([c[column] for c in checks.values()])
        y_span = _span([c[2] for c in checks.values()])
        ax.plot(x_span, x_span, color="black", linewidth=0.8, label="y = x")
        ax.set_xlim(x_span)
        ax.set_ylim(y_span)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.axvline(0, color="grey", linewidth=0.5)
        ax.ticklabel_format(style="sci", scilimits=(-2, 3))
        ax.set_xlabel(f"predicted dH ({form}: -eta Cov)")
        ax.set_ylabel("measured dH")
        ax.legend(fontsize="x-small")
    return _save(fig, path)


# ----------------------------------------------------------------------------- run summary


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What summary.md reports for one run (nan / None where the metrics do not allow it)."""

    name: str
    num_steps: int
    initial_entropy: float
    final_entropy: float
    final_reward: float
    accuracy_key: str
    fit: LawFit | None
    binned_fit: LawFit | None
    extrapolation: Extrapolation | None
    not_fitted: str
    tokens_touched: float
    concentration: float
    check_natural: CheckAgreement | None
    check_vanilla: CheckAgreement | None


def _first_last(records: Sequence[Record], key: str) -> tuple[float, float]:
    _, values = series(records, [key])
    return (float(values[0]), float(values[-1])) if values.size else (math.nan, math.nan)


def summarize_run(name: str, workdir: str, records: Sequence[Record], *, accuracy_key: str,
                  entropy_key: str = ENTROPY_KEY, reward_key: str = REWARD_KEY,
                  fit_fraction: float = 0.5, bin_steps: int = 10,
                  concentration_min_step: int = 10) -> RunSummary:
    """Entropy, reward, the law's fit (raw, binned, extrapolated), tokens touched per step, the
    median covariance concentration over the dumps from `concentration_min_step` on, and the
    agreement of the live entropy check."""
    steps, entropy, accuracy = series(records, [entropy_key, accuracy_key])
    reasons = []

    def attempt(what, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            reasons.append(f"{what}: {e}")
            return None

    fit = attempt("fit", fit_law, entropy, accuracy)
    binned = attempt("binned fit", fit_law_binned, steps, entropy, accuracy, bin_steps=bin_steps)
    extrapolation = attempt("extrapolation", extrapolate, steps, entropy, accuracy,
                            fit_fraction=fit_fraction)
    initial_entropy, final_entropy = _first_last(records, entropy_key)
    _, touched = series(records, [NUM_SELECTED_KEY])
    concentration = [c for step, c in concentration_by_step(workdir, records).items()
                     if step >= concentration_min_step]
    _, natural, vanilla, measured = series(
        records, [CHECK_NATURAL_KEY, CHECK_VANILLA_KEY, CHECK_MEASURED_KEY])
    return RunSummary(
        name=name, num_steps=sum(entropy_key in r for r in records),  # not the final evaluation
        initial_entropy=initial_entropy,
        final_entropy=final_entropy, final_reward=_first_last(records, reward_key)[1],
        accuracy_key=accuracy_key, fit=fit, binned_fit=binned, extrapolation=extrapolation,
        not_fitted="; ".join(reasons),
        tokens_touched=float(np.mean(touched)) if touched.size else math.nan,
        concentration=float(np.median(concentration)) if concentration else math.nan,
        check_natural=check_agreement(natural, measured) if natural.size else None,
        check_vanilla=check_agreement(vanilla, measured) if vanilla.size else None)


def equal_reward_entropies(runs: Mapping[str, Sequence[Record]], *, level: float | None = None,
                           window: int = 10, entropy_key: str = ENTROPY_KEY,
                           reward_key: str = REWARD_KEY
                           ) -> tuple[float, dict[str, tuple[int, float] | None]]:
    """(level, {run: (step, entropy) when its moving-average reward first reaches level}).
    Default level: the highest one every run reaches (the smallest of the runs' best smoothed
    rewards), so all runs are compared."""
    curves = {name: series(records, [reward_key, entropy_key]) for name, records in runs.items()}
    if level is None:
        level = min(float(np.max(moving_average(reward, window))) if reward.size else -math.inf
                    for _, reward, _ in curves.values())
    return level, {name: entropy_at_reward(steps, reward, entropy, level=level, window=window)
                   for name, (steps, reward, entropy) in curves.items()}


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def summary_markdown(summaries: Sequence[RunSummary], equal_reward: tuple[float, Mapping],
                     *, fit_fraction: float, bin_steps: int, window: int,
                     concentration_min_step: int) -> str:
    """summary.md: one table row per run, the equal-reward comparison, the entropy check."""
    lines = [
        "# Entropy dynamics summary", "",
        f"Law R = -a exp(H) + b fitted by least squares to (entropy, accuracy) per logged step; "
        f"R² binned = the law fitted to means over {bin_steps}-step bins; ceiling = b - a; "
        f"MAE/RMSE: fitted on the first {fit_fraction:g} of the steps, predicting the rest. "
        f"Touched = mean cov/num_selected per step; concentration = median over cov dumps from "
        f"step {concentration_min_step} on of (mean cov of the top 1% tokens) / (mean |cov|), "
        "steps where all rewards agreed left out.", "",
        "| run | steps | H initial | H final | H kept | reward final | accuracy key | a | b | R² "
        "| R² binned | ceiling | MAE | RMSE | touched/step | concentration |",
        "|" + "---|" * 16,
    ]
    notes = []
    for s in summaries:
        fit, binned, ext = s.fit, s.binned_fit, s.extrapolation
        kept = s.final_entropy / s.initial_entropy if s.initial_entropy else math.nan
        lines.append("| " + " | ".join([
            s.name, str(s.num_steps), _fmt(s.initial_entropy), _fmt(s.final_entropy),
            _fmt(100 * kept, ".1f") + "%", _fmt(s.final_reward), f"`{s.accuracy_key}`",
            _fmt(fit and fit.a), _fmt(fit and fit.b), _fmt(fit and fit.r2, ".3f"),
            _fmt(binned and binned.r2, ".3f"), _fmt(fit and fit.ceiling),
            _fmt(ext and ext.mae), _fmt(ext and ext.rmse), _fmt(s.tokens_touched, ".3g"),
            _fmt(s.concentration, ".3g")]) + " |")
        if s.not_fitted:
            notes.append(f"- {s.name}: not fitted: {s.not_fitted}")
        if fit and fit.num_points < MIN_LAW_POINTS:
            notes.append(f"- {s.name}: the law is fitted to {fit.num_points} points only; its R² "
                         "and ceiling say little")
        if fit and not 0.0 <= fit.ceiling <= 1.0:
            notes.append(f"- {s.name}: the ceiling b - a = {_fmt(fit.ceiling)} lies outside "
                         "[0, 1]: the fit extrapolates past any reachable accuracy")
    lines += ["", *notes, ""] if notes else [""]
    level, reached = equal_reward
    lines += [f"## Entropy at equal reward (moving average over {window} steps reaches "
              f"{_fmt(level)})", "", "| run | step | entropy |", "|---|---|---|"]
    for name, hit in reached.items():
        lines.append(f"| {name} | " + (f"{hit[0]} | {_fmt(hit[1])} |" if hit else "never | n/a |"))
    checked = [s for s in summaries if s.check_natural is not None]
    if checked:
        lines += ["", "## Live entropy check: predicted (first order, eta = the step's summed "
                  "learning rate) vs measured dH", "",
                  "Slope: measured ~ slope * predicted through the origin (the effective step "
                  "relative to the learning rate; not 1 under Adam).", "",
                  "| run | form | steps | correlation | same sign | slope |",
                  "|---|---|---|---|---|---|"]
        for s in checked:
            for form, c in (("natural", s.check_natural), ("vanilla", s.check_vanilla)):
                lines.append(f"| {s.name} | {form} | {c.num_steps} | {_fmt(c.correlation, '.3f')} "
                             f"| {_fmt(c.sign_agreement, '.2f')} | {_fmt(c.slope, '.3g')} |")
    return "\n".join(lines) + "\n"
