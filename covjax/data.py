"""Prompt datasets from local parquet / jsonl files, and a resumable, seeded batch order.

`load_prompts` reads one local file with `datasets` (never a hub), adapts its row schema, renders
each prompt with the tokenizer's chat template and tokenises it. Schemas (detected from the columns
when `schema` is "auto" or None, else named):

- ``dapo`` (DAPO-Math-17k): ``prompt`` is a list of chat messages that already holds the
  instruction; the answer is ``reward_model.ground_truth``.
- ``problem`` (MATH500, AIME, AMC, Minerva, OlympiadBench; these names are aliases): ``problem``
  or ``question`` plus ``answer``; the instruction suffix is appended to the user message.
- ``generic``: ``prompt`` (a string) plus ``answer``; the instruction suffix is appended.

The code task (``task="code"``) reads two layouts; its ground truths are the JSON test specs of
covjax.rewards.code, checked here:

- ``prime_code`` (verl/PRIME, Eurus-2-RL-Code): ``prompt`` chat messages that hold the
  instruction, ``reward_model.ground_truth`` a JSON string of ``inputs``/``outputs`` (and
  ``fn_name`` for call-based problems);
- ``kodcode`` (KodCode): ``question``, ``test`` (pytest source importing ``solution``) and
  ``test_info`` (its ``function_declaration``s are named in the prompt); the instruction suffix
  is appended.

Malformed rows (a missing field, an empty answer, a wrong type) are skipped, counted and reported
with the first one's row number; prompts longer than `max_prompt_length` tokens are dropped and
counted. `PromptLoader` yields batches in a per-epoch permutation drawn from a seed; its
`state()` (epoch, position) goes into the trainer's checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np

from covjax.rewards.code import parse_ground_truth

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = "Write a Python solution and put the code in a single ```python code block."
DEFAULT_INSTRUCTIONS = {"math": DEFAULT_INSTRUCTION, "code": CODE_INSTRUCTION}
TASK_SCHEMAS = {"math": ("dapo", "problem", "generic"), "code": ("prime_code", "kodcode")}
SCHEMA_ALIASES = {
    "dapo": "dapo",
    "problem": "problem",
    "math500": "problem",
    "aime": "problem",
    "amc": "problem",
    "minerva": "problem",
    "olympiad": "problem",
    "generic": "generic",
    "prime_code": "prime_code",
    "eurus_code": "prime_code",
    "kodcode": "kodcode",
}
_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
_FEATURES = datasets.Features(
    {
        "index": datasets.Value("int64"),
        "prompt_text": datasets.Value("string"),
        "ground_truth": datasets.Value("string"),
        "prompt_ids": datasets.Sequence(datasets.Value("int32")),
        "num_tokens": datasets.Value("int32"),
        "error": datasets.Value("string"),
    }
)


def split_files(spec: str) -> list[str]:
    """ "a.parquet,b.jsonl" -> ["a.parquet", "b.jsonl"]."""
    return [s.strip() for s in spec.split(",") if s.strip()]


def split_named_files(spec: str, *, source: str = "config.data.eval_files") -> dict[str, str]:
    """ "math500=a.parquet,aime=b.jsonl" -> {"math500": "a.parquet", "aime": "b.jsonl"}; a bad
    entry raises ValueError naming `source` (the key or flag it came from)."""
    out = {}
    for item in split_files(spec):
        name, sep, path = (part.strip() for part in item.partition("="))
        if not sep or not name or not path:
            raise ValueError(f"{source} entry {item!r} is not name=path")
        out[name] = path
    return out


def _check_utf8(path: str) -> None:
    """Raises ValueError naming the file and the line if a JSON file's text is not UTF-8 (JSON's
    encoding), which `datasets` would report without either."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"data file {path}: line {number} is not UTF-8 text ({e.reason} at byte "
                    f"{e.start} of the line)"
                ) from e


class _Malformed(ValueError):
    """A row that cannot be used; the message names the field."""


def detect_schema(columns: list[str], task: str = "math") -> str | None:
    """The schema of `task` a file's columns fit, or None."""
    if task == "code":
        if {"prompt", "reward_model"} <= set(columns):
            return "prime_code"
        return "kodcode" if {"question", "test"} <= set(columns) else None
    if {"prompt", "reward_model"} <= set(columns):
        return "dapo"
    if "answer" in columns and ("problem" in columns or "question" in columns):
        return "problem"
    if {"prompt", "answer"} <= set(columns):
        return "generic"
    return None


def _text(value: Any, field: str) -> str:
    """A non-empty string field."""
    if value is None:
        raise _Malformed(f"field {field!r} is missing")
    if not isinstance(value, str):
        raise _Malformed(f"field {field!r} has type {type(value).__name__}")
    if not value.strip():
        raise _Malformed(f"field {field!r} is empty")
    return value


def _answer(value: Any, field: str) -> str:
    """A ground truth as a non-empty string; numbers (AMC stores floats) are written out."""
    if isinstance(value, float):
        if not math.isfinite(value):  # a NaN is how pandas writes a missing number
            raise _Malformed(f"field {field!r} is missing ({value})")
        value = int(value) if value.is_integer() else value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return _text(value, field).strip()


def _user_turn(text: str, instruction: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{text}\n{instruction}" if instruction else text}]


def _code_tests(spec: str, field: str) -> str:
    """A code ground truth (covjax.rewards.code's JSON test spec), checked."""
    try:
        parse_ground_truth(_text(spec, field))
    except ValueError as e:
        raise _Malformed(f"field {field!r} {e}") from e
    return spec


def _kodcode(row: dict[str, Any], instruction: str) -> tuple[list[dict], str]:
    """KodCode's question, its function declarations named, and its pytest source."""
    question = _text(row.get("question"), "question")
    info = row.get("test_info") or []
    if not isinstance(info, list) or not all(isinstance(i, dict) for i in info):
        raise _Malformed("field 'test_info' is not a list of mappings")
    declarations = [
        i["function_declaration"].strip()
        for i in info
        if isinstance(i.get("function_declaration"), str)
    ]
    if declarations:
        question += (
            "\n\nNote that the function declaration is "
            + "; ".join(f"`{d}`" for d in declarations)
            + "."
        )
    tests = _code_tests(json.dumps({"pytest": _text(row.get("test"), "test")}), "test")
    return _user_turn(question, instruction), tests


def _adapt(row: dict[str, Any], schema: str, instruction: str) -> tuple[list[dict], str]:
    """(chat messages, ground truth) of one row; raises _Malformed naming the bad field."""
    if schema == "kodcode":
        return _kodcode(row, instruction)
    if schema in ("dapo", "prime_code"):
        messages = row.get("prompt")
        if not isinstance(messages, list) or not messages:
            raise _Malformed("field 'prompt' is not a non-empty list of chat messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _Malformed("field 'prompt' holds a message without a 'role'")
            _text(m.get("content"), "prompt.content")
        reward_model = row.get("reward_model")
        if not isinstance(reward_model, dict):
            raise _Malformed("field 'reward_model' is missing or not a mapping")
        field = "reward_model.ground_truth"
        truth = reward_model.get("ground_truth")
        answer = _code_tests(truth, field) if schema == "prime_code" else _answer(truth, field)
        return [{"role": m["role"], "content": m["content"]} for m in messages], answer
    if schema == "problem":
        field = "question" if row.get("problem") is None and "question" in row else "problem"
        return _user_turn(_text(row.get(field), field), instruction), _answer(
            row.get("answer"), "answer"
        )
    return _user_turn(_text(row.get("prompt"), "prompt"), instruction), _answer(
        row.get("answer"), "answer"
    )


def _render_batch(batch, indices, *, tokenizer, schema, instruction):
    """datasets.map function: adapt, render with the chat template, tokenise."""
    keys = list(batch)
    out = {name: [] for name in _FEATURES}
    for index, values in zip(indices, zip(*batch.values(), strict=True), strict=True):
        try:
            messages, answer = _adapt(dict(zip(keys, values, strict=True)), schema, instruction)
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            error = ""
        except _Malformed as e:
            text, answer, error = "", "", str(e)
        out["index"].append(index)
        out["prompt_text"].append(text)
        out["ground_truth"].append(answer)
        out["error"].append(error)
    out["prompt_ids"] = tokenizer(out["prompt_text"], add_special_tokens=False)["input_ids"]
    out["num_tokens"] = [len(ids) for ids in out["prompt_ids"]]
    return out


@dataclasses.dataclass(frozen=True)
class PromptDataset:
    """Usable prompts of one file and what was skipped.

    `examples` columns: prompt_ids (int32 token ids), prompt_text, ground_truth, index (the row
    number in the file, 0-based).
    """

    path: str
    schema: str
    examples: datasets.Dataset
    num_rows: int
    num_malformed: int
    first_malformed: str | None
    num_too_long: int

    def __len__(self) -> int:
        return len(self.examples)


def load_prompts(
    path: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    *,
    schema: str | None = "auto",
    max_prompt_length: int = 2048,
    instruction: str | None = None,
    task: str = "math",
    max_malformed_frac: float = 0.1,
    num_proc: int | None = None,
) -> PromptDataset:
    """Load, adapt, render and tokenise the prompts of one local parquet or jsonl file of `task`
    ("math" or "code"); `instruction` defaults to the task's (DEFAULT_INSTRUCTIONS).

    Raises FileNotFoundError for a missing file; ValueError naming the file for a directory, an
    unknown format or schema, a file that does not parse or is not UTF-8 (naming the line), no
    rows, more than `max_malformed_frac` malformed rows, or no usable prompt.
    """
    if not (isinstance(max_prompt_length, numbers.Integral) and max_prompt_length >= 1):
        raise ValueError(f"max_prompt_length must be an int >= 1, got {max_prompt_length!r}")
    if not (isinstance(max_malformed_frac, numbers.Real) and 0 <= max_malformed_frac <= 1):
        raise ValueError(f"max_malformed_frac must be in [0, 1], got {max_malformed_frac!r}")
    if tokenizer.chat_template is None:
        raise ValueError(
            f"the tokenizer {tokenizer.name_or_path or type(tokenizer).__name__} has no chat "
            "template, which renders every prompt: use the folder of an instruct/chat model's "
            "tokenizer (config.model.tokenizer_path in training, --tokenizer in covjax.eval)"
        )
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"data file {path} is a directory, expected a parquet or jsonl file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    fmt = _FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise ValueError(f"data file {path}: unknown format, expected one of {sorted(_FORMATS)}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"data file {path}: no rows (the file is empty)")
    if fmt == "json":
        _check_utf8(path)
    try:
        raw = datasets.load_dataset(fmt, data_files=path, split="train")
    except Exception as e:  # datasets and pyarrow raise many types, most without the file name
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        raise ValueError(f"data file {path}: cannot be read as {fmt}: {e}{cause}") from e
    if schema in (None, "auto"):
        schema = detect_schema(raw.column_names, task)
        if schema is None:
            expected = (
                "prompt+reward_model (prime_code) or question+test (kodcode)"
                if task == "code"
                else "prompt+reward_model (dapo), problem|question+answer, or prompt+answer"
            )
            raise ValueError(
                f"data file {path}: unknown schema, columns {raw.column_names}; expected {expected}"
            )
    elif SCHEMA_ALIASES.get(schema) not in TASK_SCHEMAS[task]:
        raise ValueError(
            f"data file {path}: unknown schema {schema!r} for the {task} task, expected one of "
            f"{sorted(k for k, v in SCHEMA_ALIASES.items() if v in TASK_SCHEMAS[task])}"
        )
    schema = SCHEMA_ALIASES[schema]
    if instruction is None:
        instruction = DEFAULT_INSTRUCTIONS[task]
    if len(raw) == 0:
        raise ValueError(f"data file {path}: no rows")

    rendered = raw.map(
        _render_batch,
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=_FEATURES,
        num_proc=num_proc,
        fn_kwargs={"tokenizer": tokenizer, "schema": schema, "instruction": instruction},
        desc=f"rendering {os.path.basename(path)}",
    )
    checks = rendered.select_columns(["error", "num_tokens"]).with_format("numpy")[:]
    errors = checks["error"]
    valid = errors == ""
    malformed = np.flatnonzero(~valid)
    first = f"row {malformed[0]}: {errors[malformed[0]]}" if malformed.size else None
    if malformed.size > max_malformed_frac * len(raw):
        raise ValueError(
            f"data file {path}: {malformed.size} of {len(raw)} rows are malformed (more than "
            f"max_malformed_frac={max_malformed_frac}); first at {first}"
        )
    fits = checks["num_tokens"] <= max_prompt_length
    num_too_long = int((valid & ~fits).sum())
    keep = np.flatnonzero(valid & fits)
    if keep.size == 0:
        raise ValueError(
            f"data file {path}: no usable prompt (max_prompt_length={max_prompt_length})"
        )
    if malformed.size:
        logging.warning(
            "data file %s: skipped %d malformed rows; first at %s", path, malformed.size, first
        )
    logging.info(
        "data file %s (%s): %d rows, %d prompts kept, %d malformed, %d over %d tokens",
        path,
        schema,
        len(raw),
        keep.size,
        malformed.size,
        num_too_long,
        max_prompt_length,
    )
    return PromptDataset(
        path=path,
        schema=schema,
        examples=rendered.select(keep.tolist()).remove_columns(["num_tokens", "error"]),
        num_rows=len(raw),
        num_malformed=int(malformed.size),
        first_malformed=first,
        num_too_long=num_too_long,
    )


class PromptLoader:
    """Batches of examples in a per-epoch permutation drawn from (seed, epoch).

    Each epoch yields len(dataset) // batch_size full batches (the remainder is left out so
    batch shapes stay static). `state()` / `restore()` give the exact position for resuming.
    An example is a dict: prompt_ids (list[int]), prompt_text, ground_truth, index.
    """

    def __init__(self, dataset: PromptDataset, batch_size: int, seed: int):
        if not (isinstance(batch_size, numbers.Integral) and 1 <= batch_size <= len(dataset)):
            raise ValueError(
                f"batch_size must be in [1, {len(dataset)}] for {dataset.path}, got {batch_size}"
            )
        self.examples = dataset.examples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def state(self) -> dict[str, int]:
        """Where the next batch starts: epoch and position (examples consumed this epoch)."""
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a `state()`."""
        if not {"epoch", "position"} <= set(state):
            raise ValueError(f"loader state {state} lacks 'epoch' or 'position'")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.examples):
            raise ValueError(f"loader state {state} does not fit {len(self.examples)} examples")
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)

    def __iter__(self) -> PromptLoader:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        if self.position + self.batch_size > len(self.examples):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        rows = self.examples[self._order[self.position : self.position + self.batch_size].tolist()]
        self.position += self.batch_size
        return [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
