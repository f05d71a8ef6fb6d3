"""Entry point: the entropy dynamics report of one or more training runs.

    python -m covjax.analyze --workdir=runs/A,runs/B --out=report [--fit_fraction=0.5]

Writes into --out: entropy_reward.png (entropy and reward against step, all runs), law_fit.png
(entropy-accuracy scatter with the fitted R = -a exp(H) + b), cov_hist_<run>.png (token covariance
histogram of the first and last cov dump with the Clip-Cov band and the KL-Cov threshold, from the
run's config.json unless the flags give them), entropy_check.png (predicted against measured entropy
change, when the trainer ran the live check) and summary.md (see covjax.analysis.summary_markdown).
"""

from __future__ import annotations

import os
import re

from absl import app, flags

from covjax import analysis

_WORKDIR = flags.DEFINE_list("workdir", None, "Comma-separated training workdirs.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder for the figures and summary.md.",
                           required=True)
_FIT_FRACTION = flags.DEFINE_float(
    "fit_fraction", 0.5, "Fit the law on this first fraction of the steps, predict the rest.")
_ACCURACY_KEY = flags.DEFINE_string(
    "accuracy_key", None, "Accuracy metric for the law; default val/average_accuracy, else the "
    "first val/<set>/accuracy present, else accuracy/mean.")
_ENTROPY_KEY = flags.DEFINE_string("entropy_key", analysis.ENTROPY_KEY, "Entropy metric.")
_REWARD_KEY = flags.DEFINE_string("reward_key", analysis.REWARD_KEY, "Reward metric.")
_BIN_STEPS = flags.DEFINE_integer("bin_steps", 10, "Steps per bin for the binned R^2.")
_WINDOW = flags.DEFINE_integer("window", 10, "Moving-average window for the equal-reward table.")
_EQUAL_REWARD = flags.DEFINE_float(
    "equal_reward", None, "Reward level for the equal-reward table; default the highest level "
    "that every run reaches.")
_CONCENTRATION_MIN_STEP = flags.DEFINE_integer(
    "concentration_min_step", 10, "Covariance concentration: median over dumps from this step on.")
_OWN = "; default: the run's own (its config.json), else the paper's "
_CLIP_COV_LB = flags.DEFINE_float("clip_cov_lb", None,
                                  "Clip-Cov band lower bound to mark" + _OWN + "1.0.")
_CLIP_COV_UB = flags.DEFINE_float("clip_cov_ub", None,
                                  "Clip-Cov band upper bound to mark" + _OWN + "5.0.")
_KL_COV_RATIO = flags.DEFINE_float("kl_cov_ratio", None, "KL-Cov top-k ratio whose threshold the "
                                   "histogram marks" + _OWN + "2e-3.")


def _run_names(workdirs: list[str]) -> list[str]:
    """Base names of the workdirs; the whole path where two base names collide."""
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    return [n if names.count(n) == 1 else os.path.normpath(w)
            for n, w in zip(names, workdirs, strict=True)]


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not 0.0 < _FIT_FRACTION.value < 1.0:
        raise ValueError(f"--fit_fraction must be in (0, 1), got {_FIT_FRACTION.value}")
    workdirs = _WORKDIR.value
    runs = {name: analysis.read_metrics(w)
            for name, w in zip(_run_names(workdirs), workdirs, strict=True)}
    marks = {w: analysis.histogram_marks(w, clip_cov_lb=_CLIP_COV_LB.value,
                                         clip_cov_ub=_CLIP_COV_UB.value,
                                         kl_cov_ratio=_KL_COV_RATIO.value) for w in workdirs}
    os.makedirs(_OUT.value, exist_ok=True)
    figures = []

    def out(filename: str) -> str:
        figures.append(filename)
        return os.path.join(_OUT.value, filename)

    summaries, law_points, checks = [], {}, {}
    for (name, records), workdir in zip(runs.items(), workdirs, strict=True):
        accuracy_key = analysis.resolve_accuracy_key(records, _ACCURACY_KEY.value)
        summary = analysis.summarize_run(
            name, workdir, records, accuracy_key=accuracy_key, entropy_key=_ENTROPY_KEY.value,
            reward_key=_REWARD_KEY.value, fit_fraction=_FIT_FRACTION.value,
            bin_steps=_BIN_STEPS.value, concentration_min_step=_CONCENTRATION_MIN_STEP.value)
        summaries.append(summary)
        _, entropy, accuracy = analysis.series(records, [_ENTROPY_KEY.value, accuracy_key])
        law_points[name] = (entropy, accuracy, summary.fit)
        _, *check = analysis.series(records, [analysis.CHECK_NATURAL_KEY,
                                              analysis.CHECK_VANILLA_KEY,
                                              analysis.CHECK_MEASURED_KEY])
        if check[0].size:
            checks[name] = tuple(check)
        dumps = analysis.cov_dump_paths(workdir, records)
        if dumps:
            first, last = min(dumps), max(dumps)
            analysis.plot_cov_histogram(
                {f"step {s}": analysis.load_cov(dumps[s]) for s in sorted({first, last})},
                out(f"cov_hist_{_file_safe(name)}.png"), **marks[workdir])

    analysis.plot_entropy_and_reward(runs, out("entropy_reward.png"),
                                     entropy_key=_ENTROPY_KEY.value, reward_key=_REWARD_KEY.value)
    analysis.plot_law_fit(law_points, out("law_fit.png"),
                          accuracy_label=", ".join(sorted({s.accuracy_key for s in summaries})))
    if checks:
        analysis.plot_entropy_check(checks, out("entropy_check.png"))
    equal_reward = analysis.equal_reward_entropies(
        runs, level=_EQUAL_REWARD.value, window=_WINDOW.value, entropy_key=_ENTROPY_KEY.value,
        reward_key=_REWARD_KEY.value)
    markdown = analysis.summary_markdown(
        summaries, equal_reward, fit_fraction=_FIT_FRACTION.value, bin_steps=_BIN_STEPS.value,
        window=_WINDOW.value, concentration_min_step=_CONCENTRATION_MIN_STEP.value)
    markdown += "\n## Figures\n\n" + "".join(f"![{f}]({f})\n" for f in figures)
    with open(os.path.join(_OUT.value, "summary.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    print(markdown)


if __name__ == "__main__":
    app.run(main)
