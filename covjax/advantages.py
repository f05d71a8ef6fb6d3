"""Outcome-reward advantages per response and the dynamic-sampling group filter (ALGORITHMS.md 6).

Responses are grouped by prompt: ``group_ids[j]`` is the group of response j, an int in
``[0, num_groups)`` (the sampler gives prompt indices, ``group_ids = arange(N) // n``). Groups may
have any sizes and appear in any order. Everything is jit-friendly: group statistics use
``jax.ops.segment_sum`` with a static number of segments, ``num_groups`` (default N, enough for
any ids in [0, N)). Ids outside ``[0, num_groups)`` raise a ValueError on concrete inputs; under
jit they cannot be checked and would be dropped from the group statistics.

Groups of size 1 have no baseline from the other responses: every estimator gives them advantage
0 (before the batch whitening of ``reinforce_pp``), and ``group_filter`` drops them. verl instead
uses the baseline 0 (advantage = reward) for singletons.
"""

from __future__ import annotations

import numbers

import chex
import jax
import jax.numpy as jnp
import numpy as np

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")


def _num_segments(group_ids: jax.Array, num_groups: int | None) -> int:
    """Static segment count; checks the ids when they are concrete (not traced)."""
    chex.assert_rank(group_ids, 1)
    if num_groups is None:
        num_groups = max(group_ids.shape[0], 1)
    if not (isinstance(num_groups, numbers.Integral) and num_groups >= 1):
        raise ValueError(f"num_groups must be a positive int, got num_groups={num_groups!r}")
    num_groups = int(num_groups)
    try:
        ids = np.asarray(group_ids)
    except jax.errors.TracerArrayConversionError:  # traced under jit: cannot be checked
        return num_groups
    if ids.size and (ids.min() < 0 or ids.max() >= num_groups):
        raise ValueError(
            f"group_ids must lie in [0, {num_groups}), got group_ids with min={ids.min()} "
            f"and max={ids.max()}"
        )
    return num_groups


def _prepare(
    rewards: jax.Array, group_ids: jax.Array, num_groups: int | None
) -> tuple[jax.Array, jax.Array, int]:
    """(rewards float32 [N], group_ids int32 [N], static number of segments), shapes checked."""
    num_segments = _num_segments(group_ids, num_groups)
    chex.assert_equal_shape([rewards, group_ids])
    return rewards.astype(jnp.float32), group_ids.astype(jnp.int32), num_segments


def _group_sum(values: jax.Array, group_ids: jax.Array, num_segments: int) -> jax.Array:
    """Per-response sum over its group: segment_sum gathered back to the responses."""
    return jax.ops.segment_sum(values, group_ids, num_segments=num_segments)[group_ids]


def compute(
    rewards: jax.Array,
    group_ids: jax.Array,
    *,
    estimator: str,
    eps: float = 1e-6,
    num_groups: int | None = None,
) -> jax.Array:
    """Advantage A_j of each response j from its outcome reward R_j (ALGORITHMS.md section 6).

    With n_g, mean_g, std_g the size, mean and standard deviation of j's group:

    - ``grpo``: A_j = (R_j - mean_g) / (std_g + eps). std_g is the sample standard deviation
      (ddof = 1), following verl, whose GRPO uses ``torch.std`` (unbiased).
    - ``dr_grpo`` (Dr. GRPO): A_j = R_j - mean_g.
    - ``rloo``: A_j = R_j - mean of the other responses of the group
      = n_g / (n_g - 1) * (R_j - mean_g).
    - ``reinforce_pp`` (REINFORCE++ with the group-mean baseline): c_j = R_j - mean_g, then
      whitened over the batch of responses: (c_j - mean(c)) / (std(c) + eps), std with ddof = 1.
      verl whitens over tokens (each response weighted by its length); here each response counts
      once.

    Groups of size 1 get 0 (see the module docstring). Args: rewards ``[N]`` (cast to float32),
    group_ids ``[N]`` int, ``eps`` > 0 added to the standard deviations, ``num_groups`` the
    static number of groups (ids in [0, num_groups); default N). Returns ``[N]`` float32; the
    trainer broadcasts A_j to every token of response j.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got estimator={estimator!r}")
    if not (isinstance(eps, numbers.Real) and eps > 0):
        raise ValueError(f"eps must be a number > 0, got eps={eps!r}")
    rewards, group_ids, num_segments = _prepare(rewards, group_ids, num_groups)
    size = _group_sum(jnp.ones_like(rewards), group_ids, num_segments)
    centered = rewards - _group_sum(rewards, group_ids, num_segments) / size
    multi = size > 1
    if estimator == "grpo":
        var = _group_sum(jnp.square(centered), group_ids, num_segments) / jnp.maximum(size - 1, 1)
        return jnp.where(multi, centered / (jnp.sqrt(var) + eps), 0.0)
    if estimator == "rloo":
        return jnp.where(multi, centered * size / jnp.maximum(size - 1, 1), 0.0)
    centered = jnp.where(multi, centered, 0.0)
    if estimator == "dr_grpo":
        return centered
    count = centered.shape[0]
    batch_centered = centered - jnp.mean(centered)
    batch_std = jnp.sqrt(jnp.sum(jnp.square(batch_centered)) / max(count - 1, 1))
    return batch_centered / (batch_std + eps)


def group_filter(
    rewards: jax.Array, group_ids: jax.Array, *, num_groups: int | None = None
) -> jax.Array:
    """Dynamic sampling (DAPO): keep [N] bool, False for responses whose group's rewards all agree.

    Such groups (std = 0, including groups of one) have zero advantage under every estimator and
    carry no gradient. ``num_groups`` as in ``compute``.
    """
    rewards, group_ids, num_segments = _prepare(rewards, group_ids, num_groups)
    high = jax.ops.segment_max(rewards, group_ids, num_segments=num_segments)[group_ids]
    low = jax.ops.segment_min(rewards, group_ids, num_segments=num_segments)[group_ids]
    return high > low
