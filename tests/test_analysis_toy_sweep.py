"""covjax.analysis.toy_sweep: run names, and each expected finding judged at its threshold."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from covjax.analysis import toy_sweep


def _row(variant: str, method: str, seed: int = 0, **values) -> toy_sweep.RunRow:
    """A sweep row with every number nan except those given."""
    numbers = {f.name: math.nan for f in dataclasses.fields(toy_sweep.RunRow)
               if f.type in ("float", float)}
    numbers.update(values)
    return toy_sweep.RunRow(name=toy_sweep.run_name(variant, method, seed), variant=variant,
                            method=method, seed=seed, num_steps=300,
                            num_concentration_dumps=3, **numbers)


def _evaluate(tmp_path, rows: list[toy_sweep.RunRow], reward: np.ndarray
              ) -> list[toy_sweep.Target]:
    """evaluate_targets on `rows`, each run's metrics.jsonl holding `reward` per step and its
    row's final entropy as a constant entropy."""
    workdirs = {}
    for row in rows:
        workdir = tmp_path / row.name
        workdir.mkdir()
        with open(workdir / "metrics.jsonl", "w", encoding="utf-8") as f:
            for step, r in enumerate(reward):
                f.write(json.dumps({"step": step, "reward/mean": float(r),
                                    "entropy/token_mean": row.final_entropy}) + "\n")
        workdirs[row.name] = str(workdir)
    return toy_sweep.evaluate_targets(rows, workdirs)


def _find(targets: list[toy_sweep.Target], scope: str, start: str) -> toy_sweep.Target:
    """The one target of `scope` whose text starts with `start`."""
    (hit,) = [t for t in targets if t.scope == scope and t.target.startswith(start)]
    return hit


def test_run_name_round_trip():
    name = toy_sweep.run_name("hard", "clip_higher", 12)
    assert name == "hard_clip_higher_s12"
    assert toy_sweep._parse_name(name) == ("hard", "clip_higher", 12)
    with pytest.raises(ValueError, match="run name 'easy_sgd_s0'"):
        toy_sweep._parse_name("easy_sgd_s0")


def test_targets_at_their_thresholds(tmp_path):
    """Ratios, reward drops, R² and concentrations just either side of the default thresholds."""
    rows = [
        # grpo keeps 0.2 of 1.0: lost exactly 80% (PASS); its final reward 0.99
        _row("easy", "grpo", initial_entropy=1.0, final_entropy=0.2, final_reward=0.99,
             final_accuracy=1.0, concentration=20.0),
        # 0.5992 / 0.2 = 2.996x: below 3 (MISS), shown with three decimals
        _row("easy", "clip_cov", initial_entropy=1.0, final_entropy=0.5992, final_reward=0.99,
             final_accuracy=1.0, concentration=19.99),
        # 3.5x, reward 1.9 points below grpo's (PASS)
        _row("easy", "kl_cov", initial_entropy=1.0, final_entropy=0.7, final_reward=0.971,
             final_accuracy=1.0, concentration=25.0),
        # hard: grpo lost 79.9% (MISS), R² 0.899 (MISS)
        _row("hard", "grpo", initial_entropy=1.0, final_entropy=0.201, final_reward=0.8,
             final_accuracy=0.8, law_r2=0.899, law_r2_binned=0.95, concentration=30.0),
    ]
    targets = _evaluate(tmp_path, rows, np.where(np.arange(40) < 20, 0.5, 1.0))

    assert _find(targets, "easy, seed 0", "grpo loses").passed is True
    clip_cov = _find(targets, "easy, seed 0", "clip_cov: >= 3x")
    assert clip_cov.passed is False and "2.996x" in clip_cov.measured
    kl_cov = _find(targets, "easy, seed 0", "kl_cov: >= 3x")
    assert kl_cov.passed is True and "(-1.90 points)" in kl_cov.measured
    assert _find(targets, "easy, seed 0", "clip_cov: top-1%").passed is False
    assert _find(targets, "easy, seed 0", "grpo: top-1%").passed is True
    assert _find(targets, "hard, seed 0", "grpo loses").passed is False
    assert _find(targets, "hard, seed 0", "law").passed is False
    # the 10-step moving average of a reward that jumps from 0.5 to 1 at step 20 first reaches
    # 1 at step 29; the entropy there is the run's constant
    equal = _find(targets, "easy, seed 0", "entropy at equal reward 1.000")
    assert equal.passed is None
    assert "grpo H 0.200 at step 29" in equal.measured
    assert "kl_cov H 0.700 at step 29" in equal.measured


def test_reward_drop_over_two_points_misses(tmp_path):
    rows = [
        _row("easy", "grpo", initial_entropy=1.0, final_entropy=0.1, final_reward=1.0,
             final_accuracy=1.0, concentration=30.0),
        _row("easy", "kl_cov", initial_entropy=1.0, final_entropy=0.5, final_reward=0.979,
             final_accuracy=1.0, concentration=30.0),
    ]
    kl_cov = _find(_evaluate(tmp_path, rows, np.ones(10)), "easy, seed 0", "kl_cov: >= 3x")
    assert kl_cov.passed is False and "5.000x" in kl_cov.measured
    assert "(-2.10 points)" in kl_cov.measured


def test_targets_markdown_counts_each_target_across_seeds():
    """One row per (target, variant, seed), then per (target, variant) the seeds it holds on."""
    ratio, law = "kl_cov: >= 3x grpo's entropy", "law R = -a exp(H) + b fits grpo"
    targets = [
        toy_sweep.Target(ratio, "easy", 0, "2.245x", False),
        toy_sweep.Target(ratio, "easy", 1, "5.932x", True),
        toy_sweep.Target(ratio, "easy", 2, "3.580x", True),
        toy_sweep.Target(law, "hard", 0, "R² 0.894", False),
        toy_sweep.Target(law, "hard", 1, "R² 0.936", True),
        toy_sweep.Target("entropy at equal reward", "easy", 0, "grpo H 0.2", None),
        toy_sweep.Target("grpo loses >= 80% of its entropy", "hard", 0, "lost 90.4%", True),
        toy_sweep.Target("grpo loses >= 80% of its entropy", "easy", 0, "lost 79.0%", False),
        toy_sweep.Target("grpo loses >= 80% of its entropy", "easy", 1, "lost 92.1%", True),
        toy_sweep.Target("grpo loses >= 80% of its entropy", "easy", 2, "lost 70.0%", False),
    ]
    text = toy_sweep.targets_markdown(targets)
    assert "| kl_cov: >= 3x grpo's entropy | easy, seed 0 | MISS | 2.245x |" in text
    assert "| entropy at equal reward | easy, seed 0 | reported | grpo H 0.2 |" in text
    summary = text.split("Across seeds:")[1]
    assert "| kl_cov: >= 3x grpo's entropy | easy | 2 of 3 seeds | 0 |" in summary
    assert "| law R = -a exp(H) + b fits grpo | hard | 1 of 2 seeds | 0 |" in summary
    # the same target text on both variants: counted per variant
    assert "| grpo loses >= 80% of its entropy | hard | 1 of 1 seeds | none |" in summary
    assert "| grpo loses >= 80% of its entropy | easy | 1 of 3 seeds | 0, 2 |" in summary
    assert "entropy at equal reward" not in summary
    reported_only = [t for t in targets if t.passed is None]
    assert "Across seeds" not in toy_sweep.targets_markdown(reported_only)
