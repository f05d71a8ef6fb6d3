"""The two recipes the config files of this folder build on: `toy_config` (the embedded toy) and
`paper_recipe` (the paper's Qwen2.5-7B/32B runs, docs/ALGORITHMS.md section 7).

Not a config file itself (no get_config). configs/ is not a package: ml_collections loads a config
file by its path, so each one runs this file beside it by path too:

    recipes = runpy.run_path(str(pathlib.Path(__file__).with_name("recipes.py")))

Every key with its default and range: covjax/config.py (base_config).
"""

from __future__ import annotations

import ml_collections

from covjax.config import base_config

# The recipe names of configs/*.py -> loss.method (GRPO and Clip-Higher are PPO's clip).
RECIPE_METHODS = {"grpo": "ppo", "clip_higher": "ppo", "clip_cov": "clip_cov", "kl_cov": "kl_cov"}
MODEL_SIZES = ("7b", "32b")


def parse_arg(arg: str | None, allowed: tuple[str, ...]) -> set[str]:
    """The comma-separated words of a config argument ("smoke,hard"), each checked."""
    words = {w.strip() for w in (arg or "").split(",") if w.strip()}
    bad = sorted(words - set(allowed))
    if bad:
        raise ValueError(f"config argument {arg!r}: {bad} not among {list(allowed)}")
    return words


def _check_recipe(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"recipe {name}={value!r} is not one of {list(allowed)}")


def toy_config(method: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The toy with one of grpo | clip_higher | clip_cov | kl_cov (settings: docs/toy_results.md).

    arg: comma-separated words; "hard" picks the hard variant, "smoke" shrinks the run to a few
    seconds (tests, CI).
    """
    _check_recipe("method", method, tuple(RECIPE_METHODS))
    words = parse_arg(arg, ("smoke", "hard"))
    c = base_config()
    c.loss.method = RECIPE_METHODS[method]
    if method in ("grpo", "clip_higher", "kl_cov"):
        c.loss.clip_low, c.loss.clip_high = 0.2, (0.28 if method == "clip_higher" else 0.2)
    if "hard" in words:
        c.data.toy.variant = "hard"
        # docs/toy_results.md, "Settings": the non-saturating variant makes 4 updates every step
        # and loses reward with the easy variant's ratios; it keeps the paper's band [1, 5] and
        # the 600-step warm start (2000 steps leave it little room to rise)
        c.data.toy.warm_start_steps = 600
        c.loss.clip_cov_ratio = 5e-2
        c.loss.clip_cov_lb = 1.0
        c.loss.kl_cov_ratio = 0.1
    if "smoke" in words:
        c.advantage.dynamic_sampling = False  # a 20-step warm start rarely varies in a group
        c.data.toy.warm_start_steps = 20
        c.data.toy.cache_dir = ""
        c.data.toy.eval_samples = 2
        c.train.steps = 4
        c.train.prompts_per_step = 8
        c.train.mini_batch_prompts = 4  # 2 updates per step, so KL-Cov's penalty can act
        c.train.micro_batch_size = 8
        c.train.checkpoint_interval = 2
        c.train.eval_interval = 2
        c.train.cov_dump_interval = 2
        c.train.entropy_check_interval = 2
    c.lock()
    return c


def paper_recipe(size: str, method: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """docs/ALGORITHMS.md section 7 for Qwen2.5-{7B,32B}: DAPO-Math-17k, 256 x 8, mini-batch 32.

    model.path and data.train_files must be given on the command line (validation says so).
    arg "smoke" shrinks it to 2 steps of 8 prompts x 2 responses of at most 256 tokens.
    """
    _check_recipe("size", size, MODEL_SIZES)
    _check_recipe("method", method, tuple(RECIPE_METHODS))
    words = parse_arg(arg, ("smoke",))
    c = base_config()
    c.seed = 42
    c.model.compute_dtype = "bfloat16"  # bf16 matmuls; params and Adam moments stay fp32
    c.model.remat = "auto"  # covjax.memory picks the policy that fits the device for this mesh
    c.model.scan_layers = True

    c.data.task = "math"
    c.data.schema = "auto"
    c.data.max_prompt_length = 2048
    c.data.toy.warm_start_steps = 0

    c.rollout.n = 8
    c.rollout.temperature = 1.0
    c.rollout.max_new_tokens = 8192
    c.rollout.max_gen_rounds = 10  # DAPO's max_num_gen_batches

    c.loss.method = RECIPE_METHODS[method]
    c.loss.clip_low, c.loss.clip_high = {
        "grpo": (0.2, 0.2),
        "clip_higher": (0.2, 0.28),
        "clip_cov": (1.0, 1.0),
        "kl_cov": (0.2, 0.2),  # unused: KL-Cov does not clip
    }[method]
    c.loss.clip_cov_ratio = 2e-4
    c.loss.clip_cov_lb, c.loss.clip_cov_ub = 1.0, 5.0
    c.loss.kl_cov_ratio = {"7b": 2e-3, "32b": 2e-4}[size]
    c.loss.kl_cov_coef = 1.0

    c.advantage.estimator = "grpo"
    c.advantage.dynamic_sampling = True

    # the paper's 7B and 32B scripts; an fp32 master copy keeps such an lr from vanishing in bf16
    c.optim.lr = {"7b": 5e-7, "32b": 1e-6}[size]
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0

    c.mesh.fsdp = -1  # every device shards the weights; add tensor=N for 32B on small chips

    c.train.steps = 500
    c.train.prompts_per_step = 256
    c.train.mini_batch_prompts = 32  # 8 optimizer updates per rollout step
    c.train.micro_batch_size = {"7b": 16, "32b": 8}[size]
    c.train.checkpoint_interval = 10
    c.train.eval_interval = 4  # as the paper: the entropy-performance law needs many points
    c.train.cov_dump_interval = 20
    c.train.entropy_check_interval = 20
    if "smoke" in words:
        c.rollout.max_new_tokens = 256
        c.rollout.n = 2
        c.rollout.max_gen_rounds = 2
        c.train.steps = 2
        c.train.prompts_per_step = 8
        c.train.mini_batch_prompts = 4  # 8 rows: one per device of an 8-chip host
        c.train.micro_batch_size = 4
        c.train.eval_interval = 0
    c.lock()
    return c
