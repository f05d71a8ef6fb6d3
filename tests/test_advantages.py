"""covjax.advantages against a NumPy reference written from ALGORITHMS.md section 6."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from covjax import advantages

EPS = 1e-6


def np_advantages(rewards, group_ids, estimator, eps=EPS):
    """Loop over responses: group statistics from the other members, singletons get 0."""
    r = rewards.astype(np.float64)
    out = np.zeros_like(r)
    for j in range(len(r)):
        group = r[group_ids == group_ids[j]]
        if len(group) == 1:
            continue
        if estimator == "grpo":
            out[j] = (r[j] - group.mean()) / (group.std(ddof=1) + eps)
        elif estimator == "rloo":
            others = np.delete(group, np.flatnonzero(group == r[j])[0])
            out[j] = r[j] - others.mean()
        else:
            out[j] = r[j] - group.mean()
    if estimator == "reinforce_pp":
        out = (out - out.mean()) / ((out.std(ddof=1) if len(out) > 1 else 0.0) + eps)
    return out


def make_groups(seed, binary, num_responses=24):
    """Shuffled groups of sizes 1..6 (one fixed total, so one compilation); binary (0/1, many
    all-agree groups) or real rewards."""
    rs = np.random.default_rng(seed)
    sizes = np.minimum(np.cumsum(rs.integers(1, 7, size=num_responses)), num_responses)
    sizes = np.diff(np.unique(np.concatenate([[0], sizes])))
    group_ids = np.repeat(np.arange(len(sizes)), sizes)
    rs.shuffle(group_ids)
    if binary:
        rewards = rs.integers(0, 2, size=num_responses).astype(np.float32)
    else:
        rewards = rs.normal(0, 2, size=num_responses).astype(np.float32)
    return rewards, group_ids.astype(np.int32)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    estimator=st.sampled_from(advantages.ESTIMATORS),
    binary=st.booleans(),
)
def test_estimators_match_numpy(seed, estimator, binary):
    rewards, group_ids = make_groups(seed, binary)
    actual = advantages.compute(rewards, group_ids, estimator=estimator)
    assert actual.dtype == jnp.float32 and actual.shape == rewards.shape
    np.testing.assert_allclose(
        actual, np_advantages(rewards, group_ids, estimator), rtol=2e-5, atol=2e-5
    )


def test_paper_grpo_group_of_eight():
    rewards = np.array([1, 0, 0, 1, 1, 0, 0, 0], np.float32)
    std = np.sqrt((3 * (5 / 8) ** 2 + 5 * (3 / 8) ** 2) / 7)  # ddof = 1, as torch.std
    expected = np.where(rewards == 1, 5 / 8, -3 / 8) / (std + EPS)
    actual = advantages.compute(rewards, np.zeros(8, np.int32), estimator="grpo")
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_jit_with_static_num_groups():
    rewards, group_ids = make_groups(1, binary=False)
    num_groups = int(group_ids.max()) + 1
    for estimator in advantages.ESTIMATORS:
        fn = jax.jit(
            lambda r, g, e=estimator: advantages.compute(r, g, estimator=e, num_groups=num_groups)
        )
        np.testing.assert_allclose(
            fn(rewards, group_ids),
            np_advantages(rewards, group_ids, estimator),
            rtol=2e-5,
            atol=2e-5,
        )
    keep = jax.jit(lambda r, g: advantages.group_filter(r, g, num_groups=num_groups))
    expected = [len(np.unique(rewards[group_ids == g])) > 1 for g in group_ids]
    np.testing.assert_array_equal(keep(rewards, group_ids), expected)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1))
def test_group_filter_drops_groups_that_all_agree(seed):
    rewards, group_ids = make_groups(seed, binary=True)
    keep = np.asarray(advantages.group_filter(rewards, group_ids))
    for g in np.unique(group_ids):
        members = group_ids == g
        assert (keep[members] == (len(np.unique(rewards[members])) > 1)).all()
    # the kept groups are exactly those with a non-zero GRPO advantage somewhere
    grpo = np.asarray(advantages.compute(rewards, group_ids, estimator="grpo"))
    for g in np.unique(group_ids):
        members = group_ids == g
        assert keep[members].all() == np.any(grpo[members] != 0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(estimator="ppo"), "estimator"),
        (dict(estimator="grpo", eps=0.0), "eps"),
        (dict(estimator="grpo", num_groups=0), "num_groups"),
        (dict(estimator="grpo", num_groups=2), "group_ids"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    rewards = np.ones(4, np.float32)
    group_ids = np.array([0, 0, 1, 2], np.int32)
    with pytest.raises(ValueError, match=name):
        advantages.compute(rewards, group_ids, **kwargs)
    if name in ("num_groups", "group_ids"):
        with pytest.raises(ValueError, match=name):
            advantages.group_filter(rewards, group_ids, num_groups=kwargs["num_groups"])
    with pytest.raises(ValueError, match="group_ids"):
        advantages.compute(rewards, np.array([0, -1, 1, 1]), estimator="grpo")
