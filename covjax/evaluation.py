"""Evaluation on math sets: accuracy and response length per set, as the paper reports them.

As in the paper (docs/ALGORITHMS.md section 7): greedy decoding, except for sets named like AIME
or AMC, which take `samples_k` responses per prompt (32: the paper's avg@32) at temperature 0.6
and report avg@k (the mean reward over all samples) and pass@k (the fraction of prompts with at
least one correct sample). Rewards are `covjax.rewards.math` (1 correct / 0 otherwise).

The trainer calls `evaluate` with its live model and sampler; `python -m covjax.eval` calls it on
a saved model, found in a trainer's workdir by `resolve_checkpoint` and evaluated with the run's
own settings (`training_eval_settings`).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

from covjax import storage
from covjax.data import PromptDataset
from covjax.model.hf import EXPORT_COMPLETE_FILE
from covjax.rewards.math import DEFAULT_TIMEOUT_S, score_batch
from covjax.sampler import Sampler, SamplingParams, decode_responses

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SAMPLED_SETS = re.compile(r"aime|amc", re.IGNORECASE)
SAMPLED_TEMPERATURE = 0.6
SAMPLES_K = 32  # responses per prompt of a sampled set: the paper reports avg@32


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
    params: SamplingParams,
    *,
    per_call: int,
    rng: jax.Array,
) -> tuple[list[str], list[int], list[bool]]:
    """params.n responses per prompt, `per_call` prompts per `generate`: (texts, lengths,
    stopped)."""
    texts, lengths, stopped = [], [], []
    for start in range(0, len(prompts), per_call):
        rollout = sampler.generate(
            prompts[start : start + per_call], params, rng=jax.random.fold_in(rng, start)
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
    samples_k: int = SAMPLES_K,
    temperature: float = SAMPLED_TEMPERATURE,
    top_p: float = 1.0,
    stop_token_ids: Sequence[int] | None = None,
    seed: int = 0,
    num_workers: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    output_dir: str | None = None,
    score_fn: Callable[[list[str], list[str]], Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Evaluates `model` on each named set; returns {"sets": {name: metrics}, "average_accuracy"}.

    `batch_size` is the number of responses per `generate` call; `stop_token_ids` defaults to
    the tokenizer's EOS; `sampler` defaults to an unsharded `Sampler` of `model` (the trainer
    passes its own). With `output_dir`, writes results.json and responses.jsonl there.
    `score_fn(responses, ground_truths)` gives the rewards (the code task's runs the programs);
    by default, covjax.rewards.math with `num_workers` and `timeout_s`.
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
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature if sampled else 0.0,
            top_p=top_p,
            n=k,
            stop_token_ids=tuple(stop_token_ids),
        )
        texts, lengths, stopped = _sample(
            sampler,
            tokenizer,
            list(ds.examples["prompt_ids"]),
            params,
            per_call=max(1, batch_size // k),
            rng=jax.random.fold_in(key, set_index),
        )
        truths = [t for t in ds.examples["ground_truth"] for _ in range(k)]
        scores = (
            score_fn(texts, truths)
            if score_fn
            else score_batch(texts, truths, num_workers=num_workers, timeout_s=timeout_s)
        )
        results[name] = {
            **set_metrics(
                np.reshape(scores, (-1, k)),
                np.reshape(lengths, (-1, k)),
                np.reshape(stopped, (-1, k)),
            ),
            "temperature": params.temperature,
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


def resolve_checkpoint(workdir: str) -> str:
    """The Hugging Face folder of a local trainer workdir: hf_final, else the latest
    hf_step_<step>. A folder without config.json (EXPORT_COMPLETE_FILE, which an export writes
    last) is an export cut short: skipped with a warning. ValueError for an object store's URL
    (the weights are memory-mapped from local files: the export is copied down first)."""
    if not storage.is_local(workdir):
        raise ValueError(
            f"{workdir} is not a local folder: copy its export down first (e.g. gcloud storage cp "
            f"-r {workdir.rstrip('/')}/hf_final .) and pass --model=hf_final"
        )
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{workdir} is not a directory")
    candidates = {math.inf: os.path.join(workdir, "hf_final")}
    for entry in os.listdir(workdir):
        if match := re.fullmatch(r"hf_step_(\d+)", entry):
            candidates[int(match.group(1))] = os.path.join(workdir, entry)
    for key in sorted(candidates, reverse=True):
        folder = candidates[key]
        if not os.path.isdir(folder):
            continue
        if os.path.isfile(os.path.join(folder, EXPORT_COMPLETE_FILE)):
            return folder
        logging.warning("%s has no %s (an export cut short): skipped", folder,
                        EXPORT_COMPLETE_FILE)
    raise FileNotFoundError(
        f"{workdir}: no hf_final or hf_step_* folder with {EXPORT_COMPLETE_FILE} in it"
    )


def training_eval_settings(workdir: str) -> dict[str, Any]:
    """The evaluation settings of a trainer workdir's math or code run (its config.json): what its
    val/* metrics were measured with, keyed by the names of the eval command line's flags (also the
    keywords of evaluate, covjax.data.load_prompts and covjax.model.from_pretrained). {} for a
    toy run or a folder without config.json; ValueError naming the file if it is not JSON."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON ({e})") from e
    try:
        if config["data"]["task"] not in ("math", "code"):
            return {}
        settings = {
            "task": config["data"]["task"],
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
