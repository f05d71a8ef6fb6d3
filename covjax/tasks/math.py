"""Math word problems from local files, scored by covjax.rewards.math (math-verify)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import numpy as np

from covjax import data, evaluation
from covjax import metrics as names
from covjax.data import split_files, split_named_files
from covjax.model import stop_ids
from covjax.rewards import math as math_reward
from covjax.sampler import Rollout, Sampler, SamplingParams, decode_responses


class MathTask:
    """The math task as a covjax.tasks.Task over data.train_files and data.eval_files."""

    TASK = "math"  # the schemas and default instruction of covjax.data.load_prompts
    eval_score = None  # covjax.evaluation's default scoring: math-verify

    def __init__(self, config, tokenizer):
        self.tokenizer = tokenizer
        kwargs = dict(
            schema=None if config.data.schema == "auto" else config.data.schema,
            max_prompt_length=config.data.max_prompt_length,
            task=self.TASK,
        )
        if config.data.prompt_suffix:
            kwargs["instruction"] = config.data.prompt_suffix
        files = split_files(config.data.train_files)
        sets = [data.load_prompts(path, tokenizer, **kwargs) for path in files]
        dataset = sets[0]
        if len(sets) > 1:
            import datasets

            dataset = dataclasses.replace(
                dataset, examples=datasets.concatenate_datasets([s.examples for s in sets])
            )
        self.loader = data.PromptLoader(dataset, config.train.prompts_per_step, config.seed)
        self.eval_sets = {
            name: data.load_prompts(path, tokenizer, **kwargs)
            for name, path in split_named_files(config.data.eval_files).items()
        }
        self.stop_token_ids = tuple(stop_ids(os.path.expanduser(config.model.path), tokenizer))

    def next_prompts(self, count: int) -> tuple[list[list[int]], list[str]]:
        if count != self.loader.batch_size:
            raise ValueError(f"MathTask serves batches of {self.loader.batch_size}, asked {count}")
        batch = next(self.loader)
        return [list(ex["prompt_ids"]) for ex in batch], [ex["ground_truth"] for ex in batch]

    def score(self, rollout: Rollout, truths: Sequence[str]) -> np.ndarray:
        responses = decode_responses(rollout, self.tokenizer)
        return np.asarray(
            math_reward.score_batch(responses, [truths[g] for g in rollout.group_ids]), np.float32
        )

    def score_metrics(self) -> dict[str, np.ndarray]:
        return {}

    def state(self) -> dict[str, int]:
        return self.loader.state()

    def restore(self, state: dict[str, int]) -> None:
        self.loader.restore(state)

    def evaluate(self, sampler: Sampler, rng: jax.Array, params: SamplingParams
                 ) -> dict[str, float]:
        """val/<set>/accuracy of covjax.evaluation on data.eval_files (greedy; AIME/AMC-like
        sets: avg@k at temperature 0.6, as in the paper)."""
        if not self.eval_sets:
            return {}
        summary = evaluation.evaluate(
            sampler.model,
            self.tokenizer,
            self.eval_sets,
            sampler=sampler,
            max_new_tokens=params.max_new_tokens,
            stop_token_ids=self.stop_token_ids,
            seed=int(jax.random.randint(rng, (), 0, 2**31 - 1)),
            score_fn=self.eval_score,
        )
        metrics = {names.val_accuracy(name): m["accuracy"] for name, m in summary["sets"].items()}
        metrics[names.VAL_AVERAGE_ACCURACY] = summary["average_accuracy"]
        return metrics
