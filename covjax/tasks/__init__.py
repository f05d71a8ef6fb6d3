"""Tasks: where prompts come from and how responses are scored (one module per task).

A task is what the trainer needs beyond the model: its tokenizer and stop tokens, batches of
prompts with their ground truths, a reward per response, an evaluation, and a data position
that is checkpointed so a resumed run draws the same prompts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np

from covjax.sampler import Rollout, Sampler, SamplingParams


class Task(Protocol):
    """What covjax.trainer and covjax.rollouts use of a task."""

    tokenizer: Any  # a transformers tokenizer (saved beside the trained model)
    stop_token_ids: tuple[int, ...]

    def next_prompts(self, count: int) -> tuple[list[list[int]], list]:
        """The next `count` prompts (token ids) and their ground truths."""

    def score(self, rollout: Rollout, truths: Sequence) -> np.ndarray:
        """Rewards [N] float32; row i answers prompt rollout.group_ids[i]."""

    def score_metrics(self) -> dict[str, np.ndarray]:
        """Per-row metrics [N] of the last `score` call beside the rewards (the code task's pass
        fraction), by name; the same names before and after every call (covjax.rollouts logs
        their means over every process's rows)."""

    def evaluate(self, sampler: Sampler, rng: jax.Array, params: SamplingParams
                 ) -> dict[str, float]:
        """val/* metrics of the current policy."""

    def state(self) -> dict[str, int]:
        """The data position (JSON), checkpointed with the run."""

    def restore(self, state: dict[str, int]) -> None:
        """Continues from a `state()`."""


def load_task(config) -> Task:
    """The task of `config.data.task`, its tokenizer and data read and checked here (before the
    trainer loads any weights, so bad data fails in seconds)."""
    if config.data.task == "toy":
        from covjax.tasks.toy import ToyTask

        return ToyTask(config.data.toy.variant, config.seed, config.data.toy.eval_samples)
    from covjax.model import load_tokenizer
    from covjax.tasks.code import CodeTask
    from covjax.tasks.math import MathTask

    m = config.model
    task = CodeTask if config.data.task == "code" else MathTask
    return task(config, load_tokenizer(os.path.expanduser(m.tokenizer_path or m.path)))
