"""covjax.evaluation without sampling: the per-set metrics against a direct count, which sets are
sampled, the table, a trainer workdir's checkpoint and settings, and argument checks that come
before anything is touched. The sampling itself: tests/test_eval.py, end to end."""

import json
import os

import numpy as np
import pytest
from helpers import recipes

from covjax import config as config_lib
from covjax import evaluation


def test_set_metrics_count_avg_and_pass_at_k():
    scores = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    lengths = np.arange(12).reshape(4, 3)
    stopped = np.array([[True, True, False]] * 4)
    assert evaluation.set_metrics(scores, lengths, stopped) == {
        "accuracy": pytest.approx(5 / 12),  # avg@3: every sample counts
        "pass_at_k": 0.75,  # prompts with at least one correct sample
        "mean_response_length": 5.5,
        "frac_truncated": pytest.approx(1 / 3),
        "num_prompts": 4,
        "k": 3,
    }


def test_sampled_sets_and_their_default_k():
    assert [evaluation.is_sampled_set(n) for n in ("AIME24", "amc23", "math500", "minerva")] == [
        True, True, False, False]
    assert evaluation.SAMPLES_K == 32  # the paper's avg@32 on AIME and AMC


def test_format_table():
    summary = {"sets": {
        "math500": {"temperature": 0.0, "num_prompts": 500, "k": 1, "accuracy": 0.5,
                    "pass_at_k": 0.5, "mean_response_length": 812.25},
        "aime24": {"temperature": 0.6, "num_prompts": 30, "k": 32, "accuracy": 0.125,
                   "pass_at_k": 0.4, "mean_response_length": 2048.0}},
        "average_accuracy": 0.3125}
    rows = [line.split() for line in evaluation.format_table(summary).splitlines()]
    assert rows == [["set", "decoding", "prompts", "k", "acc", "pass@k", "len"],
                    ["math500", "greedy", "500", "1", "0.5000", "0.5000", "812.2"],
                    ["aime24", "t=0.6", "30", "32", "0.1250", "0.4000", "2048.0"],
                    ["average", "0.3125"]]


def test_checkpoint_resolution(tmp_path, caplog):
    def export(name):  # config.json: written last by an export, the mark of a complete one
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text("{}")

    for name in ("hf_step_5", "hf_step_20", "hf_step_100x"):
        export(name)
    (tmp_path / "hf_step_99").write_text("")  # a file, not a model folder
    os.makedirs(tmp_path / "hf_step_30")  # an export cut short: no config.json
    (tmp_path / "hf_step_30" / "model.safetensors").write_text("")
    assert evaluation.resolve_checkpoint(str(tmp_path)) == str(tmp_path / "hf_step_20")
    assert f"{tmp_path / 'hf_step_30'} has no config.json (an export cut short)" in caplog.text
    os.makedirs(tmp_path / "hf_final")
    assert evaluation.resolve_checkpoint(str(tmp_path)) == str(tmp_path / "hf_step_20")
    (tmp_path / "hf_final" / "config.json").write_text("{}")
    assert evaluation.resolve_checkpoint(str(tmp_path)) == str(tmp_path / "hf_final")
    with pytest.raises(FileNotFoundError, match="empty_workdir is not a directory"):
        evaluation.resolve_checkpoint(str(tmp_path / "empty_workdir"))
    os.makedirs(tmp_path / "no_models" / "hf_final")
    with pytest.raises(FileNotFoundError) as error:
        evaluation.resolve_checkpoint(str(tmp_path / "no_models"))
    assert str(error.value) == (
        f"{tmp_path / 'no_models'}: no hf_final or hf_step_* folder with config.json in it"
    )
    with pytest.raises(ValueError) as error:  # from_pretrained memory-maps local files
        evaluation.resolve_checkpoint("gs://bucket/run/")
    assert str(error.value) == (
        "gs://bucket/run/ is not a local folder: copy its export down first (e.g. gcloud storage "
        "cp -r gs://bucket/run/hf_final .) and pass --model=hf_final"
    )


def test_training_eval_settings(tmp_path):
    assert evaluation.training_eval_settings(str(tmp_path)) == {}  # no config.json
    recipe = recipes().paper_recipe("7b", "kl_cov")
    recipe.data.prompt_suffix = "Box it."
    (tmp_path / "config.json").write_text(config_lib.to_json(recipe))
    assert evaluation.training_eval_settings(str(tmp_path)) == {
        "task": "math", "max_new_tokens": 8192, "compute_dtype": "bfloat16",
        "max_prompt_length": 2048, "schema": "auto", "instruction": "Box it."}
    (tmp_path / "config.json").write_text(config_lib.to_json(recipes().toy_config("grpo")))
    assert evaluation.training_eval_settings(str(tmp_path)) == {}  # the toy has no math sets
    (tmp_path / "config.json").write_text(json.dumps({"model": "elsewhere"}))
    assert evaluation.training_eval_settings(str(tmp_path)) == {}  # not a covjax config
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not JSON"):
        evaluation.training_eval_settings(str(tmp_path))


@pytest.mark.parametrize("name", ["batch_size", "samples_k"])
def test_evaluate_rejects_bad_sizes_before_sampling(name):
    """Checked first: no model, tokenizer or data is touched."""
    with pytest.raises(ValueError, match=f"{name} must be an int >= 1, got {name}=0"):
        evaluation.evaluate(None, None, {"math500": None}, **{name: 0})
    with pytest.raises(ValueError, match="datasets is empty"):
        evaluation.evaluate(None, None, {})
