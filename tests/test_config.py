"""covjax.config and configs/*.py: every config loads and validates, the paper recipes carry
ALGORITHMS.md section 7, and bad keys, types and values are named in the error."""

import json
import math
import pathlib
import sys

import ml_collections
import pytest
from helpers import load_config as load
from helpers import recipes

from covjax import config as config_lib

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
TOY = ["default", "toy_grpo", "toy_clip_higher", "toy_clip_cov", "toy_kl_cov"]
RECIPES = [f"qwen2_5_{s}_{m}" for s in ("7b", "32b")
           for m in ("grpo", "clip_higher", "clip_cov", "kl_cov")]
CODE = ["qwen2_5_7b_code_clip_cov"]
QWEN3 = ["qwen3_8b_clip_cov"]


def test_every_config_file_is_listed():
    listed = TOY + RECIPES + CODE + QWEN3 + ["recipes"]
    assert sorted(p.stem for p in CONFIGS.glob("*.py")) == sorted(listed)
    assert "get_config" not in vars(recipes())  # the recipes' module is not a config file


def test_config_files_load_from_any_directory(tmp_path, monkeypatch):
    """ml_collections loads a config file by its path, so each one finds recipes.py by its own."""
    monkeypatch.chdir(tmp_path)
    assert load("toy_grpo", "smoke").loss.method == "ppo"
    assert load("qwen2_5_32b_kl_cov").loss.kl_cov_ratio == 2e-4


@pytest.mark.parametrize("name", TOY)
@pytest.mark.parametrize("arg", [None, "smoke", "hard", "hard,smoke"])
def test_toy_configs_validate(name, arg):
    c = load(name, arg)
    config_lib.validate(c)
    assert c.data.task == "toy" and c.model.path == ""
    assert c.data.toy.variant == ("hard" if arg and "hard" in arg else "easy")
    assert (c.train.steps < 10) == bool(arg and "smoke" in arg)


def test_toy_hyperparameters_follow_toy_results():
    """The settings docs/toy_results.md measured (easy; hard: smaller ratios)."""
    c = load("default")
    assert (c.loss.method, c.loss.clip_cov_ratio, c.loss.clip_cov_lb, c.loss.clip_cov_ub) == (
        "clip_cov", 0.2, 0.5, 5.0)
    assert c.data.toy.warm_start_steps == 2000
    hard_clip_cov = load("toy_clip_cov", "hard")
    assert (hard_clip_cov.loss.clip_cov_ratio, hard_clip_cov.loss.clip_cov_lb) == (5e-2, 1.0)
    assert hard_clip_cov.data.toy.warm_start_steps == 600
    assert (c.train.prompts_per_step, c.rollout.n, c.train.mini_batch_prompts) == (64, 8, 16)
    assert (c.optim.lr, c.optim.weight_decay, c.optim.grad_clip) == (5e-4, 0.01, 1.0)
    kl = load("toy_kl_cov")
    assert (kl.loss.method, kl.loss.kl_cov_ratio, kl.loss.kl_cov_coef) == ("kl_cov", 0.4, 2.0)
    hard = load("toy_kl_cov", "hard")
    assert (hard.loss.kl_cov_ratio, hard.loss.kl_cov_coef) == (0.1, 2.0)
    assert (load("toy_grpo").loss.method, load("toy_grpo").loss.clip_high) == ("ppo", 0.2)
    assert load("toy_clip_higher").loss.clip_high == 0.28


def _with_inputs(c, tmp_path):
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "train.parquet").write_bytes(b"")
    c.model.path = str(tmp_path / "model")
    c.data.train_files = str(tmp_path / "train.parquet")
    return c


@pytest.mark.parametrize("name", RECIPES + CODE + QWEN3)
def test_recipes_need_model_and_data(name, tmp_path):
    c = load(name)
    with pytest.raises(ValueError, match="config.model.path is empty"):
        config_lib.validate(c)
    c.model.path = str(tmp_path / "missing")
    with pytest.raises(config_lib.ConfigError, match="config.model.path="):
        config_lib.validate(c)
    (tmp_path / "model").mkdir()
    c.model.path = str(tmp_path / "model")
    with pytest.raises(ValueError, match="config.data.train_files is empty"):
        config_lib.validate(c)
    c.data.train_files = ","  # commas only name no file either
    with pytest.raises(ValueError, match=r"config.data.train_files is empty \(',' names no file"):
        config_lib.validate(c)
    config_lib.validate(_with_inputs(c, tmp_path))
    config_lib.validate(_with_inputs(load(name, "smoke"), tmp_path))


def test_the_qwen3_recipe_is_the_7b_clip_cov_recipe():
    assert load(QWEN3[0]) == load("qwen2_5_7b_clip_cov")
    assert load(QWEN3[0], "smoke") == load("qwen2_5_7b_clip_cov", "smoke")


def test_the_code_recipe_is_clip_cov_on_code():
    code, math = load(CODE[0]), load("qwen2_5_7b_clip_cov")
    assert code.data.task == "code"
    code.data.task = "math"
    assert code == math


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_follow_algorithms_md_section_7(name):
    c = load(name)
    size, method = name.split("_")[2], "_".join(name.split("_")[3:])
    assert (c.train.prompts_per_step, c.rollout.n, c.train.mini_batch_prompts) == (256, 8, 32)
    assert (c.rollout.temperature, c.rollout.top_p) == (1.0, 1.0)
    assert (c.data.max_prompt_length, c.rollout.max_new_tokens) == (2048, 8192)
    assert (c.loss.loss_agg_mode, c.loss.entropy_coef, c.loss.kl_coef) == ("token-mean", 0.0, 0.0)
    lr = {"7b": 5e-7, "32b": 1e-6}[size]  # the paper's scripts
    assert (c.optim.lr, c.optim.weight_decay, c.optim.grad_clip) == (lr, 0.0, 1.0)
    assert c.train.eval_interval == 4  # the paper validates every 4 rollout steps
    assert c.advantage.estimator == "grpo" and c.advantage.dynamic_sampling
    expected = {
        "grpo": ("ppo", 0.2, 0.2),
        "clip_higher": ("ppo", 0.2, 0.28),
        "clip_cov": ("clip_cov", 1.0, 1.0),
        "kl_cov": ("kl_cov", 0.2, 0.2),
    }[method]
    assert (c.loss.method, c.loss.clip_low, c.loss.clip_high) == expected
    if method == "clip_cov":
        assert (c.loss.clip_cov_ratio, c.loss.clip_cov_lb, c.loss.clip_cov_ub) == (2e-4, 1.0, 5.0)
    if method == "kl_cov":
        assert c.loss.kl_cov_ratio == {"7b": 2e-3, "32b": 2e-4}[size]
        assert c.loss.kl_cov_coef == 1.0


def _modified(path: str, value):
    """The default config as a plain (unlocked) ConfigDict with `path` set to `value`."""
    d = config_lib.base_config().to_dict()
    *parents, leaf = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[leaf] = value
    return ml_collections.ConfigDict(d)


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("loss.clip_cov_ratio", 2.0, "config.loss.clip_cov_ratio=2.0 is out of range (0, 1]"),
        ("loss.kl_cov_ratio", 0.0, "config.loss.kl_cov_ratio=0.0 is out of range (0, 1]"),
        ("loss.method", "grpo", "config.loss.method='grpo' is not one of"),
        ("loss.cov_scope", "global", "config.loss.cov_scope='global' is not one of"),
        ("rollout.temperature", 0.0, "config.rollout.temperature=0.0 is out of range (0, inf)"),
        ("train.steps", 0, "config.train.steps=0 is out of range [1, inf)"),
        ("mesh.fsdp", 0, "config.mesh.fsdp=0 is not >= 1 or -1"),
        ("train.steps", "abc", "config.train.steps='abc' has type str, expected int"),
        ("train.steps", 2.5, "config.train.steps=2.5 has type float, expected int"),
        ("advantage.dynamic_sampling", 1, "config.advantage.dynamic_sampling=1 has type int"),
        ("optim.lr", "1e-3", "config.optim.lr='1e-3' has type str, expected float"),
        ("train.micro_batch_size", 3, "config.train.micro_batch_size=3 does not divide"),
        ("train.mini_batch_prompts", 24, "config.train.prompts_per_step=64 is not a multiple"),
        ("loss.clip_cov_lb", 6.0, "config.loss.clip_cov_lb=6.0 must be below"),
        ("model.path", "/x", "config.model.path='/x' must be empty for the toy task"),
        ("model.remat", "block", "config.model.remat='block' is not one of"),
        ("rollout.n", 1, "config.rollout.n=1: the grpo estimator needs at least 2 responses"),
        ("loss.kl_estimator", "k4", "config.loss.kl_estimator='k4' is not one of"),
        # non-finite numbers, even where the range is [0, inf) or a relation would let them by
        ("loss.kl_cov_coef", math.inf, "config.loss.kl_cov_coef=inf is not a finite number"),
        ("rollout.temperature", math.inf, "config.rollout.temperature=inf is not a finite"),
        ("loss.entropy_coef", math.inf, "config.loss.entropy_coef=inf is not a finite number"),
        ("loss.clip_cov_lb", math.nan, "config.loss.clip_cov_lb=nan is not a finite number"),
        ("optim.lr", -math.inf, "config.optim.lr=-inf is not a finite number"),
        ("log.wandb", "me/proj", "config.log.wandb='me/proj' is not a W&B project name"),
        ("log.wandb", "p" * 129, "is not a W&B project name (at most 128 characters"),
    ],
)
def test_bad_values_name_the_key(path, value, message):
    with pytest.raises(ValueError) as error:
        config_lib.validate(_modified(path, value))
    assert message in str(error.value)


def test_unknown_and_missing_keys_are_named():
    c = config_lib.base_config()
    c.loss.clip_cov_ration = 0.1  # a typo creates a new key in an unlocked ConfigDict
    with pytest.raises(ValueError, match=r"config.loss.clip_cov_ration is not a known key"):
        config_lib.validate(c)
    d = config_lib.base_config().to_dict()
    del d["train"]["steps"]
    with pytest.raises(ValueError, match=r"config.train.steps is missing"):
        config_lib.validate(ml_collections.ConfigDict(d))


def test_locked_configs_reject_new_keys_at_once():
    c = load("default")
    with pytest.raises(AttributeError, match="clip_cov_ration"):
        c.loss.clip_cov_ration = 0.1


def test_config_argument_is_checked():
    with pytest.raises(ValueError, match=r"config argument 'smok'"):
        load("default", "smok")
    with pytest.raises(ValueError, match=r"recipe method='ppo2'"):
        recipes().toy_config("ppo2")
    with pytest.raises(ValueError, match=r"recipe size='70b'"):
        recipes().paper_recipe("70b", "grpo")
    with pytest.raises(ValueError, match=r"recipe method='dapo'"):
        recipes().paper_recipe("7b", "dapo")


def test_reinforce_pp_needs_groups_too():
    """A group of one response has advantage 0 under every estimator, reinforce_pp included."""
    c = _modified("rollout.n", 1)
    c.advantage.estimator = "reinforce_pp"
    with pytest.raises(ValueError, match="config.rollout.n=1: the reinforce_pp estimator"):
        config_lib.validate(c)


def test_every_model_remat_policy_is_accepted():
    for policy in ("none", "layer", "dots"):
        config_lib.validate(_modified("model.remat", policy))


def test_to_json_round_trips():
    c = load("toy_kl_cov", "smoke")
    assert json.loads(config_lib.to_json(c)) == c.to_dict()


def test_unknown_overrides_are_named_with_the_closest_key():
    argv = ["train.py", "--config=configs/toy_grpo.py:hard", "--config.loss.method", "kl_cov",
            "--config.mesh.fsdp=-1", "--noconfig.model.scan_layers", "--workdir=x",
            "--config.loss.methd=kl_cov", "--config.foo=1", "--", "--config.bar=2"]
    assert config_lib.unknown_override_keys(argv) == [
        "config.loss.methd (did you mean config.loss.method?)", "config.foo"]


def test_wandb_logging_without_the_package_says_how_to_install_it(monkeypatch):
    config_lib.validate(_modified("log.wandb", "covjax-runs"))  # installed here
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(_modified("log.wandb", "covjax-runs"))
    assert str(error.value) == (
        "config.log.wandb='covjax-runs' needs the wandb package: pip install wandb "
        "(or pip install 'covjax[wandb]')"
    )
    config_lib.validate(_modified("log.wandb", ""))  # off: no package needed
