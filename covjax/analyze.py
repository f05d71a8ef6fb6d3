"""Entry point: the entropy dynamics report of one or more training runs.

    python -m covjax.analyze --workdir=runs/A,runs/B --out=report [--fit_fraction=0.5]

Writes into --out: entropy_reward.png (entropy and reward against step, all runs), law_fit.png
(entropy-accuracy scatter with the fitted R = -a exp(H) + b), cov_hist_<run>.png (token covariance
histogram of the first and last cov dump with the Clip-Cov band and the KL-Cov threshold, from the
run's config.json unless the flags give them), entropy_check.png (predicted against measured entropy
change, when the trainer ran the live check) and summary.md (see
covjax.analysis.stats.summary_markdown).

A bad flag value (a workdir without metrics, a metric name the runs do not log, a number out of
range, an unknown flag) stops it with one line naming the flag and the value, before it writes
anything.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

from absl import app, flags

from covjax import cli, metrics
from covjax.analysis import plots, runs, stats

# Required, checked in main rather than by absl's required=True: absl would check it whenever any
# module's flags are parsed (tests run this command line in-process beside covjax.eval's).
_WORKDIR = flags.DEFINE_list("workdir", None, "Comma-separated training workdirs (required).")
_OUT = flags.DEFINE_string("out", None, "Output folder for the figures and summary.md (required).")
_FIT_FRACTION = flags.DEFINE_float(
    "fit_fraction", 0.5, "Fit the law on this first fraction of the steps, predict the rest.")
_ACCURACY_KEY = flags.DEFINE_string(
    "accuracy_key", None, "Accuracy metric for the law; default val/average_accuracy, else the "
    "first val/<set>/accuracy present, else accuracy/mean.")
_ENTROPY_KEY = flags.DEFINE_string("entropy_key", metrics.ENTROPY_TOKEN_MEAN, "Entropy metric.")
_REWARD_KEY = flags.DEFINE_string("reward_key", metrics.REWARD_MEAN, "Reward metric.")
_BIN_STEPS = flags.DEFINE_integer("bin_steps", 10, "Steps per bin for the binned R^2.",
                                  lower_bound=1)
_WINDOW = flags.DEFINE_integer("window", 10, "Moving-average window for the equal-reward table.",
                               lower_bound=1)
_EQUAL_REWARD = flags.DEFINE_float(
    "equal_reward", None, "Reward level for the equal-reward table; default the highest level "
    "that every run reaches.")
_CONCENTRATION_MIN_STEP = flags.DEFINE_integer(
    "concentration_min_step", 10, "Covariance concentration: median over dumps from this step on.",
    lower_bound=0)
_OWN = "; default: the run's own (its config.json), else the paper's "
_CLIP_COV_LB = flags.DEFINE_float("clip_cov_lb", None,
                                  "Clip-Cov band lower bound to mark" + _OWN + "1.0.")
_CLIP_COV_UB = flags.DEFINE_float("clip_cov_ub", None,
                                  "Clip-Cov band upper bound to mark" + _OWN + "5.0.")
_KL_COV_RATIO = flags.DEFINE_float("kl_cov_ratio", None, "KL-Cov top-k ratio whose threshold the "
                                   "histogram marks" + _OWN + "2e-3.")
flags.register_validator("fit_fraction", lambda v: 0.0 < v < 1.0, "must be in (0, 1)")
flags.register_validator("equal_reward", lambda v: v is None or math.isfinite(v),
                         "must be a finite number")


def _run_names(workdirs: list[str]) -> list[str]:
    """Base names of the workdirs; the whole path where two base names collide."""
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    return [n if names.count(n) == 1 else os.path.normpath(w)
            for n, w in zip(names, workdirs, strict=True)]


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _read_runs(workdirs: Sequence[str] | None) -> dict[str, list[dict]]:
    """{run name: records} of every --workdir, the metric flags checked against what each logs."""
    if workdirs is None:
        cli.fail("--workdir is required: the training workdirs to report, comma-separated")
    if not workdirs:
        cli.fail("--workdir='': names no workdir")
    records = {}
    for name, workdir in zip(_run_names(list(workdirs)), workdirs, strict=True):
        try:
            records[name] = runs.read_metrics(workdir)
        except (OSError, ValueError) as e:
            cli.fail(f"--workdir={workdir}: {e}")
        logged = set().union(*records[name])
        path = os.path.join(workdir, metrics.METRICS_FILE)
        for flag in (_ENTROPY_KEY, _REWARD_KEY, _ACCURACY_KEY):
            if flag.value is not None and flag.value not in logged:
                cli.fail(f"--{flag.name}={flag.value}: not a metric of {path}")
        try:
            runs.resolve_accuracy_key(records[name], _ACCURACY_KEY.value)
        except ValueError as e:  # no accuracy metric the default can take
            cli.fail(f"--workdir={workdir}: {e}")
    return records


def _histogram_marks(workdirs: Sequence[str]) -> dict[str, dict[str, float]]:
    """{workdir: its histogram marks}: the flags given, else the run's config.json (a bad one is
    named by the flags given, else by --workdir)."""
    given = {flag.name: flag.value for flag in (_CLIP_COV_LB, _CLIP_COV_UB, _KL_COV_RATIO)}
    marks = {}
    for workdir in workdirs:
        try:
            marks[workdir] = runs.histogram_marks(workdir, **given)
        except (OSError, ValueError) as e:
            named = [f"--{k}={v}" for k, v in given.items() if v is not None]
            cli.fail(f"{', '.join(named) or f'--workdir={workdir}'}: {e}")
    return marks


def _check_out(out: str | None) -> None:
    if out is None:
        cli.fail("--out is required: the folder the figures and summary.md go to")
    if os.path.exists(out) and not os.path.isdir(out):
        cli.fail(f"--out={out}: exists and is not a directory")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]} (every setting is a --flag=value)")
    _check_out(_OUT.value)
    workdirs = _WORKDIR.value
    records = _read_runs(workdirs)
    marks = _histogram_marks(workdirs)
    print(_write_report(records, workdirs, marks, _OUT.value))


def _write_report(runs_by_name: Mapping[str, list[dict]], workdirs: Sequence[str],
           marks: Mapping[str, Mapping[str, float]], out_dir: str) -> str:
    """Writes the figures and summary.md of the runs into `out_dir`; returns summary.md."""
    os.makedirs(out_dir, exist_ok=True)
    figures = []

    def out(filename: str) -> str:
        figures.append(filename)
        return os.path.join(out_dir, filename)

    summaries, law_points, checks = [], {}, {}
    for (name, records), workdir in zip(runs_by_name.items(), workdirs, strict=True):
        accuracy_key = runs.resolve_accuracy_key(records, _ACCURACY_KEY.value)
        summary = stats.summarize_run(
            name, workdir, records, accuracy_key=accuracy_key, entropy_key=_ENTROPY_KEY.value,
            reward_key=_REWARD_KEY.value, fit_fraction=_FIT_FRACTION.value,
            bin_steps=_BIN_STEPS.value, concentration_min_step=_CONCENTRATION_MIN_STEP.value)
        summaries.append(summary)
        _, entropy, accuracy = runs.series(records, [_ENTROPY_KEY.value, accuracy_key])
        law_points[name] = (entropy, accuracy, summary.fit)
        check = runs.entropy_check_series(records)
        if check[0].size:
            checks[name] = check
        dumps = runs.cov_dump_paths(workdir, records)
        if dumps:
            first, last = min(dumps), max(dumps)
            plots.plot_cov_histogram(
                {f"step {s}": runs.load_cov(dumps[s]) for s in sorted({first, last})},
                out(f"cov_hist_{_file_safe(name)}.png"), **marks[workdir])

    plots.plot_entropy_and_reward(runs_by_name, out("entropy_reward.png"),
                                  entropy_key=_ENTROPY_KEY.value, reward_key=_REWARD_KEY.value)
    plots.plot_law_fit(law_points, out("law_fit.png"),
                       accuracy_label=", ".join(sorted({s.accuracy_key for s in summaries})))
    if checks:
        plots.plot_entropy_check(checks, out("entropy_check.png"))
    equal_reward = stats.equal_reward_entropies(
        runs_by_name, level=_EQUAL_REWARD.value, window=_WINDOW.value,
        entropy_key=_ENTROPY_KEY.value, reward_key=_REWARD_KEY.value)
    markdown = stats.summary_markdown(
        summaries, equal_reward, fit_fraction=_FIT_FRACTION.value, bin_steps=_BIN_STEPS.value,
        window=_WINDOW.value, concentration_min_step=_CONCENTRATION_MIN_STEP.value)
    markdown += "\n## Figures\n\n" + "".join(f"![{f}]({f})\n" for f in figures)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    return markdown


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
