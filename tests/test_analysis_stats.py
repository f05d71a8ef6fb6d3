"""covjax.analysis.stats against SciPy/NumPy on synthetic runs: the law's fit, its extrapolation,
covariance concentration, entropy at equal reward, the entropy check's agreement, summary.md."""

import os

import numpy as np
import pytest
from scipy.optimize import curve_fit
from test_analysis_runs import law, write_run

from covjax.analysis import runs, stats


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
    fit = stats.fit_law(entropy, accuracy)
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
    fit = stats.fit_law(entropy, accuracy)
    np.testing.assert_allclose([fit.a, fit.b, fit.r2, fit.ceiling], [0.4, 0.7, 1.0, 0.3],
                               atol=1e-10)


def test_fit_rejects_too_few_points():
    with pytest.raises(ValueError, match="2 distinct"):
        stats.fit_law(np.ones(5), np.arange(5.0))


def test_binned_fit_is_the_fit_of_bin_means():
    """Over 10-step bins: curve_fit on NumPy means of each bin; averaging raises R^2."""
    steps, entropy, accuracy = synthetic(sigma=0.05)
    binned = stats.fit_law_binned(steps, entropy, accuracy, bin_steps=10)
    h, r = entropy.reshape(30, 10).mean(1), accuracy.reshape(30, 10).mean(1)
    (ref_a, ref_b), _ = curve_fit(law, h, r, p0=(1.0, 1.0))
    np.testing.assert_allclose([binned.a, binned.b], [ref_a, ref_b], rtol=1e-6)
    assert binned.num_points == 30
    assert binned.r2 > stats.fit_law(entropy, accuracy).r2


def test_extrapolation_error_on_the_rest():
    """Fit on the first half (in step order, input shuffled), MAE and RMSE on the second half."""
    steps, entropy, accuracy = synthetic(sigma=0.03)
    order = np.random.default_rng(5).permutation(len(steps))
    result = stats.extrapolate(steps[order], entropy[order], accuracy[order], fit_fraction=0.5)
    (ref_a, ref_b), _ = curve_fit(law, entropy[:150], accuracy[:150], p0=(1.0, 1.0))
    error = law(entropy[150:], ref_a, ref_b) - accuracy[150:]
    assert (result.num_fit, result.num_test) == (150, 150)
    np.testing.assert_allclose([result.fit.a, result.fit.b], [ref_a, ref_b], rtol=1e-6)
    np.testing.assert_allclose([result.mae, result.rmse],
                               [np.mean(np.abs(error)), np.sqrt(np.mean(error**2))], rtol=1e-6)
    # The noise floor: the RMSE of a good extrapolation is close to sigma.
    assert 0.02 < result.rmse < 0.045
    with pytest.raises(ValueError, match="fit_fraction"):
        stats.extrapolate(steps, entropy, accuracy, fit_fraction=1.0)
    with pytest.raises(ValueError, match="need >= 2"):
        stats.extrapolate(steps[:3], entropy[:3], accuracy[:3], fit_fraction=0.5)


def test_covariance_concentration_and_kl_cov_threshold():
    """200 tokens: 198 of |cov| 0.1 and two of 10 -> top 1% (2 tokens) mean 10 / mean |cov|."""
    cov = np.concatenate([np.tile([0.1, -0.1], 99), [10.0, 10.0]])
    np.random.default_rng(0).shuffle(cov)
    mean_abs = (198 * 0.1 + 20) / 200
    assert stats.covariance_concentration(cov) == pytest.approx(10 / mean_abs)
    # Fewer than 100 tokens: still the single largest.
    assert stats.covariance_concentration(np.array([3.0, -1.0])) == pytest.approx(3 / 2)
    assert stats.kl_cov_threshold(cov, 0.01) == 10.0
    assert stats.kl_cov_threshold(cov, 0.02) == pytest.approx(0.1)  # k = 4
    assert stats.kl_cov_threshold(cov, 1e-9) == 10.0  # k = max(floor(...), 1)


def test_concentration_by_step_leaves_out_all_agree_steps(tmp_path):
    """Over the dumps of a fake run: step 0, where all rewards agreed, is left out; step 20's
    value is the mean of its top 5 of 500 covariances over their mean |cov|."""
    run = str(tmp_path / "run")
    write_run(run)
    concentration = stats.concentration_by_step(run, runs.read_metrics(run))
    assert sorted(concentration) == [20, 40]
    cov = np.load(os.path.join(run, "cov", "step_000020.npy"))
    assert concentration[20] == pytest.approx(np.mean(np.sort(cov)[-5:]) / np.mean(np.abs(cov)))


def test_entropy_at_equal_reward():
    """Trailing moving average of the reward over 2 steps first reaches 0.5 at index 2; the
    entropy there is averaged over the same window."""
    steps = np.arange(10, 16)
    reward = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    entropy = np.array([2.0, 1.8, 1.6, 1.4, 1.2, 1.0])
    np.testing.assert_allclose(stats.moving_average(reward, 2), [0, 0, 0.5, 1, 1, 1])
    assert stats.entropy_at_reward(steps, reward, entropy, level=0.5, window=2) == (
        12, pytest.approx(1.7))
    assert stats.entropy_at_reward(steps, reward, entropy, level=1.1, window=2) is None
    runs = {"low": [{"step": int(s), "reward/mean": 0.5 * r, "entropy/token_mean": h}
                    for s, r, h in zip(steps, reward, entropy, strict=True)],
            "high": [{"step": int(s), "reward/mean": r, "entropy/token_mean": h + 1}
                     for s, r, h in zip(steps, reward, entropy, strict=True)]}
    level, reached = stats.equal_reward_entropies(runs, window=2)
    assert level == 0.5  # the best smoothed reward of the weaker run
    assert reached == {"low": (13, pytest.approx(1.5)), "high": (12, pytest.approx(2.7))}


def test_check_agreement():
    predicted = np.array([-1.0, -2.0, 0.5, -0.3])
    measured = 0.25 * predicted
    agreement = stats.check_agreement(predicted, measured)
    assert agreement.num_steps == 4 and agreement.sign_agreement == 1.0
    assert agreement.correlation == pytest.approx(1.0) and agreement.slope == pytest.approx(0.25)
    flipped = stats.check_agreement(predicted, -measured)
    assert flipped.sign_agreement == 0.0 and flipped.correlation == pytest.approx(-1.0)


def test_summary_warns_of_few_points_and_a_ceiling_outside_0_1(tmp_path):
    run = str(tmp_path / "run")
    write_run(run, a=0.3, b=1.4, num_steps=8, seed=3)  # ceiling 1.1; 8 points
    records = runs.read_metrics(run)
    s = stats.summarize_run("short", run, records, accuracy_key="accuracy/mean")
    assert s.fit.num_points == 8 and s.fit.ceiling > 1
    markdown = stats.summary_markdown([s], (0.5, {}), fit_fraction=0.5, bin_steps=10,
                                         window=10, concentration_min_step=10)
    assert "- short: the law is fitted to 8 points only; its R² and ceiling say little" in markdown
    assert (f"- short: the ceiling b - a = {stats._fmt(s.fit.ceiling)} lies outside [0, 1]"
            in markdown)


