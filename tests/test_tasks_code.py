"""The code task: program extraction, both data layouts (Eurus-2-RL-Code's and KodCode's) with
their schema detection and malformed rows, scoring of known-correct, partly correct and wrong
programs in the sandbox, and one RL step end to end on a tiny random Qwen2 (sampling -> sandbox
-> reward -> advantages -> update, val/* metrics of both layouts).

The tiny model's word-level vocabulary holds whole programs as single tokens (programs without
a space), so a sampled response is a program whose score is known in advance."""

import copy
import dataclasses
import json
import math

import jax
import numpy as np
import pytest
from helpers import TINY_SHAPE, make_tokenizer, tiny_hf_model, write_jsonl

from covjax import config as config_lib
from covjax import data, trainer
from covjax.rewards import code, sandbox
from covjax.rewards.sandbox import Outcome
from covjax.sampler import Rollout, SamplingParams, decode_responses
from covjax.tasks import load_task
from covjax.tasks.code import CodeTask, make_sandbox

# program token -> its fraction passed on (stdin problem, call problem, KodCode problem)
PROGRAMS = {
    "print(int(input())*2)": (1.0, 0.0, 0.0),
    "print(0)": (0.5, 0.0, 0.0),  # right for input 0 only
    "add=lambda*a:sum(a)": (0.0, 1.0, 1.0),
    "add=lambda*a:3": (0.0, 0.5, 0.5),  # right for 1 + 2 only
    "import(": (0.0, 0.0, 0.0),  # a syntax error
}
STDIN_TRUTH = {"inputs": ["0\n", "3\n"], "outputs": ["0\n", "6\n"]}
CALL_TRUTH = {"inputs": [[1, 2], [5, 5]], "outputs": [3, [10]], "fn_name": "add"}
KODCODE_TEST = (
    "from solution import add\n\ndef test_three():\n    assert add(1, 2) == 3\n\n"
    "def test_four():\n    assert add(2, 2) == 4\n"
)


def _eurus_row(content, truth):
    return {
        "data_source": "codecontests",
        "prompt": [{"role": "user", "content": content}],
        "ability": "code",
        "reward_model": {"style": "rule", "ground_truth": json.dumps(truth)},
    }


KODCODE_ROW = {
    "question": "add two numbers",
    "test": KODCODE_TEST,
    "test_info": [
        {
            "function_name": "add",
            "parameter_list": "(a, b)",
            "function_declaration": "def add(a, b):",
            "docstring": None,
        }
    ],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("code")
    tok, _ = make_tokenizer(list(PROGRAMS) + "double add two numbers it".split())
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    model = tiny_hf_model(
        "qwen2",
        0,
        vocab_size=len(tok),
        **TINY_SHAPE | {"num_hidden_layers": 1},  # one layer: the update compiles faster
        eos_token_id=eos,
        max_position_embeddings=128,
        bos_token_id=None,
        pad_token_id=0,
    )
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "tokenizer")  # apart: beside a qwen2 config it loads as Qwen2's
    eurus = write_jsonl(
        root / "eurus.jsonl",
        [_eurus_row("double it", STDIN_TRUTH), _eurus_row("add two numbers", CALL_TRUTH)],
    )
    kodcode = root / "kodcode.parquet"
    import pandas as pd

    pd.DataFrame([KODCODE_ROW, {**KODCODE_ROW, "question": "add numbers"}]).to_parquet(kodcode)
    c = config_lib.base_config()
    c.data.task = "code"
    c.model.path, c.model.tokenizer_path = str(root / "model"), str(root / "tokenizer")
    c.data.train_files = f"{eurus},{kodcode}"
    c.data.eval_files = f"eurus={eurus},kodcode={kodcode}"
    c.data.max_prompt_length = 64
    c.data.code.test_s, c.data.code.program_s, c.data.code.workers = 1.0, 3.0, 2
    c.rollout.n, c.rollout.max_new_tokens = 4, 1  # one token: a program, or a word
    c.advantage.dynamic_sampling = False
    c.loss.method = "ppo"  # the task is under test, not the loss: the cheapest update to compile
    c.train.steps, c.train.prompts_per_step, c.train.mini_batch_prompts = 1, 2, 2
    c.train.micro_batch_size = 8
    c.train.eval_interval, c.train.checkpoint_interval = 0, 0
    c.train.cov_dump_interval = c.train.entropy_check_interval = 0
    return dict(root=root, tok=tok, config=c, eurus=eurus, kodcode=kodcode, task=load_task(c))


def test_ground_truths_parse_and_outputs_compare_by_tokens():
    spec = code.parse_ground_truth('{"inputs": [["1 2", "3"]], "outputs": [["3", "x"]]}')
    assert spec == {"inputs": ["1 2\n3\n"], "outputs": ["3\nx\n"]}  # lists of lines joined
    ok, wrong = Outcome("ok", " 3 \n x"), Outcome("ok", "3 y")
    assert code.fraction_passed([ok], spec) == 1.0 and code.fraction_passed([wrong], spec) == 0.0
    assert code.fraction_passed([Outcome("timeout", "3\nx\n")], spec) == 0.0
    call = '{"inputs": [[1], [2]], "outputs": [[[1, 2]], 5], "fn_name": "f"}'
    call = code.parse_ground_truth(call)
    # [1, 2] matches the expected value unwrapped from its one-element list; 5 needs no unwrap
    assert code.fraction_passed([Outcome("ok", "[1, 2]"), Outcome("ok", "5")], call) == 1.0
    assert code.fraction_passed([Outcome("ok", "[[1, 2]]"), Outcome("ok", "[5]")], call) == 0.5
    kod = code.parse_ground_truth('{"pytest": "def test_x(): pass"}')
    assert code.fraction_passed([Outcome("ok", "2 3")], kod) == pytest.approx(2 / 3)
    assert code.fraction_passed([Outcome("ok", "4 3")], kod) == 0.0  # forged counts
    assert code.fraction_passed([Outcome("timeout", "3 3")], kod) == 0.0


def test_program_extraction():
    fenced = "Plan.\n```python\nprint(1)\n```\nthen\n```py\nprint(2)\n```\n```text\nx\n```"
    assert code.extract_program(fenced) == "print(2)\n"  # the last Python block
    assert code.extract_program("```python\nprint(3)") == "print(3)"  # cut short: to the end
    assert code.extract_program("print(4)") == "print(4)"  # no fence: the whole response


def test_layouts_are_detected_and_rendered(setup):
    tok = setup["tok"]
    eurus = data.load_prompts(setup["eurus"], tok, task="code")
    kod = data.load_prompts(setup["kodcode"], tok, task="code", max_prompt_length=64)
    assert (eurus.schema, kod.schema) == ("prime_code", "kodcode")
    assert json.loads(eurus.examples["ground_truth"][1]) == CALL_TRUTH
    assert json.loads(kod.examples["ground_truth"][0]) == {"pytest": KODCODE_TEST}
    assert (
        "Note that the function declaration is `def add(a, b):`." in kod.examples["prompt_text"][0]
    )
    assert data.CODE_INSTRUCTION in kod.examples["prompt_text"][0]
    assert data.CODE_INSTRUCTION not in eurus.examples["prompt_text"][0]  # it holds its own
    assert data.load_prompts(setup["eurus"], tok).schema == "dapo"  # the math task's reading


@pytest.mark.parametrize(
    "truth, message",
    [
        ({"inputs": ["1"], "outputs": ["1", "2"]}, "has 1 inputs but 2 outputs"),
        ({"inputs": [1], "outputs": ["1"]}, "are not strings"),
        ({"inputs": ["1"], "outputs": ["1"], "fn_name": "a b"}, "is not a Python name"),
        ("not json", "is not JSON"),
    ],
)
def test_malformed_rows_are_named_with_their_row(setup, tmp_path, truth, message):
    rows = [_eurus_row("double it", STDIN_TRUTH)] * 2 + [
        {
            **_eurus_row("x", STDIN_TRUTH),
            "reward_model": {
                "ground_truth": truth if isinstance(truth, str) else json.dumps(truth)
            },
        }
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(
        ValueError, match=f"first at row 2: field 'reward_model.ground_truth' .*{message}"
    ):
        data.load_prompts(path, setup["tok"], task="code")
    kod = write_jsonl(tmp_path / "bad_kod.jsonl", [KODCODE_ROW, {**KODCODE_ROW, "test": ""}])
    with pytest.raises(ValueError, match="first at row 1: field 'test' is empty"):
        data.load_prompts(kod, setup["tok"], task="code")


def _rollout(tok, programs):
    """A rollout whose responses are `programs` (one token each, then the stop token)."""
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    tokens = np.asarray([[0, tok.convert_tokens_to_ids(p), eos] for p in programs], np.int32)
    n = len(programs)
    return Rollout(
        tokens=tokens,
        attention_mask=tokens > 0,
        positions=tokens * 0,
        response_mask=tokens > 0,
        logprobs=np.zeros(tokens.shape, np.float32),
        lengths=np.full(n, 2, np.int32),
        stopped=np.ones(n, bool),
        group_ids=np.arange(n, dtype=np.int32),
        prompt_length=1,
    )


def test_known_programs_score_as_expected(setup):
    task = setup["task"]
    truths = [task.eval_sets["eurus"].examples["ground_truth"][i] for i in (0, 1)]
    truths.append(task.eval_sets["kodcode"].examples["ground_truth"][0])
    programs = [p for p in PROGRAMS for _ in truths]
    layout = [j for _ in PROGRAMS for j in range(len(truths))]
    rollout = _rollout(setup["tok"], programs)
    rewards = task.score(rollout, [truths[j] for j in layout])
    expected = np.asarray([PROGRAMS[p][j] for p, j in zip(programs, layout, strict=True)])
    np.testing.assert_array_equal(rewards, (expected == 1.0).astype(np.float32))
    np.testing.assert_array_equal(task.score_metrics()["reward/code_pass_frac"], expected)
    assert task.eval_score(["```python\nadd=lambda*a:sum(a)\n```"], truths[1:2]) == [1.0]


def test_sandbox_errors_name_the_config_keys(setup, tmp_path, monkeypatch):
    """make_sandbox's, and the trainer's one line (a ConfigError) before anything is written."""
    c = config_lib.base_config().data.code
    c.workers = sandbox.MAX_WORKERS + 1
    with pytest.raises(ValueError, match=r"^config\.data\.code\.workers must be in \[1, 64\]"):
        make_sandbox(c)
    c.workers, c.isolation = 1, "bwrap"
    monkeypatch.setattr(sandbox, "_bwrap_works", lambda: "bwrap is not installed")
    with pytest.raises(ValueError, match=r"^config\.data\.code\.isolation='bwrap' is not avail"):
        make_sandbox(c)
    c.isolation, c.memory_mb = "rlimit", 1  # Python cannot start
    with pytest.raises(ValueError, match=r"^config\.data\.code: .*a known program fails"):
        make_sandbox(c)
    run = copy.deepcopy(setup["config"])
    run.data.code.isolation = "bwrap"
    with pytest.raises(config_lib.ConfigError, match=r"^config\.data\.code\.isolation='bwrap'"):
        trainer.train(run, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


class _KnownSampler:
    """A sampler whose every response is the program `program` (covjax.evaluation's view)."""

    model = None

    def __init__(self, tok, program):
        self.tok, self.program = tok, program

    def generate(self, prompts, params, *, rng):
        rollout = _rollout(self.tok, [self.program] * (len(prompts) * params.n))
        return dataclasses.replace(rollout, group_ids=np.arange(rollout.lengths.size) // params.n)


def test_validation_metrics_are_pass_at_1_of_known_programs(setup):
    task = setup["task"]
    params = SamplingParams(max_new_tokens=2, temperature=1.0, n=4)
    metrics = task.evaluate(
        _KnownSampler(setup["tok"], "add=lambda*a:sum(a)"), jax.random.key(0), params
    )
    # eurus: the stdin problem fails, the call-based one passes; kodcode: both rows pass
    assert metrics == {
        "val/eurus/accuracy": 0.5,
        "val/kodcode/accuracy": 1.0,
        "val/average_accuracy": 0.75,
    }


def test_one_rl_step_end_to_end(setup, tmp_path, monkeypatch):
    """The rewards the step trained on are those of the sampled programs (one token each)."""
    scored, task_score = [], CodeTask.score

    def score(task, rollout, truths):
        rewards = task_score(task, rollout, truths)
        scored.append(
            (
                decode_responses(rollout, task.tokenizer),
                [truths[g] for g in rollout.group_ids],
                rewards,
            )
        )
        return rewards

    monkeypatch.setattr(CodeTask, "score", score)
    config = setup["config"]
    records = trainer.train(config, str(tmp_path / "run"))
    ((responses, truths, rewards),) = scored
    column = {json.dumps(STDIN_TRUTH): 0, json.dumps(CALL_TRUTH): 1}
    expected = [
        PROGRAMS.get(r, (0.0, 0.0, 0.0))[column.get(t, 2)] == 1.0
        for r, t in zip(responses, truths, strict=True)
    ]
    np.testing.assert_array_equal(rewards, np.asarray(expected, np.float32))
    step = records[0]
    assert step["reward/mean"] == pytest.approx(np.mean(expected))
    assert 0.0 <= step["reward/mean"] <= step["reward/code_pass_frac"] <= 1.0
    for key in ("entropy/token_mean", "cov/mean", "ppo/clip_frac", "optim/grad_norm"):
        assert math.isfinite(step[key]), key
    assert step["optim/num_updates"] == 1
    # seed 0 samples the right program in one group: its rewards differ, so the advantages and
    # the gradient are not zero
    assert rewards.max() == 1.0 and step["optim/grad_norm"] > 0
