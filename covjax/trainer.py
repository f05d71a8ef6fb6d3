"""The RL loop: `train(config, workdir)` sets up, then runs each step in this order:

    evaluate? (task.evaluate)
    -> rollouts (covjax.rollouts: sample, score, dynamic-sampling refill, advantages, batch)
    -> learn (old log-probs, then covjax.train_step.CompiledUpdate per mini-batch)
    -> write (covjax.metrics: metrics.jsonl + TensorBoard)
    -> checkpoint (covjax.checkpointing, every N steps and on SIGTERM/SIGINT)

Everything a step needs is derived from (seed, step) and the data position, which are
checkpointed with the parameters and the optimizer state, so a resumed run repeats exactly what
an uninterrupted one would have done (bit for bit on the same mesh, micro-batch size, length
granularity, remat policy and rollout slot count, which checkpointing.check_resume lets a resumed
run change).
Metric "step" is the 0-based index of the RL step; checkpoints are numbered by completed steps.

Several processes (jax.distributed, one mesh over all their devices) run this same loop: every
process draws the same prompts; the sampler is one program over the global mesh and its results
are all-gathered to every host; each process scores its own slice of the responses
(covjax.rollouts.score_split); training batches are global arrays each process fills from the
same host data; process 0 alone writes config.json, metrics, cov dumps, the Hugging Face exports
(hf_step_<steps done> every train.export_interval steps, hf_final at the end) and the log, and
every process takes part in the orbax checkpoint and in the exports' gathers.

The workdir is a local folder or an object store's URL (gs://...: covjax.storage); a storage layer
that refuses it stops the run at set-up, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from etils import epath
from flax import nnx

from covjax import checkpointing, entropy_check, memory, multihost, sharding, storage, train_step
from covjax import config as config_lib
from covjax import metrics as names
from covjax.metrics import (
    MetricsWriter,
    entropy_metrics,
    summarize_updates,
    summary_table,
    token_covariance_np,
)
from covjax.model import Transformer, check_pretrained, from_pretrained, save_pretrained
from covjax.model.hf import save_tokenizer
from covjax.rollouts import StepData, collect_rollouts, rollout_slots, sampling_params
from covjax.sampler import Sampler
from covjax.tasks import Task, load_task
from covjax.tasks import toy_warm_start as toy_ws
from covjax.tasks.toy import get_variant

# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Runs (or resumes) the RL job of `config` in `workdir`; returns the metric records of the
    steps it ran and of the final evaluation. Raises StoppedBySignal after checkpointing when
    SIGTERM/SIGINT stopped it before the end, and config.ConfigError on bad input (a bad value,
    a workdir holding a checkpointed run of another config, a workdir the storage layer
    refuses), before anything is compiled."""
    config_lib.validate(config)
    try:
        workdir = storage.as_path(workdir)
    except ValueError as error:  # a URL of no file system etils.epath knows
        raise config_lib.ConfigError(f"workdir {error}") from error
    m = config.mesh
    try:
        mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor)
    except ValueError as error:  # the mesh does not fit the devices
        raise config_lib.ConfigError(f"config.mesh: {error}") from error
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    mini_rows = config.train.mini_batch_prompts * config.rollout.n
    if mini_rows % shards:
        raise config_lib.ConfigError(
            f"config.train.mini_batch_prompts * config.rollout.n = {mini_rows} rows per "
            f"mini-batch do not split over the {shards} batch shards of config.mesh (data x fsdp)"
        )
    try:  # the model folder's config and weight headers, the tokenizer and the data files
        if config.data.task == "toy":
            model_config = toy_ws.model_config()
        else:
            model_config = check_pretrained(os.path.expanduser(config.model.path))
        task = load_task(config)  # bad data fails here, before anything is written
    except (OSError, ValueError) as error:  # their messages name the file and the field or row
        raise config_lib.ConfigError(str(error)) from error
    _check_context(config, model_config.max_position_embeddings)
    with checkpointing.storage_errors(workdir):
        workdir.mkdir(parents=True, exist_ok=True)
    with checkpointing.workdir_lock(workdir):
        with checkpointing.storage_errors(workdir):
            manager = checkpointing.make_manager(workdir)
            latest = manager.latest_step()  # None: a fresh run
            checkpointing.check_workdir(workdir, config, latest)
            if jax.process_index() == 0:
                checkpointing.write_config(workdir, config)

        model = build_model(config, mesh)
        if config.data.task == "toy":
            if latest is None and config.data.toy.warm_start_steps > 0:
                toy_warm_start(config, model)
            sharding.shard_model(model, mesh)
        with jax.set_mesh(mesh):
            return _train(config, workdir, mesh, model, task, manager, latest)


def _check_context(config, max_positions: int) -> None:
    """A prompt and its response must fit the model's positions (the sampler's limit): checked
    before anything is written or compiled."""
    needed = config.data.max_prompt_length + config.rollout.max_new_tokens
    if needed > max_positions:
        raise config_lib.ConfigError(
            f"config.data.max_prompt_length + config.rollout.max_new_tokens = "
            f"{config.data.max_prompt_length} + {config.rollout.max_new_tokens} exceeds the "
            f"model's max_position_embeddings={max_positions}"
        )


def remat_policy(config, mesh, model_cfg) -> str:
    """config.model.remat; "auto": the policy of least recomputation whose update fits this
    device's memory by covjax.memory's model for the mesh ("layer" where the device does not
    report its memory, as the CPU)."""
    if config.model.remat != "auto":
        return config.model.remat
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit is None:
        return "layer"
    shape = memory.MeshShape(**{axis: mesh.shape[axis] for axis in ("data", "fsdp", "tensor")})
    policy = memory.choose_remat(
        model_cfg.replace(compute_dtype=config.model.compute_dtype), shape, limit,
        micro_batch=max(config.train.micro_batch_size // (shape.data * shape.fsdp), 1),
        seq_len=config.data.max_prompt_length + config.rollout.max_new_tokens - 1,
        response_len=config.rollout.max_new_tokens,
        logits_chunk=config.train.logprob_chunk_size,
        fused_attention=jax.default_backend() == "gpu",
    )
    logging.info("model.remat auto: %s", policy)
    return policy


def build_model(config, mesh) -> Transformer:
    """A local Hugging Face folder, loaded onto `mesh`; or the toy's fresh tiny model, on this
    process's default device (the trainer warm-starts, then shards it)."""
    m = config.model
    if config.data.task == "toy":
        model_cfg = toy_ws.model_config(param_dtype=m.param_dtype, compute_dtype=m.compute_dtype)
        model_cfg = model_cfg.replace(
            remat=remat_policy(config, mesh, model_cfg), scan_layers=m.scan_layers
        )
        return Transformer(model_cfg, rngs=nnx.Rngs(config.seed))
    path = os.path.expanduser(m.path)
    return from_pretrained(
        path,
        dtype=jnp.dtype(m.param_dtype),
        mesh=mesh,
        compute_dtype=m.compute_dtype,
        remat=remat_policy(config, mesh, check_pretrained(path)),
        scan_layers=m.scan_layers,
    )


def toy_warm_start(config, model: Transformer) -> None:
    """The toy's supervised warm start, in place, outside any mesh: on one device of every
    process alike, so the RL run starts from the same policy whatever the mesh."""
    t0 = time.perf_counter()
    toy = config.data.toy
    ws = toy_ws.WarmStart(
        steps=toy.warm_start_steps,
        batch_size=toy.warm_start_batch,
        lr=toy.warm_start_lr,
        frac_correct=toy.warm_start_frac_correct,
    )
    cached = toy_ws.warm_start(
        model, variant=get_variant(toy.variant), seed=config.seed, ws=ws, cache_dir=toy.cache_dir
    )
    logging.info("toy warm start (%s): %.1fs", "cached" if cached else "trained",
                 time.perf_counter() - t0)


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


@dataclasses.dataclass
class Learner:
    """What the update needs besides the train state: the model's static parts, the optimizer,
    the frozen reference policy (KL loss only) and the compiled programs, one set per batch
    shape (each compiles a program per micro-batch length)."""

    graphdef: Any
    rest: Any
    tx: Any
    schedule: Any
    cfg: train_step.StepConfig
    mesh: Any
    state_sharding: Any
    mini_rows: int
    ref_params: Any = None
    compiled: dict = dataclasses.field(default_factory=dict)

    def programs(self, batch: dict[str, np.ndarray]):
        """(update, log-probs, batch shardings) compiled for this batch's shapes (cached)."""
        key = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if key not in self.compiled:
            b_sharding = train_step.batch_shardings(batch, self.mesh)
            mb = {k: v[: self.mini_rows] for k, v in batch.items()}
            for name in ("old_logp", "ref_logp") if self.ref_params is not None else ("old_logp",):
                mb[name] = mb["advantages"]  # [B, R] float32 like the advantages
            self.compiled[key] = (
                train_step.CompiledUpdate(
                    graphdef=self.graphdef, rest=self.rest, tx=self.tx, schedule=self.schedule,
                    cfg=self.cfg, state_sharding=self.state_sharding,
                    batch_sharding=train_step.batch_shardings(mb, self.mesh), mesh=self.mesh,
                ),
                train_step.LogProbs(
                    graphdef=self.graphdef, rest=self.rest, cfg=self.cfg,
                    batch_sharding={k: b_sharding[k] for k in train_step.LOGPROB_KEYS},
                    mesh=self.mesh,
                ),
                b_sharding,
            )
        return self.compiled[key]


def _make_learner(config, mesh, model) -> tuple[Learner, train_step.TrainState]:
    """The learner and the initial train state (sharded like the parameters)."""
    tx, schedule = train_step.make_optimizer(
        config.optim.lr, config.optim.weight_decay, config.optim.grad_clip,
        config.optim.warmup_steps,
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_sharding = train_step.param_shardings(params, mesh)
    state = jax.jit(lambda p: train_step.init_state(p, tx))(params)
    state_sharding = train_step.state_shardings(state, param_sharding, mesh)
    learner = Learner(
        graphdef=graphdef, rest=rest, tx=tx, schedule=schedule,
        cfg=train_step.StepConfig.from_config(config), mesh=mesh, state_sharding=state_sharding,
        mini_rows=config.train.mini_batch_prompts * config.rollout.n,
        # the policy at the start of RL, kept frozen
        ref_params=jax.tree.map(jnp.copy, params) if config.loss.kl_coef > 0 else None,
    )
    return learner, jax.device_put(state, state_sharding)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


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


class RunFailed(RuntimeError):
    """The run cannot go on: an output that could not be written (a full disk), a non-finite loss
    or gradient norm, no checkpoint that restores. The message names the path or the step; the
    checkpoints saved before stay, and the same command resumes from the newest."""


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints at the next step boundary and exits. A second
    signal quits at once, without that checkpoint."""

    def __init__(self):
        self.set = False
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.set:
            logging.warning("signal %d again: quitting now (the last checkpoint resumes)", signum)
            os._exit(128 + signum)  # the step may be stuck; skip its cleanup
        logging.warning("signal %d: checkpointing at the end of this step, then exiting "
                        "(signal again to quit at once)", signum)
        self.set = True
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _due(step: int, interval: int) -> bool:
    """Whether an every-`interval`-steps action falls on `step` (interval 0: never)."""
    return bool(interval) and step % interval == 0


def _train(config, workdir: epath.Path, mesh, model, task: Task, manager, latest: int | None
           ) -> list[dict[str, Any]]:
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    mesh_shape = memory.MeshShape(**{a: mesh.shape[a] for a in ("data", "fsdp", "tensor")})
    slots = rollout_slots(config, model.config, mesh_shape, limit)  # before anything compiles
    learner, state = _make_learner(config, mesh, model)
    start_step = 0
    if latest is not None:
        try:
            restored, meta = checkpointing.restore_newest(
                manager, {"train": state, "ref": learner.ref_params}
            )
        except checkpointing.CheckpointError as error:
            raise RunFailed(str(error)) from error
        state, learner.ref_params = restored["train"], restored["ref"]
        task.restore(meta["task"])
        start_step = int(meta["step"])
        logging.info("resumed from %s at step %d", workdir / "checkpoints", start_step)
        if start_step >= config.train.steps:
            logging.info("all %d steps are done: the final evaluation and hf_final are made again "
                         "(a larger --config.train.steps goes on training)", config.train.steps)
    nnx.update(model, state.params)

    def save(step: int) -> None:
        checkpointing.save(
            manager, step, {"train": state, "ref": learner.ref_params},
            {"step": step, "task": task.state(), "seed": config.seed},
        )

    buckets = _prompt_buckets(config.data.max_prompt_length)
    sampler = Sampler(model, mesh=mesh, length_buckets=buckets,
                      slots=slots,
                      max_prompt_length=config.data.max_prompt_length)
    eval_params = sampling_params(config.rollout, task.stop_token_ids)
    base_rng = jax.random.key(config.seed)
    writer = _start_metrics(config, workdir, start_step)
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
            if _due(step, config.train.eval_interval):
                metrics.update(task.evaluate(sampler, jax.random.fold_in(step_rng, 1), eval_params))
            data = collect_rollouts(task, sampler, config, jax.random.fold_in(step_rng, 0))
            metrics.update(data.metrics)
            state, learn_metrics = _learn(step, step_rng, data, state, learner, config, workdir)
            metrics.update(learn_metrics)
            nnx.update(model, state.params)
            metrics[names.TIME_STEP] = time.perf_counter() - t_step
            resp_tokens = float(data.arrays["response_mask"].sum())
            metrics["throughput/tokens_per_s"] = resp_tokens / metrics[names.TIME_STEP]
            _write_step(writer, manager, step, metrics)
            if not all(math.isfinite(metrics.get(k, 0.0))
                       for k in (names.OPTIM_LOSS, names.OPTIM_GRAD_NORM)):
                raise _stop_run(manager, (
                    f"step {step}: non-finite {names.OPTIM_LOSS}={metrics[names.OPTIM_LOSS]} or "
                    f"{names.OPTIM_GRAD_NORM}={metrics[names.OPTIM_GRAD_NORM]} (lower "
                    "config.optim.lr or config.optim.grad_clip)"
                ))
            records.append({"step": step, **metrics})
            if step % config.train.log_interval == 0:
                logging.info("step %d: %s", step, ", ".join(
                    f"{k}={metrics[k]:.4g}" for k in names.SUMMARY_KEYS if k in metrics))
            bar.set_postfix(
                reward=f"{metrics.get(names.REWARD_MEAN, math.nan):.3f}",
                entropy=f"{metrics.get(names.ENTROPY_TOKEN_MEAN, math.nan):.3f}",
                sel=f"{metrics.get(names.COV_FRAC_SELECTED, math.nan):.4f}",
            )
            done = step + 1
            stopping = multihost.any_process(stop.set)  # all processes stop at the same step
            if stopping or done == config.train.steps or _due(
                done, config.train.checkpoint_interval
            ):
                with _stop_on_storage_error(manager, step):
                    save(done)
            # the last step's weights are hf_final; a stop skips the export (made again when due)
            if not stopping and done < config.train.steps and _due(
                done, config.train.export_interval
            ):
                with _stop_on_storage_error(manager, step):
                    _export(model, workdir / f"hf_step_{done}", config, task)
            if stopping:
                break

    finished = not stopping
    if finished and config.train.eval_interval:
        final_rng = jax.random.fold_in(jax.random.fold_in(base_rng, config.train.steps), 1)
        final = task.evaluate(sampler, final_rng, eval_params)
        _write_step(writer, manager, config.train.steps, final)
        records.append({"step": config.train.steps, **final})
    try:
        checkpointing.raise_save_errors(manager, wait=True)
    except checkpointing.CheckpointError as error:
        raise _stop_run(manager, str(error)) from error
    manager.close()
    writer.close()
    if finished and not _all_finite(state.params):
        raise RunFailed(f"the weights after step {config.train.steps - 1} are not finite: "
                        "hf_final is not written (lower config.optim.lr)")
    if finished:
        with _stop_on_storage_error(manager, config.train.steps):
            _export(model, workdir / "hf_final", config, task)
        if config.data.task == "toy" and jax.process_index() == 0:
            # beside a qwen2 config.json, AutoTokenizer would load Qwen2's own tokenizer
            save_tokenizer(task.tokenizer, workdir / "tokenizer")
    logging.info("compilations: sampler %d, update/log-prob shapes %d", sampler.num_compilations,
                 len(learner.compiled))
    if jax.process_index() == 0:
        print(summary_table(records), flush=True)
        print(f"workdir: {workdir}" + (f"\nmodel: {workdir / 'hf_final'}" if finished else ""),
              flush=True)
    if stopping:
        raise StoppedBySignal(done, stop.signum)
    return records


def _export(model: Transformer, path: epath.Path, config, task: Task) -> None:
    """The model as a Hugging Face folder at `path` (weights in train.export_dtype, the tokenizer,
    the model folder's generation config): every process gathers, process 0 writes."""
    save_pretrained(model, path, tokenizer=task.tokenizer,
                    source_dir=os.path.expanduser(config.model.path) or None,
                    dtype=config.train.export_dtype)


def _start_metrics(config, workdir: epath.Path, start_step: int) -> MetricsWriter:
    """The run's MetricsWriter (metrics.jsonl cut back to the checkpoint; the W&B run started),
    made on process 0 only. Every process learns whether it failed there (a full disk, a line that
    is not JSON, W&B refusing to start) and stops with RunFailed together (collective), instead of
    the others waiting for process 0 in the next gather."""
    error = None
    try:
        writer = MetricsWriter(workdir, start_step, wandb_project=config.log.wandb,
                               run_config=config_lib.flatten(config.to_dict()))
    except Exception as e:  # noqa: BLE001 - raised below, once every process knows
        error = e
    if multihost.any_process(error is not None):
        if error is None:
            raise RunFailed(f"{workdir}: process 0 failed to start the metrics writer")
        if not storage.is_storage_error(error):
            raise error
        raise RunFailed(str(error)) from error
    return writer


def _write_step(writer: MetricsWriter, manager, step: int, metrics: dict[str, float]) -> None:
    """The step's metrics, and a check that no checkpoint save has failed since the last. Every
    process learns whether either failed on any process (process 0 alone writes the metrics) and
    all stop together with RunFailed, instead of the others waiting for it in the next collective.
    """
    failure = None
    try:
        writer.write(step, metrics)
        checkpointing.raise_save_errors(manager)
    except Exception as error:  # noqa: BLE001 - a storage error is raised below, on every process
        failure = f"step {step}: {storage.kept_storage_error(error)}"
    if multihost.any_process(failure is not None):
        raise _stop_run(manager, failure or f"step {step}: another process failed to write the "
                        "metrics or a checkpoint (its log names the file)")


def _stop_on_storage_error(manager, step: int):
    """A context in which a storage error (storage.is_storage_error: a full disk, a refused
    write) stops the run with `_stop_run`, naming `step`."""
    return storage.storage_errors_as(lambda error: _stop_run(manager, f"step {step}: {error}"))


def _stop_run(manager, why: str) -> RunFailed:
    """The RunFailed that stops the run for `why`, once the checkpoint in flight (the last good
    one) is written; it names the checkpoint that resumes."""
    try:
        checkpointing.raise_save_errors(manager, wait=True)
    except checkpointing.CheckpointError as error:
        why = why if str(error) in why else f"{why} (and {error})"
    steps = manager.all_steps()
    resume = f"the last checkpoint, {max(steps)}, resumes" if steps else "no checkpoint was saved"
    return RunFailed(f"{why}; {resume}")


def _all_finite(tree) -> bool:
    """Whether every array of a pytree is finite."""
    return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree))


def _learn(step: int, step_rng: jax.Array, data: StepData, state: train_step.TrainState,
           learner: Learner, config, workdir: epath.Path
           ) -> tuple[train_step.TrainState, dict[str, float]]:
    """Old log-probs, the mini-batch updates and their metrics: (new state, metrics)."""
    t0 = time.perf_counter()
    host = train_step.make_batch(data.arrays, data.prompt_length, data.advantages)
    update_fn, logprob_fn, b_sharding = learner.programs(host)
    batch = {k: multihost.global_array(v, b_sharding[k]) for k, v in host.items()}
    lp_batch = {k: batch[k] for k in train_step.LOGPROB_KEYS}
    old_logp, entropy = logprob_fn(state.params, lp_batch)
    host["old_logp"] = old_logp_np = multihost.host_gather(old_logp)
    if learner.ref_params is not None:
        host["ref_logp"] = multihost.host_gather(logprob_fn(learner.ref_params, lp_batch)[0])

    mask, mini_rows = host["mask"], learner.mini_rows
    metrics = entropy_metrics(multihost.host_gather(entropy), mask)
    sampled = data.arrays["logprobs"][:, data.prompt_length:]
    metrics["rollout/logprob_abs_diff"] = float(np.abs(old_logp_np - sampled)[mask].mean())
    metrics.update(_covariance_metrics(step, old_logp_np, host["advantages"], mask, mini_rows,
                                       config, workdir))

    updates = []
    for index, start in enumerate(range(0, mask.shape[0], mini_rows)):
        if not data.trainable or not mask[start:start + mini_rows].any():
            continue  # nothing kept, or padding only (dynamic sampling came up short)
        mb = {  # cut on the host: a slice of the sharded batch would lose the data sharding
            k: multihost.global_array(v[start:start + mini_rows],
                                      b_sharding.get(k, b_sharding["advantages"]))
            for k, v in host.items()
        }
        # the first update's parameters computed old_logp: its selection reuses them
        state, m = update_fn(state, mb, jax.random.fold_in(step_rng, 2 + index),
                             logp_is_old=not updates)
        updates.append(m)
    updates = [{k: float(v) for k, v in u.items()} for u in jax.device_get(updates)]
    metrics.update(summarize_updates(updates))

    if updates and _due(step, config.train.entropy_check_interval):
        _, entropy_after = logprob_fn(state.params, lp_batch)
        check = entropy_check.entropy_check_metrics(
            old_logp, batch["advantages"], batch["mask"], entropy, entropy_after,
            eta=sum(u["lr"] for u in updates),  # k updates between the measurements: k * lr
        )
        metrics.update({k: float(v) for k, v in check.items()})
    metrics["time/update"] = time.perf_counter() - t0
    return state, metrics


def _covariance_metrics(step: int, logp: np.ndarray, advantages: np.ndarray, mask: np.ndarray,
                        mini_rows: int, config, workdir: epath.Path) -> dict[str, float]:
    """cov/mean and cov/p99 of Eq. 10 within each mini-batch; the values are dumped to
    WORKDIR/cov every train.cov_dump_interval steps (process 0)."""
    covs = [
        token_covariance_np(logp[s:s + mini_rows], advantages[s:s + mini_rows],
                            mask[s:s + mini_rows])
        for s in range(0, mask.shape[0], mini_rows)
    ]
    all_cov = np.concatenate(covs)
    if _due(step, config.train.cov_dump_interval) and jax.process_index() == 0:
        cov_dir = workdir / names.COV_DIR
        cov_dir.mkdir(exist_ok=True)
        with (cov_dir / names.cov_file(step)).open("wb") as f:
            np.save(f, all_cov)
    return {
        names.COV_MEAN: float(all_cov.mean()) if all_cov.size else math.nan,
        names.COV_P99: float(np.percentile(all_cov, 99)) if all_cov.size else math.nan,
    }


def default_workdir(config_name: str) -> str:
    """runs/<config name>_<timestamp>."""
    return os.path.join("runs", f"{config_name}_{time.strftime('%Y%m%d_%H%M%S')}")

