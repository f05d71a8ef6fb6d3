"""Live check of the covariance theory of entropy change (ALGORITHMS.md section 2).

For a softmax policy pi = softmax(z) at a state s, a change of logits dz changes the entropy by,
to first order (the paper's lemma for softmax policies; dH/dz_a = -pi(a) (log pi(a) + H)):

    dH ~= -Cov_{a~pi(.|s)}( log pi(a|s), dz(a) ).

- natural policy gradient, dz = eta * A(s, .):           dH ~= -eta * Cov(log pi, A);
- vanilla policy gradient, dz = eta * pi(.|s) * A(s, .): dH ~= -eta * Cov(log pi, pi * A).

Two forms are implemented:
- `exact_entropy_change` / `exact_predicted_change`: the per-state covariance over all actions,
  for when the logit change of every action is known (a tabular softmax, the closed-form test).
- `predicted_entropy_change`: what the trainer can compute, since only the sampled token's
  advantage is known. The paper's practical estimator (Eq. 10 averaged over the valid tokens,
  times the step size) is the covariance over the batch's sampled tokens of (log pi(a_t|s_t), A_t),
  centred on the batch means. It needs only the sampled tokens' log-probs, so logits [B, T, V] or
  the chunked hidden + unembed form (covjax.losses.logprobs_and_entropy[_chunked]) serve alike.
  It is a first-order approximation with eta = the learning rate: a real model does not
  move its logits by eta * A (the logits share parameters), and under Adam the effective step is
  not eta. So the trainer logs the prediction next to `measured_entropy_change` (entropy of the
  same batch recomputed after the update minus before) and the analysis judges the sign, the
  correlation over steps and the ratio measured / predicted (covjax.analysis.stats.check_agreement).
  Measure around one optimizer update on its own mini-batch; over k updates between the two
  entropy measurements the first-order prediction is k times larger (pass eta = k * lr).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from covjax import metrics as names
from covjax.losses import token_covariance

Array = jax.Array


def exact_entropy_change(logits: Array, logit_change: Array) -> Array:
    """First-order dH = -Cov_{a~pi}(log pi(a), dz(a)) per state, pi = softmax(logits) over the
    last axis; logits and logit_change [..., V] -> [...] float32."""
    chex.assert_equal_shape([logits, logit_change])
    log_pi = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    pi = jnp.exp(log_pi)
    logit_change = logit_change.astype(jnp.float32)
    centred_log_pi = log_pi - jnp.sum(pi * log_pi, axis=-1, keepdims=True)
    centred_change = logit_change - jnp.sum(pi * logit_change, axis=-1, keepdims=True)
    return -jnp.sum(pi * centred_log_pi * centred_change, axis=-1)


def exact_predicted_change(logits: Array, action_advantages: Array, *, eta: float | Array
                           ) -> dict[str, Array]:
    """Per-state predicted dH for advantages A(s, a) of every action [..., V]:
    natural = -eta Cov(log pi, A) (dz = eta A), vanilla = -eta Cov(log pi, pi A) (dz = eta pi A)."""
    pi = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return {"natural": exact_entropy_change(logits, eta * action_advantages),
            "vanilla": exact_entropy_change(logits, eta * pi * action_advantages)}


def _masked_covariance(x: Array, y: Array, mask: Array) -> Array:
    """Cov_t(x, y) over the valid tokens: the token mean of Eq. 10's per-token covariance."""
    cov = token_covariance(x, y, mask)
    return jnp.sum(cov) / jnp.maximum(jnp.sum(mask), 1.0)


def predicted_entropy_change(logp: Array, advantages: Array, mask: Array, *, eta: float | Array
                             ) -> dict[str, Array]:
    """The sampled-token estimator of the token-mean entropy change (mean of Eq. 10 times -eta):
    natural = -eta Cov_t(logp_t, A_t), vanilla = -eta Cov_t(logp_t, exp(logp_t) A_t), covariances
    over the valid tokens of the batch ([B, T] arrays -> float32 scalars, no gradient)."""
    chex.assert_equal_shape([logp, advantages, mask])
    logp = jax.lax.stop_gradient(logp.astype(jnp.float32))
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    mask = mask.astype(jnp.float32)
    return {"natural": -eta * _masked_covariance(logp, advantages, mask),
            "vanilla": -eta * _masked_covariance(logp, jnp.exp(logp) * advantages, mask)}


def measured_entropy_change(entropy_before: Array, entropy_after: Array, mask: Array) -> Array:
    """Token mean over the valid tokens of H_after - H_before (same batch, [B, T] -> scalar)."""
    chex.assert_equal_shape([entropy_before, entropy_after, mask])
    mask = mask.astype(jnp.float32)
    change = entropy_after.astype(jnp.float32) - entropy_before.astype(jnp.float32)
    return jnp.sum(change * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def entropy_check_metrics(logp: Array, advantages: Array, mask: Array, entropy_before: Array,
                          entropy_after: Array, *, eta: float | Array) -> dict[str, Array]:
    """The three entropy_check/* metrics (docs/metrics.md) for one trained batch: logp and
    entropy_before from the policy before the update, entropy_after recomputed on the same batch
    after it, eta the summed learning rates of the updates made between the two."""
    predicted = predicted_entropy_change(logp, advantages, mask, eta=eta)
    return {names.CHECK_PREDICTED_NATURAL: predicted["natural"],
            names.CHECK_PREDICTED_VANILLA: predicted["vanilla"],
            names.CHECK_MEASURED: measured_entropy_change(entropy_before, entropy_after, mask)}
