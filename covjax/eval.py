"""Entry point: evaluation of a model on local math or code sets (covjax.evaluation), printed as
a table.

    python -m covjax.eval --model=HF_DIR --data=math500=math500.jsonl,aime24=aime24.parquet
    python -m covjax.eval --checkpoint=WORKDIR --data=...
    python -m covjax.eval --task=code --model=HF_DIR --data=kodcode=kodcode_test.parquet

--task=code scores by running each response's program on its tests in the sandbox
(covjax.rewards.sandbox, --num_workers programs at once, the default limits of config.data.code):
accuracy is pass@1 for greedy sets, avg@k for sampled ones.

Greedy decoding, except for sets named like AIME or AMC: --samples_k responses per prompt (32,
the paper's avg@32) at --temperature 0.6, reported as avg@k and pass@k. Prints a table, writes
OUTPUT_DIR/results.json and OUTPUT_DIR/responses.jsonl (every response with its score).

--checkpoint=WORKDIR (a math run's; a toy run is refused) reads the Hugging Face folder the
trainer saves: WORKDIR/hf_final, else the WORKDIR/hf_step_<step> with the largest step; it must
hold the tokenizer files too. The flags
it does not set take the trainer's evaluation settings from WORKDIR/config.json (response budget,
compute dtype, prompt limit, instruction, schema, task), so the numbers match its val/* metrics.

A bad flag value (a missing folder or file, a malformed --data entry, a number out of range, an
unknown flag) stops it with one line naming the flag and the value, before the model is loaded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from covjax import cli, evaluation
from covjax.data import SCHEMA_ALIASES, TASK_SCHEMAS, load_prompts, split_named_files
from covjax.model import check_pretrained, from_pretrained, load_tokenizer, stop_ids
from covjax.model.config import DTYPES
from covjax.rewards.math import DEFAULT_TIMEOUT_S

_MODEL = flags.DEFINE_string("model", "", "Local Hugging Face model folder.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "Trainer workdir: evaluates its hf_final or latest hf_step_<step> folder.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer folder (default: the model folder).")
_DATA = flags.DEFINE_string("data", "", "Comma-separated name=path of local parquet/jsonl sets.")
_SCHEMA = flags.DEFINE_enum("schema", "auto", ["auto", *SCHEMA_ALIASES],
                            "Row schema of the data files (covjax/data.py).")
_TASK = flags.DEFINE_enum("task", "math", list(TASK_SCHEMAS), "What the sets hold.")
_INSTRUCTION = flags.DEFINE_string("instruction", None,
                                   "Suffix of each question (default: the task's, covjax/data.py).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "",
                                  "Default: WORKDIR/eval/<folder> or ./eval/<folder>.")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", DTYPES,
                                   "Sampling compute dtype (bfloat16 on GPU).")
_MAX_PROMPT_LENGTH = flags.DEFINE_integer("max_prompt_length", 2048,
                                          "Longer prompts are dropped (counted).", lower_bound=1)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 3072, "Response token budget.",
                                       lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Responses per generate call.",
                                   lower_bound=1)
_SAMPLES_K = flags.DEFINE_integer("samples_k", evaluation.SAMPLES_K,
                                  "Samples per prompt for AIME/AMC-like sets (avg@k).",
                                  lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", evaluation.SAMPLED_TEMPERATURE,
                                  "Temperature of AIME/AMC-like sets (0: greedy).",
                                  lower_bound=0.0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling of AIME/AMC-like sets.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", None,
                                    "math-verify worker processes, or programs run at once.",
                                    lower_bound=1)
_TIMEOUT_S = flags.DEFINE_float("timeout_s", DEFAULT_TIMEOUT_S,
                                "Time limit of one answer check (s).")
flags.register_validator("top_p", lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")
flags.register_validator("timeout_s", lambda v: 0.0 < v < math.inf, "must be a positive number")


def parse_data_flag(spec: str) -> dict[str, str]:
    """ "math500=a.jsonl,aime24=b.parquet" -> {"math500": "a.jsonl", "aime24": "b.parquet"};
    every file must exist."""
    try:
        sets = split_named_files(spec, source="--data")
    except ValueError as e:
        cli.fail(f"--data={spec}: {e}")
    if not sets:
        cli.fail(f"--data={spec!r}: names no set; expected name=path,name=path")
    for name, path in sets.items():
        if not os.path.isfile(path):
            cli.fail(f"--data={name}={path}: no such file")
    return sets


def _model_dir() -> str:
    """The model folder of --model or --checkpoint, its config.json and weights' headers read."""
    if bool(_MODEL.value) == bool(_CHECKPOINT.value):
        cli.fail("give exactly one of --model=HF_DIR or --checkpoint=WORKDIR, got "
              f"--model={_MODEL.value!r} --checkpoint={_CHECKPOINT.value!r}")
    flag = f"--model={_MODEL.value}" if _MODEL.value else f"--checkpoint={_CHECKPOINT.value}"
    try:
        model_dir = _MODEL.value or evaluation.resolve_checkpoint(_CHECKPOINT.value)
        check_pretrained(model_dir)
    except (OSError, ValueError) as e:
        cli.fail(f"{flag}: {e}")
    return model_dir


def _refuse_toy_run(workdir: str) -> None:
    """Stops on a toy run's workdir: its model answers digit sums, not the text sets scored here."""
    path = os.path.join(workdir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            task = json.load(f)["data"]["task"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not a trainer's config.json: the checks that follow name what is wrong
    if task == "toy":
        cli.fail(f"--checkpoint={workdir}: a toy run ({path}: data.task='toy'); covjax.eval "
                 "evaluates text (math) models, the toy's accuracy is val/toy/accuracy in its "
                 "metrics.jsonl")


def _take_training_settings(workdir: str) -> dict[str, Any]:
    """Sets the flags left at their default from the run's config.json; returns those taken."""
    try:
        settings = evaluation.training_eval_settings(workdir)
    except ValueError as e:
        cli.fail(f"--checkpoint={workdir}: {e}")
    taken = {k: v for k, v in settings.items() if flags.FLAGS[k].using_default_value}
    for name, value in taken.items():
        try:
            setattr(flags.FLAGS, name, value)  # absl checks the value as it would a given flag's
        except flags.Error as e:
            cli.fail(f"--checkpoint={workdir}: its config.json gives --{name}={value!r}: {e}")
    return taken


def main(argv: Sequence[str]) -> None:
    """The command line: check the flags, load the sets and the model, evaluate, print."""
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {list(argv[1:])} (every setting is a --flag=value)")
    if _CHECKPOINT.value:
        _refuse_toy_run(_CHECKPOINT.value)
    data_files = parse_data_flag(_DATA.value)
    model_dir = _model_dir()
    if _CHECKPOINT.value and (taken := _take_training_settings(_CHECKPOINT.value)):
        print(f"from {os.path.join(_CHECKPOINT.value, 'config.json')} (the trainer's evaluation): "
              + ", ".join(f"--{k}={v!r}" for k, v in taken.items()))
    output_dir = _OUTPUT_DIR.value or (
        os.path.join(_CHECKPOINT.value, "eval", os.path.basename(model_dir))
        if _CHECKPOINT.value
        else os.path.join("eval", os.path.basename(os.path.normpath(model_dir)))
    )
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        cli.fail(f"--output_dir={output_dir}: exists and is not a directory")
    tokenizer_dir = _TOKENIZER.value or model_dir
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except (OSError, ValueError) as e:
        cli.fail(f"--tokenizer={tokenizer_dir}: {e}")
    score_fn = None
    if _TASK.value == "code":  # before the data: the sandbox's start-up self-test is quick
        from covjax import config as config_lib
        from covjax.tasks.code import eval_scorer, make_sandbox

        code_config = config_lib.base_config().data.code
        code_config.workers = _NUM_WORKERS.value or 0
        try:
            score_fn = eval_scorer(make_sandbox(code_config))
        except ValueError as e:
            cli.fail(f"--task=code --num_workers={_NUM_WORKERS.value}: {e}")
    datasets = {}
    for name, path in data_files.items():
        try:
            datasets[name] = load_prompts(path, tokenizer, schema=_SCHEMA.value,
                                          max_prompt_length=_MAX_PROMPT_LENGTH.value,
                                          instruction=_INSTRUCTION.value, task=_TASK.value)
        except (OSError, ValueError) as e:
            cli.fail(f"--data={name}={path}: {e}")

    model = from_pretrained(model_dir, compute_dtype=_COMPUTE_DTYPE.value)
    summary = evaluation.evaluate(
        model,
        tokenizer,
        datasets,
        max_new_tokens=_MAX_NEW_TOKENS.value,
        batch_size=_BATCH_SIZE.value,
        samples_k=_SAMPLES_K.value,
        temperature=_TEMPERATURE.value,
        top_p=_TOP_P.value,
        stop_token_ids=stop_ids(model_dir, tokenizer),
        seed=_SEED.value,
        num_workers=_NUM_WORKERS.value,
        timeout_s=_TIMEOUT_S.value,
        output_dir=output_dir,
        score_fn=score_fn,
    )
    print(f"model {model_dir}")
    print(evaluation.format_table(summary))
    print(f"wrote {output_dir}/results.json and responses.jsonl")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
