"""The figures of the entropy analysis (matplotlib, written as PNG files): entropy and reward
against step, the law's fit, token-covariance histograms and the live entropy check."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from covjax import metrics
from covjax.analysis.runs import Record, series
from covjax.analysis.stats import LawFit, check_agreement, kl_cov_threshold

# Files only: the non-interactive backend needs no display (a headless machine, a subprocess).
matplotlib.use("Agg")


def _save(fig: plt.Figure, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_entropy_and_reward(runs: Mapping[str, Sequence[Record]], path: str, *,
                            entropy_key: str = metrics.ENTROPY_TOKEN_MEAN,
                            reward_key: str = metrics.REWARD_MEAN) -> str:
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
