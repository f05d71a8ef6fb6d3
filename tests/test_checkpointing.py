"""covjax.checkpointing: which config changes a resume allows, and how they are named."""

import json

import pytest
from helpers import load_config as load

from covjax import checkpointing
from covjax import config as config_lib


def test_resume_refuses_a_changed_experiment_and_names_every_change():
    saved = json.loads(config_lib.to_json(load("default")))
    checkpointing.check_resume(saved, load("default"), "run/config.json")  # the same config
    go_on = load("default")
    go_on.train.steps, go_on.mesh.fsdp, go_on.train.micro_batch_size = 600, 2, 64
    checkpointing.check_resume(saved, go_on, "run/config.json")  # run longer, on another mesh
    other = load("toy_kl_cov", "hard")
    other.seed, other.train.steps = 3, 600
    with pytest.raises(ValueError) as error:
        checkpointing.check_resume(saved, other, "run/config.json")
    message = str(error.value)
    assert message.startswith("run/config.json holds a checkpointed run of another config")
    for change in ("config.loss.method: 'clip_cov' -> 'kl_cov'", "config.seed: 0 -> 3",
                   "config.data.toy.variant: 'easy' -> 'hard'"):
        assert change in message
    assert "config.train.steps" not in message.split(": resume")[0]
    older = dict(saved, loss={k: v for k, v in saved["loss"].items() if k != "method"})
    kl_cov = load("default")
    kl_cov.loss.method = "kl_cov"
    checkpointing.check_resume(older, kl_cov, "run/config.json")  # a key it lacks is not compared


def test_resume_compares_local_paths_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "d.jsonl").write_text("")
    saved = load("qwen2_5_7b_grpo")
    saved.model.path, saved.data.train_files = str(tmp_path / "m"), str(tmp_path / "d.jsonl")
    saved.data.eval_files = f"math500={tmp_path / 'd.jsonl'}"
    same = load("qwen2_5_7b_grpo")
    same.model.path, same.data.train_files = "~/m", "~/d.jsonl"
    same.data.eval_files = "math500=~/./d.jsonl"
    checkpointing.check_resume(json.loads(config_lib.to_json(saved)), same, "run/config.json")
    same.data.eval_files = "aime=~/d.jsonl"
    with pytest.raises(ValueError, match="config.data.eval_files: 'math500="):
        checkpointing.check_resume(json.loads(config_lib.to_json(saved)), same, "run/config.json")


def test_every_key_a_resume_may_change_is_a_config_key():
    assert set(checkpointing.RESUME_MAY_CHANGE) <= set(config_lib.flat_schema())
