"""The jitted, sharded update of one optimizer mini-batch.

    covariance + selection over the whole mini-batch (cov_scope="minibatch")
    -> micro-batch forward/backward with the selection as an input mask, gradients accumulated
    -> optax AdamW with global-norm clipping on fp32 master weights

Everything here is a pure function of arrays: the parameters live in a `TrainState` pytree
(donated to the update, so the old copy is freed), the model structure in an nnx graphdef.

A batch is a dict of [B, ...] arrays, with P the padded prompt length and R the response length:
  input_ids, positions [B, P+R-1] int32; attention_mask [B, P+R-1] bool  (tokens[:, :-1])
  targets [B, R] int32 (response tokens); mask [B, R] bool (response_mask[:, P:])
  advantages, old_logp [B, R] float32; ref_logp [B, R] float32 (only when kl_coef > 0)
The logits at position t predict token t+1, so the response's log-probs come from the last R
hidden states: the output projection runs on those only, chunked (covjax.losses).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from covjax import losses, sharding

Batch = dict[str, jax.Array]


@struct.dataclass
class TrainState:
    """Everything the update changes: fp32 master parameters, optimizer state, update count."""

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: optimizer updates done


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static settings of the update (jit-static and hashable): the policy loss's LossConfig
    and what the step adds around it (config.loss, config.rollout and config.train keys)."""

    loss: losses.LossConfig
    cov_scope: str
    entropy_coef: float
    kl_coef: float
    kl_estimator: str
    temperature: float
    micro_batch_size: int
    chunk_size: int

    @classmethod
    def from_config(cls, config) -> StepConfig:
        """From a validated covjax config (covjax/config.py)."""
        loss_fields = [f.name for f in dataclasses.fields(losses.LossConfig)]
        return cls(
            loss=losses.LossConfig(**{name: config.loss[name] for name in loss_fields}),
            cov_scope=config.loss.cov_scope,
            entropy_coef=float(config.loss.entropy_coef),
            kl_coef=float(config.loss.kl_coef),
            kl_estimator=config.loss.kl_estimator,
            temperature=float(config.rollout.temperature),
            micro_batch_size=int(config.train.micro_batch_size),
            chunk_size=int(config.train.logprob_chunk_size),
        )

    @property
    def preselect(self) -> bool:
        """Whether the update needs the selection pre-pass over the whole mini-batch."""
        return self.loss.selects and self.cov_scope == "minibatch"


def make_optimizer(
    lr: float, weight_decay: float, grad_clip: float, warmup_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW after global-norm clipping, linear warmup to a constant lr; returns (tx, schedule)."""
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup_steps, 1)), optax.constant_schedule(lr)],
        [warmup_steps],
    ) if warmup_steps > 0 else optax.constant_schedule(lr)
    tx = optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay),
    )
    return tx, schedule


def init_state(params: nnx.State, tx: optax.GradientTransformation) -> TrainState:
    """Fresh optimizer state for `params` (same dtype: fp32 moments for fp32 master weights)."""
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))


def make_batch(
    rollout: dict[str, np.ndarray] | Any, prompt_length: int, advantages: np.ndarray
) -> dict[str, np.ndarray]:
    """The host batch of `update` (without old_logp) from a sampler Rollout or a dict of its
    arrays: inputs shifted by one, targets and mask on the response columns, the response
    advantage [N] broadcast to its tokens."""
    get = rollout.get if isinstance(rollout, dict) else functools.partial(getattr, rollout)
    mask = np.asarray(get("response_mask"))[:, prompt_length:]
    tokens = np.asarray(get("tokens"), np.int32)
    return {
        "input_ids": tokens[:, :-1],
        "positions": np.asarray(get("positions"), np.int32)[:, :-1],
        "attention_mask": np.asarray(get("attention_mask"), bool)[:, :-1],
        "targets": tokens[:, prompt_length:],
        "mask": mask,
        "advantages": np.where(mask, np.asarray(advantages)[:, None], 0.0).astype(np.float32),
    }


# ---------------------------------------------------------------------------------------------
# Log-probs
# ---------------------------------------------------------------------------------------------


def response_logprobs(
    graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, batch: Batch, cfg: StepConfig
) -> tuple[jax.Array, jax.Array]:
    """(logp, entropy) [B, R] float32 of the response tokens under the temperature-scaled policy."""
    model = nnx.merge(graphdef, params, rest)
    hidden = model.hidden_states(
        batch["input_ids"], batch["positions"], attention_mask=batch["attention_mask"]
    )
    num_resp = batch["targets"].shape[1]
    return losses.logprobs_and_entropy_chunked(
        hidden[:, -num_resp:],
        model.unembed_kernel(),
        batch["targets"],
        cfg.temperature,
        chunk_size=cfg.chunk_size,
    )


def _split_micro(x: jax.Array, num_micro: int) -> jax.Array:
    """[B, ...] -> [num_micro, B / num_micro, ...], micro-batch j = rows j, j+M, j+2M, ...

    Strided, not contiguous: each device's contiguous shard of rows then holds a slice of every
    micro-batch, so a micro-batch is spread over all devices like the mini-batch.
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]), 0, 1)


def _merge_micro(x: jax.Array) -> jax.Array:
    """Inverse of `_split_micro`."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def batched_logprobs(
    graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, batch: Batch, cfg: StepConfig
) -> tuple[jax.Array, jax.Array]:
    """No-gradient (logp, entropy) [B, R] of a whole batch, one micro-batch at a time."""
    num_micro = batch["targets"].shape[0] // cfg.micro_batch_size
    micro = jax.tree.map(lambda x: _split_micro(x, num_micro), batch)
    logp, entropy = jax.lax.map(
        lambda b: response_logprobs(graphdef, params, rest, b, cfg), micro
    )
    return jax.lax.stop_gradient((_merge_micro(logp), _merge_micro(entropy)))


# ---------------------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------------------


def _denominators(mask: jax.Array) -> dict[str, jax.Array]:
    """The mini-batch's aggregation denominators (ALGORITHMS.md 4, global over micro-batches)."""
    return dict(
        num_tokens=jnp.sum(mask.astype(jnp.float32)),
        num_seqs=jnp.sum(jnp.any(mask, axis=1).astype(jnp.float32)),
        max_len=mask.shape[1],
    )


def micro_batch_loss(
    params: nnx.State,
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    batch: Batch,
    selected: jax.Array | None,
    rng: jax.Array,
    denominators: dict[str, jax.Array],
    cfg: StepConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """This micro-batch's share of the mini-batch loss (its denominators are the mini-batch's).

    Policy loss (covjax.losses.policy_loss), minus entropy_coef * entropy, plus kl_coef * KL to
    the reference policy, all aggregated with the same loss_agg_mode and global denominators, so
    the micro-batch losses add up to the mini-batch loss.
    """
    logp, entropy = response_logprobs(graphdef, params, rest, batch, cfg)
    mask = batch["mask"]
    loss, aux = losses.policy_loss(
        logp, batch["old_logp"], batch["advantages"], mask, cfg.loss, rng=rng, selected=selected,
        **denominators,
    )
    if cfg.entropy_coef > 0:
        loss = loss + losses.entropy_bonus(
            entropy, mask, entropy_coef=cfg.entropy_coef, loss_agg_mode=cfg.loss.loss_agg_mode,
            **denominators,
        )
    if cfg.kl_coef > 0:
        kl = losses.kl_penalty(logp, batch["ref_logp"], mask, estimator=cfg.kl_estimator)
        kl_loss = losses.aggregate(kl, mask, cfg.loss.loss_agg_mode, **denominators)
        loss = loss + cfg.kl_coef * kl_loss
    count = jnp.sum(mask.astype(jnp.float32))
    num_selected = aux["num_selected"].astype(jnp.float32)
    stats = dict(
        loss=loss,
        entropy_sum=jnp.sum(jnp.where(mask, jax.lax.stop_gradient(entropy), 0.0)),
        num_selected=num_selected,
        cov_selected_sum=aux["cov_selected_mean"] * num_selected,
        ppo_clip_count=aux["ppo_clip_frac"] * count,
        ppo_kl_sum=aux["ppo_kl"] * count,
    )
    return loss, stats


def select_minibatch(
    params: nnx.State,
    batch: Batch,
    rng: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    cfg: StepConfig,
) -> tuple[jax.Array, jax.Array]:
    """The selection pre-pass of `update` (cov_scope="minibatch"): the policy's log-probs [B, R]
    of the whole mini-batch and the tokens [B, R] Clip-Cov / KL-Cov select among them by Eq. 10's
    covariance (covjax.losses.select_tokens; `rng`: Clip-Cov's random choice)."""
    logp, _ = batched_logprobs(graphdef, params, rest, batch, cfg)
    selected = losses.select_tokens(
        logp, batch["old_logp"], batch["advantages"], batch["mask"], cfg.loss, rng=rng
    )
    return logp, selected


def update_rngs(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(selection key, loss key) of `update`'s key."""
    return tuple(jax.random.split(rng))


def update(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    cfg: StepConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on one mini-batch: selection pre-pass, accumulated micro-batch
    gradients, clipped AdamW. Returns the new state and the mini-batch's metrics (scalars)."""
    mask = batch["mask"]
    chex.assert_equal_shape([batch["targets"], mask, batch["advantages"], batch["old_logp"]])
    num_seqs = mask.shape[0]
    if num_seqs % cfg.micro_batch_size:
        raise ValueError(f"mini-batch of {num_seqs} rows: micro_batch_size={cfg.micro_batch_size} "
                         "does not divide it")
    num_micro = num_seqs // cfg.micro_batch_size
    denominators = _denominators(mask)
    select_rng, loss_rng = update_rngs(rng)

    logp = None
    selected = None
    if cfg.preselect:  # the selection of the whole mini-batch, handed to every micro-batch
        logp, selected = select_minibatch(
            state.params, batch, select_rng, graphdef=graphdef, rest=rest, cfg=cfg
        )

    micro = jax.tree.map(lambda x: _split_micro(x, num_micro), batch)
    micro_selected = None if selected is None else _split_micro(selected, num_micro)
    micro_rngs = jax.random.split(loss_rng, num_micro)
    grad_fn = jax.grad(micro_batch_loss, has_aux=True)

    def accumulate(grads, xs):
        mb, sel, key = xs
        g, stats = grad_fn(state.params, graphdef, rest, mb, sel, key, denominators, cfg)
        return jax.tree.map(jnp.add, grads, g), stats

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, stats = jax.lax.scan(accumulate, zeros, (micro, micro_selected, micro_rngs))
    stats = jax.tree.map(jnp.sum, stats)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    num_tokens = jnp.maximum(denominators["num_tokens"], 1.0)
    metrics = {
        "loss": stats["loss"],
        "entropy": stats["entropy_sum"] / num_tokens,
        "num_selected": stats["num_selected"],
        "frac_selected": stats["num_selected"] / num_tokens,
        "ppo_clip_frac": stats["ppo_clip_count"] / num_tokens,
        "ppo_kl": stats["ppo_kl_sum"] / num_tokens,
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(state.step),
        "num_tokens": denominators["num_tokens"],
        # micro-batch means (microbatch scope) weighted by their selected counts
        "cov_selected_mean": stats["cov_selected_sum"] / jnp.maximum(stats["num_selected"], 1.0),
    }
    if selected is not None:  # the covariance the mini-batch selection saw
        cov = losses.token_covariance(logp, batch["advantages"], mask)
        sel = (selected & mask).astype(jnp.float32)
        metrics["cov_selected_mean"] = jnp.sum(cov * sel) / jnp.maximum(jnp.sum(sel), 1.0)
    return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics


# ---------------------------------------------------------------------------------------------
# Compiled, sharded entry points
# ---------------------------------------------------------------------------------------------


def param_shardings(params: nnx.State, mesh: Mesh) -> nnx.State:
    """The NamedSharding of every parameter, from its logical axes (covjax.sharding's rules)."""

    def one(var: nnx.Variable) -> NamedSharding:
        value = var.get_value()
        axes = var.get_metadata().get("logical_axes") or (None,) * value.ndim
        return sharding.logical_sharding(mesh, axes, value.shape)

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: TrainState, param_shardings: nnx.State, mesh: Mesh) -> TrainState:
    """Shardings of a TrainState: optimizer moments like their parameters, scalars replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def like_params(x):
        return param_shardings if isinstance(x, nnx.State) else replicated

    opt = jax.tree.map(like_params, state.opt_state, is_leaf=lambda x: isinstance(x, nnx.State))
    return TrainState(params=param_shardings, opt_state=opt, step=replicated)


def batch_shardings(batch: Batch, mesh: Mesh) -> dict[str, NamedSharding]:
    """Every [B, ...] array of a batch sharded over ("data", "fsdp")."""
    return {k: sharding.data_sharding(mesh, v.ndim) for k, v in batch.items()}


def compile_update(
    *,
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    cfg: StepConfig,
    state_sharding: TrainState,
    batch_sharding: dict[str, NamedSharding],
    mesh: Mesh,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """`update` under jax.jit with explicit in/out shardings; the state argument is donated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def fn(state, batch, rng):
        return update(
            state, batch, rng, graphdef=graphdef, rest=rest, tx=tx, schedule=schedule, cfg=cfg
        )

    return jax.jit(
        fn,
        in_shardings=(state_sharding, batch_sharding, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )


def compile_logprobs(
    *,
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    cfg: StepConfig,
    param_sharding: nnx.State,
    batch_sharding: dict[str, NamedSharding],
    mesh: Mesh,
) -> Callable[[nnx.State, Batch], tuple[jax.Array, jax.Array]]:
    """`batched_logprobs` under jax.jit: (logp, entropy) [B, R], sharded like the batch."""
    out = sharding.data_sharding(mesh, 2)

    def fn(params, batch):
        return batched_logprobs(graphdef, params, rest, batch, cfg)

    return jax.jit(fn, in_shardings=(param_sharding, batch_sharding), out_shardings=(out, out))
