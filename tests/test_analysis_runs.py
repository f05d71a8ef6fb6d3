"""covjax.analysis.runs: reading a trainer workdir back, on fake workdirs written here as the
trainer writes them (docs/metrics.md)."""

import json
import math
import os

import numpy as np
import pytest

from covjax.analysis import runs


def law(entropy, a, b):
    return -a * np.exp(entropy) + b


def write_run(workdir, *, a=0.3, b=0.9, num_steps=60, seed=0, val=False, check=True,
              final_eval=False):
    """A fake trainer workdir: metrics.jsonl on the law plus noise, all-agree step 0, cov dumps;
    `final_eval`: then the trainer's record of the evaluation after the last step."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(workdir, "cov"))
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step in range(num_steps):
            entropy = 1.2 * math.exp(-step / 15) + 0.1
            accuracy = law(entropy, a, b) + 0.01 * rng.normal()
            record = {"step": step, "entropy/token_mean": entropy, "reward/mean": accuracy,
                      "accuracy/mean": accuracy, "filter/kept_group_frac": float(step > 0),
                      "cov/num_selected": 3.0}
            if val and step % 5 == 0:
                record["val/toy/accuracy"] = accuracy
            if check:
                predicted = -1e-3 * entropy
                record.update({"entropy_check/predicted_natural": predicted,
                               "entropy_check/predicted_vanilla": 0.5 * predicted,
                               "entropy_check/measured": 20 * predicted})
            f.write(json.dumps(record) + "\n")
        if final_eval:
            f.write(json.dumps({"step": num_steps, "val/toy/accuracy": b - a}) + "\n")
    for step in (0, 20, 40):
        cov = np.zeros(500) if step == 0 else rng.standard_t(2, size=500) * 0.1
        np.save(os.path.join(workdir, "cov", f"step_{step:06d}.npy"), cov.astype(np.float32))


def test_reading_series_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        runs.read_metrics(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        runs.read_metrics(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        runs.read_metrics(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"loss": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        runs.read_metrics(str(tmp_path))

    run = str(tmp_path / "run")
    write_run(run, val=True)
    records = runs.read_metrics(run)
    assert runs.resolve_accuracy_key(records) == "val/toy/accuracy"
    assert runs.resolve_accuracy_key(records, "accuracy/mean") == "accuracy/mean"
    with pytest.raises(ValueError, match="val/other/accuracy"):
        runs.resolve_accuracy_key(records, "val/other/accuracy")
    assert runs.resolve_accuracy_key([{"step": 0, "accuracy/mean": 1}]) == "accuracy/mean"
    math_sets = {"val/aime24/accuracy": 0.1, "val/math500/accuracy": 0.5,
                 "val/average_accuracy": 0.3}
    assert runs.resolve_accuracy_key([{"step": 0, **math_sets}]) == "val/average_accuracy"
    with pytest.raises(ValueError, match="no accuracy metric"):
        runs.resolve_accuracy_key([{"step": 0}])
    steps, val = runs.series(records, ["val/toy/accuracy"])
    np.testing.assert_array_equal(steps, np.arange(0, 60, 5))
    steps, _ = runs.series(records + [{"step": 99, "val/toy/accuracy": float("nan")}],
                           ["val/toy/accuracy"], skip_filtered=True)
    np.testing.assert_array_equal(steps, np.arange(5, 60, 5))  # step 0 all agree, nan dropped
    assert list(runs.cov_dump_paths(run)) == [0, 20, 40]
    assert list(runs.cov_dump_paths(run, records)) == [20, 40]  # all agree at step 0
    np.testing.assert_array_equal(runs.load_cov(runs.cov_dump_paths(run)[20]),
                                  np.load(os.path.join(run, "cov", "step_000020.npy")))


def test_entropy_check_series():
    records = [{"step": 0, "entropy/token_mean": 1.0},
               {"step": 1, "entropy_check/predicted_natural": -2.0,
                "entropy_check/predicted_vanilla": -1.0, "entropy_check/measured": -0.5},
               {"step": 2, "entropy_check/predicted_natural": -4.0}]  # incomplete: left out
    natural, vanilla, measured = runs.entropy_check_series(records)
    assert (natural.tolist(), vanilla.tolist(), measured.tolist()) == ([-2.0], [-1.0], [-0.5])
    assert all(column.size == 0 for column in runs.entropy_check_series(records[:1]))


def test_histogram_marks_follow_the_run_config_then_the_flags(tmp_path):
    """The band and KL-Cov ratio a histogram marks: the given value, else the run's config.json,
    else the paper's (1, 5) and 2e-3; a broken config.json is named."""
    run = tmp_path / "run"
    run.mkdir()
    assert runs.histogram_marks(str(run)) == {
        "clip_cov_lb": 1.0, "clip_cov_ub": 5.0, "kl_cov_ratio": 2e-3}
    (run / "config.json").write_text(json.dumps(
        {"seed": 2, "loss": {"clip_cov_lb": 0.5, "clip_cov_ub": 5.0, "kl_cov_ratio": 0.3}}))
    assert runs.histogram_marks(str(run)) == {
        "clip_cov_lb": 0.5, "clip_cov_ub": 5.0, "kl_cov_ratio": 0.3}
    assert runs.histogram_marks(str(run), clip_cov_lb=2.0, kl_cov_ratio=None) == {
        "clip_cov_lb": 2.0, "clip_cov_ub": 5.0, "kl_cov_ratio": 0.3}
    with pytest.raises(ValueError, match="unknown histogram marks"):
        runs.histogram_marks(str(run), clip_cov_band=1.0)
    with pytest.raises(ValueError, match="need 0 < clip_cov_lb < clip_cov_ub"):
        runs.histogram_marks(str(run), clip_cov_lb=0.0)
    (run / "config.json").write_text(json.dumps({"seed": 2, "loss": {"clip_cov_lb": 0.5}}))
    with pytest.raises(ValueError, match="'loss' section lacks a number for 'clip_cov_ub'"):
        runs.histogram_marks(str(run))
    # every mark given: the broken file is not read
    assert runs.histogram_marks(str(run), clip_cov_lb=1, clip_cov_ub=2, kl_cov_ratio=0.1) == {
        "clip_cov_lb": 1.0, "clip_cov_ub": 2.0, "kl_cov_ratio": 0.1}
    (run / "config.json").write_text(json.dumps({"seed": 2}))
    with pytest.raises(ValueError, match="config.json' holds no trainer config with a 'loss'"):
        runs.histogram_marks(str(run))
    with pytest.raises(FileNotFoundError, match="config.json' not found"):
        runs.read_loss_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json' not found"):
        runs.histogram_marks(str(tmp_path), require_config=True)


