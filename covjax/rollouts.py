"""One RL step's rollouts: generate, score (split over hosts), refill (dynamic sampling), batch.

`collect_rollouts` samples config.train.prompts_per_step groups of config.rollout.n responses;
with DAPO's dynamic sampling, groups whose rewards all agree are dropped and new prompts sampled,
up to config.rollout.max_gen_rounds rounds. Its `StepData` is the host batch the update trains
on: the kept rows, their advantages, and the order that deals them over the mini-batches.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from covjax import advantages as advantages_lib
from covjax import memory, multihost
from covjax import metrics as names
from covjax.config import ConfigError
from covjax.model import ModelConfig
from covjax.sampler import Rollout, Sampler, SamplingParams
from covjax.tasks import Task


def sampling_params(rollout_config, stop_token_ids: Sequence[int]) -> SamplingParams:
    """The SamplingParams of config.rollout, with the task's stop tokens."""
    r = rollout_config
    return SamplingParams(
        max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
        n=r.n, stop_token_ids=tuple(stop_token_ids),
    )


# Share of the device memory the KV caches may claim: the rest holds the decode step's working
# set (a layer's keys/values read from the cache, logits, sampling, the prefill batch), sized by
# compiling the rollout program (benchmarks/rollout_pool.py memory).
SLOT_MEMORY_FRACTION = 0.9


def rollout_slots(
    config, model_config: ModelConfig, mesh: memory.MeshShape, bytes_limit: float | None
) -> int | None:
    """The sampler's pool over the mesh: rollout.slots_per_device x the batch shards, at most
    one slot per row of a step. 0 derives the per-device count from covjax.memory (KV caches of
    max_prompt_length + max_new_tokens tokens beside the training state in
    SLOT_MEMORY_FRACTION x `bytes_limit`);
    None (one slot per row) when the device reports no memory size. ConfigError, naming the
    key, when the slots (at least one) do not fit."""
    per_device = config.rollout.slots_per_device
    if bytes_limit is not None:
        seq_len = config.data.max_prompt_length + config.rollout.max_new_tokens
        budget = SLOT_MEMORY_FRACTION * bytes_limit
        fitting = memory.rollout_sequences(model_config, mesh, seq_len, budget)
        if max(per_device, 1) > fitting:
            raise ConfigError(
                f"config.rollout.slots_per_device={per_device}: {fitting} KV caches of "
                f"{seq_len} tokens fit beside the training state in {bytes_limit / 1e9:.1f} GB "
                "per device (covjax.memory)"
            )
        per_device = per_device or fitting
    if not per_device:
        return None
    rows = config.train.prompts_per_step * config.rollout.n
    return min(per_device * mesh.data * mesh.fsdp, rows)


def _left_pad(rollout: Rollout, prompt_length: int) -> Rollout:
    """The same rollout with its prompt region left-padded to `prompt_length` columns."""
    extra = prompt_length - rollout.prompt_length
    if extra == 0:
        return rollout

    def pad(x):
        return np.pad(x, ((0, 0), (extra, 0)))

    return dataclasses.replace(
        rollout,
        tokens=pad(rollout.tokens),
        attention_mask=pad(rollout.attention_mask),
        positions=pad(rollout.positions),
        response_mask=pad(rollout.response_mask),
        logprobs=pad(rollout.logprobs),
        prompt_length=prompt_length,
    )


def _take(rollout: Rollout, rows: np.ndarray) -> dict[str, np.ndarray]:
    return {
        k: getattr(rollout, k)[rows]
        for k in ("tokens", "attention_mask", "positions", "response_mask", "logprobs")
    }


@dataclasses.dataclass
class StepData:
    """The rollout batch of one RL step (host arrays, N = prompts_per_step * n rows)."""

    arrays: dict[str, np.ndarray]  # tokens, attention_mask, positions, response_mask, logprobs
    prompt_length: int
    advantages: np.ndarray  # [N], 0 for padding rows
    metrics: dict[str, float]
    trainable: bool  # False: every group of every round agreed; the first round's responses are
    # kept for the entropy and covariance metrics only


def _rollout_rows(rollout: Rollout, rows: np.ndarray) -> Rollout:
    """The responses `rows` of a rollout (group_ids keep indexing the full prompt list)."""
    return dataclasses.replace(
        rollout,
        **{
            f.name: getattr(rollout, f.name)[rows]
            for f in dataclasses.fields(rollout)
            if f.name != "prompt_length"
        },
    )


def score_split(task: Task, rollout: Rollout, truths: Sequence) -> tuple[np.ndarray, dict]:
    """(Rewards [N] of every response, the means of the task's per-row score metrics over every
    response); each process scores its own slice (multihost.process_rows) and the slices are
    all-gathered, so every process returns the same."""
    num_rows = rollout.lengths.shape[0]
    if jax.process_count() == 1:
        rewards = task.score(rollout, truths)
        return rewards, {k: float(v.mean()) for k, v in task.score_metrics().items()}
    rows = multihost.process_rows(num_rows)
    per = -(-num_rows // jax.process_count())
    local = np.zeros((per, 1 + len(task.score_metrics())), np.float32)
    if rows.size:
        local[: rows.size, 0] = task.score(_rollout_rows(rollout, rows), truths)
        for i, values in enumerate(task.score_metrics().values()):
            local[: rows.size, 1 + i] = values
    gathered = multihost.host_concat(local)[:num_rows]
    return gathered[:, 0], {
        k: float(gathered[:, 1 + i].mean()) for i, k in enumerate(task.score_metrics())
    }


def collect_rollouts(task: Task, sampler: Sampler, config, rng: jax.Array) -> StepData:
    """Samples prompts_per_step groups of n responses; with dynamic sampling, groups whose
    rewards all agree are dropped and new prompts are sampled (up to rollout.max_gen_rounds
    rounds). Missing groups are padding rows with an empty response mask, so shapes are fixed;
    the kept groups of such a short step are dealt over the mini-batches (minibatch_group_order).

    Reward, accuracy and length metrics are those of the first round (the policy's own
    performance, not biased by the filter); filter/kept_group_frac counts every round.
    """
    r, num_prompts = config.rollout, config.train.prompts_per_step
    params = sampling_params(r, task.stop_token_ids)
    kept: list[tuple[Rollout, np.ndarray, np.ndarray]] = []  # (rollout, rows, rewards)
    first: tuple[Rollout, np.ndarray, np.ndarray] | None = None
    num_kept = num_informative = num_generated = 0
    metrics: dict[str, float] = {}
    t_gen = t_score = 0.0
    for round_index in range(r.max_gen_rounds):
        prompts, truths = task.next_prompts(num_prompts)
        t0 = time.perf_counter()
        rollout = sampler.generate(prompts, params, rng=jax.random.fold_in(rng, round_index))
        t1 = time.perf_counter()
        rewards, score_means = score_split(task, rollout, truths)
        t_gen, t_score = t_gen + t1 - t0, t_score + time.perf_counter() - t1
        if round_index == 0:
            first = (rollout, np.arange(rewards.size), np.zeros_like(rewards))
            metrics.update(
                {
                    names.REWARD_MEAN: float(rewards.mean()),
                    names.ACCURACY_MEAN: float((rewards > 0.5).mean()),
                    names.RESPONSE_LENGTH_MEAN: float(rollout.lengths.mean()),
                    "response_length/max": float(rollout.lengths.max()),
                    "response_length/frac_truncated": float((~rollout.stopped).mean()),
                    **score_means,
                }
            )
        informative = np.asarray(advantages_lib.group_filter(rewards, rollout.group_ids))
        group_informative = informative.reshape(num_prompts, r.n).all(axis=1)
        num_generated += num_prompts
        num_informative += int(group_informative.sum())
        use = group_informative if config.advantage.dynamic_sampling else np.ones(num_prompts, bool)
        groups = np.flatnonzero(use)[: num_prompts - num_kept]
        rows = (groups[:, None] * r.n + np.arange(r.n)).reshape(-1)
        if rows.size:
            kept.append((rollout, rows, rewards[rows]))
        num_kept += len(groups)
        if num_kept == num_prompts:
            break

    metrics.update(
        {
            names.FILTER_KEPT_GROUP_FRAC: num_informative / num_generated,
            names.FILTER_GEN_ROUNDS: float(round_index + 1),
            names.FILTER_PADDED_GROUP_FRAC: 1.0 - num_kept / num_prompts,
            "time/rollout": t_gen,
            "time/rewards": t_score,
        }
    )
    data = _assemble_batch(kept or [first], num_prompts * r.n, r.n, config.advantage.estimator,
                           metrics, config.train.mini_batch_prompts)
    # nothing kept: the first round is measured, nothing is trained on
    return data if kept else dataclasses.replace(data, trainable=False)


def minibatch_group_order(num_kept: int, num_groups: int, groups_per_minibatch: int) -> np.ndarray:
    """Where each group goes when dynamic sampling came up short: ``order[slot]`` is the group
    (kept ones first, then padding) placed in group slot ``slot`` of the step's batch.

    The kept groups are dealt round-robin over the mini-batches (kept group g to mini-batch
    g mod M, M = num_groups / groups_per_minibatch), so a short step still makes
    min(num_kept, M) optimizer updates, as a full one makes M (verl keeps sampling until the batch
    is full, so its number of updates per step never drops). Packed into the first mini-batch,
    a step with few kept groups would make one on-policy update and KL-Cov's penalty, whose
    gradient is zero on-policy (ALGORITHMS.md section 3), would never act.
    """
    if not 0 < groups_per_minibatch <= num_groups or num_groups % groups_per_minibatch:
        raise ValueError(
            f"groups_per_minibatch={groups_per_minibatch} must divide num_groups={num_groups}"
        )
    num_minibatches = num_groups // groups_per_minibatch
    kept = np.arange(num_kept)
    slots = (kept % num_minibatches) * groups_per_minibatch + kept // num_minibatches
    order = np.full(num_groups, -1)
    order[slots] = kept
    order[order < 0] = np.arange(num_kept, num_groups)
    return order


def _assemble_batch(kept, num_rows: int, n: int, estimator: str, metrics,
                    groups_per_minibatch: int) -> StepData:
    """Concatenates the kept rows (prompts left-padded to one width) and computes the advantages
    of the kept groups. When groups are missing, one gather fills num_rows: the kept groups are
    dealt over the mini-batches (minibatch_group_order) and the empty group slots hold copies of
    row 0 with an empty response mask and advantage 0."""
    width = max(ro.prompt_length for ro, _, _ in kept)
    parts = [_take(_left_pad(ro, width), rows) for ro, rows, _ in kept]
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    rewards = np.concatenate([rw for _, _, rw in kept]).astype(np.float32)
    num_real = rewards.size
    # Group-local estimators: pad with reward-0 groups (advantage 0), so that one shape is
    # compiled instead of one per number of kept groups (each a compilation). REINFORCE++
    # whitens over the batch, so it sees the real responses only.
    if estimator != "reinforce_pp":
        rewards = np.pad(rewards, (0, num_rows - num_real))
    group_ids = np.arange(rewards.size) // n
    adv = np.asarray(
        advantages_lib.compute(jnp.asarray(rewards), jnp.asarray(group_ids), estimator=estimator)
    )[:num_real].astype(np.float32)
    if num_real < num_rows:
        order = minibatch_group_order(num_real // n, num_rows // n, groups_per_minibatch)
        rows = (order[:, None] * n + np.arange(n)).reshape(-1)
        padding = rows >= num_real
        source = np.where(padding, 0, rows)
        arrays = {k: v[source] for k, v in arrays.items()}
        arrays["response_mask"][padding] = False
        adv = np.where(padding, np.float32(0), adv[source])
    return StepData(arrays, width, adv, metrics, trainable=True)


