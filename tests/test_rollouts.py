"""covjax.rollouts: dynamic sampling's refill and padding, the mini-batch order, the batch."""

import types

import jax
import numpy as np
import pytest
from helpers import recipes

from covjax import memory, rollouts
from covjax.config import ConfigError
from covjax.sampler import Rollout


class _FakeSampler:
    """Rollouts of fixed shape: prompt [1, g] (g = prompt index), responses of 2 tokens."""

    def generate(self, prompts, params, *, rng):
        n = params.n
        rows = len(prompts) * n
        tokens = np.zeros((rows, 4), np.int32)
        tokens[:, 1] = np.repeat([p[-1] for p in prompts], n)
        tokens[:, 2:] = 7
        mask = np.zeros((rows, 4), bool)
        mask[:, 2:] = True
        return Rollout(tokens=tokens, attention_mask=np.ones((rows, 4), bool),
                       positions=np.tile(np.arange(4, dtype=np.int32), (rows, 1)),
                       response_mask=mask, logprobs=np.zeros((rows, 4), np.float32),
                       lengths=np.full(rows, 2), stopped=np.ones(rows, bool),
                       group_ids=np.repeat(np.arange(len(prompts)), n), prompt_length=2)


class _FakeTask:
    """Round k serves prompts 10k .. 10k+3 and the rewards of ROUNDS[k]."""

    stop_token_ids = ()

    def __init__(self, rounds):
        self.rounds, self.calls = rounds, 0

    def next_prompts(self, count):
        self.calls += 1
        base = 10 * (self.calls - 1)
        return [[1, base + g] for g in range(count)], None

    def score(self, rollout, truths):
        return np.asarray(self.rounds[self.calls - 1], np.float32)

    def score_metrics(self):
        return {}


def _collect(rounds, dynamic=True, max_rounds=3):
    config = recipes().toy_config("clip_cov")
    config.unlock()
    config.train.prompts_per_step, config.rollout.n = 4, 2
    config.train.mini_batch_prompts = 2  # 2 mini-batches of 2 groups
    config.advantage.dynamic_sampling, config.rollout.max_gen_rounds = dynamic, max_rounds
    task = _FakeTask(rounds)
    return task, rollouts.collect_rollouts(task, _FakeSampler(), config, jax.random.key(0))


def test_dynamic_sampling_refills_then_pads():
    # round 0: groups 1 and 3 informative; round 1: group 0; round 2: none -> one padded group.
    # Kept groups (prompts 1, 3, 10) are dealt over the 2 mini-batches: [1, 10 | 3, padding]
    task, data = _collect([[0, 0, 1, 0, 1, 1, 0, 1], [1, 0, 1, 1, 0, 0, 0, 0],
                           [1, 1, 1, 1, 0, 0, 0, 0]])
    assert task.calls == 3 and data.trainable
    np.testing.assert_array_equal(data.arrays["tokens"][:6, 1], [1, 1, 10, 10, 3, 3])
    assert not data.arrays["response_mask"][6:].any()  # the padded group: no tokens
    np.testing.assert_allclose(data.advantages, [0.707, -0.707, 0.707, -0.707, -0.707, 0.707,
                                                 0, 0], atol=1e-3)  # GRPO, std with ddof=1
    m = data.metrics
    assert m["reward/mean"] == 0.5 and m["filter/kept_group_frac"] == pytest.approx(3 / 12)
    assert m["filter/gen_rounds"] == 3 and m["filter/padded_group_frac"] == 0.25


@pytest.mark.parametrize(
    "num_kept, num_groups, per_minibatch, expected",
    [
        (5, 8, 2, [0, 4, 1, 5, 2, 6, 3, 7]),  # 4 mini-batches, each gets a kept group
        (2, 8, 2, [0, 2, 1, 3, 4, 5, 6, 7]),  # 2 kept: mini-batches 0 and 1, one each
        (3, 4, 4, [0, 1, 2, 3]),  # one mini-batch: order unchanged
    ],
)
def test_minibatch_group_order_deals_kept_groups_round_robin(
    num_kept, num_groups, per_minibatch, expected
):
    order = rollouts.minibatch_group_order(num_kept, num_groups, per_minibatch)
    np.testing.assert_array_equal(order, expected)
    per_minibatch_kept = (order < num_kept).reshape(-1, per_minibatch).sum(1)
    num_minibatches = num_groups // per_minibatch
    assert (per_minibatch_kept >= 1).sum() == min(num_kept, num_minibatches)
    assert per_minibatch_kept.max() - per_minibatch_kept.min() <= 1


def test_short_step_puts_padding_between_kept_groups_with_masks_and_advantages_aligned():
    # 2 of 4 groups kept (prompts 0 and 2), 2 mini-batches of 2 groups: [prompt 0, pad | 2, pad]
    _, data = _collect([[0, 1, 1, 1, 1, 0, 0, 0], [1] * 8, [1] * 8])
    response = data.arrays["response_mask"].any(axis=1)
    np.testing.assert_array_equal(response, [1, 1, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(data.arrays["tokens"][response, 1], [0, 0, 2, 2])
    np.testing.assert_allclose(data.advantages, [-0.707, 0.707, 0, 0, 0.707, -0.707, 0, 0],
                               atol=1e-3)


def test_dynamic_sampling_stops_when_full_and_measures_saturated_steps():
    task, data = _collect([[0, 1] * 4, [1] * 8])
    assert task.calls == 1 and data.trainable and data.metrics["filter/kept_group_frac"] == 1
    task, data = _collect([[1] * 8, [1] * 8], max_rounds=2)
    assert task.calls == 2 and not data.trainable  # nothing to learn: metrics only
    assert data.arrays["response_mask"][:, 2:].all() and not data.advantages.any()
    assert data.metrics["filter/kept_group_frac"] == 0 and data.metrics["reward/mean"] == 1
    task, data = _collect([[1] * 8], dynamic=False)
    assert data.trainable and data.metrics["filter/kept_group_frac"] == 0


FSDP8 = memory.MeshShape(fsdp=8)


def _slots(per_device, bytes_limit, mesh=FSDP8):
    config = recipes().toy_config("clip_cov")
    config.unlock()
    config.rollout.slots_per_device = per_device
    config.data.max_prompt_length, config.rollout.max_new_tokens = 2048, 8192
    config.train.prompts_per_step, config.rollout.n = 256, 8
    return rollouts.rollout_slots(config, memory.QWEN2_5_7B, mesh, bytes_limit)


def test_rollout_slots_from_config_or_memory_and_refusals():
    """Qwen2.5-7B on 8 devices: fp32 params + AdamW sharded (12 P / 8), bf16 weights gathered
    for decoding (2 P), KV caches of 10240 tokens (2 L Hkv Dh S 2 bytes)."""
    assert _slots(0, None) is None  # no memory size: one slot per row
    assert _slots(3, None, memory.MeshShape(data=2, fsdp=4)) == 24
    assert _slots(1000, None) == 2048  # at most one slot per row of the step
    p = memory.param_counts(memory.QWEN2_5_7B).total
    kv = 2 * 28 * 4 * 128 * 10240 * 2
    limit = 127e9
    assert _slots(0, limit) == 8 * int((0.9 * limit - 12 * p / 8 - 2 * p) // kv)
    with pytest.raises(ConfigError, match=r"config.rollout.slots_per_device=0: 0 KV caches"):
        _slots(0, 20e9)
    with pytest.raises(ConfigError, match=r"config.rollout.slots_per_device=500: \d+ KV caches"):
        _slots(500, limit)


class _RowTask:
    """Rewards [rows] = each row's prompt index; its per-row metric is twice that."""

    def score(self, rollout, truths):
        self.rewards = rollout.tokens[:, 1].astype(np.float32)
        return self.rewards

    def score_metrics(self):
        return {"m": 2 * self.rewards}


def test_score_split_gathers_rewards_and_metrics_of_every_process(monkeypatch):
    """3 processes share 4 rows (2, 2 and none): every process gets all 4 rewards and the
    metric's mean over all 4, the one with no rows included."""
    rollout = _FakeSampler().generate([[1, 3], [1, 5]], types.SimpleNamespace(n=2), rng=None)
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    slices = []
    monkeypatch.setattr(rollouts.multihost, "host_concat",
                        lambda x: slices.append(x) or np.concatenate([x] * 3))
    task = _RowTask()
    task.rewards = np.full(2, 9.0, np.float32)  # what a process with no rows must not report
    for p in (2, 0, 1):  # the empty slice first: its metric is a stale one
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        rollouts.score_split(task, rollout, None)
    monkeypatch.setattr(rollouts.multihost, "host_concat",
                        lambda x: np.concatenate([slices[1], slices[2], slices[0]]))
    rewards, means = rollouts.score_split(task, rollout, None)
    np.testing.assert_array_equal(rewards, [3, 3, 5, 5])
    assert means == {"m": pytest.approx(2 * 4.0)}
