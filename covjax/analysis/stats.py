"""The numbers of the entropy analysis: the entropy-performance law, covariance concentration,
the live entropy check's agreement, and the summary of a run.

The entropy-performance law (docs/ALGORITHMS.md section 1): R = -a * exp(H) + b, with the
predicted ceiling R(H=0) = b - a. Given exp(H) the model is linear in (a, b), so SciPy's linear
least squares on the design [-exp(H), 1] is the exact least-squares fit (no iterative optimiser
needed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.linalg

from covjax import metrics
from covjax.analysis.runs import Record, cov_dump_paths, entropy_check_series, load_cov, series

MIN_LAW_POINTS = 10  # fewer (entropy, accuracy) pairs: summary.md says the fit says little


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
    """Least-squares fit of R = -a * exp(H) + b (docs/ALGORITHMS.md section 1) to (H, R) pairs."""
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
    tokens (the paper's ~1800x for the top 0.02%, docs/ALGORITHMS.md section 2)."""
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
                  entropy_key: str = metrics.ENTROPY_TOKEN_MEAN,
                  reward_key: str = metrics.REWARD_MEAN, fit_fraction: float = 0.5,
                  bin_steps: int = 10, concentration_min_step: int = 10) -> RunSummary:
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
    _, touched = series(records, [metrics.COV_NUM_SELECTED])
    concentration = [c for step, c in concentration_by_step(workdir, records).items()
                     if step >= concentration_min_step]
    natural, vanilla, measured = entropy_check_series(records)
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
                           window: int = 10, entropy_key: str = metrics.ENTROPY_TOKEN_MEAN,
                           reward_key: str = metrics.REWARD_MEAN
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
