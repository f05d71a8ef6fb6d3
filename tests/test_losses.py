"""covjax.losses against an independent NumPy reference written from ALGORITHMS.md sections 1-5.

The reference computes in float64; gradients wrt logp use the analytic per-token derivative of
each loss times the aggregation weight of the token.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from covjax import losses

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
PROPERTY_SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
B, T = 6, 12
AGG_MODES = losses.AGG_MODES

# --------------------------------------------------------------------------------------------
# NumPy reference (ALGORITHMS.md)
# --------------------------------------------------------------------------------------------


def np_logprobs_entropy(logits, targets, temperature):
    z = logits.astype(np.float64) / temperature
    zmax = z.max(-1, keepdims=True)
    log_norm = np.log(np.exp(z - zmax).sum(-1)) + zmax[..., 0]
    probs = np.exp(z - log_norm[..., None])
    logp = np.take_along_axis(z, targets[..., None], -1)[..., 0] - log_norm
    return logp, log_norm - (probs * z).sum(-1)


def np_cov(logp, adv, mask):
    """Eq. 10 with means over the valid tokens; 0 where masked."""
    m = mask.astype(bool)
    lp, a = logp.astype(np.float64), adv.astype(np.float64)
    cov = (lp - lp[m].mean()) * (a - a[m].mean()) if m.any() else np.zeros(m.shape)
    return np.where(m, cov, 0.0)


def np_count(ratio, num_valid):
    return max(int(ratio * num_valid), 1)


def np_surrogates(logp, old, adv, clip_low, clip_high):
    """L1, L2 and their derivatives wrt logp (the log-ratio is clamped to [-20, 20])."""
    d = logp.astype(np.float64) - old
    inside = np.abs(d) < 20
    rho = np.exp(np.clip(d, -20, 20))
    a = adv.astype(np.float64)
    l1, g1 = -a * rho, -a * rho * inside
    l2 = -a * np.clip(rho, 1 - clip_low, 1 + clip_high)
    g2 = np.where((rho > 1 - clip_low) & (rho < 1 + clip_high), g1, 0.0)
    return l1, g1, l2, g2


def np_clip_cov_candidates(logp, old, adv, mask, clip_low, clip_high, lb, ub):
    l1, _, l2, _ = np_surrogates(logp, old, adv, clip_low, clip_high)
    cov = np_cov(logp, adv, mask)
    return mask & ~((l2 > l1) & mask) & (cov > lb) & (cov < ub)


def np_kl_cov_selection(logp, adv, mask, ratio):
    """Top-k valid tokens by cov, ties by row-major position (stable sort)."""
    cov = np.where(mask, np_cov(logp, adv, mask), -np.inf).reshape(-1)
    k = np_count(ratio, mask.sum())
    order = np.argsort(-cov, kind="stable")[:k]
    chosen = np.zeros(cov.shape, bool)
    chosen[order] = True
    return chosen.reshape(mask.shape) & mask


def np_token_loss(method, logp, old, adv, selected, p):
    """Per-token loss matrix and its derivative wrt logp (ALGORITHMS.md section 3)."""
    l1, g1, l2, g2 = np_surrogates(logp, old, adv, p["clip_low"], p["clip_high"])
    if method == "kl_cov":
        d = logp.astype(np.float64) - old
        beta = p["kl_cov_coef"]
        return l1 + selected * beta * np.abs(d), g1 + selected * beta * np.sign(d)
    loss = np.maximum(l1, l2)
    grad = np.where(l1 >= l2, g1, g2)
    if method == "dual_clip":
        bound = -adv.astype(np.float64) * p["dual_clip_c"]
        bounded = (adv < 0) & (loss > bound)
        loss, grad = np.where(bounded, bound, loss), np.where(bounded, 0.0, grad)
    if method == "clip_cov":
        loss, grad = np.where(selected, 0.0, loss), np.where(selected, 0.0, grad)
    return loss, grad


def np_agg_weights(mask, mode, num_tokens=None, num_seqs=None, max_len=None):
    """d loss / d L_bt for each aggregation mode (ALGORITHMS.md section 4)."""
    m = mask.astype(np.float64)
    lengths = m.sum(1, keepdims=True)
    n_tok = max(m.sum() if num_tokens is None else num_tokens, 1)
    n_seq = max((lengths > 0).sum() if num_seqs is None else num_seqs, 1)
    t_max = mask.shape[1] if max_len is None else max_len
    return {
        "token-mean": m / n_tok,
        "seq-mean-token-sum": m / n_seq,
        "seq-mean-token-mean": m / (n_seq * np.maximum(lengths, 1)),
        "seq-mean-token-sum-norm": m / (n_seq * t_max),
        "token-sum": m,
    }[mode]


def np_policy_loss(method, logp, old, adv, mask, selected, p, mode, **counts):
    loss_mat, grad_mat = np_token_loss(method, logp, old, adv, selected, p)
    w = np_agg_weights(mask, mode, **counts)
    return np.sum(w * np.where(mask, loss_mat, 0.0)), w * grad_mat


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def make_batch(seed, batch=B, length=T, garbage=True):
    """Ragged response masks at random offsets, per-sequence advantages, junk where masked."""
    rs = np.random.default_rng(seed)
    lengths = rs.integers(0, length + 1, size=batch)
    starts = rs.integers(0, length - lengths + 1)
    pos = np.arange(length)
    mask = (pos >= starts[:, None]) & (pos < (starts + lengths)[:, None])
    logp = -rs.exponential(1.5, (batch, length))
    old = logp + rs.normal(0.0, 0.3, (batch, length))
    adv = np.repeat(rs.normal(0.0, 1.5, (batch, 1)), length, 1) + rs.normal(0, 0.2, (batch, length))
    if garbage:
        junk = rs.normal(0.0, 1e3, (3, batch, length))
        logp, old, adv = (np.where(mask, x, j) for x, j in zip((logp, old, adv), junk, strict=True))
    return tuple(np.asarray(x, np.float32) for x in (logp, old, adv)) + (mask,)


PARAMS = st.fixed_dictionaries(
    {
        "clips": st.sampled_from([(0.2, 0.2), (0.2, 0.28), (1.0, 1.0)]),
        "bounds": st.sampled_from([(1.0, 5.0), (0.3, 2.0), (0.05, 8.0)]),
        "ratio": st.sampled_from([0.02, 0.1, 0.29, 0.5]),
        "kl_cov_coef": st.sampled_from([1.0, 0.1]),
        "dual_clip_c": st.sampled_from([3.0, 1.5]),
    }
)


def fixed_params(clips, bounds):
    """One draw of PARAMS: ratio 0.1, kl_cov_coef 1, dual_clip_c 3."""
    return {"clips": clips, "bounds": bounds, "ratio": 0.1, "kl_cov_coef": 1.0, "dual_clip_c": 3.0}


def loss_config(method, p, mode="token-mean"):
    """The LossConfig of one draw of PARAMS."""
    return losses.LossConfig(
        method=method,
        loss_agg_mode=mode,
        clip_low=p["clips"][0],
        clip_high=p["clips"][1],
        dual_clip_c=p["dual_clip_c"],
        clip_cov_ratio=p["ratio"],
        clip_cov_lb=p["bounds"][0],
        clip_cov_ub=p["bounds"][1],
        kl_cov_ratio=p["ratio"],
        kl_cov_coef=p["kl_cov_coef"],
    )


def np_params(p):
    return {
        "clip_low": p["clips"][0],
        "clip_high": p["clips"][1],
        "kl_cov_coef": p["kl_cov_coef"],
        "dual_clip_c": p["dual_clip_c"],
    }


def loss_and_grad(logp, old, adv, mask, config, **kwargs):
    def f(lp):
        return losses.policy_loss(lp, old, adv, mask, config, **kwargs)

    (loss, aux), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    return float(loss), aux, np.asarray(grad)


def assert_close(actual, expected, rtol=2e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_numpy(temperature):
    rs = np.random.default_rng(0)
    logits = rs.normal(0, 3, (2, 5, 11)).astype(np.float32)
    targets = rs.integers(0, 11, (2, 5))
    logp, entropy = losses.logprobs_and_entropy(jnp.asarray(logits), targets, temperature)
    ref_logp, ref_entropy = np_logprobs_entropy(logits, targets, temperature)
    assert logp.dtype == entropy.dtype == jnp.float32
    assert_close(logp, ref_logp, atol=1e-5)
    assert_close(entropy, ref_entropy, atol=1e-5)
    # bf16 logits are upcast before the softmax: exact float32 results of the rounded logits
    logits16 = jnp.asarray(logits, jnp.bfloat16)
    logp16, entropy16 = losses.logprobs_and_entropy(logits16, targets, temperature)
    assert logp16.dtype == entropy16.dtype == jnp.float32
    ref_logp16, ref_entropy16 = np_logprobs_entropy(
        np.asarray(logits16, np.float32), targets, temperature
    )
    assert_close(logp16, ref_logp16, atol=1e-5)
    assert_close(entropy16, ref_entropy16, atol=1e-5)


def head_inputs(seed, batch=2, length=5, width=4, vocab=11):
    """(hidden [B, T, D], unembed [D, V], targets [B, T]) float32 / int, and the generator."""
    rs = np.random.default_rng(seed)
    hidden = jnp.asarray(rs.normal(0, 1, (batch, length, width)), jnp.float32)
    unembed = jnp.asarray(rs.normal(0, 1, (width, vocab)), jnp.float32)
    targets = jnp.asarray(rs.integers(0, vocab, (batch, length)))
    return hidden, unembed, targets, rs


def test_chunked_matches_unchunked_values_and_grads():
    """10 tokens in chunks of 4: three chunks, the last one padded."""
    hidden, unembed, targets, rs = head_inputs(1)
    weights = jnp.asarray(rs.normal(0, 1, (2, 2, 5)), jnp.float32)

    def objective(fn, h, w):
        logp, entropy = fn(h, w)
        return jnp.sum(weights[0] * logp + weights[1] * entropy), (logp, entropy)

    def full(h, w):
        return losses.logprobs_and_entropy(h @ w, targets, 0.8)

    def chunked(h, w):
        return losses.logprobs_and_entropy_chunked(h, w, targets, 0.8, chunk_size=4)

    grad = functools.partial(jax.grad, argnums=(0, 1), has_aux=True)
    (gh, gw), (logp, ent) = grad(functools.partial(objective, full))(hidden, unembed)
    (ch, cw), (clogp, cent) = jax.jit(grad(functools.partial(objective, chunked)))(hidden, unembed)
    for a, b in [(clogp, logp), (cent, ent), (ch, gh), (cw, gw)]:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_without_entropy_gradient():
    """entropy_grad=False: the entropy's value unchanged, its gradient zero, and logp's gradient
    that of the unchunked softmax (the backward then skips the entropy's term)."""
    hidden, unembed, targets, rs = head_inputs(1)
    weights = jnp.asarray(rs.normal(0, 1, (2, 5)), jnp.float32)

    def full(h, w):
        return jnp.sum(weights * losses.logprobs_and_entropy(h @ w, targets, 0.8)[0])

    def chunked(h, w, which):
        out = losses.logprobs_and_entropy_chunked(
            h, w, targets, 0.8, chunk_size=4, entropy_grad=False
        )
        return jnp.sum(weights * out[which])

    grad = functools.partial(jax.grad, argnums=(0, 1))
    for a, b in zip(grad(chunked)(hidden, unembed, 0), grad(full)(hidden, unembed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for g in grad(chunked)(hidden, unembed, 1):
        assert not np.any(np.asarray(g))
    entropy = losses.logprobs_and_entropy_chunked(hidden, unembed, targets, 0.8, chunk_size=4)[1]
    np.testing.assert_allclose(
        entropy, losses.logprobs_and_entropy(hidden @ unembed, targets, 0.8)[1], rtol=1e-5
    )


def test_chunked_scans_chunks_without_full_logits():
    """The jaxpr holds [chunk, V] logits inside the scan and never a [B*T, V] array."""
    hidden, unembed = jnp.zeros((4, 16, 8)), jnp.zeros((8, 50))
    targets = jnp.zeros((4, 16), jnp.int32)

    def f(h, w):
        logp, ent = losses.logprobs_and_entropy_chunked(h, w, targets, chunk_size=8)
        return jnp.sum(logp + ent)

    text = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(hidden, unembed))
    assert "scan" in text and "f32[8,50]" in text
    assert "f32[64,50]" not in text and "f32[4,16,50]" not in text


def test_chunked_temperature_gradient_matches_unchunked():
    """d/d(temperature) of a weighted sum of logp and entropy, chunked vs one [B, T, V] softmax."""
    hidden, unembed, targets, _ = head_inputs(2)

    def full(temperature):
        logp, entropy = losses.logprobs_and_entropy(hidden @ unembed, targets, temperature)
        return jnp.sum(logp) + 0.5 * jnp.sum(entropy)

    def chunked(temperature):
        logp, entropy = losses.logprobs_and_entropy_chunked(
            hidden, unembed, targets, temperature, chunk_size=3
        )
        return jnp.sum(logp) + 0.5 * jnp.sum(entropy)

    assert_close(jax.grad(chunked)(0.8), float(jax.grad(full)(0.8)), rtol=1e-5)


def _dot_operand_dtypes(jaxpr):
    """Operand dtypes of every dot_general in a jaxpr and its sub-jaxprs (scan bodies, ...)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield tuple(var.aval.dtype for var in eqn.invars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _dot_operand_dtypes(sub)


def test_chunked_bf16_gradient_is_close_to_float32():
    """bf16 hidden/unembed: the logits' cotangent enters the head matmuls in bf16, yet logp,
    entropy and both gradients stay within bf16 rounding of the float32 computation at the same
    (bf16-representable) inputs, and the gradients come back in bf16."""
    rs = np.random.default_rng(3)
    hidden = jnp.asarray(rs.normal(0, 1, (3, 7, 16)), jnp.bfloat16)
    unembed = jnp.asarray(rs.normal(0, 0.3, (16, 40)), jnp.bfloat16)
    targets = jnp.asarray(rs.integers(0, 40, (3, 7)))
    weights = jnp.asarray(rs.normal(0, 1, (2, 3, 7)), jnp.float32)

    def objective(h, w):
        logp, entropy = losses.logprobs_and_entropy_chunked(h, w, targets, 0.9, chunk_size=5)
        return jnp.sum(weights[0] * logp + weights[1] * entropy), (logp, entropy)

    grad = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True))
    (gh16, gw16), (logp16, ent16) = grad(hidden, unembed)
    h32, w32 = hidden.astype(jnp.float32), unembed.astype(jnp.float32)
    (gh32, gw32), (logp32, ent32) = grad(h32, w32)
    ref_logp, ref_ent = np_logprobs_entropy(
        np.asarray(h32, np.float64) @ np.asarray(w32, np.float64), np.asarray(targets), 0.9
    )
    assert gh16.dtype == gw16.dtype == jnp.bfloat16
    assert logp16.dtype == ent16.dtype == jnp.float32
    # bf16 x bf16 products are exact in float32: the forward pass is float32-accurate.
    assert_close(logp16, ref_logp, rtol=1e-5, atol=1e-5)
    assert_close(ent16, ref_ent, rtol=1e-5, atol=1e-5)
    assert_close(logp32, ref_logp, rtol=1e-5, atol=1e-5)
    for g16, g32 in [(gh16, gh32), (gw16, gw32)]:
        g16, g32 = np.asarray(g16, np.float64), np.asarray(g32, np.float64)
        assert np.abs(g16 - g32).max() <= 1e-2 * np.abs(g32).max()
    # Forward and both backward head matmuls multiply bf16 by bf16 (none runs as f32/TF32).
    jaxpr = jax.make_jaxpr(jax.grad(lambda h, w: objective(h, w)[0], argnums=(0, 1)))
    operand_dtypes = set(_dot_operand_dtypes(jaxpr(hidden, unembed).jaxpr))
    assert operand_dtypes == {(jnp.dtype(jnp.bfloat16),) * 2}


def test_chunked_bf16_unembed_gradient_accumulates_in_float32():
    """512 chunks each add exactly 1.0 to every dW entry (uniform softmax over V = 2 with
    unit hidden states): a bf16 running sum stalls at 256 (256 + 1 rounds back to 256); the
    float32 sum is 512 exactly, which bf16 also represents exactly."""
    hidden = jnp.ones((4, 256, 3), jnp.bfloat16)
    unembed = jnp.zeros((3, 2), jnp.bfloat16)
    targets = jnp.zeros((4, 256), jnp.int32)

    def total_logp(w):
        logp, _ = losses.logprobs_and_entropy_chunked(hidden, w, targets, chunk_size=2)
        return jnp.sum(logp)

    d_unembed = jax.jit(jax.grad(total_logp))(unembed)
    assert d_unembed.dtype == jnp.bfloat16
    # d logp / d logits = onehot(target) - softmax = (+1/2, -1/2) per token, 1024 tokens.
    np.testing.assert_array_equal(np.asarray(d_unembed, np.float32), [[512.0, -512.0]] * 3)


# --------------------------------------------------------------------------------------------
# Policy losses against NumPy
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    method=st.sampled_from(losses.METHODS),
    mode=st.sampled_from(AGG_MODES),
    p=PARAMS,
)
def test_policy_loss_matches_numpy(seed, method, mode, p):
    logp, old, adv, mask = make_batch(seed)
    config = loss_config(method, p, mode)
    key = jax.random.key(seed % 1000)
    loss, aux, grad = loss_and_grad(logp, old, adv, mask, config, rng=key)
    sel = np.asarray(aux["selected"])
    num_valid = mask.sum()
    if method == "clip_cov":
        cand = np_clip_cov_candidates(logp, old, adv, mask, *p["clips"], *p["bounds"])
        assert not (sel & ~cand).any()
        assert sel.sum() == min(np_count(p["ratio"], num_valid), cand.sum())
    elif method == "kl_cov":
        np.testing.assert_array_equal(sel, np_kl_cov_selection(logp, adv, mask, p["ratio"]))
    else:
        assert not sel.any()
    np.testing.assert_array_equal(losses.select_tokens(logp, old, adv, mask, config, rng=key), sel)

    ref_loss, ref_grad = np_policy_loss(method, logp, old, adv, mask, sel, np_params(p), mode)
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert_close(grad, ref_grad)

    n = max(num_valid, 1)
    cov = np_cov(logp, adv, mask)
    l1, _, l2, _ = np_surrogates(logp, old, adv, *p["clips"])
    clip_frac = 0.0 if method == "kl_cov" else ((l2 > l1) & mask).sum() / n
    assert int(aux["num_selected"]) == sel.sum()
    assert_close(aux["cov_frac"], sel.sum() / n)
    assert_close(aux["ppo_clip_frac"], clip_frac)
    assert_close(aux["ppo_kl"], np.sum(np.where(mask, old - logp.astype(np.float64), 0)) / n)
    assert_close(aux["cov_mean"], cov.sum() / n, atol=1e-5)
    assert_close(aux["cov_selected_mean"], (cov * sel).sum() / max(sel.sum(), 1), atol=1e-5)


def test_log_ratio_is_clamped():
    """|logp - old_logp| > 20: the ratio saturates at exp(+-20) and its gradient is 0."""
    logp, old, adv, mask = make_batch(14, garbage=False)
    mask[0, :4] = True
    old[0, :4] = logp[0, :4] + np.array([30.0, -28.0, -0.5, 0.5], np.float32)
    adv[0, :4] = [-1.0, 1.0, 1.0, -1.0]
    p = {"clip_low": 0.2, "clip_high": 0.2, "kl_cov_coef": 1.0, "dual_clip_c": 3.0}
    for method in ("ppo", "kl_cov"):
        sel = np.zeros((B, T), bool)
        config = losses.LossConfig(method)
        loss, _, grad = loss_and_grad(logp, old, adv, mask, config, selected=sel)
        ref_loss, ref_grad = np_policy_loss(method, logp, old, adv, mask, sel, p, "token-mean")
        assert np.isfinite(loss) and np.isfinite(grad).all()
        assert_close(loss, ref_loss, rtol=1e-6)
        assert_close(grad, ref_grad)
        assert grad[0, 0] == grad[0, 1] == 0.0


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_matches_numpy(mode):
    rs = np.random.default_rng(2)
    _, _, _, mask = make_batch(3)
    loss_mat = rs.normal(0, 1, mask.shape).astype(np.float32)
    expected = np.sum(np_agg_weights(mask, mode) * np.where(mask, loss_mat, 0.0))
    assert_close(losses.aggregate(loss_mat, mask, mode), expected)
    counts = dict(num_tokens=100, num_seqs=9, max_len=20)
    expected = np.sum(np_agg_weights(mask, mode, **counts) * np.where(mask, loss_mat, 0.0))
    assert_close(losses.aggregate(loss_mat, mask, mode, **counts), expected)
    assert float(losses.aggregate(loss_mat, np.zeros_like(mask), mode)) == 0.0


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_penalty_matches_numpy(estimator):
    logp, ref, _, mask = make_batch(4)
    ref = np.where(mask, ref + np.float32(0.5), ref).astype(np.float32)
    ref[0, 0], mask[0, 0] = logp[0, 0] + 25.0, True  # exp(25) saturates the k3 clamp at 10
    d = np.where(mask, logp.astype(np.float64) - ref, 0.0)
    expected, grad = {
        "k1": (d, np.ones_like(d)),
        "k2": (0.5 * d**2, d),
        "k3": (np.exp(-d) - (-d) - 1, 1 - np.exp(-d)),
    }["k3" if estimator == "low_var_kl" else estimator]
    if estimator in ("k3", "low_var_kl"):
        grad = np.where(np.abs(expected) < 10, grad, 0.0)
        expected = np.clip(expected, -10, 10)
    kl_fn = functools.partial(losses.kl_penalty, estimator=estimator)
    kl = kl_fn(logp, ref, mask)
    assert_close(kl, np.where(mask, expected, 0.0), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda lp: jnp.sum(kl_fn(lp, ref, mask)))(jnp.asarray(logp))
    assert_close(g, np.where(mask, grad, 0.0), rtol=1e-5, atol=1e-5)


def test_entropy_bonus_is_minus_coef_times_aggregated_entropy():
    _, _, _, mask = make_batch(5)
    entropy = np.random.default_rng(5).uniform(0, 3, mask.shape).astype(np.float32)
    for mode in AGG_MODES:
        expected = -0.01 * np.sum(np_agg_weights(mask, mode) * np.where(mask, entropy, 0.0))
        actual = losses.entropy_bonus(entropy, mask, entropy_coef=0.01, loss_agg_mode=mode)
        assert_close(actual, expected)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), method=st.sampled_from(losses.METHODS), p=PARAMS)
def test_masked_positions_change_neither_loss_nor_gradient(seed, method, p):
    logp, old, adv, mask = make_batch(seed, garbage=False)
    config = loss_config(method, p, "seq-mean-token-mean")
    key = jax.random.key(seed % 1000)
    loss, aux, grad = loss_and_grad(logp, old, adv, mask, config, rng=key)
    junk = np.random.default_rng(seed + 1).choice([np.nan, np.inf, -np.inf, 1e30, -7.0], (3, B, T))
    logp2, old2, adv2 = (
        np.where(mask, x, j).astype(np.float32) for x, j in zip((logp, old, adv), junk, strict=True)
    )
    loss2, aux2, grad2 = loss_and_grad(logp2, old2, adv2, mask, config, rng=key)
    assert loss2 == loss
    np.testing.assert_array_equal(grad2, grad)
    np.testing.assert_array_equal(aux2["selected"], aux["selected"])
    assert not grad[~mask].any()


@PROPERTY_SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    ratio=st.sampled_from([1e-3, 0.02, 0.07, 0.1, 0.29, 0.3, 0.5, 0.7, 1.0]),
)
def test_selected_count_rule(seed, ratio):
    """count = min(max(floor(r N), 1), candidates), with floor as Python's int(r * N)."""
    logp, old, adv, mask = make_batch(seed)
    num_valid = mask.sum()
    kl = losses.select_tokens(logp, old, adv, mask, losses.LossConfig("kl_cov", kl_cov_ratio=ratio))
    assert int(np.sum(kl)) == (np_count(ratio, num_valid) if num_valid else 0)
    config = losses.LossConfig(
        "clip_cov", clip_cov_ratio=ratio, clip_cov_lb=-100.0, clip_cov_ub=100.0
    )
    clip = losses.select_tokens(logp, old, adv, mask, config, rng=jax.random.key(seed % 97))
    cand = np_clip_cov_candidates(logp, old, adv, mask, 0.2, 0.2, -100.0, 100.0)
    assert int(np.sum(clip)) == min(np_count(ratio, num_valid), cand.sum())
    assert not (np.asarray(clip) & ~cand).any()


def test_count_floor_matches_python_at_integer_boundaries():
    """0.58 * 50 is 28.999999999999996 in float64 (int: 28) but 29.0 in float32."""
    logp, old, adv, _ = make_batch(0)
    mask = np.zeros((B, T), bool)
    mask.reshape(-1)[:50] = True
    sel = losses.select_tokens(logp, old, adv, mask, losses.LossConfig("kl_cov", kl_cov_ratio=0.58))
    assert int(np.sum(sel)) == int(0.58 * 50) == 28
    config = losses.LossConfig("kl_cov", kl_cov_ratio=np.float64(0.06))
    sel = losses.select_tokens(logp, old, adv, mask, config)
    assert int(np.sum(sel)) == int(0.06 * 50) == 3


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), p=PARAMS)
def test_clip_cov_chosen_get_zero_gradient_and_stay_in_denominator(seed, p):
    logp, old, adv, mask = make_batch(seed)
    key = jax.random.key(seed % 1000)
    loss, aux, grad = loss_and_grad(logp, old, adv, mask, loss_config("clip_cov", p), rng=key)
    sel = np.asarray(aux["selected"])
    assert np.all(grad[sel] == 0.0)
    ppo_loss, _, ppo_grad = loss_and_grad(logp, old, adv, mask, loss_config("ppo", p))
    np.testing.assert_allclose(grad[~sel], ppo_grad[~sel], rtol=1e-6, atol=1e-9)
    ppo_tok = np_token_loss("ppo", logp, old, adv, sel, np_params(p))[0]
    removed = np.sum(ppo_tok[sel]) / max(mask.sum(), 1)  # same denominator N
    assert_close(loss, ppo_loss - removed, rtol=1e-5, atol=1e-5)


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), p=PARAMS, mode=st.sampled_from(AGG_MODES))
def test_kl_cov_chosen_get_extra_sign_gradient(seed, p, mode):
    logp, old, adv, mask = make_batch(seed)
    config = loss_config("kl_cov", p, mode)
    _, aux, grad = loss_and_grad(logp, old, adv, mask, config)
    sel = np.asarray(aux["selected"])
    _, _, base = loss_and_grad(logp, old, adv, mask, config, selected=np.zeros_like(sel))
    extra = p["kl_cov_coef"] * np.sign(logp.astype(np.float64) - old) * np_agg_weights(mask, mode)
    assert_close(grad - base, np.where(sel, extra, 0.0), rtol=1e-4, atol=1e-6)


def test_kl_cov_on_policy_penalty_has_zero_gradient():
    logp, _, adv, mask = make_batch(6)
    config = losses.LossConfig("kl_cov", kl_cov_ratio=0.2)
    _, aux, grad = loss_and_grad(logp, logp, adv, mask, config)
    sel = np.asarray(aux["selected"])
    _, _, base = loss_and_grad(logp, logp, adv, mask, config, selected=~mask)
    assert sel.any()
    np.testing.assert_array_equal(grad, base)


def test_kl_cov_ties_broken_by_position():
    """Equal cov: the lower row-major position wins (four identical sequences)."""
    logp = np.array([[0.0, -2.0] * 6] * 4 + [[-1.0] * 12] * 2, np.float32)
    adv = np.array([[1.0] * 12] * 4 + [[-2.0] * 12] * 2, np.float32)
    mask = np.ones((B, T), bool)
    # cov = +1 at the 24 logp = 0 tokens, -1 at logp = -2, 0 in the last two rows; k = 18
    config = losses.LossConfig("kl_cov", kl_cov_ratio=0.25)
    sel = losses.select_tokens(logp, logp, adv, mask, config)
    np.testing.assert_array_equal(sel, np_kl_cov_selection(logp, adv, mask, 0.25))
    assert np.flatnonzero(np.asarray(sel)).tolist() == list(range(0, 36, 2))
    # one advantage for all: every cov is +0.0 or -0.0, a tie; the first k valid positions win
    mask[0, 0] = False
    sel = losses.select_tokens(logp, logp, np.ones_like(adv), mask, config)
    assert np.flatnonzero(np.asarray(sel)).tolist() == list(range(1, 18))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_cov_two_stage_top_k_matches_numpy_on_a_large_tied_batch(seed):
    """16 x 1024 tokens with k_max = 164 take the blocked two-stage top-k; logp on a coarse grid and
    shared advantages make many equal cov values, so ties must still go to the lower position."""
    rng = np.random.default_rng(seed)
    logp = -rng.integers(0, 4, (16, 1024)).astype(np.float32)
    adv = np.repeat(rng.choice([-1.0, 1.0], (16, 1)), 1024, axis=1).astype(np.float32)
    mask = np.arange(1024)[None, :] < rng.integers(100, 1025, (16, 1))
    assert losses._selection_block(mask.size, 164) > 1
    config = losses.LossConfig("kl_cov", kl_cov_ratio=0.01)
    sel = losses.select_tokens(logp, logp, adv, mask, config)
    np.testing.assert_array_equal(sel, np_kl_cov_selection(logp, adv, mask, 0.01))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_stage_top_k_equals_a_stable_sort_with_ties_and_ineligible(seed):
    """The blocked top-k against NumPy's stable argsort: a few large values late in the array,
    many equal small ones earlier (so the chosen blocks must be read in index order), -inf
    entries, and a size that is not a multiple of the block."""
    rng = np.random.default_rng(seed)
    flat = rng.integers(0, 3, 5003).astype(np.float32)
    flat[rng.choice(np.arange(4000, 5003), 20, replace=False)] = 9.0
    flat[rng.random(5003) < 0.3] = -np.inf
    k = 50
    assert flat.size % losses._selection_block(flat.size, k) != 0
    score, index = losses._top_k(jnp.asarray(flat), k)
    order = np.argsort(-flat, kind="stable")[:k]
    np.testing.assert_array_equal(index, order)
    np.testing.assert_array_equal(score, flat[order])


def test_select_top_counts_signed_zeros_as_one_value_and_accepts_an_empty_batch():
    chosen = losses._select_top(jnp.array([-1.0, -0.0, 0.0, -jnp.inf]), jnp.int32(1), 2)
    np.testing.assert_array_equal(chosen, [False, True, False, False])
    empty = np.zeros((0, 5), np.float32)
    sel = losses.select_tokens(empty, empty, empty, empty.astype(bool), losses.LossConfig("kl_cov"))
    assert sel.shape == (0, 5)


def test_same_key_same_choice_other_keys_differ():
    logp, old, adv, mask = make_batch(7)
    config = losses.LossConfig(
        "clip_cov", clip_cov_ratio=0.1, clip_cov_lb=-100.0, clip_cov_ub=100.0
    )
    select = jax.jit(functools.partial(losses.select_tokens, config=config))
    first = np.asarray(select(logp, old, adv, mask, rng=jax.random.key(3)))
    np.testing.assert_array_equal(select(logp, old, adv, mask, rng=jax.random.key(3)), first)
    choices = {
        np.asarray(select(logp, old, adv, mask, rng=jax.random.key(k))).tobytes() for k in range(10)
    }
    assert len(choices) > 5


def test_clip_cov_choice_is_uniform_over_candidates():
    """Chi-square goodness of fit of each candidate's selection count over 3000 keys."""
    logp, old, adv, mask = make_batch(8)
    ratio, lb, ub = 0.1, 0.05, 8.0
    cand = np_clip_cov_candidates(logp, old, adv, mask, 0.2, 0.2, lb, ub)
    count = min(np_count(ratio, mask.sum()), cand.sum())
    assert cand.sum() >= 2 * count >= 4
    config = losses.LossConfig("clip_cov", clip_cov_ratio=ratio, clip_cov_lb=lb, clip_cov_ub=ub)
    select = functools.partial(losses.select_tokens, logp, old, adv, mask, config)
    keys = jax.random.split(jax.random.key(0), 3000)
    chosen = np.asarray(jax.jit(jax.vmap(lambda k: select(rng=k)))(keys))
    assert (chosen.sum((1, 2)) == count).all() and not (chosen & ~cand).any()
    freq = chosen.sum(0)[cand]
    _, pvalue = scipy.stats.chisquare(freq, np.full(freq.shape, 3000 * count / cand.sum()))
    assert pvalue > 1e-3


@pytest.mark.parametrize("method", losses.METHODS)
def test_jit_matches_eager(method):
    logp, old, adv, mask = make_batch(9)
    config = loss_config(method, fixed_params(clips=(0.2, 0.28), bounds=(0.3, 2.0)), "token-mean")

    args = (logp, old, adv, mask, config)
    key = jax.random.key(1)
    vg = jax.value_and_grad(losses.policy_loss, has_aux=True)
    (loss, aux), grad = vg(*args, rng=key)
    jitted = jax.jit(vg, static_argnums=4)  # the LossConfig as a static argument
    (jloss, jaux), jgrad = jitted(*args, rng=key)
    np.testing.assert_allclose(jloss, loss, rtol=1e-6)
    np.testing.assert_allclose(jgrad, grad, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(jaux["selected"], aux["selected"])


@pytest.mark.parametrize(
    "method, mode",
    [("clip_cov", mode) for mode in AGG_MODES]
    + [("kl_cov", mode) for mode in AGG_MODES]
    + [("ppo", "seq-mean-token-mean"), ("dual_clip", "token-mean")],
)
def test_microbatches_with_global_selection_sum_to_minibatch(method, mode):
    logp, old, adv, mask = make_batch(10)
    config = loss_config(method, fixed_params(clips=(0.2, 0.2), bounds=(0.3, 5.0)), mode)
    key = jax.random.key(2)
    loss, aux, grad = loss_and_grad(logp, old, adv, mask, config, rng=key)
    selected = np.asarray(aux["selected"])
    if method in ("clip_cov", "kl_cov"):
        assert selected.any()
    counts = dict(num_tokens=int(mask.sum()), num_seqs=int((mask.sum(1) > 0).sum()), max_len=T)
    total, grads = 0.0, []
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
        part = (x[rows] for x in (logp, old, adv, mask))
        part_loss, _, part_grad = loss_and_grad(*part, config, selected=selected[rows], **counts)
        total += part_loss
        grads.append(part_grad)
    assert_close(total, loss, rtol=1e-5, atol=1e-6)
    assert_close(np.concatenate(grads), grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, name",
    [
        (dict(method="grpo"), "method"),
        (dict(method="ppo", loss_agg_mode="mean"), "loss_agg_mode"),
        (dict(method="ppo", clip_low=-0.1), "clip_low"),
        (dict(method="ppo", clip_high=-1.0), "clip_high"),
        (dict(method="dual_clip", dual_clip_c=1.0), "dual_clip_c"),
        (dict(method="clip_cov", clip_cov_ratio=0.0), "clip_cov_ratio"),
        (dict(method="clip_cov", clip_cov_ratio=1.5), "clip_cov_ratio"),
        (dict(method="kl_cov", kl_cov_ratio=-2e-4), "kl_cov_ratio"),
        (dict(method="clip_cov", clip_cov_lb=5.0), "clip_cov_lb"),
        (dict(method="kl_cov", kl_cov_coef=-1.0), "kl_cov_coef"),
    ],
)
def test_loss_config_rejects_bad_hyperparameters(fields, name):
    with pytest.raises(ValueError, match=name):
        losses.LossConfig(**fields)


@pytest.mark.parametrize(
    "fields, kwargs, name",
    [
        (dict(method="clip_cov"), {}, "rng"),
        (dict(method="ppo"), dict(num_tokens=0), "num_tokens"),
        (dict(method="ppo", loss_agg_mode="seq-mean-token-sum-norm"), dict(max_len=-3), "max_len"),
    ],
)
def test_policy_loss_rejects_bad_arguments(fields, kwargs, name):
    logp, old, adv, mask = make_batch(11)
    with pytest.raises(ValueError, match=name):
        losses.policy_loss(logp, old, adv, mask, losses.LossConfig(**fields), **kwargs)


def test_other_functions_reject_bad_arguments():
    logp, old, adv, mask = make_batch(12)
    with pytest.raises(ValueError, match="estimator"):
        losses.kl_penalty(logp, old, mask, estimator="k4")
    with pytest.raises(ValueError, match="entropy_coef"):
        losses.entropy_bonus(logp, mask, entropy_coef=-0.1)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        losses.aggregate(logp, mask, "sum")
    with pytest.raises(ValueError, match="temperature"):
        losses.logprobs_and_entropy(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), int), 0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        losses.logprobs_and_entropy_chunked(
            jnp.zeros((1, 2, 3)), jnp.zeros((3, 4)), jnp.zeros((1, 2), int), chunk_size=0
        )
