"""The RL loop of DESIGN.md: one function, `train(config, workdir)`, read top to bottom.

    prompts -> sampler.generate -> rewards -> advantages -> dynamic-sampling filter (refill up to
    rollout.max_gen_rounds) -> old log-probs (one no-grad forward, training numerics)
    -> for each mini-batch: train_step.update (selection pre-pass, micro-batches, AdamW)
    -> metrics (metrics.jsonl + TensorBoard) -> orbax checkpoint every N steps and on SIGTERM/SIGINT

Everything a step needs is derived from (seed, step) and the data position, which are
checkpointed with the parameters and the optimizer state, so a resumed run repeats exactly what
an uninterrupted one would have done (bit for bit on the same mesh, micro-batch size and remat
policy, which config.check_resume lets a resumed run change).
Metric "step" is the 0-based index of the RL step; checkpoints are numbered by completed steps.

Several processes (jax.distributed, one mesh over all their devices) run this same loop:
- every process draws the same prompts (cheap, and the data order does not depend on the number
  of processes); the sampler is one program over the global mesh, so each device decodes only
  the rows it holds, with per-row keys from the global row index (a row draws the same tokens on
  any number of processes); its results are all-gathered to every host (small: token ids);
- each process scores its own contiguous slice of the responses (math-verify is the costly part)
  and the rewards are all-gathered, so the bookkeeping after it (advantages, the dynamic-sampling
  filter, metrics) is the same computation on every host;
- training batches are global arrays whose shards each process fills from that host data;
- process 0 alone writes config.json, metrics.jsonl, TensorBoard, cov dumps, hf_final and the
  log; every process takes part in the orbax checkpoint (orbax coordinates the writes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from flax import nnx
from jax.sharding import NamedSharding

from covjax import advantages as advantages_lib
from covjax import config as config_lib
from covjax import entropy_check, sharding, train_step
from covjax.model import Transformer, check_pretrained, from_pretrained, save_pretrained
from covjax.rewards import toy
from covjax.sampler import Rollout, Sampler, decode_responses

METRICS_FILE = "metrics.jsonl"
SUMMARY_KEYS = (
    "reward/mean",
    "accuracy/mean",
    "entropy/token_mean",
    "cov/mean",
    "cov/frac_selected",
    "response_length/mean",
    "time/step",
)


# ---------------------------------------------------------------------------------------------
# Tasks: where prompts come from and how responses are scored
# ---------------------------------------------------------------------------------------------


class ToyTask:
    """Digits that sum to S (covjax/rewards/toy.py); the prompt batch k is drawn from (seed, k)."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.variant = toy.get_variant(config.data.toy.variant)
        self.seed = config.seed
        self.tokenizer = toy.build_tokenizer()
        self.stop_token_ids = (self.tokenizer.eos_token_id,)
        self.eval_samples = config.data.toy.eval_samples
        self.position = 0  # prompt batches drawn so far

    def next_prompts(self, count: int) -> tuple[list[list[int]], list[int]]:
        rng = np.random.default_rng([self.seed, self.position])
        self.position += 1
        targets = [int(s) for s in toy.sample_targets(rng, count, self.variant)]
        return [toy.prompt_ids(s) for s in targets], targets

    def score(self, rollout: Rollout, truths: Sequence[int]) -> np.ndarray:
        return toy.score_rollout(rollout, truths, self.variant)

    def state(self) -> dict[str, int]:
        return {"position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])

    def evaluate(self, sampler: Sampler, rng: jax.Array, rollout_cfg) -> dict[str, float]:
        """val/toy/accuracy: eval_samples responses for every target of the variant."""
        targets = list(range(self.variant.min_target, self.variant.max_target + 1))
        rollout = sampler.generate(
            [toy.prompt_ids(s) for s in targets],
            max_new_tokens=rollout_cfg.max_new_tokens,
            temperature=rollout_cfg.temperature,
            top_p=rollout_cfg.top_p,
            top_k=rollout_cfg.top_k,
            n=self.eval_samples,
            stop_token_ids=self.stop_token_ids,
            rng=rng,
        )
        return {"val/toy/accuracy": float(self.score(rollout, targets).mean())}


class MathTask:
    """Math word problems from local files, scored by covjax.rewards.math (math-verify)."""

    def __init__(self, config: ml_collections.ConfigDict, tokenizer):
        from covjax import data

        self.tokenizer = tokenizer
        self.config = config
        kwargs = dict(
            schema=None if config.data.schema == "auto" else config.data.schema,
            max_prompt_length=config.data.max_prompt_length,
        )
        if config.data.prompt_suffix:
            kwargs["instruction"] = config.data.prompt_suffix
        sets = [
            data.load_prompts(p, tokenizer, **kwargs)
            for p in config_lib.split_files(config.data.train_files)
        ]
        dataset = sets[0]
        if len(sets) > 1:
            import datasets

            dataset = dataclasses.replace(
                dataset, examples=datasets.concatenate_datasets([s.examples for s in sets])
            )
        self.loader = data.PromptLoader(dataset, config.train.prompts_per_step, config.seed)
        self.eval_sets = {
            name: data.load_prompts(path, tokenizer, **kwargs)
            for name, path in config_lib.split_named_files(config.data.eval_files).items()
        }
        from covjax.eval import stop_ids

        self.stop_token_ids = tuple(stop_ids(os.path.expanduser(config.model.path), tokenizer))

    def next_prompts(self, count: int) -> tuple[list[list[int]], list[str]]:
        if count != self.loader.batch_size:
            raise ValueError(f"MathTask serves batches of {self.loader.batch_size}, asked {count}")
        batch = next(self.loader)
        return [list(ex["prompt_ids"]) for ex in batch], [ex["ground_truth"] for ex in batch]

    def score(self, rollout: Rollout, truths: Sequence[str]) -> np.ndarray:
        from covjax.rewards import math as math_reward

        responses = decode_responses(rollout, self.tokenizer)
        return np.asarray(
            math_reward.score_batch(responses, [truths[g] for g in rollout.group_ids]), np.float32
        )

    def state(self) -> dict[str, int]:
        return self.loader.state()

    def restore(self, state: dict[str, int]) -> None:
        self.loader.restore(state)

    def evaluate(self, sampler: Sampler, rng: jax.Array, rollout_cfg) -> dict[str, float]:
        """val/<set>/accuracy of covjax.eval on data.eval_files (greedy; AIME/AMC-like sets:
        avg@k at temperature 0.6, as in the paper)."""
        from covjax import eval as eval_lib

        if not self.eval_sets:
            return {}
        summary = eval_lib.evaluate(
            sampler.model,
            self.tokenizer,
            self.eval_sets,
            sampler=sampler,
            max_new_tokens=rollout_cfg.max_new_tokens,
            stop_token_ids=self.stop_token_ids,
            seed=int(jax.random.randint(rng, (), 0, 2**31 - 1)),
        )
        metrics = {f"val/{name}/accuracy": m["accuracy"] for name, m in summary["sets"].items()}
        metrics["val/average_accuracy"] = summary["average_accuracy"]
        return metrics


# ---------------------------------------------------------------------------------------------
# Rollouts with dynamic sampling, and the training batch
# ---------------------------------------------------------------------------------------------


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


def score_split(task, rollout: Rollout, truths: Sequence) -> np.ndarray:
    """Rewards [N] of every response; each process scores its own slice (sharding.process_rows)
    and the slices are all-gathered, so every process returns the same array."""
    num_rows = rollout.lengths.shape[0]
    if jax.process_count() == 1:
        return task.score(rollout, truths)
    rows = sharding.process_rows(num_rows)
    local = np.zeros(-(-num_rows // jax.process_count()), np.float32)
    if rows.size:
        local[: rows.size] = task.score(_rollout_rows(rollout, rows), truths)
    return sharding.host_concat(local)[:num_rows]


def collect_rollouts(task, sampler: Sampler, config, rng: jax.Array) -> StepData:
    """Samples prompts_per_step groups of n responses; with dynamic sampling, groups whose
    rewards all agree are dropped and new prompts are sampled (up to rollout.max_gen_rounds
    rounds). Missing groups are padding rows with an empty response mask, so shapes are fixed;
    the kept groups of such a short step are dealt over the mini-batches (minibatch_group_order).

    Reward, accuracy and length metrics are those of the first round (the policy's own
    performance, not biased by the filter); filter/kept_group_frac counts every round.
    """
    r, num_prompts = config.rollout, config.train.prompts_per_step
    kept: list[tuple[Rollout, np.ndarray, np.ndarray]] = []  # (rollout, rows, rewards)
    first: tuple[Rollout, np.ndarray, np.ndarray] | None = None
    num_kept = num_informative = num_generated = 0
    metrics: dict[str, float] = {}
    t_gen = t_score = 0.0
    for round_index in range(r.max_gen_rounds):
        prompts, truths = task.next_prompts(num_prompts)
        t0 = time.perf_counter()
        rollout = sampler.generate(
            prompts,
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            n=r.n,
            stop_token_ids=task.stop_token_ids,
            rng=jax.random.fold_in(rng, round_index),
        )
        t1 = time.perf_counter()
        rewards = score_split(task, rollout, truths)
        t_gen, t_score = t_gen + t1 - t0, t_score + time.perf_counter() - t1
        if round_index == 0:
            first = (rollout, np.arange(rewards.size), np.zeros_like(rewards))
            metrics.update(
                {
                    "reward/mean": float(rewards.mean()),
                    "accuracy/mean": float((rewards > 0.5).mean()),
                    "response_length/mean": float(rollout.lengths.mean()),
                    "response_length/max": float(rollout.lengths.max()),
                    "response_length/frac_truncated": float((~rollout.stopped).mean()),
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
            "filter/kept_group_frac": num_informative / num_generated,
            "filter/gen_rounds": float(round_index + 1),
            "filter/padded_group_frac": 1.0 - num_kept / num_prompts,
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
    # compiled instead of one per number of kept groups (0.75 s each on a CPU). REINFORCE++
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


def _to_device(x: np.ndarray, sharding_: NamedSharding) -> jax.Array:
    """A global array from the same host data on every process (works multi-host)."""
    return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])


# ---------------------------------------------------------------------------------------------
# Metrics helpers
# ---------------------------------------------------------------------------------------------


def token_covariance_np(logp: np.ndarray, adv: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Eq. 10 over the valid tokens of the arrays (float64 means), valid entries only [n]."""
    lp, a = logp[mask].astype(np.float64), adv[mask].astype(np.float64)
    return ((lp - lp.mean()) * (a - a.mean())).astype(np.float32) if lp.size else lp


def entropy_metrics(entropy: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """entropy/token_mean (verl) and entropy/seq_mean (the paper's Eq. 5) over non-empty rows."""
    rows = mask.any(axis=1)
    per_seq = (entropy * mask).sum(1)[rows] / mask.sum(1)[rows]
    return {
        "entropy/token_mean": float(entropy[mask].mean()) if mask.any() else math.nan,
        "entropy/seq_mean": float(per_seq.mean()) if rows.any() else math.nan,
    }


def summarize_updates(updates: list[dict[str, float]]) -> dict[str, float]:
    """Per-step metrics from the mini-batch updates, weighted by their token counts."""
    if not updates:
        return {}
    tokens = np.array([u["num_tokens"] for u in updates])
    selected = np.array([u["num_selected"] for u in updates])

    def weighted(key, w):
        return float((np.array([u[key] for u in updates]) * w).sum() / max(w.sum(), 1.0))

    return {
        "cov/selected_mean": weighted("cov_selected_mean", selected),
        "cov/num_selected": float(selected.sum()),
        "cov/frac_selected": float(selected.sum() / max(tokens.sum(), 1.0)),
        "ppo/clip_frac": weighted("ppo_clip_frac", tokens),
        "ppo/kl": weighted("ppo_kl", tokens),
        "optim/grad_norm": float(np.mean([u["grad_norm"] for u in updates])),
        "optim/lr": float(updates[-1]["lr"]),
        "optim/loss": float(np.mean([u["loss"] for u in updates])),
        "optim/num_updates": float(len(updates)),
    }


class MetricsWriter:
    """metrics.jsonl (one JSON object per step) + TensorBoard events in the workdir."""

    def __init__(self, workdir: Path, resume_step: int):
        from tensorboardX import SummaryWriter

        self.path = workdir / METRICS_FILE
        self.enabled = jax.process_index() == 0  # one writer in a multi-host run
        self.tb = None
        if not self.enabled:
            return
        if self.path.exists():  # drop steps logged after the checkpoint
            lines = self.path.read_text().splitlines()
            keep = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] < resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _json_number(v) for k, v in sorted(metrics.items())}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            if v is not None and math.isfinite(v):
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _json_number(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def summary_table(records: list[dict[str, Any]]) -> str:
    """First and last value of the headline metrics, as a small text table."""
    lines = [f"{'metric':<26}{'first':>12}{'last':>12}"]
    for key in SUMMARY_KEYS:
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            lines.append(f"{key:<26}{values[0]:>12.4g}{values[-1]:>12.4g}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Setup: mesh, model, optimizer, checkpoints
# ---------------------------------------------------------------------------------------------


def make_mesh(config) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh of config.mesh (-1: the remaining devices).

    One process without a -1 may use only the first data*fsdp*tensor devices; several processes
    must use all of them (a process without a device in the mesh could not take part).
    """
    m = config.mesh
    sizes = (m.data, m.fsdp, m.tensor)
    devices = jax.devices()
    if -1 not in sizes and jax.process_count() > 1 and math.prod(sizes) != len(devices):
        raise ValueError(
            f"config.mesh data={m.data} x fsdp={m.fsdp} x tensor={m.tensor} = {math.prod(sizes)}"
            f" devices, but the {jax.process_count()} processes have {len(devices)}: a "
            "multi-process run uses every device (set one axis to -1)"
        )
    if -1 not in sizes:
        devices = devices[: math.prod(sizes)]
    return sharding.make_mesh(m.data, m.fsdp, m.tensor, devices=devices)


def load_task(config) -> ToyTask | MathTask:
    """The task with its tokenizer and data (a local folder's tokenizer and the data files, read
    and checked here, before the trainer loads the model's weights)."""
    if config.data.task == "toy":
        return ToyTask(config)
    from covjax.model import load_tokenizer

    m = config.model
    return MathTask(config, load_tokenizer(os.path.expanduser(m.tokenizer_path or m.path)))


def build_model(config, mesh) -> Transformer:
    """A local Hugging Face folder, loaded onto `mesh`; or the toy's fresh tiny model, on this
    process's default device (the trainer warm-starts, then shards it)."""
    m = config.model
    if config.data.task == "toy":
        model_cfg = toy.model_config(param_dtype=m.param_dtype, compute_dtype=m.compute_dtype)
        model_cfg = model_cfg.replace(remat=m.remat, scan_layers=m.scan_layers)
        return Transformer(model_cfg, rngs=nnx.Rngs(config.seed))
    return from_pretrained(
        os.path.expanduser(m.path),
        dtype=jnp.dtype(m.param_dtype),
        mesh=mesh,
        compute_dtype=m.compute_dtype,
        remat=m.remat,
        scan_layers=m.scan_layers,
    )


def _prompt_buckets(max_prompt_length: int) -> tuple[int, ...]:
    """Padded prompt lengths: powers of two from max/8 to max, so few shapes get compiled."""
    lo = max(1, max_prompt_length // 8)
    buckets = {max_prompt_length}
    b = 1
    while b < max_prompt_length:
        if b >= lo:
            buckets.add(b)
        b *= 2
    return tuple(sorted(buckets))


class StoppedBySignal(Exception):
    """The run stopped on SIGTERM/SIGINT before it finished (the last step included: then without
    the final evaluation and hf_final), with a checkpoint of `steps_done` steps; the same command
    resumes it. `signum`: the signal this process got (None when another process of a
    multi-process run got it)."""

    def __init__(self, steps_done: int, signum: int | None):
        super().__init__(f"stopped by a signal after {steps_done} steps (checkpoint saved; the "
                         "same command resumes the run)")
        self.steps_done = steps_done
        self.signum = signum


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.set = False
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        logging.warning("signal %d: checkpointing at the end of this step, then exiting", signum)
        self.set = True
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Runs (or resumes) the RL job of `config` in `workdir`; returns the metric records of the
    steps it ran and of the final evaluation. Raises StoppedBySignal after checkpointing when
    SIGTERM/SIGINT stopped it before the end, and ValueError when the workdir holds a
    checkpointed run of another config (config.check_resume)."""
    config_lib.validate(config)  # before anything is created or compiled
    if "://" in str(workdir):
        raise ValueError(
            f"workdir={workdir!r}: remote (URL) workdirs are not supported; use a path on a "
            "file system every process sees"
        )
    mesh = make_mesh(config)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if (config.train.mini_batch_prompts * config.rollout.n) % shards:
        raise ValueError(
            f"config.train.mini_batch_prompts * config.rollout.n = "
            f"{config.train.mini_batch_prompts * config.rollout.n} rows per mini-batch do not "
            f"split over the {shards} batch shards of config.mesh (data x fsdp)"
        )
    if config.data.task != "toy":  # the model folder's config and weight files, not the weights
        check_pretrained(os.path.expanduser(config.model.path))
    task = load_task(config)  # bad data fails here, before anything is written
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    manager = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
        item_names=("state", "meta"),
    )
    latest = manager.latest_step()  # None: a fresh run
    saved_config = workdir / "config.json"
    if latest is not None and saved_config.exists():
        config_lib.check_resume(json.loads(saved_config.read_text()), config, str(saved_config))
    if jax.process_index() == 0:  # whole or not at all: the other processes may be reading it
        partial = workdir / "config.json.partial"
        partial.write_text(config_lib.to_json(config))
        os.replace(partial, saved_config)

    model = build_model(config, mesh)
    if config.data.task == "toy":
        if latest is None and config.data.toy.warm_start_steps > 0:
            toy_warm_start(config, model)
        sharding.shard_model(model, mesh)
    with jax.set_mesh(mesh):
        return _train(config, workdir, mesh, model, task, manager, latest)


def toy_warm_start(config, model: Transformer) -> None:
    """The toy's supervised warm start, in place, outside any mesh: on one device of every
    process alike, so the RL run starts from the same policy whatever the mesh."""
    t0 = time.perf_counter()
    ws = toy.WarmStart(
        steps=config.data.toy.warm_start_steps,
        batch_size=config.data.toy.warm_start_batch,
        lr=config.data.toy.warm_start_lr,
        frac_correct=config.data.toy.warm_start_frac_correct,
    )
    cached = toy.warm_start(
        model, variant=toy.get_variant(config.data.toy.variant), seed=config.seed, ws=ws,
        cache_dir=config.data.toy.cache_dir,
    )
    logging.info("toy warm start (%s): %.1fs", "cached" if cached else "trained",
                 time.perf_counter() - t0)


def _train(config, workdir: Path, mesh, model, task, manager, latest: int | None
           ) -> list[dict[str, Any]]:
    cfg = train_step.StepConfig.from_config(config)
    tx, schedule = train_step.make_optimizer(
        config.optim.lr, config.optim.weight_decay, config.optim.grad_clip,
        config.optim.warmup_steps,
    )

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_sharding = train_step.param_shardings(params, mesh)
    state = jax.jit(lambda p: train_step.init_state(p, tx))(params)
    state_sharding = train_step.state_shardings(state, param_sharding, mesh)
    state = jax.device_put(state, state_sharding)
    ref_params = None
    if config.loss.kl_coef > 0:  # the policy at the start of RL, kept frozen
        ref_params = jax.tree.map(jnp.copy, params)

    start_step = 0
    if latest is not None:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            {"train": state, "ref": ref_params},
        )
        restored = manager.restore(
            latest,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        state, ref_params = restored.state["train"], restored.state["ref"]
        task.restore(restored.meta["task"])
        start_step = int(restored.meta["step"])
        logging.info("resumed from %s at step %d", workdir / "checkpoints", start_step)
        if start_step >= config.train.steps:
            logging.info("all %d steps are done: the final evaluation and hf_final are made again "
                         "(a larger --config.train.steps goes on training)", config.train.steps)
    nnx.update(model, state.params)

    def save(step: int) -> None:
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"train": state, "ref": ref_params}),
                meta=ocp.args.JsonSave({"step": step, "task": task.state(), "seed": config.seed}),
            ),
            force=True,
        )

    sampler = Sampler(
        model,
        mesh=mesh,
        length_buckets=_prompt_buckets(config.data.max_prompt_length),
    )
    base_rng = jax.random.key(config.seed)
    writer = MetricsWriter(workdir, start_step)
    cov_dir = workdir / "cov"
    mini_rows = config.train.mini_batch_prompts * config.rollout.n
    compiled: dict[tuple, Any] = {}

    def step_fns(batch: dict[str, np.ndarray]):
        """Compiled update and log-prob functions for this batch's shapes (cached by shape)."""
        key = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if key not in compiled:
            b_sharding = train_step.batch_shardings(batch, mesh)
            mb = {k: v[:mini_rows] for k, v in batch.items()}
            for name in ("old_logp", "ref_logp") if ref_params is not None else ("old_logp",):
                mb[name] = mb["advantages"]  # [B, R] float32 like the advantages
            lp_keys = ("input_ids", "positions", "attention_mask", "targets")
            compiled[key] = (
                train_step.compile_update(
                    graphdef=graphdef, rest=rest, tx=tx, schedule=schedule, cfg=cfg,
                    state_sharding=state_sharding,
                    batch_sharding=train_step.batch_shardings(mb, mesh), mesh=mesh,
                ),
                train_step.compile_logprobs(
                    graphdef=graphdef, rest=rest, cfg=cfg, param_sharding=param_sharding,
                    batch_sharding={k: b_sharding[k] for k in lp_keys}, mesh=mesh,
                ),
                b_sharding,
            )
        return compiled[key]

    records: list[dict[str, Any]] = []
    stopping = False
    with StopFlag() as stop, tqdm.trange(
        start_step, config.train.steps, initial=start_step, total=config.train.steps,
        desc="rl", dynamic_ncols=True,
        disable=True if jax.process_index() != 0 else None,  # None: off unless a terminal
    ) as bar:
        for step in bar:
            t_step = time.perf_counter()
            step_rng = jax.random.fold_in(base_rng, step)
            metrics: dict[str, float] = {}
            if config.train.eval_interval and step % config.train.eval_interval == 0:
                eval_rng = jax.random.fold_in(step_rng, 1)
                metrics.update(task.evaluate(sampler, eval_rng, config.rollout))

            data = collect_rollouts(task, sampler, config, jax.random.fold_in(step_rng, 0))
            metrics.update(data.metrics)
            metrics.update(
                _learn(step, step_rng, data, state, ref_params, step_fns, cfg, config, mini_rows,
                       cov_dir)
            )
            state = metrics.pop("_state")
            nnx.update(model, state.params)
            metrics["time/step"] = time.perf_counter() - t_step
            resp_tokens = float(data.arrays["response_mask"].sum())
            metrics["throughput/tokens_per_s"] = resp_tokens / metrics["time/step"]
            writer.write(step, metrics)
            records.append({"step": step, **metrics})
            if step % config.train.log_interval == 0:
                logging.info("step %d: %s", step, ", ".join(
                    f"{k}={metrics[k]:.4g}" for k in SUMMARY_KEYS if k in metrics))
            bar.set_postfix(
                reward=f"{metrics.get('reward/mean', math.nan):.3f}",
                entropy=f"{metrics.get('entropy/token_mean', math.nan):.3f}",
                sel=f"{metrics.get('cov/frac_selected', math.nan):.4f}",
            )
            done = step + 1
            stopping = sharding.any_process(stop.set)  # all processes stop at the same step
            if stopping or done == config.train.steps or (
                config.train.checkpoint_interval and done % config.train.checkpoint_interval == 0
            ):
                save(done)
            if stopping:
                break

    finished = not stopping
    if finished and config.train.eval_interval:
        final_rng = jax.random.fold_in(jax.random.fold_in(base_rng, config.train.steps), 1)
        final = task.evaluate(sampler, final_rng, config.rollout)
        writer.write(config.train.steps, final)
        records.append({"step": config.train.steps, **final})
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if finished:
        save_pretrained(model, str(workdir / "hf_final"), tokenizer=task.tokenizer,  # process 0
                        source_dir=os.path.expanduser(config.model.path) or None)
        if config.data.task == "toy" and jax.process_index() == 0:
            # beside a qwen2 config.json, AutoTokenizer would load Qwen2's own tokenizer
            task.tokenizer.save_pretrained(str(workdir / "tokenizer"))
    logging.info("compilations: sampler %d, update/log-prob shapes %d", sampler.num_compilations,
                 len(compiled))
    if jax.process_index() == 0:
        print(summary_table(records), flush=True)
    if stopping:
        raise StoppedBySignal(done, stop.signum)
    return records


def _learn(step, step_rng, data: StepData, state, ref_params, step_fns, cfg, config, mini_rows,
           cov_dir: Path) -> dict[str, Any]:
    """Old log-probs, the mini-batch updates and their metrics. Returns the metrics with the
    new train state under "_state"."""
    t0 = time.perf_counter()
    host = train_step.make_batch(data.arrays, data.prompt_length, data.advantages)
    update_fn, logprob_fn, b_sharding = step_fns(host)
    batch = {k: _to_device(v, b_sharding[k]) for k, v in host.items()}
    lp_batch = {k: batch[k] for k in ("input_ids", "positions", "attention_mask", "targets")}
    old_logp, entropy = logprob_fn(state.params, lp_batch)
    host["old_logp"] = old_logp_np = sharding.host_gather(old_logp)
    if ref_params is not None:
        host["ref_logp"] = sharding.host_gather(logprob_fn(ref_params, lp_batch)[0])

    mask = host["mask"]
    entropy_np = sharding.host_gather(entropy)
    metrics: dict[str, Any] = entropy_metrics(entropy_np, mask)
    sampled = data.arrays["logprobs"][:, data.prompt_length:]
    metrics["rollout/logprob_abs_diff"] = float(np.abs(old_logp_np - sampled)[mask].mean())

    covs = [
        token_covariance_np(old_logp_np[s:s + mini_rows], host["advantages"][s:s + mini_rows],
                            mask[s:s + mini_rows])
        for s in range(0, mask.shape[0], mini_rows)
    ]
    all_cov = np.concatenate(covs)
    metrics["cov/mean"] = float(all_cov.mean()) if all_cov.size else math.nan
    metrics["cov/p99"] = float(np.percentile(all_cov, 99)) if all_cov.size else math.nan
    dump = config.train.cov_dump_interval and step % config.train.cov_dump_interval == 0
    if dump and jax.process_index() == 0:
        cov_dir.mkdir(exist_ok=True)
        np.save(cov_dir / f"step_{step:06d}.npy", all_cov)

    updates = []
    for index, start in enumerate(range(0, mask.shape[0], mini_rows)):
        if not data.trainable or not mask[start:start + mini_rows].any():
            continue  # nothing kept, or padding only (dynamic sampling came up short)
        mb = {  # cut on the host: a slice of the sharded batch would lose the data sharding
            k: _to_device(v[start:start + mini_rows], b_sharding.get(k, b_sharding["advantages"]))
            for k, v in host.items()
        }
        state, m = update_fn(state, mb, jax.random.fold_in(step_rng, 2 + index))
        updates.append(m)
    updates = [{k: float(v) for k, v in u.items()} for u in jax.device_get(updates)]
    metrics.update(summarize_updates(updates))

    check_step = config.train.entropy_check_interval and (
        step % config.train.entropy_check_interval == 0
    )
    if updates and check_step:
        _, entropy_after = logprob_fn(state.params, lp_batch)
        check = entropy_check.entropy_check_metrics(
            old_logp, batch["advantages"], batch["mask"], entropy, entropy_after,
            eta=sum(u["lr"] for u in updates),  # k updates between the measurements: k * lr
        )
        metrics.update({k: float(v) for k, v in check.items()})
    metrics["time/update"] = time.perf_counter() - t0
    metrics["_state"] = state
    return metrics


def default_workdir(config_name: str) -> str:
    """runs/<config name>_<timestamp>."""
    return os.path.join("runs", f"{config_name}_{time.strftime('%Y%m%d_%H%M%S')}")

