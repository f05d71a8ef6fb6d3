"""`python -m covjax.eval` in a subprocess: `--checkpoint=WORKDIR` end to end on a tiny random
Qwen2, and one line naming the flag for every bad flag value.

References: a direct count over the written responses.jsonl, a fresh scoring of every response,
and transformers' PyTorch greedy `generate` for the greedy set.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import chatml, make_tokenizer, tiny_hf_model, write_jsonl

from covjax import config as config_lib
from covjax.rewards.math import score_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSWERS = [r"\boxed{1}", r"\boxed{2}", r"\boxed{3}", r"\boxed{4}"]
WORDS = ANSWERS + "user assistant Solve step 1 2 3 4 x".split()
MAX_NEW_TOKENS, SAMPLES_K = 12, 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A trainer-like workdir with a tiny model, its tokenizer folder and two sets."""
    root = tmp_path_factory.mktemp("eval")
    tok, _ = make_tokenizer(WORDS)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    torch_model = tiny_hf_model(
        "qwen2",
        seed=0,
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=0,
    )
    workdir = root / "workdir"
    os.makedirs(workdir / "hf_step_1")  # older (and empty): must not be picked
    torch_model.save_pretrained(workdir / "hf_step_3")
    # transformers 5 loads a tokenizer saved beside a qwen2 config.json as its own
    # Qwen2Tokenizer (byte-level), not this word-level one: keep it in a folder of its own.
    tok.save_pretrained(root / "tokenizer")
    trained = config_lib.base_config()  # the trainer's config.json: its settings fill unset flags
    trained.data.task, trained.model.path = "math", "/models/tiny"
    trained.rollout.max_new_tokens, trained.data.max_prompt_length = 2, 16
    trained.data.prompt_suffix = "Think hard."
    (workdir / "config.json").write_text(config_lib.to_json(trained))

    math500 = write_jsonl(
        root / "math500.jsonl",
        [{"problem": f"Solve {a} step x", "answer": str(a)} for a in (1, 2, 3, 4, 2)],
    )
    aime = root / "aime24.parquet"
    pd.DataFrame({"problem": ["Solve x", "Solve 3 x", "step 4"], "answer": [2, 3, 4]}).to_parquet(
        aime
    )
    return dict(root=root, workdir=workdir, tokenizer=root / "tokenizer", math500=math500,
                aime=aime, tok=tok, eos=eos, torch_model=torch_model)


@pytest.fixture(scope="module")
def run(files):
    """One CLI evaluation of the workdir's model on both sets."""
    workdir, math500, aime = files["workdir"], files["math500"], files["aime"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "covjax.eval",
            f"--checkpoint={workdir}",
            f"--tokenizer={files['tokenizer']}",
            f"--data=math500={math500},aime24={aime}",
            "--instruction=",
            f"--max_new_tokens={MAX_NEW_TOKENS}",
            f"--samples_k={SAMPLES_K}",
            "--batch_size=8",
            "--num_workers=1",
            "--max_prompt_length=32",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = workdir / "eval" / "hf_step_3"
    summary = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    return dict(
        stdout=result.stdout,
        summary=summary,
        records=records,
        torch_model=files["torch_model"],
        tok=files["tok"],
        eos=files["eos"],
    )


def test_flags_left_unset_take_the_trainers_settings(run):
    assert "(the trainer's evaluation): --compute_dtype='float32', --schema='auto'\n" in (
        run["stdout"]  # the others were given, so they win
    )


def test_records_and_scores(run):
    records = run["records"]
    assert [(r["set"], r["index"], r["sample"]) for r in records] == [
        ("math500", i, 0) for i in range(5)
    ] + [("aime24", i, j) for i in range(3) for j in range(SAMPLES_K)]
    assert records[0]["prompt"] == chatml([{"role": "user", "content": "Solve 1 step x"}])
    assert all(0 < r["response_length"] <= MAX_NEW_TOKENS for r in records)
    fresh = score_batch([r["response"] for r in records], [r["ground_truth"] for r in records])
    assert fresh == [r["score"] for r in records]
    assert 0 < sum(fresh) < len(fresh)  # the random model answers some, not all: a real check


def test_table_matches_direct_count(run):
    records, summary = run["records"], run["summary"]
    table = {line.split()[0]: line.split() for line in run["stdout"].splitlines() if line}
    for name, k, temperature in (("math500", 1, 0.0), ("aime24", SAMPLES_K, 0.6)):
        rows = [r for r in records if r["set"] == name]
        scores = np.array([r["score"] for r in rows]).reshape(-1, k)
        expected = {
            "accuracy": scores.mean(),
            "pass_at_k": (scores == 1).any(axis=1).mean(),
            "mean_response_length": np.mean([r["response_length"] for r in rows]),
            "frac_truncated": np.mean([not r["stopped"] for r in rows]),
            "num_prompts": scores.shape[0],
            "k": k,
            "temperature": temperature,
        }
        got = summary["sets"][name]
        assert {key: got[key] for key in expected} == pytest.approx(expected)
        decoding, prompts, k_col, acc, pass_k, length = table[name][1:]
        assert decoding == ("greedy" if k == 1 else "t=0.6")
        assert (int(prompts), int(k_col)) == (expected["num_prompts"], k)
        assert float(acc) == pytest.approx(expected["accuracy"], abs=5e-5)
        assert float(pass_k) == pytest.approx(expected["pass_at_k"], abs=5e-5)
        assert float(length) == pytest.approx(expected["mean_response_length"], abs=0.05)
    mean = np.mean([summary["sets"][n]["accuracy"] for n in ("math500", "aime24")])
    assert summary["average_accuracy"] == pytest.approx(mean)
    assert float(table["average"][1]) == pytest.approx(mean, abs=5e-5)


def test_greedy_responses_match_transformers(run):
    tok, eos, torch_model = run["tok"], run["eos"], run["torch_model"]
    for r in [r for r in run["records"] if r["set"] == "math500"]:
        ids = torch.tensor([tok(r["prompt"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = torch_model.generate(
                ids,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=0,
            )
        new = out[0, ids.shape[1] :].tolist()
        assert r["response_length"] == len(new)
        assert r["response"] == tok.decode(new, skip_special_tokens=True)


def test_every_bad_flag_stops_with_one_line_before_the_model_loads(files, tmp_path):
    """Each case in its own process, all started at once (each costs an interpreter start). Every
    check comes before from_pretrained, and nothing is written."""
    workdir, model, tokenizer = files["workdir"], files["workdir"] / "hf_step_3", files["tokenizer"]
    good = [f"--model={model}", f"--tokenizer={tokenizer}", f"--data=math500={files['math500']}"]
    empty, a_file, broken = tmp_path / "empty.jsonl", tmp_path / "file", tmp_path / "broken"
    empty.write_text("")
    a_file.write_text("")
    shutil.copytree(model, broken / "hf_final")
    (broken / "config.json").write_text("{not json")
    absent = tmp_path / "absent"
    cases = [  # (flags, what the line names)
        ([*good, "--bogus=3"], ["--bogus=3: ", "'bogus'"]),
        ([f"--data=math500={files['math500']}"], ["exactly one of --model", "--model=''"]),
        ([*good, f"--checkpoint={workdir}"],
         ["exactly one of --model", f"--checkpoint='{workdir}'"]),
        ([f"--model={absent}", *good[1:]], [f"--model={absent}: ", "does not exist"]),
        ([f"--model={tmp_path}", *good[1:]], [f"--model={tmp_path}: ", "config.json"]),
        ([f"--checkpoint={absent}", *good[1:]], [f"--checkpoint={absent}: ", "not a directory"]),
        ([f"--checkpoint={tmp_path}", *good[1:]],
         [f"--checkpoint={tmp_path}: ", "no hf_final or hf_step_"]),
        ([f"--checkpoint={broken}", *good[1:]],
         [f"--checkpoint={broken}: ", "config.json is not JSON"]),
        ([*good[:2], f"--data=math500={files['math500']},oops"],
         [f"--data=math500={files['math500']},oops: ", "'oops' is not name=path"]),
        ([*good[:2], f"--data=aime24={absent}.parquet"],
         [f"--data=aime24={absent}.parquet: no such file"]),
        ([*good[:2], "--data="], ["--data='': names no set"]),
        ([*good[:2], f"--data=math500={empty}"], [f"--data=math500={empty}: ", "no rows"]),
        ([good[0], f"--tokenizer={absent}", good[2]], [f"--tokenizer={absent}: "]),
        ([*good, f"--output_dir={a_file}"], [f"--output_dir={a_file}: exists and is not a dir"]),
        ([*good, "--batch_size=0"], ["--batch_size=0: "]),
        ([*good, "--samples_k=0"], ["--samples_k=0: "]),
        ([*good, "--max_new_tokens=-5"], ["--max_new_tokens=-5: "]),
        ([*good, "--max_prompt_length=lots"], ["--max_prompt_length=lots: "]),
        ([*good, "--temperature=-0.5"], ["--temperature=-0.5: "]),
        ([*good, "--top_p=1.5"], ["--top_p=1.5: must be in (0, 1]"]),
        ([*good, "--timeout_s=0"], ["--timeout_s=0.0: must be a positive number"]),
        ([*good, "--num_workers=0"], ["--num_workers=0: "]),
        ([*good, "--compute_dtype=int8"], ["--compute_dtype=int8: ", "float32"]),
        ([*good, "--schema=xml"], ["--schema=xml: ", "auto"]),
        ([*good, "stray"], ["unexpected arguments ['stray']"]),
    ]
    env = {**os.environ, "PYTHONPATH": REPO}
    processes = [subprocess.Popen([sys.executable, "-m", "covjax.eval", *args], cwd=tmp_path,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for args, _ in cases]
    for process, (args, expected) in zip(processes, cases, strict=True):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode != 0, args
        assert len(stderr.splitlines()) == 1, (args, stderr)
        assert stderr.startswith("FATAL Flags parsing error: "), (args, stderr)
        for text in expected:
            assert text in stderr, (args, text, stderr)
    assert not os.path.exists(tmp_path / "eval")  # the default output folder of --model
