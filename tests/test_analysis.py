"""covjax.analysis and `python -m covjax.analyze` against SciPy/NumPy on synthetic runs."""

import json
import math
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from scipy.optimize import curve_fit

import covjax
from covjax import analysis


def law(entropy, a, b):
    return -a * np.exp(entropy) + b


def synthetic(num=300, a=0.25, b=0.95, sigma=0.02, seed=0):
    """Steps, entropy falling with step, accuracy on the law plus Gaussian noise of sd sigma."""
    rng = np.random.default_rng(seed)
    steps = np.arange(num)
    entropy = 1.4 * np.exp(-steps / 80) + 0.1 + 0.02 * rng.normal(size=num)
    return steps, entropy, law(entropy, a, b) + sigma * rng.normal(size=num)


def test_fit_recovers_known_parameters_within_noise():
    """a, b within 4 standard errors of OLS (sigma^2 (X'X)^-1, X = [-e^H, 1]); same optimum as
    SciPy's curve_fit; R^2 and the ceiling b - a from their definitions."""
    a, b, sigma = 0.25, 0.95, 0.02
    _, entropy, accuracy = synthetic(a=a, b=b, sigma=sigma)
    fit = analysis.fit_law(entropy, accuracy)
    design = np.stack([-np.exp(entropy), np.ones_like(entropy)], axis=1)
    se_a, se_b = sigma * np.sqrt(np.diag(np.linalg.inv(design.T @ design)))
    assert abs(fit.a - a) < 4 * se_a and abs(fit.b - b) < 4 * se_b
    (ref_a, ref_b), _ = curve_fit(law, entropy, accuracy, p0=(1.0, 1.0))
    np.testing.assert_allclose([fit.a, fit.b], [ref_a, ref_b], rtol=1e-6)
    residual = accuracy - law(entropy, ref_a, ref_b)
    want_r2 = 1 - np.sum(residual**2) / np.sum((accuracy - accuracy.mean()) ** 2)
    np.testing.assert_allclose(fit.r2, want_r2, rtol=1e-6)
    assert fit.ceiling == pytest.approx(fit.b - fit.a) and fit.num_points == len(entropy)


def test_fit_is_exact_without_noise():
    _, entropy, accuracy = synthetic(a=0.4, b=0.7, sigma=0.0)
    fit = analysis.fit_law(entropy, accuracy)
    np.testing.assert_allclose([fit.a, fit.b, fit.r2, fit.ceiling], [0.4, 0.7, 1.0, 0.3],
                               atol=1e-10)


def test_fit_rejects_too_few_points():
    with pytest.raises(ValueError, match="2 distinct"):
        analysis.fit_law(np.ones(5), np.arange(5.0))


def test_binned_fit_is_the_fit_of_bin_means():
    """Over 10-step bins: curve_fit on NumPy means of each bin; averaging raises R^2."""
    steps, entropy, accuracy = synthetic(sigma=0.05)
    binned = analysis.fit_law_binned(steps, entropy, accuracy, bin_steps=10)
    h, r = entropy.reshape(30, 10).mean(1), accuracy.reshape(30, 10).mean(1)
    (ref_a, ref_b), _ = curve_fit(law, h, r, p0=(1.0, 1.0))
    np.testing.assert_allclose([binned.a, binned.b], [ref_a, ref_b], rtol=1e-6)
    assert binned.num_points == 30
    assert binned.r2 > analysis.fit_law(entropy, accuracy).r2


def test_extrapolation_error_on_the_rest():
    """Fit on the first half (in step order, input shuffled), MAE and RMSE on the second half."""
    steps, entropy, accuracy = synthetic(sigma=0.03)
    order = np.random.default_rng(5).permutation(len(steps))
    result = analysis.extrapolate(steps[order], entropy[order], accuracy[order], fit_fraction=0.5)
    (ref_a, ref_b), _ = curve_fit(law, entropy[:150], accuracy[:150], p0=(1.0, 1.0))
    error = law(entropy[150:], ref_a, ref_b) - accuracy[150:]
    assert (result.num_fit, result.num_test) == (150, 150)
    np.testing.assert_allclose([result.fit.a, result.fit.b], [ref_a, ref_b], rtol=1e-6)
    np.testing.assert_allclose([result.mae, result.rmse],
                               [np.mean(np.abs(error)), np.sqrt(np.mean(error**2))], rtol=1e-6)
    # The noise floor: the RMSE of a good extrapolation is close to sigma.
    assert 0.02 < result.rmse < 0.045
    with pytest.raises(ValueError, match="fit_fraction"):
        analysis.extrapolate(steps, entropy, accuracy, fit_fraction=1.0)
    with pytest.raises(ValueError, match="need >= 2"):
        analysis.extrapolate(steps[:3], entropy[:3], accuracy[:3], fit_fraction=0.5)


def test_covariance_concentration_and_kl_cov_threshold():
    """200 tokens: 198 of |cov| 0.1 and two of 10 -> top 1% (2 tokens) mean 10 / mean |cov|."""
    cov = np.concatenate([np.tile([0.1, -0.1], 99), [10.0, 10.0]])
    np.random.default_rng(0).shuffle(cov)
    mean_abs = (198 * 0.1 + 20) / 200
    assert analysis.covariance_concentration(cov) == pytest.approx(10 / mean_abs)
    # Fewer than 100 tokens: still the single largest.
    assert analysis.covariance_concentration(np.array([3.0, -1.0])) == pytest.approx(3 / 2)
    assert analysis.kl_cov_threshold(cov, 0.01) == 10.0
    assert analysis.kl_cov_threshold(cov, 0.02) == pytest.approx(0.1)  # k = 4
    assert analysis.kl_cov_threshold(cov, 1e-9) == 10.0  # k = max(floor(...), 1)


def test_entropy_at_equal_reward():
    """Trailing moving average of the reward over 2 steps first reaches 0.5 at index 2; the
    entropy there is averaged over the same window."""
    steps = np.arange(10, 16)
    reward = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    entropy = np.array([2.0, 1.8, 1.6, 1.4, 1.2, 1.0])
    np.testing.assert_allclose(analysis.moving_average(reward, 2), [0, 0, 0.5, 1, 1, 1])
    assert analysis.entropy_at_reward(steps, reward, entropy, level=0.5, window=2) == (
        12, pytest.approx(1.7))
    assert analysis.entropy_at_reward(steps, reward, entropy, level=1.1, window=2) is None
    runs = {"low": [{"step": int(s), "reward/mean": 0.5 * r, "entropy/token_mean": h}
                    for s, r, h in zip(steps, reward, entropy, strict=True)],
            "high": [{"step": int(s), "reward/mean": r, "entropy/token_mean": h + 1}
                     for s, r, h in zip(steps, reward, entropy, strict=True)]}
    level, reached = analysis.equal_reward_entropies(runs, window=2)
    assert level == 0.5  # the best smoothed reward of the weaker run
    assert reached == {"low": (13, pytest.approx(1.5)), "high": (12, pytest.approx(2.7))}


def test_check_agreement():
    predicted = np.array([-1.0, -2.0, 0.5, -0.3])
    measured = 0.25 * predicted
    agreement = analysis.check_agreement(predicted, measured)
    assert agreement.num_steps == 4 and agreement.sign_agreement == 1.0
    assert agreement.correlation == pytest.approx(1.0) and agreement.slope == pytest.approx(0.25)
    flipped = analysis.check_agreement(predicted, -measured)
    assert flipped.sign_agreement == 0.0 and flipped.correlation == pytest.approx(-1.0)


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
        analysis.read_metrics(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        analysis.read_metrics(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        analysis.read_metrics(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"loss": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        analysis.read_metrics(str(tmp_path))

    run = str(tmp_path / "run")
    write_run(run, val=True)
    records = analysis.read_metrics(run)
    assert analysis.resolve_accuracy_key(records) == "val/toy/accuracy"
    assert analysis.resolve_accuracy_key(records, "accuracy/mean") == "accuracy/mean"
    with pytest.raises(ValueError, match="val/other/accuracy"):
        analysis.resolve_accuracy_key(records, "val/other/accuracy")
    assert analysis.resolve_accuracy_key([{"step": 0, "accuracy/mean": 1}]) == "accuracy/mean"
    math_sets = {"val/aime24/accuracy": 0.1, "val/math500/accuracy": 0.5,
                 "val/average_accuracy": 0.3}
    assert analysis.resolve_accuracy_key([{"step": 0, **math_sets}]) == "val/average_accuracy"
    with pytest.raises(ValueError, match="no accuracy metric"):
        analysis.resolve_accuracy_key([{"step": 0}])
    steps, val = analysis.series(records, ["val/toy/accuracy"])
    np.testing.assert_array_equal(steps, np.arange(0, 60, 5))
    steps, _ = analysis.series(records + [{"step": 99, "val/toy/accuracy": float("nan")}],
                               ["val/toy/accuracy"], skip_filtered=True)
    np.testing.assert_array_equal(steps, np.arange(5, 60, 5))  # step 0 all agree, nan dropped
    assert list(analysis.cov_dump_paths(run)) == [0, 20, 40]
    assert list(analysis.cov_dump_paths(run, records)) == [20, 40]  # all agree at step 0
    concentration = analysis.concentration_by_step(run, records)
    assert sorted(concentration) == [20, 40]  # the all-agree step 0 left out
    cov = np.load(os.path.join(run, "cov", "step_000020.npy"))
    assert concentration[20] == pytest.approx(np.mean(np.sort(cov)[-5:]) / np.mean(np.abs(cov)))


def assert_png(path):
    assert os.path.getsize(path) > 0
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plots_are_written(tmp_path):
    run = str(tmp_path / "run")
    write_run(run)
    records = analysis.read_metrics(run)
    steps, entropy, accuracy = analysis.series(records, ["entropy/token_mean", "accuracy/mean"])
    fit = analysis.fit_law(entropy, accuracy)
    dumps = {step: analysis.load_cov(path) for step, path in analysis.cov_dump_paths(run).items()}
    _, *check = analysis.series(records, [analysis.CHECK_NATURAL_KEY, analysis.CHECK_VANILLA_KEY,
                                          analysis.CHECK_MEASURED_KEY])
    paths = [
        analysis.plot_entropy_and_reward({"run": records, "copy": records[:30]},
                                         str(tmp_path / "curves.png")),
        analysis.plot_law_fit({"run": (entropy, accuracy, fit), "unfitted": (entropy, accuracy,
                                                                              None)},
                              str(tmp_path / "law.png")),
        analysis.plot_cov_histogram({"step 20": dumps[20], "step 40": dumps[40]},
                                    str(tmp_path / "cov.png"), clip_cov_lb=1.0, clip_cov_ub=5.0,
                                    kl_cov_ratio=0.02),
        analysis.plot_entropy_check({"run": tuple(check)}, str(tmp_path / "check.png")),
    ]
    for path in paths:
        assert_png(path)


def run_analyze(*args):
    root = os.path.dirname(os.path.dirname(covjax.__file__))
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "covjax.analyze", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_summary_warns_of_few_points_and_a_ceiling_outside_0_1(tmp_path):
    run = str(tmp_path / "run")
    write_run(run, a=0.3, b=1.4, num_steps=8, seed=3)  # ceiling 1.1; 8 points
    records = analysis.read_metrics(run)
    s = analysis.summarize_run("short", run, records, accuracy_key="accuracy/mean")
    assert s.fit.num_points == 8 and s.fit.ceiling > 1
    markdown = analysis.summary_markdown([s], (0.5, {}), fit_fraction=0.5, bin_steps=10,
                                         window=10, concentration_min_step=10)
    assert "- short: the law is fitted to 8 points only; its R² and ceiling say little" in markdown
    assert (f"- short: the ceiling b - a = {analysis._fmt(s.fit.ceiling)} lies outside [0, 1]"
            in markdown)


def test_analyze_cli_end_to_end(tmp_path):
    """Two fake runs -> figures and summary.md whose numbers are analysis' own on the same data."""
    run_a, run_b, out = (str(tmp_path / n) for n in ("A", "B", "report"))
    write_run(run_a, a=0.3, b=0.9, seed=1, final_eval=True)  # still 60 steps
    write_run(run_b, a=0.2, b=0.8, seed=2, check=False)
    result = run_analyze(f"--workdir={run_a},{run_b}", f"--out={out}", "--fit_fraction=0.6",
                         "--accuracy_key=accuracy/mean")
    assert result.returncode == 0, result.stderr
    for name in ("entropy_reward.png", "law_fit.png", "cov_hist_A.png", "cov_hist_B.png",
                 "entropy_check.png"):
        assert_png(os.path.join(out, name))
    summary = open(os.path.join(out, "summary.md")).read()
    for name, workdir in (("A", run_a), ("B", run_b)):
        records = analysis.read_metrics(workdir)
        s = analysis.summarize_run(name, workdir, records, accuracy_key="accuracy/mean",
                                   fit_fraction=0.6)
        row = next(line for line in summary.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "60" and cells[6] == "`accuracy/mean`"
        assert float(cells[7]) == pytest.approx(s.fit.a, rel=1e-3)
        assert float(cells[9]) == pytest.approx(s.fit.r2, abs=1e-3)
        assert float(cells[11]) == pytest.approx(s.fit.b - s.fit.a, rel=1e-3)
        assert float(cells[13]) == pytest.approx(s.extrapolation.rmse, rel=1e-3)
        assert float(cells[14]) == 3.0
        assert s.fit.r2 > 0.9 and abs(s.fit.a - (0.3 if name == "A" else 0.2)) < 0.05
        assert s.extrapolation.num_fit == 36
    assert "| A | natural | 60 | 1.000 | 1.00 | 20 |" in summary
    assert "points only" not in summary and "outside [0, 1]" not in summary  # 60 points, 0.6
    assert "Entropy at equal reward" in summary


def test_analyze_cli_names_missing_paths(tmp_path):
    result = run_analyze(f"--workdir={tmp_path / 'absent'}", f"--out={tmp_path / 'out'}")
    assert result.returncode != 0 and str(tmp_path / "absent") in result.stderr
    result = run_analyze(f"--workdir={tmp_path}", f"--out={tmp_path / 'out'}")
    assert result.returncode != 0 and os.path.join(str(tmp_path), "metrics.jsonl") in result.stderr


def test_histogram_marks_follow_the_run_config_then_the_flags(tmp_path):
    """The band and KL-Cov ratio a histogram marks: the given value, else the run's config.json,
    else the paper's (1, 5) and 2e-3; a broken config.json is named."""
    run = tmp_path / "run"
    run.mkdir()
    assert analysis.histogram_marks(str(run)) == {
        "clip_cov_lb": 1.0, "clip_cov_ub": 5.0, "kl_cov_ratio": 2e-3}
    (run / "config.json").write_text(json.dumps(
        {"seed": 2, "loss": {"clip_cov_lb": 0.5, "clip_cov_ub": 5.0, "kl_cov_ratio": 0.3}}))
    assert analysis.histogram_marks(str(run)) == {
        "clip_cov_lb": 0.5, "clip_cov_ub": 5.0, "kl_cov_ratio": 0.3}
    assert analysis.histogram_marks(str(run), clip_cov_lb=2.0, kl_cov_ratio=None) == {
        "clip_cov_lb": 2.0, "clip_cov_ub": 5.0, "kl_cov_ratio": 0.3}
    with pytest.raises(ValueError, match="unknown histogram marks"):
        analysis.histogram_marks(str(run), clip_cov_band=1.0)
    with pytest.raises(ValueError, match="need 0 < clip_cov_lb < clip_cov_ub"):
        analysis.histogram_marks(str(run), clip_cov_lb=0.0)
    (run / "config.json").write_text(json.dumps({"seed": 2, "loss": {"clip_cov_lb": 0.5}}))
    with pytest.raises(ValueError, match="'loss' section lacks a number for 'clip_cov_ub'"):
        analysis.histogram_marks(str(run))
    # every mark given: the broken file is not read
    assert analysis.histogram_marks(str(run), clip_cov_lb=1, clip_cov_ub=2, kl_cov_ratio=0.1) == {
        "clip_cov_lb": 1.0, "clip_cov_ub": 2.0, "kl_cov_ratio": 0.1}
    (run / "config.json").write_text(json.dumps({"seed": 2}))
    with pytest.raises(ValueError, match="config.json' holds no trainer config with a 'loss'"):
        analysis.histogram_marks(str(run))
    with pytest.raises(FileNotFoundError, match="config.json' not found"):
        analysis.read_loss_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json' not found"):
        analysis.histogram_marks(str(tmp_path), require_config=True)


def test_analyze_cli_marks_from_the_run_config_and_flags(tmp_path):
    """The CLI takes the marks from config.json, lets a flag override one, and names a bad one."""
    run, out = str(tmp_path / "A"), str(tmp_path / "report")
    write_run(run, a=0.3, b=0.9, seed=1)
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"loss": {"clip_cov_lb": 0.5, "clip_cov_ub": 5.0, "kl_cov_ratio": 0.2}}, f)
    result = run_analyze(f"--workdir={run}", f"--out={out}", "--clip_cov_lb=2")
    assert result.returncode == 0, result.stderr
    assert_png(os.path.join(out, "cov_hist_A.png"))
    result = run_analyze(f"--workdir={run}", f"--out={tmp_path / 'bad'}", "--clip_cov_lb=6")
    assert result.returncode != 0 and not os.path.exists(tmp_path / "bad")  # before any work
    assert "need 0 < clip_cov_lb < clip_cov_ub" in result.stderr and "clip_cov_lb': 6.0" in (
        result.stderr)
