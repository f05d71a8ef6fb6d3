"""python -m covjax.train end to end on the toy's smoke setting (4 steps): the metrics file, the
checkpoints, the Hugging Face exports (hf_step_2, hf_final), exact resume (4 steps == 2 + resume +
2) and the clear error of a bad config or a workdir the storage layer refuses (with nothing
written or compiled); and a paper recipe's smoke setting on a tiny random Qwen2 folder with local
math data (the real-model path: from_pretrained, covjax.data, math-verify rewards, covjax.eval,
bf16 compute, remat, scanned layers)."""

import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import transformers
from helpers import load_config, make_tokenizer, write_jsonl
from safetensors.numpy import load_file

from covjax import config as config_lib
from covjax import trainer

REPO = pathlib.Path(__file__).resolve().parent.parent
SMOKE = "--config=configs/default.py:smoke"
TRAIN_KEYS = [  # docs/metrics.md names logged on every step
    "reward/mean", "accuracy/mean", "entropy/token_mean", "entropy/seq_mean", "cov/mean",
    "cov/p99", "cov/selected_mean", "cov/frac_selected", "cov/num_selected", "ppo/clip_frac",
    "ppo/kl", "response_length/mean", "response_length/max", "response_length/frac_truncated",
    "filter/kept_group_frac", "optim/grad_norm", "optim/lr", "time/rollout", "time/rewards",
    "time/update", "throughput/tokens_per_s",
]
CHECK_KEYS = ["entropy_check/predicted_natural", "entropy_check/predicted_vanilla",
              "entropy_check/measured"]


def train(workdir, *flags, check=True, config=SMOKE):
    result = subprocess.run(
        [sys.executable, "-m", "covjax.train", config, f"--workdir={workdir}", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"train failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight") / "run"
    return workdir, train(workdir, "--config.train.export_interval=2")


def test_end_to_end_run_writes_metrics_checkpoints_and_model(straight):
    workdir, result = straight
    config = json.loads((workdir / "config.json").read_text())
    assert config["loss"]["method"] == "clip_cov" and config["train"]["steps"] == 4
    recs = records(workdir)
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]  # 4 steps, then the final evaluation
    for r in recs[:4]:
        assert set(TRAIN_KEYS) <= set(r), set(TRAIN_KEYS) - set(r)
        assert 0.0 <= r["reward/mean"] <= 1.0 and math.isfinite(r["reward/mean"])
        assert r["entropy/token_mean"] > 0 and math.isfinite(r["entropy/token_mean"])
        assert r["optim/lr"] == pytest.approx(5e-4)
        assert r["rollout/logprob_abs_diff"] < 1e-4  # sampler and trainer agree on log-probs
    for step in (0, 2):  # eval_interval = cov_dump_interval = entropy_check_interval = 2
        assert "val/toy/accuracy" in recs[step] and set(CHECK_KEYS) <= set(recs[step])
        cov = np.load(workdir / "cov" / f"step_{step:06d}.npy")
        # every response token of the step (throughput x time = its token count), not one
        # mini-batch's
        num_tokens = round(recs[step]["throughput/tokens_per_s"] * recs[step]["time/step"])
        assert cov.dtype == np.float32 and cov.ndim == 1 and cov.size == num_tokens > 4 * 8
    assert "val/toy/accuracy" in recs[4] and "entropy_check/measured" not in recs[1]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert any(p.name.startswith("events") for p in (workdir / "tensorboard").iterdir())
    assert (workdir / "hf_final" / "config.json").exists()
    assert (workdir / "hf_final" / "tokenizer.json").exists()
    # every 2 steps but the last, whose weights are hf_final's; bfloat16, train.export_dtype's
    # default
    assert sorted(p.name for p in workdir.glob("hf_*")) == ["hf_final", "hf_step_2"]
    assert (workdir / "hf_step_2" / "tokenizer.json").exists()
    assert json.loads((workdir / "hf_step_2" / "config.json").read_text())["torch_dtype"] == (
        "bfloat16"
    )
    exported = load_file(str(workdir / "hf_step_2" / "model.safetensors"))
    assert {w.dtype.name for w in exported.values()} == {"bfloat16"}
    assert "reward/mean" in result.stdout  # the summary table
    assert result.stdout.endswith(f"workdir: {workdir}\nmodel: {workdir / 'hf_final'}\n")
    assert not (workdir / "lock").exists()  # released at the end


def test_resume_is_exact_past_a_corrupt_checkpoint_and_a_torn_metrics_line(straight, tmp_path):
    workdir, _ = straight
    resumed = tmp_path / "resumed"
    train(resumed, "--config.train.steps=2", "--config.train.checkpoint_interval=1")
    assert sorted(os.listdir(resumed / "checkpoints")) == ["1", "2"]
    # the weights after 2 steps: the 4-step run exported the same ones as hf_step_2
    after_two = load_file(str(resumed / "hf_final" / "model.safetensors"))
    exported = load_file(str(workdir / "hf_step_2" / "model.safetensors"))
    assert after_two.keys() == exported.keys()
    for name in after_two:
        np.testing.assert_array_equal(after_two[name], exported[name])
    for path in (resumed / "checkpoints" / "2").rglob("*"):  # a crash cut its files short
        if path.is_file():
            path.write_bytes(b"")
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "rew')  # and the line being written (after 0, 1 and the final 2)
    result = train(resumed)
    assert f"{resumed / 'checkpoints'}/2 does not restore (" in result.stderr
    assert "resumed from" in result.stderr and "at step 1" in result.stderr
    assert f"{resumed / 'metrics.jsonl'}: its last line 4 is torn" in result.stderr
    assert sorted(os.listdir(resumed / "checkpoints")) == ["2", "2.unrestorable", "4"]
    a, b = records(workdir), records(resumed)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]

    def stable(r):
        return {k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))}

    for x, y in zip(a, b, strict=True):
        assert stable(x) == stable(y)
    wa = load_file(str(workdir / "hf_final" / "model.safetensors"))
    wb = load_file(str(resumed / "hf_final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name])


def test_sigterm_checkpoints_the_step_exits_143_and_the_same_command_resumes(tmp_path):
    workdir = tmp_path / "stopped"
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr_file:
        run = subprocess.Popen(
            [sys.executable, "-m", "covjax.train", SMOKE, f"--workdir={workdir}",
             "--config.train.steps=200",  # ~0.1 s a step: the signal comes long before the end
             "--config.train.export_interval=1"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr_file,
        )
    metrics, deadline = workdir / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()):  # the loop has begun
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    run.wait(timeout=300)
    stderr = log.read_text()
    assert run.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    done = len(records(workdir))
    assert f"stopped by a signal after {done} steps (checkpoint saved" in stderr
    assert 1 <= done < 200 and max(int(p) for p in os.listdir(workdir / "checkpoints")) == done
    # an export every step but the one the signal stopped: its checkpoint matters more
    assert sorted(p.name for p in workdir.glob("hf_*")) == sorted(
        f"hf_step_{k}" for k in range(1, done))
    train(workdir, f"--config.train.steps={done + 2}")  # the same command, two steps longer
    assert [r["step"] for r in records(workdir)] == list(range(done + 3))  # + final evaluation


def test_a_reused_workdir_refuses_another_experiment(straight, tmp_path):
    workdir, _ = straight
    reused = tmp_path / "reused"
    shutil.copytree(workdir, reused)
    kept = {name: (reused / name).read_bytes() for name in ("config.json", "metrics.jsonl")}
    # the finished run, by the same command: its final evaluation is made again
    result = train(reused, "--config.train.export_interval=2")
    assert "all 4 steps are done: the final evaluation and hf_final are made again" in (
        result.stderr
    )
    assert {name: (reused / name).read_bytes() for name in kept} == kept
    result = train(reused, "--config.loss.method=kl_cov", "--config.seed=3", check=False)
    assert result.returncode != 0
    assert "holds a checkpointed run of another config" in result.stderr
    assert "Traceback" not in result.stderr
    assert "config.loss.method: 'clip_cov' -> 'kl_cov'; config.seed: 0 -> 3" in result.stderr
    assert {name: (reused / name).read_bytes() for name in kept} == kept  # nothing rewritten


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.loss.clip_cov_ratio=2.0",
         "config.loss.clip_cov_ratio=2.0 is out of range (0, 1]"),
        ("--config.train.micro_batch_size=3", "config.train.micro_batch_size=3 does not divide"),
        ("--config.train.steps=abc", "train.steps"),
        ("--config.loss.clip_cov_ration=0.1", "FATAL Flags parsing error: "
         "config.loss.clip_cov_ration (did you mean config.loss.clip_cov_ratio?): not a known "
         "config key"),
        ("--config.foo=1", "FATAL Flags parsing error: config.foo: not a known config key"),
        ("--config=configs/nope.py", "FATAL bad input: --config=configs/nope.py: "),
        ("--config=configs/toy_grpo.py:smok", "config argument 'smok': ['smok'] not among"),
        ("--config.mesh.fsdp=16", "FATAL bad input: config.mesh: mesh data=1 x fsdp=16"),
        ("--workdir=", "FATAL Flags parsing error: --workdir='' is empty"),  # after the good one
    ],
)
def test_bad_config_stops_before_anything_is_written(tmp_path, flag, message):
    workdir = tmp_path / "bad"
    result = train(workdir, flag, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr  # one line, not a Python error
    assert not workdir.exists()  # no config.json, no checkpoint


def test_paper_recipe_smoke_on_a_tiny_local_model(tmp_path):
    words = [r"\boxed{1}", r"\boxed{2}", "Solve", "step", "x", "1", "2"]
    tok, _ = make_tokenizer(words)
    torch.manual_seed(0)
    hf_config = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, bos_token_id=None, pad_token_id=0,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )
    transformers.Qwen2ForCausalLM(hf_config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "tokenizer")  # apart: beside a qwen2 config it loads as Qwen2's
    rows = [{"problem": f"Solve {a} step x", "answer": str(a)} for a in (1, 2, 1, 2, 2, 1, 2, 1)]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    eval_file = write_jsonl(tmp_path / "math500.jsonl", rows[:3])
    workdir = tmp_path / "run"
    train(
        workdir,
        f"--config.model.path={tmp_path / 'model'}",
        f"--config.model.tokenizer_path={tmp_path / 'tokenizer'}",
        f"--config.data.train_files={train_file}",
        f"--config.data.eval_files=math500={eval_file}",
        "--config.data.max_prompt_length=32",
        "--config.rollout.max_new_tokens=8",
        "--config.advantage.dynamic_sampling=False",  # a random model rarely varies in a group
        "--config.train.eval_interval=1",
        config="--config=configs/qwen2_5_7b_clip_cov.py:smoke",
    )
    recs = records(workdir)
    assert [r["step"] for r in recs] == [0, 1, 2]
    for r in recs[:2]:
        assert set(TRAIN_KEYS) <= set(r) and "val/math500/accuracy" in r
        assert r["optim/num_updates"] == 2 and r["optim/lr"] == pytest.approx(5e-7)
        assert r["response_length/max"] <= 8 and math.isfinite(r["entropy/token_mean"])
    assert "val/math500/accuracy" in recs[2]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf_final")
    assert reloaded.config.num_hidden_layers == 2
    # bad data is named before anything is written or the weights are read
    no_answers = write_jsonl(tmp_path / "no_answers.jsonl", rows[:3] + [{"problem": "Solve x"}])
    result = train(
        tmp_path / "bad_data_run",
        f"--config.model.path={tmp_path / 'model'}",
        f"--config.model.tokenizer_path={tmp_path / 'tokenizer'}",
        f"--config.data.train_files={no_answers}",
        config="--config=configs/qwen2_5_7b_clip_cov.py:smoke",
        check=False,
    )
    assert result.returncode != 0
    assert "no_answers.jsonl" in result.stderr and "field 'answer' is missing" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bad_data_run").exists()  # nothing written
    gpt = tmp_path / "gpt_model"  # a model folder covjax cannot load, with good data
    shutil.copytree(tmp_path / "model", gpt)
    hf_config = json.loads((gpt / "config.json").read_text())
    (gpt / "config.json").write_text(json.dumps(dict(hf_config, architectures=["GPT2LMHeadModel"])))
    result = train(
        tmp_path / "bad_model_run",
        f"--config.model.path={gpt}",
        f"--config.model.tokenizer_path={tmp_path / 'tokenizer'}",
        f"--config.data.train_files={train_file}",
        config="--config=configs/qwen2_5_7b_clip_cov.py:smoke",
        check=False,
    )
    assert result.returncode != 0 and "architectures=['GPT2LMHeadModel'] is not supported" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bad_model_run").exists()


def test_limits_known_before_compiling_are_checked_before_anything_is_written(tmp_path):
    config = load_config("default", "smoke")
    with config.unlocked():
        config.rollout.max_new_tokens = 100  # past the toy model's 64 positions
    with pytest.raises(config_lib.ConfigError) as error:
        trainer.train(config, str(tmp_path / "run"))
    assert str(error.value) == (
        "config.data.max_prompt_length + config.rollout.max_new_tokens = 2 + 100 exceeds the "
        "model's max_position_embeddings=64"
    )
    assert not (tmp_path / "run").exists()


def test_a_workdir_the_storage_layer_refuses_stops_before_compiling(monkeypatch):
    from etils.epath import backend

    def refuse(self, path):  # as gcsfs without credentials
        raise PermissionError(f"Anonymous caller does not have storage.objects.list access to "
                              f"{path}.\nPermission denied.")

    monkeypatch.setattr(type(backend.fsspec_backend), "fs", refuse)
    monkeypatch.setattr(trainer, "build_model", lambda *args: pytest.fail("built and compiled"))
    config = load_config("default", "smoke")
    for workdir, message in [
        ("gs://bucket/run", "workdir gs://bucket/run: PermissionError: Anonymous caller does not "
         "have storage.objects.list access to gs://bucket/run."),
        ("foo://bucket/run", "workdir foo://bucket/run: etils.epath opens no foo:// paths"),
    ]:
        with pytest.raises(config_lib.ConfigError) as error:
            trainer.train(config, workdir)
        assert str(error.value) == message


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "diverged"
    result = train(
        workdir, "--config.optim.lr=1e10",  # one update per step: step 0 finite, step 1 not
        "--config.train.mini_batch_prompts=8", "--config.train.steps=3",
        "--config.train.checkpoint_interval=1", "--config.train.eval_interval=0",
        "--config.train.entropy_check_interval=0", "--config.train.cov_dump_interval=0",
        check=False,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    fatal = [line for line in result.stderr.splitlines() if line.startswith("FATAL")]
    assert fatal == [
        "FATAL run failed: step 1: non-finite optim/loss=nan or optim/grad_norm=nan (lower "
        "config.optim.lr or config.optim.grad_clip); the last checkpoint, 1, resumes"
    ]
    assert os.listdir(workdir / "checkpoints") == ["1"] and not (workdir / "hf_final").exists()
    losses = [r["optim/loss"] for r in records(workdir)]
    assert math.isfinite(losses[0]) and losses[1:] == [None]


def test_a_second_signal_quits_at_once(monkeypatch):
    exits = []

    def exit_now(status):
        exits.append(status)
        raise SystemExit(status)

    monkeypatch.setattr(trainer.os, "_exit", exit_now)
    with trainer.StopFlag() as stop:
        signal.raise_signal(signal.SIGINT)  # the first: checkpoint at the end of the step
        assert stop.set and not exits
        with pytest.raises(SystemExit):
            signal.raise_signal(signal.SIGINT)
    assert exits == [128 + signal.SIGINT]


def test_a_failed_run_ends_with_its_one_line_without_the_interpreter_shutdown():
    # a non-daemon thread stands for orbax's: a shutdown would wait for it (forever, here)
    script = ("import threading, time; from covjax import cli; "
              "threading.Thread(target=time.sleep, args=(600,)).start(); "
              "cli.fail('disk full\\nat /x', kind='run failed', at_once=True)")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stderr) == (1, "FATAL run failed: disk full at /x\n")


def test_a_metrics_write_that_fails_on_process_0_stops_every_process(tmp_path, monkeypatch):
    """A full disk under metrics.jsonl raises on process 0 alone: every process learns it in one
    agreement and stops with the same step named, none waiting in the next collective."""
    agreed = []

    class Writer:
        def write(self, step, metrics):
            raise OSError(28, "No space left on device", str(tmp_path / "metrics.jsonl"))

    class Manager:
        def all_steps(self):
            return [4]

    monkeypatch.setattr(trainer.checkpointing, "raise_save_errors", lambda *a, **k: None)
    monkeypatch.setattr(trainer.multihost, "any_process", lambda flag: agreed.append(flag) or flag)
    with pytest.raises(trainer.RunFailed) as error:
        trainer._write_step(Writer(), Manager(), 5, {})
    assert str(error.value) == (f"step 5: [Errno 28] No space left on device: "
                                f"'{tmp_path / 'metrics.jsonl'}'; the last checkpoint, 4, resumes")
    assert agreed == [True]
    monkeypatch.setattr(trainer.multihost, "any_process", lambda flag: True)  # not process 0
    with pytest.raises(trainer.RunFailed, match="step 5: another process failed to write"):
        trainer._write_step(type("Idle", (), {"write": lambda *a: None})(), Manager(), 5, {})


def test_a_metrics_writer_that_fails_on_process_0_stops_every_process(tmp_path, monkeypatch):
    config = load_config("default", "smoke")
    agreed = []

    def refuse(*args, **kwargs):  # W&B starts on process 0 only
        raise ValueError("config.log.wandb='p': W&B did not start: no API key")

    monkeypatch.setattr(trainer, "MetricsWriter", refuse)
    monkeypatch.setattr(trainer.multihost, "any_process", lambda flag: agreed.append(flag) or flag)
    with pytest.raises(trainer.RunFailed) as error:
        trainer._start_metrics(config, tmp_path, 0)
    assert str(error.value) == "config.log.wandb='p': W&B did not start: no API key"
    assert agreed == [True]  # every process learns it and stops at once
    monkeypatch.setattr(trainer, "MetricsWriter", lambda *args, **kwargs: None)  # not process 0
    monkeypatch.setattr(trainer.multihost, "any_process", lambda flag: True)
    with pytest.raises(trainer.RunFailed) as error:
        trainer._start_metrics(config, tmp_path, 0)
    assert str(error.value) == f"{tmp_path}: process 0 failed to start the metrics writer"
