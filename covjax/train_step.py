"""The sharded update of one optimizer mini-batch.

    rows sorted by response length, cut into micro-batches, each computed to its longest row
    (cov_scope="microbatch": consecutive rows, all R columns, selection per micro-batch)
    -> covariance + selection over the whole mini-batch (cov_scope="minibatch")
    -> micro-batch forward/backward with the selection as an input mask, gradients accumulated
    -> optax AdamW with global-norm clipping on fp32 master weights

Everything jitted is a pure function of arrays: the parameters live in a `TrainState` pytree
(donated to the update, so the old copy is freed), the model structure in an nnx graphdef. A
micro-batch's program is compiled once per length (a multiple of `length_granularity`), and the
host runs the mini-batch's micro-batches one after another, the gradient sum staying on device.

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
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from covjax import losses, multihost, sharding

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
    length_granularity: int = 1  # micro-batch lengths are multiples of this (recompile bound)

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
            length_granularity=int(config.train.length_granularity),
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
        entropy_grad=cfg.entropy_coef > 0,
    )


# ---------------------------------------------------------------------------------------------
# Micro-batches computed to their longest response
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """Rows of a batch computed together, and the response columns they are computed to."""

    rows: np.ndarray  # [m] int32 row indices into the batch
    length: int  # the longest response among the rows, rounded up to the length granularity


def response_lengths(mask: np.ndarray) -> np.ndarray:
    """[B] int: each row's response columns up to its last real token (0 for none)."""
    mask = np.asarray(mask, bool)
    last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
    return np.where(mask.any(axis=1), last, 0)


def plan_micro_batches(
    mask: np.ndarray, micro_batch_size: int, granularity: int, *, by_length: bool = True
) -> list[MicroBatch]:
    """Micro-batches of `micro_batch_size` rows.

    by_length: the rows sorted by response length and cut into micro-batches, each computed only
    to its longest response rounded up to a multiple of `granularity` (so at most
    ceil(R / granularity) shapes compile). Columns past a row's response are padding the loss
    masks, and causal attention keeps them out of every earlier position, so dropping them
    changes no real token's log-prob. Otherwise: consecutive rows in order, each micro-batch
    computed to all R columns (the reference's micro-batches, for a per-micro-batch selection).
    """
    num_rows, width = mask.shape
    if num_rows % micro_batch_size:
        raise ValueError(f"{num_rows} rows: micro_batch_size={micro_batch_size} does not divide "
                         "them")
    if not by_length:
        return [MicroBatch(rows=np.arange(start, start + micro_batch_size, dtype=np.int32),
                           length=width) for start in range(0, num_rows, micro_batch_size)]
    lengths = response_lengths(mask)
    plan = []
    for rows in np.split(np.argsort(lengths, kind="stable"), num_rows // micro_batch_size):
        longest = max(int(lengths[rows].max()), 1)
        length = min(-(-longest // granularity) * granularity, width)
        plan.append(MicroBatch(rows=rows.astype(np.int32), length=length))
    return plan


def computed_tokens(plan: list[MicroBatch], prompt_columns: int) -> int:
    """Input tokens the forward passes of `plan` compute: rows x (prompt + response columns)."""
    return sum(len(mb.rows) * (prompt_columns + mb.length - 1) for mb in plan)


def gather_micro(batch: Batch, rows: jax.Array, length: int) -> Batch:
    """The micro-batch `rows` of `batch` cut to `length` response columns (inputs keep their
    P - 1 prompt columns before them), its rows spread over the batch shards."""
    width = batch["targets"].shape[1]

    def one(x):
        x = x[:, : x.shape[1] - width + length][rows]
        return sharding.constrain(x, ("act_batch",) + (None,) * (x.ndim - 1))

    return {k: one(v) for k, v in batch.items()}


def micro_logprobs_into(
    params: nnx.State,
    batch: Batch,
    rows: jax.Array,
    out: tuple[jax.Array, jax.Array],
    *,
    length: int,
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    cfg: StepConfig,
) -> tuple[jax.Array, jax.Array]:
    """`out` = (logp, entropy) [B, R] with the no-gradient values of micro-batch `rows` written
    into its first `length` columns, 0 past each row's response (the other entries are left as
    they are)."""
    micro = gather_micro(batch, rows, length)
    values = response_logprobs(graphdef, params, rest, micro, cfg)
    return tuple(
        o.at[rows, :length].set(jnp.where(micro["mask"], jax.lax.stop_gradient(v), 0.0))
        for o, v in zip(out, values, strict=True)
    )


# ---------------------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------------------

_STATS = ("loss", "entropy_sum", "num_selected", "cov_selected_sum", "ppo_clip_count",
          "ppo_kl_sum")


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


def micro_grads_into(
    params: nnx.State,
    acc: tuple[nnx.State, dict[str, jax.Array]],
    batch: Batch,
    selected: jax.Array | None,
    rows: jax.Array,
    rng: jax.Array,
    *,
    length: int,
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    cfg: StepConfig,
) -> tuple[nnx.State, dict[str, jax.Array]]:
    """`acc` (gradient sum, statistics sums) plus micro-batch `rows`' share of the mini-batch
    loss, computed to `length` response columns; `selected`: the mini-batch's selection [B, R]."""
    denominators = _denominators(batch["mask"])
    micro = gather_micro(batch if selected is None else {**batch, "selected": selected}, rows,
                         length)
    micro_selected = micro.pop("selected", None)
    grads, stats = jax.grad(micro_batch_loss, has_aux=True)(
        params, graphdef, rest, micro, micro_selected, rng, denominators, cfg
    )
    return jax.tree.map(jnp.add, acc, (grads, stats))


def select_given_logp(
    logp: jax.Array, batch: Batch, rng: jax.Array, cfg: StepConfig
) -> jax.Array:
    """The tokens [B, R] Clip-Cov / KL-Cov select over the whole mini-batch by Eq. 10's
    covariance of the policy's log-probs `logp` (covjax.losses.select_tokens; `rng`: Clip-Cov's
    random choice)."""
    return losses.select_tokens(
        logp, batch["old_logp"], batch["advantages"], batch["mask"], cfg.loss, rng=rng
    )


def update_rngs(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(selection key, loss key) of `update`'s key."""
    return tuple(jax.random.split(rng))


def apply_gradients(
    state: TrainState,
    acc: tuple[nnx.State, dict[str, jax.Array]],
    batch: Batch,
    logp: jax.Array | None,
    selected: jax.Array | None,
    *,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The optimizer step on the accumulated gradients and the mini-batch's metrics (scalars)."""
    grads, stats = acc
    mask = batch["mask"]
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    count = jnp.sum(mask.astype(jnp.float32))
    num_tokens = jnp.maximum(count, 1.0)
    metrics = {
        "loss": stats["loss"],
        "entropy": stats["entropy_sum"] / num_tokens,
        "num_selected": stats["num_selected"],
        "frac_selected": stats["num_selected"] / num_tokens,
        "ppo_clip_frac": stats["ppo_clip_count"] / num_tokens,
        "ppo_kl": stats["ppo_kl_sum"] / num_tokens,
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(state.step),
        "num_tokens": count,
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


class CompiledUpdate:
    """`CompiledUpdate(...)(state, batch, rng)`: one optimizer step on one mini-batch with
    explicit shardings, as programs compiled per micro-batch length (the state is donated).

    Micro-batches as `plan` cuts them: rows sorted by response length, or, when the selection is
    per micro-batch (cov_scope="microbatch"), consecutive rows computed to all R columns, so
    that the selection is the reference's whatever length_granularity is. The selection pre-pass
    (cov_scope="minibatch") computes the policy's log-probs of the whole mini-batch, micro-batch
    by micro-batch, then selects over all of it; with `logp_is_old=True` (the step's first
    mini-batch: the parameters that computed old_logp) it selects on old_logp instead of a
    second forward. The micro-batches' gradients are summed, then clipped AdamW applies them.
    `forwards` counts the micro-batch forward passes run.
    """

    def __init__(self, *, graphdef, rest, tx, schedule, cfg, state_sharding, batch_sharding, mesh):
        self.cfg, self.batch_sharding = cfg, batch_sharding
        replicated = NamedSharding(mesh, PartitionSpec())
        rows = sharding.data_sharding(mesh, 2)
        model = dict(graphdef=graphdef, rest=rest, cfg=cfg)
        self._zeros = jax.jit(
            lambda params: (jax.tree.map(jnp.zeros_like, params),
                            {k: jnp.zeros((), jnp.float32) for k in _STATS}),
            out_shardings=(state_sharding.params, replicated),
        )
        self._grads = jax.jit(
            functools.partial(micro_grads_into, **model), static_argnames=("length",),
            donate_argnums=(1,), out_shardings=(state_sharding.params, replicated),
        )
        self.logprobs = LogProbs(batch_sharding=batch_sharding, mesh=mesh, **model)
        self._select = jax.jit(functools.partial(select_given_logp, cfg=cfg), out_shardings=rows)
        self._apply = jax.jit(
            functools.partial(apply_gradients, tx=tx, schedule=schedule),
            donate_argnums=(0,), out_shardings=(state_sharding, replicated),
        )
        self.forwards = 0

    def plan(self, mask: np.ndarray) -> list[MicroBatch]:
        """The micro-batches of a mini-batch with this response `mask` [B, R]."""
        per_micro = self.cfg.loss.selects and self.cfg.cov_scope == "microbatch"
        return plan_micro_batches(mask, self.cfg.micro_batch_size, self.cfg.length_granularity,
                                  by_length=not per_micro)

    def lower_micro_batch(self, state: TrainState, batch: Batch) -> jax.stages.Lowered:
        """The gradient program of one micro-batch computed to all R columns, lowered for
        `batch` (arrays or abstract ShapeDtypeStructs): the update's largest program, whose
        memory analysis is the update's peak but for the optimizer state it leaves alone."""
        length = batch["targets"].shape[1]
        selected = jax.ShapeDtypeStruct(batch["mask"].shape, jnp.bool_,
                                        sharding=self.batch_sharding["mask"])
        return self._grads.lower(
            state.params, jax.eval_shape(self._zeros, state.params), batch,
            selected if self.cfg.preselect else None,
            np.arange(self.cfg.micro_batch_size, dtype=np.int32), jax.random.key(0), length=length,
        )

    def __call__(
        self, state: TrainState, batch: Batch, rng: jax.Array, *, logp_is_old: bool = False
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        chex.assert_equal_shape([batch["targets"], batch["mask"], batch["advantages"],
                                 batch["old_logp"]])
        plan = self.plan(multihost.host_gather(batch["mask"]))
        batch = {k: jax.device_put(v, self.batch_sharding[k]) for k, v in batch.items()}
        select_rng, loss_rng = update_rngs(rng)
        logp = selected = None
        if self.cfg.preselect:
            if logp_is_old:
                logp = batch["old_logp"]
            else:
                logp, _ = self.logprobs.run(state.params, batch, plan)
                self.forwards += len(plan)
            selected = self._select(logp, batch, select_rng)
        acc = self._zeros(state.params)
        keys = jax.random.split(loss_rng, len(plan))
        for key, micro in zip(keys, plan, strict=True):
            acc = self._grads(state.params, acc, batch, selected, micro.rows, key,
                              length=micro.length)
        self.forwards += len(plan)
        return self._apply(state, acc, batch, logp, selected)


LOGPROB_KEYS = ("input_ids", "positions", "attention_mask", "targets", "mask")


class LogProbs:
    """`LogProbs(...)(params, batch)`: no-gradient (logp, entropy) [B, R] of a batch (its
    LOGPROB_KEYS arrays), sharded like it, micro-batch by micro-batch, each computed to its
    longest response; entries past a row's response are 0."""

    def __init__(self, *, graphdef, rest, cfg, batch_sharding, mesh):
        self.cfg, self.batch_sharding = cfg, batch_sharding
        self._rows = sharding.data_sharding(mesh, 2)
        self._into = jax.jit(
            functools.partial(micro_logprobs_into, graphdef=graphdef, rest=rest, cfg=cfg),
            static_argnames=("length",), donate_argnums=(3,),
            out_shardings=(self._rows, self._rows),
        )

    def run(
        self, params: nnx.State, batch: Batch, plan: list[MicroBatch]
    ) -> tuple[jax.Array, jax.Array]:
        """(logp, entropy) of the placed `batch`, computed as `plan` groups its rows."""
        zeros = np.zeros(batch["targets"].shape, np.float32)
        out = (multihost.global_array(zeros, self._rows), multihost.global_array(zeros, self._rows))
        for micro in plan:
            out = self._into(params, batch, micro.rows, out, length=micro.length)
        return out

    def __call__(self, params: nnx.State, batch: Batch) -> tuple[jax.Array, jax.Array]:
        mask = multihost.host_gather(batch["mask"])
        plan = plan_micro_batches(mask, self.cfg.micro_batch_size, self.cfg.length_granularity)
        batch = {k: jax.device_put(v, self.batch_sharding[k]) for k, v in batch.items()}
        return self.run(params, batch, plan)

