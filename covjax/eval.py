"""Evaluation on local math sets: accuracy and response length per set.

    python -m covjax.eval --model=HF_DIR --data=math500=math500.jsonl,aime24=aime24.parquet
    python -m covjax.eval --checkpoint=WORKDIR --data=...

As in the paper (ALGORITHMS.md section 7): greedy decoding, except for sets named like AIME or
AMC, which take `samples_k` responses per prompt at temperature 0.6 and report avg@k (the mean
reward over all samples) and pass@k (the fraction of prompts with at least one correct sample).
Rewards are `covjax.rewards.math` (1 correct / 0 otherwise). Prints a table, writes
OUTPUT_DIR/results.json and OUTPUT_DIR/responses.jsonl (every response with its score).

--checkpoint=WORKDIR reads the Hugging Face folder the trainer saves: WORKDIR/hf_final, else the
WORKDIR/hf_step_<step> with the largest step; it must hold the tokenizer files too. The flags
it does not set take the trainer's evaluation settings from WORKDIR/config.json (response budget,
compute dtype, prompt limit, instruction, schema), so the numbers match its val/* metrics.
The trainer calls `evaluate` directly with its live model and sampler.
"""

from __future__ import annotations

import json
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

from covjax.config import split_named_files
from covjax.data import DEFAULT_INSTRUCTION, PromptDataset, load_prompts
from covjax.rewards.math import DEFAULT_TIMEOUT_S, score_batch
from covjax.sampler import Sampler, decode_responses

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SAMPLED_SETS = re.compile(r"aime|amc", re.IGNORECASE)
SAMPLED_TEMPERATURE = 0.6


def is_sampled_set(name: str) -> bool:
    """Sets named like AIME/AMC are evaluated with k samples at temperature 0.6."""
    return SAMPLED_SETS.search(name) is not None


def set_metrics(scores: np.ndarray, lengths: np.ndarray, stopped: np.ndarray) -> dict[str, float]:
    """Metrics of one set from [num_prompts, k] arrays of scores (1/0), lengths and stop flags."""
    return {
        "accuracy": float(scores.mean()),  # avg@k; plain accuracy when k = 1
        "pass_at_k": float((scores > 0).any(axis=1).mean()),
        "mean_response_length": float(lengths.mean()),
        "frac_truncated": float(1.0 - stopped.mean()),
        "num_prompts": int(scores.shape[0]),
        "k": int(scores.shape[1]),
    }


def _sample(
    sampler: Sampler,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    n: int,
    per_call: int,
    rng: jax.Array,
    **generate_kwargs: Any,
) -> tuple[list[str], list[int], list[bool]]:
    """n responses per prompt, `per_call` prompts per `generate`: (texts, lengths, stopped)."""
    texts, lengths, stopped = [], [], []
    for start in range(0, len(prompts), per_call):
        rollout = sampler.generate(
            prompts[start : start + per_call],
            n=n,
            rng=jax.random.fold_in(rng, start),
            **generate_kwargs,
        )
        texts += decode_responses(rollout, tokenizer)
        lengths += rollout.lengths.tolist()
        stopped += rollout.stopped.tolist()
    return texts, lengths, stopped


def evaluate(
    model: nnx.Module,
    tokenizer: PreTrainedTokenizerBase,
    datasets: Mapping[str, PromptDataset],
    *,
    sampler: Sampler | None = None,
    max_new_tokens: int = 3072,
    batch_size: int = 64,
    samples_k: int = 8,
    temperature: float = SAMPLED_TEMPERATURE,
    top_p: float = 1.0,
    stop_token_ids: Sequence[int] | None = None,
    seed: int = 0,
    num_workers: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    output_dir: str | None = None,
) -> dict[str, Any]:
    """Evaluates `model` on each named set; returns {"sets": {name: metrics}, "average_accuracy"}.

    `batch_size` is the number of responses per `generate` call; `stop_token_ids` defaults to
    the tokenizer's EOS; `sampler` defaults to an unsharded `Sampler` of `model` (the trainer
    passes its own). With `output_dir`, writes results.json and responses.jsonl there.
    """
    if not datasets:
        raise ValueError("datasets is empty: give at least one name -> PromptDataset")
    for name, value in (("batch_size", batch_size), ("samples_k", samples_k)):
        if not (isinstance(value, numbers.Integral) and value >= 1):
            raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
    # One batch bucket: the last, partial batch of a set compiles no program of its own.
    sampler = sampler or Sampler(model, batch_buckets=(batch_size,))
    if stop_token_ids is None:
        stop_token_ids = [i for i in (tokenizer.eos_token_id,) if i is not None]
    key = jax.random.key(seed)
    results, records = {}, []
    for set_index, (name, ds) in enumerate(datasets.items()):
        sampled = is_sampled_set(name)
        k = samples_k if sampled else 1
        texts, lengths, stopped = _sample(
            sampler,
            tokenizer,
            list(ds.examples["prompt_ids"]),
            n=k,
            temperature=temperature if sampled else 0.0,
            per_call=max(1, batch_size // k),
            rng=jax.random.fold_in(key, set_index),
            max_new_tokens=max_new_tokens,
            top_p=top_p,
            stop_token_ids=stop_token_ids,
        )
        truths = [t for t in ds.examples["ground_truth"] for _ in range(k)]
        scores = score_batch(texts, truths, num_workers=num_workers, timeout_s=timeout_s)
        results[name] = {
            **set_metrics(
                np.reshape(scores, (-1, k)),
                np.reshape(lengths, (-1, k)),
                np.reshape(stopped, (-1, k)),
            ),
            "temperature": temperature if sampled else 0.0,
            "path": ds.path,
        }
        indices, prompt_texts = list(ds.examples["index"]), list(ds.examples["prompt_text"])
        for row, (text, truth, length, stop, score) in enumerate(
            zip(texts, truths, lengths, stopped, scores, strict=True)
        ):
            records.append(
                {
                    "set": name,
                    "index": indices[row // k],
                    "sample": row % k,
                    "prompt": prompt_texts[row // k],
                    "ground_truth": truth,
                    "response": text,
                    "response_length": length,
                    "stopped": stop,
                    "score": score,
                }
            )
    summary = {
        "sets": results,
        "average_accuracy": float(np.mean([r["accuracy"] for r in results.values()])),
    }
    if output_dir and jax.process_index() == 0:
        write_outputs(summary, records, output_dir)
    return summary


def write_outputs(summary: dict[str, Any], records: list[dict], output_dir: str) -> None:
    """results.json (the summary) and responses.jsonl (one record per response)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(output_dir, "responses.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def format_table(summary: dict[str, Any]) -> str:
    """One row per set: decoding, prompts, k, accuracy (avg@k), pass@k, mean response length."""
    lines = [f"{'set':<16}{'decoding':>10}{'prompts':>9}{'k':>4}{'acc':>9}{'pass@k':>9}{'len':>9}"]
    for name, m in summary["sets"].items():
        decoding = f"t={m['temperature']:g}" if m["temperature"] else "greedy"
        lines.append(
            f"{name:<16}{decoding:>10}{m['num_prompts']:>9}{m['k']:>4}{m['accuracy']:>9.4f}"
            f"{m['pass_at_k']:>9.4f}{m['mean_response_length']:>9.1f}"
        )
    lines.append(f"{'average':<48}{summary['average_accuracy']:>9.4f}")
    return "\n".join(lines)


def parse_data_flag(spec: str) -> dict[str, str]:
    """ "math500=a.jsonl,aime24=b.parquet" -> {"math500": "a.jsonl", "aime24": "b.parquet"}."""
    sets = split_named_files(spec, source="--data")
    if not sets:
        raise ValueError(f"--data={spec!r} names no set; expected name=path,name=path")
    return sets


def resolve_checkpoint(workdir: str) -> str:
    """The Hugging Face folder of a trainer workdir: hf_final, else the latest hf_step_<step>."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--checkpoint={workdir} is not a directory")
    final = os.path.join(workdir, "hf_final")
    if os.path.isdir(final):
        return final
    steps = {}
    for entry in os.listdir(workdir):
        match = re.fullmatch(r"hf_step_(\d+)", entry)
        if match and os.path.isdir(os.path.join(workdir, entry)):
            steps[int(match.group(1))] = os.path.join(workdir, entry)
    if not steps:
        raise FileNotFoundError(f"--checkpoint={workdir}: no hf_final or hf_step_* folder in it")
    return steps[max(steps)]


def training_eval_settings(workdir: str) -> dict[str, Any]:
    """The evaluation settings of a trainer workdir's math run (its config.json), as values of
    this module's flags: what its val/* metrics were measured with. {} for a toy run or a folder
    without config.json."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    try:
        if config["data"]["task"] != "math":
            return {}
        settings = {
            "max_new_tokens": config["rollout"]["max_new_tokens"],
            "compute_dtype": config["model"]["compute_dtype"],
            "max_prompt_length": config["data"]["max_prompt_length"],
            "schema": config["data"]["schema"],
        }
        if config["data"]["prompt_suffix"]:
            settings["instruction"] = config["data"]["prompt_suffix"]
    except (KeyError, TypeError):  # not a covjax trainer's config.json
        return {}
    return settings


def stop_ids(model_dir: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS plus the eos_token_id(s) of the folder's generation_config.json."""
    ids = {tokenizer.eos_token_id}
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


def main(argv: Sequence[str]) -> None:
    """The command line: load the model and the sets named by the flags, evaluate, print."""
    from absl import flags

    from covjax.model import from_pretrained, load_tokenizer

    del argv
    f = flags.FLAGS
    if bool(f.model) == bool(f.checkpoint):
        raise ValueError("give exactly one of --model=HF_DIR or --checkpoint=WORKDIR")
    data_files = parse_data_flag(f.data)  # a bad --data fails before anything is loaded
    if f.model and not os.path.isdir(f.model):
        raise FileNotFoundError(f"--model={f.model} is not a directory")
    model_dir = f.model or resolve_checkpoint(f.checkpoint)
    if f.checkpoint:
        taken = {k: v for k, v in training_eval_settings(f.checkpoint).items()
                 if f[k].using_default_value}
        for name, value in taken.items():
            setattr(f, name, value)
        if taken:
            print(f"from {os.path.join(f.checkpoint, 'config.json')} (the trainer's evaluation): "
                  + ", ".join(f"--{k}={v!r}" for k, v in taken.items()))
    output_dir = f.output_dir or (
        os.path.join(f.checkpoint, "eval", os.path.basename(model_dir))
        if f.checkpoint
        else os.path.join("eval", os.path.basename(os.path.normpath(model_dir)))
    )
    tokenizer = load_tokenizer(f.tokenizer or model_dir)
    datasets = {
        name: load_prompts(
            path,
            tokenizer,
            schema=f.schema,
            max_prompt_length=f.max_prompt_length,
            instruction=f.instruction,
        )
        for name, path in data_files.items()
    }
    model = from_pretrained(model_dir, compute_dtype=f.compute_dtype)
    summary = evaluate(
        model,
        tokenizer,
        datasets,
        max_new_tokens=f.max_new_tokens,
        batch_size=f.batch_size,
        samples_k=f.samples_k,
        temperature=f.temperature,
        top_p=f.top_p,
        stop_token_ids=stop_ids(model_dir, tokenizer),
        seed=f.seed,
        num_workers=f.num_workers,
        timeout_s=f.timeout_s,
        output_dir=output_dir,
    )
    print(f"model {model_dir}")
    print(format_table(summary))
    print(f"wrote {output_dir}/results.json and responses.jsonl")


def _define_flags() -> None:
    """Flags of the command line (defined only when run as a program, so that importing
    `evaluate` into the trainer adds no flags to its command line)."""
    from absl import flags

    flags.DEFINE_string("model", "", "Local Hugging Face model folder.")
    flags.DEFINE_string(
        "checkpoint",
        "",
        "Trainer workdir: evaluates hf_final or the latest hf_step_<step> folder in it.",
    )
    flags.DEFINE_string("tokenizer", "", "Tokenizer folder (default: the model folder).")
    flags.DEFINE_string("data", "", "Comma-separated name=path of local parquet/jsonl sets.")
    flags.DEFINE_string("schema", "auto", "Row schema of the data files (covjax/data.py).")
    flags.DEFINE_string("instruction", DEFAULT_INSTRUCTION, "Suffix of each question.")
    flags.DEFINE_string("output_dir", "", "Default: WORKDIR/eval/<folder> or ./eval/<folder>.")
    flags.DEFINE_string("compute_dtype", "float32", "Sampling compute dtype (bfloat16 on GPU).")
    flags.DEFINE_integer("max_prompt_length", 2048, "Longer prompts are dropped (counted).")
    flags.DEFINE_integer("max_new_tokens", 3072, "Response token budget.")
    flags.DEFINE_integer("batch_size", 64, "Responses per generate call.")
    flags.DEFINE_integer("samples_k", 8, "Samples per prompt for AIME/AMC-like sets.")
    flags.DEFINE_float("temperature", SAMPLED_TEMPERATURE, "Temperature of AIME/AMC-like sets.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling of AIME/AMC-like sets.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("num_workers", None, "math-verify worker processes.")
    flags.DEFINE_float("timeout_s", DEFAULT_TIMEOUT_S, "Time limit of one answer check (s).")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
