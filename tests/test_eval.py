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
from helpers import (
    assert_one_fatal_line,
    chatml,
    cli_runner,
    make_tokenizer,
    tiny_hf_model,
    write_jsonl,
)

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
    taken = "--task='math', --compute_dtype='float32', --schema='auto'"
    assert f"(the trainer's evaluation): {taken}\n" in run["stdout"]  # the others were given


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


FATAL = "FATAL Flags parsing error: "


@pytest.fixture
def paths(files, tmp_path):
    """Good and bad paths for the flags: the tiny model, a folder without one, an empty set..."""
    model = files["workdir"] / "hf_step_3"
    broken = tmp_path / "broken"  # a workdir whose config.json is not JSON
    shutil.copytree(model, broken / "hf_final")
    (broken / "config.json").write_text("{not json")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "file").write_text("")
    toy = tmp_path / "toy"  # a toy run's workdir
    shutil.copytree(model, toy / "hf_final")
    (toy / "config.json").write_text(json.dumps({"data": {"task": "toy"}}))
    return dict(model=model, tokenizer=files["tokenizer"], math500=files["math500"],
                workdir=files["workdir"], broken=broken, toy=toy, tmp=tmp_path,
                absent=tmp_path / "absent", empty=tmp_path / "empty.jsonl", file=tmp_path / "file")


@pytest.fixture
def eval_cli(monkeypatch):
    """The command line in this process: the absl flags parsed as app.run parses them, then main;
    returns the message it exits with. Loading the model is an AssertionError: every check must
    come before it."""
    from absl import flags

    from covjax import eval as eval_cli

    def fail_if_loaded(*args, **kwargs):
        raise AssertionError("the model was loaded: the flags were not rejected")

    monkeypatch.setattr(eval_cli, "from_pretrained", fail_if_loaded)

    yield cli_runner(eval_cli.main, "eval")
    flags.FLAGS.unparse_flags()


GOOD = ["--model={model}", "--tokenizer={tokenizer}", "--data=math500={math500}"]
BAD_FLAGS = [  # (flags, what the line names); {model}, {absent}, ... from the paths fixture
    ([*GOOD, "--bogus=3"], ["--bogus=3: ", "'bogus'"]),
    (GOOD[1:], ["exactly one of --model", "--model=''"]),
    ([*GOOD, "--checkpoint={workdir}"], ["exactly one of --model", "--checkpoint='{workdir}'"]),
    (["--model={absent}", *GOOD[1:]], ["--model={absent}: ", "does not exist"]),
    (["--model={tmp}", *GOOD[1:]], ["--model={tmp}: ", "config.json"]),
    (["--checkpoint={absent}", *GOOD[1:]], ["--checkpoint={absent}: ", "not a directory"]),
    (["--checkpoint={tmp}", *GOOD[1:]], ["--checkpoint={tmp}: ", "no hf_final or hf_step_"]),
    (["--checkpoint=gs://bucket/run", *GOOD[1:]],
     ["--checkpoint=gs://bucket/run: gs://bucket/run is not a local folder: copy its export down "
      "first"]),
    (["--checkpoint={broken}", *GOOD[1:]], ["--checkpoint={broken}: ", "is not JSON"]),
    (["--checkpoint={toy}", *GOOD[1:]],
     ["--checkpoint={toy}: a toy run ({toy}/config.json: data.task='toy'); covjax.eval evaluates "
      "text (math) models"]),
    ([*GOOD[:2], "--data=math500={math500},oops"],
     ["--data=math500={math500},oops: ", "'oops' is not name=path"]),
    ([*GOOD[:2], "--data=aime24={absent}.parquet"], ["--data=aime24={absent}.parquet: no such"]),
    ([*GOOD[:2], "--data="], ["--data='': names no set"]),
    ([*GOOD[:2], "--data=math500={empty}"], ["--data=math500={empty}: ", "no rows"]),
    ([GOOD[0], "--tokenizer={absent}", GOOD[2]], ["--tokenizer={absent}: "]),
    ([*GOOD, "--output_dir={file}"], ["--output_dir={file}: exists and is not a directory"]),
    ([*GOOD, "--batch_size=0"], ["--batch_size=0: "]),
    ([*GOOD, "--samples_k=0"], ["--samples_k=0: "]),
    ([*GOOD, "--max_new_tokens=-5"], ["--max_new_tokens=-5: "]),
    ([*GOOD, "--max_prompt_length=lots"], ["--max_prompt_length=lots: "]),
    ([*GOOD, "--temperature=-0.5"], ["--temperature=-0.5: "]),
    ([*GOOD, "--top_p=1.5"], ["--top_p=1.5: must be in (0, 1]"]),
    ([*GOOD, "--timeout_s=0"], ["--timeout_s=0.0: must be a positive number"]),
    ([*GOOD, "--num_workers=0"], ["--num_workers=0: "]),
    ([*GOOD, "--task=code", "--num_workers=100"],
     ["--task=code --num_workers=100: config.data.code.workers must be in [1, 64]"]),
    ([*GOOD, "--compute_dtype=int8"], ["--compute_dtype=int8: ", "float32"]),
    ([*GOOD, "--schema=xml"], ["--schema=xml: ", "auto"]),
    ([*GOOD, "stray"], ["unexpected arguments ['stray']"]),
]


@pytest.mark.parametrize("args, expected", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_a_bad_flag_stops_with_one_line_before_the_model_loads(eval_cli, paths, args, expected):
    message = eval_cli(*(a.format(**paths) for a in args))
    assert_one_fatal_line(message, [text.format(**paths) for text in expected])


def test_the_process_prints_the_line_alone(paths):
    """What a user sees: status 1 and the one line on stderr, no traceback, nothing on stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "covjax.eval", f"--model={paths['absent']}",
         f"--data=math500={paths['math500']}", "--top_p=2"],
        cwd=paths["tmp"], env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
        timeout=300,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"{FATAL}--top_p=2.0: must be in (0, 1]\n"  # flags before paths
