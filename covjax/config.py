"""The config schema of `python -m covjax.train`: every key, its default, its type and its range.

A config file (configs/*.py) builds on `base_config()` (through configs/recipes.py) and changes
values; `validate` then checks the resolved config (after the command-line overrides)
before anything is compiled: an unknown key, a value of the wrong type or out of its range stops
the run with an error that names the key, e.g.
`config.loss.clip_cov_ratio=2.0 is out of range (0, 1]`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from covjax.advantages import ESTIMATORS
from covjax.data import split_files, split_named_files
from covjax.losses import AGG_MODES, KL_ESTIMATORS, METHODS, LossConfig
from covjax.model.config import DTYPES, REMAT_POLICIES
from covjax.rewards.sandbox import ISOLATION_LEVELS, MAX_WORKERS
from covjax.sampler import SamplingParams


def base_config() -> ml_collections.ConfigDict:
    """Every key of the schema with its default: the toy task (easy) with Clip-Cov on a CPU."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    # --- Model: a local Hugging Face folder; empty = the toy's tiny Qwen2-shaped model.
    c.model = ml_collections.ConfigDict()
    c.model.path = ""
    c.model.tokenizer_path = ""  # "" = model.path
    c.model.param_dtype = "float32"  # master weights and optimizer state: keep fp32
    c.model.compute_dtype = "float32"  # bfloat16 on accelerators
    # "layer": recompute each layer in the backward pass ("dots": but keep its matmul outputs;
    # "minimal", "save_attention": keep named ones, covjax.model.ModelConfig); "auto": the
    # policy covjax.memory finds fits the device for the mesh
    c.model.remat = "none"
    c.model.scan_layers = False

    # --- Data: "toy" (covjax/tasks/toy.py), "math" or "code" (local parquet/jsonl files).
    c.data = ml_collections.ConfigDict()
    c.data.task = "toy"
    c.data.train_files = ""  # comma-separated local files (math)
    c.data.eval_files = ""  # "name=path,name=path" (math)
    c.data.schema = "auto"  # record layout of the data files, see covjax/data.py
    c.data.max_prompt_length = 2  # tokens; longer prompts are dropped by the loader
    c.data.prompt_suffix = ""  # instruction after each question; "" = covjax.data's default
    # The code task's sandbox (covjax.rewards.sandbox): limits per test and per program.
    c.data.code = ml_collections.ConfigDict()
    c.data.code.workers = 0  # programs run at once; 0 = one per core
    c.data.code.test_s = 5.0  # wall-clock and CPU seconds per test
    c.data.code.program_s = 30.0  # ... per program, all its tests together
    c.data.code.memory_mb = 2048  # address space
    c.data.code.isolation = "auto"  # bubblewrap when installed, else "rlimit" (warned)
    c.data.toy = ml_collections.ConfigDict()
    c.data.toy.variant = "easy"  # "easy" saturates, "hard" shows the entropy-reward law
    # The supervised warm start (covjax.tasks.toy_warm_start): 2000 steps give the easy variant
    # a start with room to rise on every seed (the hard variant keeps 600, configs/recipes.py);
    # a quarter correct answers taught nothing, all correct left no room (docs/toy_results.md).
    c.data.toy.warm_start_steps = 2000
    c.data.toy.warm_start_batch = 256
    c.data.toy.warm_start_lr = 3e-3
    c.data.toy.warm_start_frac_correct = 0.65
    c.data.toy.cache_dir = "~/.cache/covjax/toy"  # warm starts, shared by runs; "" = no cache
    c.data.toy.eval_samples = 16  # responses per target for val/toy/accuracy

    # --- Rollout (sampler).
    c.rollout = ml_collections.ConfigDict()
    c.rollout.n = 8  # responses per prompt (the GRPO group)
    c.rollout.temperature = 1.0
    c.rollout.top_p = SamplingParams.top_p  # the sampler's defaults: no truncation
    c.rollout.top_k = SamplingParams.top_k
    c.rollout.max_new_tokens = 7  # the toy's 6 digits + EOS
    c.rollout.max_gen_rounds = 3  # dynamic sampling: generation rounds to fill one step
    # decode slots per device of the sampler's pool; 0 = as many KV caches as fit beside the
    # training state (covjax.memory), every row when the device reports no memory size
    c.rollout.slots_per_device = 0

    # --- Policy loss: the fields of covjax.losses.LossConfig (their defaults are the paper's),
    # then the step's own keys. The toy changes five of them (docs/toy_results.md, "Settings").
    c.loss = ml_collections.ConfigDict(dataclasses.asdict(LossConfig(method="clip_cov")))
    c.loss.clip_low = 1.0  # Clip-Cov recipe: eps = 1 so PPO clipping only trims extremes
    c.loss.clip_high = 1.0
    # the paper's r = 2e-4 touches one token of a toy mini-batch; from r = 0.2 on, the band
    # decides how many are touched, so its lower bound is 0.5 (the paper's band is [1, 5])
    c.loss.clip_cov_ratio = 0.2
    c.loss.clip_cov_lb = 0.5
    c.loss.kl_cov_ratio = 0.4  # the easy toy's k; its hard variant and the recipes set their own
    c.loss.kl_cov_coef = 2.0  # beta; the paper and its recipes use 1
    c.loss.cov_scope = "minibatch"  # "microbatch" = the reference's per-micro-batch selection
    c.loss.entropy_coef = 0.0
    c.loss.kl_coef = 0.0  # > 0 keeps a frozen reference policy and adds a KL loss
    c.loss.kl_estimator = "low_var_kl"

    # --- Advantages.
    c.advantage = ml_collections.ConfigDict()
    c.advantage.estimator = "grpo"
    # DAPO's filter of groups whose rewards all agree (on in the paper's recipe). In the toy it
    # also keeps saturated steps from feeding AdamW all-zero gradients, on which lr 5e-4
    # oscillates once reward saturates (docs/toy_results.md).
    c.advantage.dynamic_sampling = True

    # --- Optimizer: optax AdamW on fp32 master weights.
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-4
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0  # global norm
    c.optim.warmup_steps = 0  # optimizer updates of linear warmup

    # --- Device mesh (covjax.sharding.make_mesh): -1 = the remaining devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    # --- Training loop. Intervals count RL steps; 0 turns the thing off.
    c.train = ml_collections.ConfigDict()
    c.train.steps = 300  # the easy variant saturates by ~30, entropy keeps falling
    c.train.prompts_per_step = 64
    c.train.mini_batch_prompts = 16  # 4 optimizer updates per rollout step
    c.train.micro_batch_size = 128  # responses per forward/backward
    c.train.logprob_chunk_size = 1024  # tokens per chunk of the log-softmax over the vocabulary
    c.train.length_granularity = 256  # micro-batch lengths: multiples of this many tokens
    c.train.checkpoint_interval = 50
    c.train.eval_interval = 10
    c.train.log_interval = 10  # a log line of the headline metrics (metrics.jsonl: every step)
    c.train.cov_dump_interval = 10
    c.train.entropy_check_interval = 10  # one more no-grad forward on those steps
    c.train.export_interval = 0  # a Hugging Face folder WORKDIR/hf_step_<steps done>
    c.train.export_dtype = "bfloat16"  # of hf_step_* and hf_final (the master weights are fp32)

    # --- Logging beyond the workdir's metrics.jsonl and TensorBoard events.
    c.log = ml_collections.ConfigDict()
    # a W&B project: the same metrics and this config go to a W&B run there too (pip install
    # 'covjax[wandb]'; WANDB_MODE=offline keeps it local); "" = off
    c.log.wandb = ""
    return c


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A bad config value, or a relation between values that does not hold: the message names
    the key and the value (the entry points print it as one line)."""


def _choice(options: tuple) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), f"not one of {list(options)}"


def _interval(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    def ok(v):
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    right = ")" if hi_open or hi == math.inf else "]"
    return ok, f"out of range {'(' if lo_open else '['}{lo}, {hi}{right}"


_POSITIVE = ((lambda v: v > 0), "out of range (0, inf)")
_NON_NEGATIVE = ((lambda v: v >= 0), "out of range [0, inf)")
_AT_LEAST_ONE = ((lambda v: v >= 1), "out of range [1, inf)")
_MESH_AXIS = ((lambda v: v >= 1 or v == -1), "not >= 1 or -1 (the remaining devices)")

RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": _NON_NEGATIVE,
    "model.param_dtype": _choice(DTYPES),
    "model.compute_dtype": _choice(DTYPES),
    "model.remat": _choice(REMAT_POLICIES + ("auto",)),
    "data.task": _choice(("toy", "math", "code")),
    "data.code.workers": _interval(0, MAX_WORKERS),
    "data.code.test_s": _POSITIVE,
    "data.code.program_s": _POSITIVE,
    "data.code.memory_mb": _AT_LEAST_ONE,
    "data.code.isolation": _choice(ISOLATION_LEVELS),
    "data.max_prompt_length": _AT_LEAST_ONE,
    "data.toy.variant": _choice(("easy", "hard")),
    "data.toy.warm_start_steps": _NON_NEGATIVE,
    "data.toy.warm_start_batch": _AT_LEAST_ONE,
    "data.toy.warm_start_lr": _POSITIVE,
    "data.toy.warm_start_frac_correct": _interval(0, 1),
    "data.toy.eval_samples": _AT_LEAST_ONE,
    "rollout.n": _AT_LEAST_ONE,
    "rollout.temperature": _interval(0, math.inf, lo_open=True),
    "rollout.top_p": _interval(0, 1, lo_open=True),
    "rollout.top_k": _NON_NEGATIVE,
    "rollout.max_new_tokens": _AT_LEAST_ONE,
    "rollout.max_gen_rounds": _AT_LEAST_ONE,
    "rollout.slots_per_device": _NON_NEGATIVE,
    "loss.method": _choice(METHODS),
    "loss.clip_low": _interval(0, 1),
    "loss.clip_high": _NON_NEGATIVE,
    "loss.dual_clip_c": _interval(1, math.inf, lo_open=True),
    "loss.clip_cov_ratio": _interval(0, 1, lo_open=True),
    "loss.kl_cov_ratio": _interval(0, 1, lo_open=True),
    "loss.kl_cov_coef": _NON_NEGATIVE,
    "loss.loss_agg_mode": _choice(AGG_MODES),
    "loss.cov_scope": _choice(("minibatch", "microbatch")),
    "loss.entropy_coef": _NON_NEGATIVE,
    "loss.kl_coef": _NON_NEGATIVE,
    "loss.kl_estimator": _choice(KL_ESTIMATORS),
    "advantage.estimator": _choice(ESTIMATORS),
    "optim.lr": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.grad_clip": _POSITIVE,
    "optim.warmup_steps": _NON_NEGATIVE,
    "mesh.data": _MESH_AXIS,
    "mesh.fsdp": _MESH_AXIS,
    "mesh.tensor": _MESH_AXIS,
    "train.steps": _AT_LEAST_ONE,
    "train.prompts_per_step": _AT_LEAST_ONE,
    "train.mini_batch_prompts": _AT_LEAST_ONE,
    "train.micro_batch_size": _AT_LEAST_ONE,
    "train.logprob_chunk_size": _AT_LEAST_ONE,
    "train.length_granularity": _AT_LEAST_ONE,
    "train.checkpoint_interval": _NON_NEGATIVE,
    "train.eval_interval": _NON_NEGATIVE,
    "train.log_interval": _AT_LEAST_ONE,
    "train.cov_dump_interval": _NON_NEGATIVE,
    "train.entropy_check_interval": _NON_NEGATIVE,
    "train.export_interval": _NON_NEGATIVE,
    "train.export_dtype": _choice(DTYPES),
    # W&B's own rule for project names
    "log.wandb": ((lambda v: len(v) <= 128 and not set(v) & set("/\\#?%:")),
                  "not a W&B project name (at most 128 characters, none of / \\ # ? % :)"),
}


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _type_ok(value: Any, default: Any) -> bool:
    """bool must be bool, int must be int (not bool), float accepts int, str must be str."""
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def flat_schema() -> dict[str, Any]:
    """Every config key as a dotted path ("loss.method"), with its default."""
    return flatten(base_config().to_dict())


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the key on an unknown/missing key, a wrong type or a bad value."""
    schema = flat_schema()
    values = flatten(config.to_dict())
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise ConfigError(f"config.{unknown[0]} is not a known key (unknown keys: {unknown})")
    missing = sorted(set(schema) - set(values))
    if missing:
        raise ConfigError(f"config.{missing[0]} is missing (missing keys: {missing})")
    for key, default in schema.items():
        value = values[key]
        if not _type_ok(value, default):
            raise ConfigError(
                f"config.{key}={value!r} has type {type(value).__name__}, "
                f"expected {type(default).__name__}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config.{key}={value!r} is not a finite number")
        if key in RANGES:
            ok, why = RANGES[key]
            if not ok(value):
                raise ConfigError(f"config.{key}={value!r} is {why}")
    _check_packages(config)
    _validate_relations(config)


def _check_packages(c: ml_collections.ConfigDict) -> None:
    """The optional packages the config asks for are installed."""
    if c.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"config.log.wandb={c.log.wandb!r} needs the wandb package: pip install wandb "
            "(or pip install 'covjax[wandb]')"
        )


def _validate_relations(c: ml_collections.ConfigDict) -> None:
    """Checks between keys: group size, batch divisibility, the Clip-Cov band, real-model inputs."""
    if c.rollout.n < 2:  # covjax.advantages gives a group of one response advantage 0
        raise ConfigError(
            f"config.rollout.n={c.rollout.n}: the {c.advantage.estimator} estimator needs at "
            "least 2 responses per prompt (its baseline is the group's mean)"
        )
    if c.train.prompts_per_step % c.train.mini_batch_prompts:
        raise ConfigError(
            f"config.train.prompts_per_step={c.train.prompts_per_step} is not a multiple of "
            f"config.train.mini_batch_prompts={c.train.mini_batch_prompts}"
        )
    mini_batch = c.train.mini_batch_prompts * c.rollout.n
    if mini_batch % c.train.micro_batch_size:
        raise ConfigError(
            f"config.train.micro_batch_size={c.train.micro_batch_size} does not divide the "
            f"mini-batch of {mini_batch} responses (mini_batch_prompts * rollout.n)"
        )
    if c.loss.clip_cov_lb >= c.loss.clip_cov_ub:
        raise ConfigError(
            f"config.loss.clip_cov_lb={c.loss.clip_cov_lb} must be below "
            f"config.loss.clip_cov_ub={c.loss.clip_cov_ub}"
        )
    if c.data.task == "toy":
        if c.model.path:
            raise ConfigError(f"config.model.path={c.model.path!r} must be empty for the toy task")
        return
    if not c.model.path:
        raise ConfigError("config.model.path is empty: set it to a local Hugging Face model folder")
    for key in ("path", "tokenizer_path"):
        path = c.model[key]
        if path and not os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"config.model.{key}={path!r} is not a directory")
    if not split_files(c.data.train_files):
        raise ConfigError(
            f"config.data.train_files is empty ({c.data.train_files!r} names no file): set it "
            "to local parquet/jsonl files"
        )
    for path in split_files(c.data.train_files):
        if not os.path.exists(os.path.expanduser(path)):
            raise ConfigError(f"config.data.train_files: {path!r} does not exist")
    for name, path in split_named_files(c.data.eval_files).items():
        if not os.path.exists(os.path.expanduser(path)):
            raise ConfigError(f"config.data.eval_files: {name}={path!r} does not exist")


def unknown_override_keys(argv: list[str]) -> list[str]:
    """The ``--config.KEY`` overrides of a command line (up to ``--``) whose KEY is not in the
    schema, each with the closest known key when there is one: "config.loss.methd (did you mean
    config.loss.method?)"."""
    known = list(flat_schema())
    unknown = []
    for arg in argv[1:]:
        if arg == "--":
            break
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].partition("=")[0]
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean config.{close[0]}?)" if close else ""
            unknown.append(f"config.{key}{hint}")
    return unknown


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as indented JSON (written to the workdir at start)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)
