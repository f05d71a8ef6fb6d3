"""covjax.entropy_check against closed forms on a hand-made softmax bandit (NumPy float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covjax import entropy_check

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0])  # one state, V = 5 actions


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def entropy(z):
    p = softmax(z)
    return -np.sum(p * np.log(p), axis=-1)


def cov_under_pi(z, x, y):
    """Cov_{a~softmax(z)}(x(a), y(a)), NumPy float64."""
    p = softmax(z)
    return np.sum(p * x * y) - np.sum(p * x) * np.sum(p * y)


# High-probability actions rewarded: entropy must fall. Low-probability ones: it must rise.
@pytest.mark.parametrize("advantages, sign", [
    (np.array([1.0, 0.5, -0.2, -0.5, -1.0]), -1.0),
    (np.array([-1.0, -0.5, 0.2, 0.5, 1.0]), 1.0),
])
@pytest.mark.parametrize("form", ["natural", "vanilla"])
def test_bandit_step_matches_first_order_prediction(advantages, sign, form):
    """True H(z') - H(z) after z' = z + eta*A (natural) or z + eta*pi*A (vanilla) against
    -eta*Cov(log pi, A) / -eta*Cov(log pi, pi*A): same sign, relative error O(eta)."""
    log_pi = np.log(softmax(LOGITS))
    direction = advantages if form == "natural" else softmax(LOGITS) * advantages
    errors = []
    for eta in (2e-2, 1e-2):
        predicted = float(entropy_check.exact_predicted_change(
            jnp.asarray(LOGITS), jnp.asarray(advantages), eta=eta)[form])
        closed_form = -eta * cov_under_pi(LOGITS, log_pi, direction)
        np.testing.assert_allclose(predicted, closed_form, rtol=1e-5)
        true_change = entropy(LOGITS + eta * direction) - entropy(LOGITS)
        assert np.sign(predicted) == np.sign(true_change) == sign
        relative_error = abs(predicted - true_change) / abs(true_change)
        assert relative_error < eta
        errors.append(abs(predicted - true_change))
    # The error is second order: halving eta divides it by about 4.
    assert 3.0 < errors[0] / errors[1] < 5.0


def test_exact_entropy_change_batched_matches_numpy():
    """[B, T, V] logits and logit changes: -Cov_{a~pi}(log pi, dz) per state."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)) * 2
    change = rng.normal(size=(2, 3, 7))
    got = np.asarray(entropy_check.exact_entropy_change(jnp.asarray(logits), jnp.asarray(change)))
    log_pi = np.log(softmax(logits))
    want = np.array([[-cov_under_pi(logits[b, t], log_pi[b, t], change[b, t]) for t in range(3)]
                     for b in range(2)])
    assert got.shape == (2, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_sampled_estimator_converges_to_exact_covariance():
    """Sampled tokens a_t ~ pi of one state with A_t = A(a_t): the masked batch covariance
    estimator tends to the exact per-state forms (standard error ~ 1/sqrt(200k))."""
    advantages = np.array([1.0, 0.5, -0.2, -0.5, -1.0])
    eta = 1e-3
    actions = np.random.default_rng(1).choice(5, size=(400, 500), p=softmax(LOGITS))
    logp = np.log(softmax(LOGITS))[actions]
    got = entropy_check.predicted_entropy_change(
        jnp.asarray(logp), jnp.asarray(advantages[actions]), jnp.ones(actions.shape), eta=eta)
    exact = entropy_check.exact_predicted_change(
        jnp.asarray(LOGITS), jnp.asarray(advantages), eta=eta)
    for form in ("natural", "vanilla"):
        np.testing.assert_allclose(float(got[form]), float(exact[form]), rtol=0.02)


def test_sampled_estimator_is_masked_covariance():
    """Against NumPy's biased covariance of the valid tokens only; padding values do not leak."""
    rng = np.random.default_rng(2)
    logp = -rng.exponential(size=(3, 8))
    advantages = rng.normal(size=(3, 8))
    mask = rng.random((3, 8)) < 0.6
    logp_padded = np.where(mask, logp, 123.0)
    got = jax.jit(entropy_check.predicted_entropy_change)(
        jnp.asarray(logp_padded), jnp.asarray(advantages), jnp.asarray(mask), eta=0.5)
    x, a = logp[mask], advantages[mask]
    np.testing.assert_allclose(float(got["natural"]), -0.5 * np.cov(x, a, bias=True)[0, 1],
                               rtol=1e-5)
    np.testing.assert_allclose(float(got["vanilla"]),
                               -0.5 * np.cov(x, np.exp(x) * a, bias=True)[0, 1], rtol=1e-5)


def test_measured_change_and_metrics():
    """Token mean of H_after - H_before over the mask; the metric names of docs/metrics.md."""
    rng = np.random.default_rng(3)
    before, after = rng.random((2, 4, 6))
    mask = rng.random((4, 6)) < 0.5
    want = np.mean((after - before)[mask])
    got = entropy_check.measured_entropy_change(jnp.asarray(before), jnp.asarray(after),
                                                jnp.asarray(mask))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    logp = -rng.exponential(size=(4, 6))
    metrics = entropy_check.entropy_check_metrics(
        jnp.asarray(logp), jnp.ones((4, 6)), jnp.asarray(mask), jnp.asarray(before),
        jnp.asarray(after), eta=1e-3)
    assert set(metrics) == {"entropy_check/predicted_natural", "entropy_check/predicted_vanilla",
                            "entropy_check/measured"}
    np.testing.assert_allclose(float(metrics["entropy_check/measured"]), want, rtol=1e-5)
    # Constant advantages carry no covariance with log pi under the natural form.
    np.testing.assert_allclose(float(metrics["entropy_check/predicted_natural"]), 0.0, atol=1e-9)


def test_empty_mask_gives_zero_not_nan():
    zeros = jnp.zeros((2, 3))
    mask = jnp.zeros((2, 3), bool)
    got = entropy_check.entropy_check_metrics(zeros, zeros, mask, zeros, zeros, eta=1.0)
    assert all(float(v) == 0.0 for v in got.values())
