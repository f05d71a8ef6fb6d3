"""Code problems from local files (Eurus-2-RL-Code's or KodCode's layout, covjax.data), scored
by running each response's program on its tests in covjax.rewards.sandbox."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from covjax import metrics as names
from covjax.rewards import code as code_reward
from covjax.rewards.sandbox import Limits, Sandbox
from covjax.sampler import Rollout, decode_responses
from covjax.tasks.math import MathTask


def make_sandbox(code_config) -> Sandbox:
    """The sandbox of config.data.code (workers 0: one per core); ValueError naming the key of
    a setting it refuses, or saying that a known program fails in it."""
    c = code_config
    limits = Limits(test_s=c.test_s, program_s=c.program_s, memory_mb=c.memory_mb)
    try:
        return Sandbox(limits, workers=c.workers or None, isolation=c.isolation)
    except ValueError as error:  # its message starts with the setting's name
        raise ValueError(f"config.data.code.{error}") from error
    except RuntimeError as error:  # the self-test: nothing could be scored with these settings
        raise ValueError(f"config.data.code: {error}") from error


def eval_scorer(sandbox: Sandbox) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    """covjax.evaluation's `score_fn`: 1 for a program that passes every test (pass@1 of greedy
    sets, avg@k of sampled ones count these)."""

    def score(responses: Sequence[str], truths: Sequence[str]) -> list[float]:
        return code_reward.score_batch(responses, truths, sandbox)[0].tolist()

    return score


class CodeTask(MathTask):
    """The code task as a covjax.tasks.Task: the math task's data handling over the code
    layouts; rewards 1 when the program passes every test (covjax.rewards.code)."""

    TASK = "code"

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        self.sandbox = make_sandbox(config.data.code)
        self.eval_score = eval_scorer(self.sandbox)
        self._fractions = np.zeros(0, np.float32)

    def score(self, rollout: Rollout, truths: Sequence[str]) -> np.ndarray:
        responses = decode_responses(rollout, self.tokenizer)
        rewards, self._fractions = code_reward.score_batch(
            responses, [truths[g] for g in rollout.group_ids], self.sandbox
        )
        return rewards

    def score_metrics(self) -> dict[str, np.ndarray]:
        return {names.CODE_PASS_FRAC: self._fractions}
