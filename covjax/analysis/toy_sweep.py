"""The toy reproduction of the entropy mechanism as a sweep: train the methods on both toy
variants over several seeds, tabulate each run, and check the findings the toy should reproduce.

    python -m covjax.analysis.toy_sweep run --out=runs/toy_sweep --seeds=0,1 --steps=300
    python -m covjax.analysis.toy_sweep report --out=runs/toy_sweep --seeds=0,1 \
        --equal_reward=easy=0.9:0.99,hard=0.5:0.8

`run` trains grpo, clip_higher, clip_cov and kl_cov (configs/toy_<method>.py, ":hard" for the
non-saturating variant) one after another in subprocesses, into OUT/<variant>_<method>_s<seed>;
every method of a seed starts from the same cached warm start (covjax.tasks.toy_warm_start). A
run whose metrics.jsonl already holds its final record is skipped; an interrupted one resumes from
its checkpoint. `report` reads the metrics back (covjax.analysis.runs, covjax.analysis.stats) into
one table row per run, checks each expected finding against its threshold (evaluate_targets: per
seed, then on how many seeds each holds) and writes table.md, targets.md, rows.json and figures/
into OUT/report (or --report_dir). notebooks/entropy_mechanism.ipynb calls the same functions;
docs/toy_results.md holds the results.

Definitions used by the table and the targets (metric names: docs/metrics.md):
- initial entropy = entropy/token_mean at step 0 (the warm-started policy);
- final entropy, final reward = means of entropy/token_mean and reward/mean over the last
  `final_window` RL steps (one step's reward of 64 x 8 samples is noisy); final accuracy =
  val/toy/accuracy of the trainer's evaluation after the last step (every target, 16 samples);
- the law R = -a exp(H) + b is fitted to (entropy/token_mean, val/toy/accuracy) at the evaluated
  steps (covjax.analysis.stats.summarize_run: raw, over 30-step bins, and fitted on the first
  half of the evaluations predicting the second), and to (entropy/token_mean, reward/mean) of
  every step (raw and over 10-step bins);
- tokens touched per step = mean of cov/num_selected (tokens Clip-Cov zeroed / KL-Cov
  penalised in the step, all mini-batches);
- concentration = the median over the cov dumps from step `concentration_min_step` on of (mean
  cov of the top 1% tokens) / (mean |cov| of all tokens), steps where all rewards agreed left out
  (and dumps whose covariances are all 0: without dynamic sampling a step may hold no group
  with differing rewards).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from covjax import metrics
from covjax.analysis import plots, stats
from covjax.analysis.runs import (
    Record,
    cov_dump_paths,
    entropy_check_series,
    histogram_marks,
    load_cov,
    read_metrics,
    series,
)

METHODS = ("grpo", "clip_higher", "clip_cov", "kl_cov")
VARIANTS = ("easy", "hard")
ACCURACY_KEY = metrics.val_accuracy("toy")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- running


def run_name(variant: str, method: str, seed: int) -> str:
    """The workdir name of one run: <variant>_<method>_s<seed>."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {list(VARIANTS)}")
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {list(METHODS)}")
    return f"{variant}_{method}_s{seed}"


def train_command(variant: str, method: str, seed: int, workdir: str, *, steps: int,
                  smoke: bool = False, overrides: Sequence[str] = ()) -> list[str]:
    """The `python -m covjax.train` command of one run (configs/toy_<method>.py[:hard][,smoke]);
    `overrides` are extra "key=value" config overrides (e.g. "data.toy.warm_start_steps=200")."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    words = [w for w, on in (("hard", variant == "hard"), ("smoke", smoke)) if on]
    run_name(variant, method, seed)  # validates variant and method
    config = os.path.join(REPO_ROOT, "configs", f"toy_{method}.py")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"config file {config!r} not found (run from a covjax checkout)")
    if words:
        config += ":" + ",".join(words)
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r} is not key=value")
    return [sys.executable, "-m", "covjax.train", f"--config={config}", f"--config.seed={seed}",
            f"--config.train.steps={steps}", *(f"--config.{o}" for o in overrides),
            f"--workdir={workdir}"]


def is_complete(workdir: str, steps: int) -> bool:
    """True when `workdir`/metrics.jsonl holds the record of the final evaluation (step == steps),
    which the trainer writes after the last RL step."""
    path = os.path.join(workdir, metrics.METRICS_FILE)
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    return bool(lines) and json.loads(lines[-1]).get("step") == steps


def _subprocess_env() -> dict[str, str]:
    """This environment without a forced host device count (tests set 8 fake CPU devices; a
    training run uses one device as from the command line)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    return env


def run_sweep(out_dir: str, *, steps: int = 300, seeds: Sequence[int] = (0,),
              variants: Sequence[str] = VARIANTS, methods: Sequence[str] = METHODS,
              smoke: bool = False, overrides: Sequence[str] = (),
              log: Callable[[str], None] = print) -> dict[str, str]:
    """Trains every (seed, variant, method) run one at a time (seed-major, so that a shortened
    sweep still compares all methods) and returns {run name: workdir}. Each run's output goes to
    its workdir's train.log; a failed run raises RuntimeError with the log's tail."""
    if not seeds or not variants or not methods:
        raise ValueError(f"seeds {seeds}, variants {variants} and methods {methods} must be "
                         "non-empty")
    os.makedirs(out_dir, exist_ok=True)
    workdirs = {}
    for variant, method, seed, name, workdir in _runs(out_dir, seeds, variants, methods):
        workdirs[name] = workdir
        if is_complete(workdir, steps):
            log(f"{name}: complete, skipped")
            continue
        os.makedirs(workdir, exist_ok=True)
        command = train_command(variant, method, seed, workdir, steps=steps, smoke=smoke,
                                overrides=overrides)
        t0 = time.perf_counter()
        log_path = os.path.join(workdir, "train.log")
        with open(log_path, "a", encoding="utf-8") as log_file:
            result = subprocess.run(command, cwd=REPO_ROOT, env=_subprocess_env(),
                                    stdout=log_file, stderr=subprocess.STDOUT, check=False)
        if result.returncode != 0:
            with open(log_path, encoding="utf-8") as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}; "
                               f"end of {log_path}:\n{tail}")
        log(f"{name}: {time.perf_counter() - t0:.0f} s")
    return workdirs


def _runs(out_dir: str, seeds: Sequence[int], variants: Sequence[str],
          methods: Sequence[str]) -> Iterator[tuple[str, str, int, str, str]]:
    """(variant, method, seed, run name, absolute workdir) of every run, seed-major (so that a
    shortened sweep still compares all methods)."""
    for seed in seeds:
        for variant in variants:
            for method in methods:
                name = run_name(variant, method, seed)
                yield variant, method, seed, name, os.path.abspath(os.path.join(out_dir, name))


# ----------------------------------------------------------------------------- one run


@dataclasses.dataclass(frozen=True)
class RunRow:
    """One row of the sweep table (nan where the metrics do not allow a number)."""

    name: str
    variant: str
    method: str
    seed: int
    num_steps: int
    initial_entropy: float
    final_entropy: float
    final_reward: float
    final_accuracy: float
    law_a: float  # R = -a exp(H) + b on (entropy, val/toy/accuracy)
    law_b: float
    law_r2: float
    law_r2_binned: float
    ceiling: float
    half_fit_mae: float  # fitted on the first half of the evaluations, predicting the second
    half_fit_ceiling: float
    reward_law_r2: float  # the same law on (entropy, reward/mean) of every step
    reward_law_r2_binned: float
    tokens_touched: float
    concentration: float
    concentration_min: float
    num_concentration_dumps: int

    @property
    def entropy_lost(self) -> float:
        """The fraction of the initial entropy lost by the end."""
        return 1.0 - self.final_entropy / self.initial_entropy


def _tail_mean(records: Sequence[Record], key: str, window: int) -> float:
    """Mean of `key` over the last `window` records that hold it."""
    _, values = series(records, [key])
    return float(np.mean(values[-window:])) if values.size else math.nan


def _get(obj: object | None, attribute: str) -> float:
    return math.nan if obj is None else float(getattr(obj, attribute))


def summarize(name: str, workdir: str, *, final_window: int = 20, val_bin_steps: int = 30,
              reward_bin_steps: int = 10, concentration_min_step: int = 10) -> RunRow:
    """The table row of one run (module docstring: definitions). The law on val/toy/accuracy is
    binned over `val_bin_steps` steps (the trainer evaluates every 10: a 10-step bin is one
    evaluation), the law on the per-step reward over `reward_bin_steps`."""
    variant, method, seed = _parse_name(name)
    records = read_metrics(workdir)
    rl_records = [r for r in records if metrics.ENTROPY_TOKEN_MEAN in r]
    val = stats.summarize_run(name, workdir, records, accuracy_key=ACCURACY_KEY,
                              bin_steps=val_bin_steps,
                              concentration_min_step=concentration_min_step)
    reward = stats.summarize_run(name, workdir, records, accuracy_key=metrics.REWARD_MEAN,
                                 bin_steps=reward_bin_steps,
                                 concentration_min_step=concentration_min_step)
    concentration = [c for step, c in stats.concentration_by_step(workdir, records).items()
                     if step >= concentration_min_step and math.isfinite(c)]
    _, accuracy = series(records, [ACCURACY_KEY])
    extrapolation = val.extrapolation
    return RunRow(
        name=name, variant=variant, method=method, seed=seed, num_steps=val.num_steps,
        initial_entropy=val.initial_entropy,
        final_entropy=_tail_mean(rl_records, metrics.ENTROPY_TOKEN_MEAN, final_window),
        final_reward=_tail_mean(rl_records, metrics.REWARD_MEAN, final_window),
        final_accuracy=float(accuracy[-1]) if accuracy.size else math.nan,
        law_a=_get(val.fit, "a"), law_b=_get(val.fit, "b"), law_r2=_get(val.fit, "r2"),
        law_r2_binned=_get(val.binned_fit, "r2"), ceiling=_get(val.fit, "ceiling"),
        half_fit_mae=_get(extrapolation, "mae"),
        half_fit_ceiling=math.nan if extrapolation is None else extrapolation.fit.ceiling,
        reward_law_r2=_get(reward.fit, "r2"), reward_law_r2_binned=_get(reward.binned_fit, "r2"),
        tokens_touched=val.tokens_touched,
        concentration=float(np.median(concentration)) if concentration else math.nan,
        concentration_min=min(concentration) if concentration else math.nan,
        num_concentration_dumps=len(concentration))


def _parse_name(name: str) -> tuple[str, str, int]:
    """(variant, method, seed) of a run name written by run_name."""
    variant, rest = name.split("_", 1)
    method, _, seed = rest.rpartition("_s")
    if variant not in VARIANTS or method not in METHODS or not seed.isdigit():
        raise ValueError(f"run name {name!r} is not <variant>_<method>_s<seed> "
                         f"(variants {list(VARIANTS)}, methods {list(METHODS)})")
    return variant, method, int(seed)


# ----------------------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class Target:
    """One checked finding on one (variant, seed): what it states, the numbers measured, and
    whether it holds at its threshold."""

    target: str
    variant: str
    seed: int
    measured: str
    passed: bool | None  # None: a comparison to report, not a pass/fail

    @property
    def scope(self) -> str:
        """'<variant>, seed <seed>': the column targets.md shows."""
        return f"{self.variant}, seed {self.seed}"


def equal_reward(workdirs: Mapping[str, str], *, level: float | None, window: int = 10
                 ) -> tuple[float, dict[str, tuple[int, float] | None]]:
    """(level, {run: (step, entropy) where its moving-average reward first reaches level});
    level None = the highest level every run reaches (stats.equal_reward_entropies)."""
    runs = {name: [r for r in read_metrics(w) if metrics.ENTROPY_TOKEN_MEAN in r]
            for name, w in workdirs.items()}
    return stats.equal_reward_entropies(runs, level=level, window=window)


def _fmt(x: float, spec: str = ".3g") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def evaluate_targets(rows: Sequence[RunRow], workdirs: Mapping[str, str], *,
                     min_entropy_lost: float = 0.8, min_entropy_ratio: float = 3.0,
                     max_reward_drop: float = 0.02, min_law_r2: float = 0.9,
                     min_concentration: float = 20.0,
                     equal_reward_levels: Mapping[str, Sequence[float]] | None = None,
                     window: int = 10) -> list[Target]:
    """The findings the toy should reproduce, per (variant, seed), each judged at a threshold
    (the defaults: the paper's qualitative findings made measurable on the toy):
    - grpo loses >= 80% of its initial entropy (both variants);
    - easy: clip_cov and kl_cov end with >= 3x grpo's entropy and a final reward (last-window
      mean of reward/mean) at most 2 points below grpo's (the final val/toy/accuracy is shown);
    - hard: the law fits grpo with R^2 >= 0.9 on (entropy, val/toy/accuracy), raw and binned
      shown (and the law on the per-step reward), with the first-half prediction's error;
    - each run: the median concentration over the dumps from the chosen step on is >= 20x;
    - entropy at equal reward (no threshold): at the highest level all methods of the (variant,
      seed) reach, and at the levels of `equal_reward_levels[variant]`."""
    by_key = {(r.variant, r.seed, r.method): r for r in rows}
    equal_reward_levels = equal_reward_levels or {}
    targets = []
    for variant, seed in sorted({(r.variant, r.seed) for r in rows}):
        grpo = by_key.get((variant, seed, "grpo"))
        if grpo is not None:
            targets.append(Target(
                f"grpo loses >= {min_entropy_lost:.0%} of its entropy", variant, seed,
                f"H {grpo.initial_entropy:.3f} -> {grpo.final_entropy:.3f}: lost "
                f"{_fmt(100 * grpo.entropy_lost, '.1f')}%",
                bool(grpo.entropy_lost >= min_entropy_lost)))
        if variant == "easy" and grpo is not None:
            for method in ("clip_cov", "kl_cov"):
                row = by_key.get((variant, seed, method))
                if row is None:
                    continue
                ratio = row.final_entropy / grpo.final_entropy
                drop = grpo.final_reward - row.final_reward
                targets.append(Target(
                    f"{method}: >= {min_entropy_ratio:g}x grpo's entropy, reward <= "
                    f"{100 * max_reward_drop:g} points below", variant, seed,
                    f"H {row.final_entropy:.3f} vs {grpo.final_entropy:.3f} = {ratio:.3f}x; "
                    f"reward {row.final_reward:.4f} vs {grpo.final_reward:.4f} "
                    f"({-100 * drop:+.2f} points); final accuracy {row.final_accuracy:.3f} vs "
                    f"{grpo.final_accuracy:.3f}",
                    bool(ratio >= min_entropy_ratio and drop <= max_reward_drop)))
        if variant == "hard" and grpo is not None:
            targets.append(Target(
                f"law R = -a exp(H) + b fits grpo with R² >= {min_law_r2:g}", variant, seed,
                f"val accuracy: R² {_fmt(grpo.law_r2)} raw, {_fmt(grpo.law_r2_binned)} binned "
                f"(a {_fmt(grpo.law_a)}, b {_fmt(grpo.law_b)}, ceiling {_fmt(grpo.ceiling)}); "
                f"per-step reward: R² {_fmt(grpo.reward_law_r2)} raw, "
                f"{_fmt(grpo.reward_law_r2_binned)} binned",
                bool(grpo.law_r2 >= min_law_r2)))
            targets.append(Target(
                "first half of the evaluations predicts the second (grpo)", variant, seed,
                f"MAE {_fmt(grpo.half_fit_mae)}; ceiling from the first half "
                f"{_fmt(grpo.half_fit_ceiling)} vs {_fmt(grpo.ceiling)} from all, final accuracy "
                f"{_fmt(grpo.final_accuracy)}", None))
        group = [r for r in rows if (r.variant, r.seed) == (variant, seed)]
        for r in group:
            targets.append(Target(
                f"{r.method}: top-1% mean cov >= {min_concentration:g}x mean \\|cov\\| (median "
                "over dumps)", variant, seed,
                f"{_fmt(r.concentration)}x (min {_fmt(r.concentration_min)}, "
                f"{r.num_concentration_dumps} dumps)", bool(r.concentration >= min_concentration)))
        names = {r.name: workdirs[r.name] for r in group}
        for level in (None, *equal_reward_levels.get(variant, ())):
            reached_level, reached = equal_reward(names, level=level, window=window)
            targets.append(Target(
                f"entropy at equal reward {reached_level:.3f} ({window}-step moving average)"
                + (" (highest level all reach)" if level is None else ""), variant, seed,
                "; ".join(f"{_parse_name(n)[1]} " + (f"H {hit[1]:.3f} at step {hit[0]}" if hit
                                                       else "never")
                          for n, hit in reached.items()), None))
    return targets


# ----------------------------------------------------------------------------- tables


TABLE_COLUMNS = (
    ("run", "name", None), ("H initial", "initial_entropy", ".4g"),
    ("H final", "final_entropy", ".4g"), ("H lost", "entropy_lost", "%"),
    ("reward final", "final_reward", ".4g"), ("accuracy final", "final_accuracy", ".4g"),
    ("a", "law_a", ".4g"), ("b", "law_b", ".4g"), ("R²", "law_r2", ".4g"),
    ("R² binned", "law_r2_binned", ".4g"), ("ceiling b-a", "ceiling", ".4g"),
    ("half-fit MAE", "half_fit_mae", ".4g"), ("R² reward", "reward_law_r2", ".4g"),
    ("R² reward binned", "reward_law_r2_binned", ".4g"),
    ("touched/step", "tokens_touched", ".4g"), ("concentration", "concentration", ".4g"),
)


def format_cell(value: object, spec: str | None) -> str:
    """A table cell: text as is, numbers with `spec` ("%": percent with one decimal), n/a for
    nan."""
    if spec is None:
        return str(value)
    if spec == "%":
        return _fmt(100 * value, ".1f") + "%"
    return _fmt(value, spec)


def table_markdown(rows: Sequence[RunRow]) -> str:
    """The sweep table, one row per run (module docstring: definitions)."""
    lines = ["| " + " | ".join(title for title, _, _ in TABLE_COLUMNS) + " |",
             "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(getattr(row, field), spec)
                                       for _, field, spec in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _across_seeds_markdown(targets: Sequence[Target]) -> list[str]:
    """Each pass/fail target per variant: on how many of the seeds it was judged on it holds, and
    which seeds miss (a number that could not be measured, nan, counts as a miss). [] if none."""
    by_target: dict[tuple[str, str], list[Target]] = {}
    for t in targets:
        if t.passed is not None:
            by_target.setdefault((t.target, t.variant), []).append(t)
    if not by_target:
        return []
    lines = ["", "Across seeds:", "", "| target | variant | holds on | misses on |",
             "|---|---|---|---|"]
    for (target, variant), group in by_target.items():
        missed = ", ".join(str(t.seed) for t in group if not t.passed) or "none"
        held = sum(bool(t.passed) for t in group)
        lines.append(f"| {target} | {variant} | {held} of {len(group)} seeds | {missed} |")
    return lines


def targets_markdown(targets: Sequence[Target]) -> str:
    """The targets, one row per (target, variant, seed): PASS / MISS / (reported); then each
    pass/fail target counted across seeds (_across_seeds_markdown)."""
    lines = ["| target | variant, seed | result | measured |", "|---|---|---|---|"]
    for t in targets:
        result = "reported" if t.passed is None else ("PASS" if t.passed else "MISS")
        lines.append(f"| {t.target} | {t.scope} | {result} | {t.measured} |")
    return "\n".join(lines + _across_seeds_markdown(targets)) + "\n"


# ----------------------------------------------------------------------------- figures


def plot_overview(runs: Mapping[str, Sequence[Record]], path: str, *,
                  window: int = 10) -> str:
    """Entropy (top row) and reward (bottom row, {window}-step moving average) against step, one
    column per variant, one colour per method; the first seed solid, the others dashed."""
    names = {name: _parse_name(name) for name in runs}
    variants = [v for v in VARIANTS if any(p[0] == v for p in names.values())]
    seeds = sorted({p[2] for p in names.values()})
    fig, axes = plt.subplots(2, len(variants), figsize=(5.5 * len(variants), 6), sharex=True,
                             squeeze=False)
    for column, variant in enumerate(variants):
        ax_h, ax_r = axes[0, column], axes[1, column]
        for name, (v, method, seed) in names.items():
            if v != variant:
                continue
            steps, entropy, reward = series(
                runs[name], [metrics.ENTROPY_TOKEN_MEAN, metrics.REWARD_MEAN])
            style = {"color": f"C{METHODS.index(method)}",
                     "linestyle": "-" if seed == seeds[0] else "--", "linewidth": 1.2,
                     "label": f"{method} s{seed}"}
            ax_h.plot(steps, entropy, **style)
            ax_r.plot(steps, stats.moving_average(reward, window), **style)
        ax_h.set_title(f"{variant} variant")
        ax_h.set_ylabel("entropy (token mean)")
        ax_r.set_ylabel(f"reward ({window}-step mean)")
        ax_r.set_xlabel("RL step")
        ax_h.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_figures(workdirs: Mapping[str, str], rows: Sequence[RunRow], figure_dir: str
                 ) -> list[str]:
    """The figures of covjax.analysis.plots for each (variant, seed) plus the overview: entropy
    and reward against step, the law fit, the covariance histogram of grpo and clip_cov (first
    and last dump, Clip-Cov band and the KL-Cov threshold of the run's own config) and predicted
    vs measured entropy change. Returns the paths written."""
    os.makedirs(figure_dir, exist_ok=True)
    records = {name: read_metrics(w) for name, w in workdirs.items()}
    rows_by_name = {r.name: r for r in rows}
    paths = [plot_overview(records, os.path.join(figure_dir, "overview.png"))]
    for variant, seed in sorted({(r.variant, r.seed) for r in rows}):
        group = [r.name for r in rows if (r.variant, r.seed) == (variant, seed)]
        tag = f"{variant}_s{seed}"
        paths.append(plots.plot_entropy_and_reward(
            {n: records[n] for n in group}, os.path.join(figure_dir, f"entropy_reward_{tag}.png")))
        points = {}
        for n in group:
            _, entropy, accuracy = series(records[n], [metrics.ENTROPY_TOKEN_MEAN, ACCURACY_KEY])
            row = rows_by_name[n]
            fit = (stats.LawFit(row.law_a, row.law_b, row.law_r2, entropy.size)
                   if math.isfinite(row.law_a) else None)
            points[n] = (entropy, accuracy, fit)
        paths.append(plots.plot_law_fit(points, os.path.join(figure_dir, f"law_fit_{tag}.png"),
                                        accuracy_label=ACCURACY_KEY))
        for n in group:
            if _parse_name(n)[1] not in ("grpo", "clip_cov"):
                continue
            dumps = cov_dump_paths(workdirs[n], records[n])
            if not dumps:
                continue
            shown = sorted({min(dumps), max(dumps)})
            paths.append(plots.plot_cov_histogram(
                {f"{n} step {s}": load_cov(dumps[s]) for s in shown},
                os.path.join(figure_dir, f"cov_hist_{n}.png"),
                **histogram_marks(workdirs[n], require_config=True)))
        checks = {}
        for n in group:
            check = entropy_check_series(records[n])
            if check[0].size:
                checks[n] = check
        if checks:
            paths.append(plots.plot_entropy_check(
                checks, os.path.join(figure_dir, f"entropy_check_{tag}.png")))
    return paths


# ----------------------------------------------------------------------------- report


def report(workdirs: Mapping[str, str], report_dir: str, *, final_window: int = 20,
           concentration_min_step: int = 10,
           equal_reward_levels: Mapping[str, Sequence[float]] | None = None,
           figures: bool = True) -> dict[str, object]:
    """Summarises every run, judges the targets and writes into `report_dir`: table.md,
    targets.md, rows.json (the table's numbers unrounded) and figures/*.png. Returns {"rows",
    "targets", "figures", "table", "targets_md"}."""
    if not workdirs:
        raise ValueError("workdirs is empty: no runs to report")
    rows = [summarize(name, w, final_window=final_window,
                      concentration_min_step=concentration_min_step)
            for name, w in workdirs.items()]
    targets = evaluate_targets(rows, workdirs, equal_reward_levels=equal_reward_levels)
    os.makedirs(report_dir, exist_ok=True)
    table, targets_md = table_markdown(rows), targets_markdown(targets)
    with open(os.path.join(report_dir, "table.md"), "w", encoding="utf-8") as f:
        f.write(table)
    with open(os.path.join(report_dir, "targets.md"), "w", encoding="utf-8") as f:
        f.write(targets_md)
    with open(os.path.join(report_dir, "rows.json"), "w", encoding="utf-8") as f:
        json.dump([{**dataclasses.asdict(r), "entropy_lost": r.entropy_lost,
                    "workdir": workdirs[r.name]} for r in rows], f, indent=1)
    paths = make_figures(workdirs, rows, os.path.join(report_dir, "figures")) if figures else []
    return {"rows": rows, "targets": targets, "figures": paths, "table": table,
            "targets_md": targets_md}


def sweep_workdirs(out_dir: str, *, seeds: Sequence[int], variants: Sequence[str] = VARIANTS,
                   methods: Sequence[str] = METHODS) -> dict[str, str]:
    """{run name: workdir} of the runs of a sweep folder that exist (same order as run_sweep)."""
    workdirs = {
        name: workdir
        for _, _, _, name, workdir in _runs(out_dir, seeds, variants, methods)
        if os.path.isfile(os.path.join(workdir, metrics.METRICS_FILE))
    }
    if not workdirs:
        raise FileNotFoundError(f"no run of seeds {list(seeds)}, variants {list(variants)}, "
                                f"methods {list(methods)} in {out_dir!r}")
    return workdirs


# ----------------------------------------------------------------------------- command line


def _levels(text: str) -> dict[str, list[float]]:
    """"easy=0.9,hard=0.3:0.5" -> {"easy": [0.9], "hard": [0.3, 0.5]}."""
    levels = {}
    for item in filter(None, text.split(",")):
        variant, _, values = item.partition("=")
        if variant not in VARIANTS or not values:
            raise ValueError(f"--equal_reward item {item!r} is not <variant>=<level>[:<level>]")
        levels[variant] = [float(v) for v in values.split(":")]
    return levels


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m covjax.analysis.toy_sweep",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--out", required=True, help="Sweep folder (one workdir per run).")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--smoke", action="store_true", help="The configs' :smoke setting.")
    parser.add_argument("--override", action="append", default=[],
                        help="Config override key=value for every run (repeatable).")
    parser.add_argument("--report_dir", default=None, help="Report folder (default OUT/report).")
    parser.add_argument("--final_window", type=int, default=20)
    parser.add_argument("--concentration_min_step", type=int, default=10)
    parser.add_argument("--equal_reward", default="",
                        help="Extra equal-reward levels, e.g. easy=0.9,hard=0.3:0.5.")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants, methods = args.variants.split(","), args.methods.split(",")
    if args.command == "run":
        run_sweep(args.out, steps=args.steps, seeds=seeds, variants=variants, methods=methods,
                  smoke=args.smoke, overrides=args.override,
                  log=lambda line: print(line, flush=True))
        return
    result = report(sweep_workdirs(args.out, seeds=seeds, variants=variants, methods=methods),
                    args.report_dir or os.path.join(args.out, "report"),
                    final_window=args.final_window,
                    concentration_min_step=args.concentration_min_step,
                    equal_reward_levels=_levels(args.equal_reward))
    print(result["table"])
    print(result["targets_md"])


if __name__ == "__main__":
    main()
