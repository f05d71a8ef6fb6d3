"""The embedded toy task: "digits that sum to S" (docs/toy_results.md).

The prompt is a target sum S, the response exactly six digits followed by EOS; the reward is 1 if
the digits sum to S, else 0. Many responses are correct for each S, so the policy's entropy over
correct answers is meaningful: that is where the paper's entropy collapse shows.

- easy: digits 0-4, S in 8..16 (random guessing is right about 11% of the time, reward saturates);
- hard: digits 0-9, S in 4..50 (the extreme sums have few solutions, reward does not saturate).

Everything a real model run gets from outside is made here offline: a WordLevel tokenizer wrapped
as a `transformers.PreTrainedTokenizerFast` (so the toy runs the real models' code path), the
prompts and the exact reward checker. Its tiny model and supervised warm start live beside it, in
covjax/tasks/toy_warm_start.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from covjax import metrics as names
from covjax.sampler import Rollout, Sampler, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

NUM_DIGITS = 6  # a response is exactly this many digits, then EOS
MIN_TARGET, MAX_TARGET = 4, 50  # the targets that have a token (the hard variant's range)
PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One version of the task: the digits a response may use and the targets S asked for."""

    name: str
    max_digit: int
    min_target: int
    max_target: int


VARIANTS = {
    "easy": Variant("easy", max_digit=4, min_target=8, max_target=16),
    "hard": Variant("hard", max_digit=9, min_target=4, max_target=50),
}


def get_variant(name: str) -> Variant:
    """The task variant called `name` ("easy" or "hard")."""
    if name not in VARIANTS:
        raise ValueError(f"toy variant={name!r} is unknown; expected one of {sorted(VARIANTS)}")
    return VARIANTS[name]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def vocabulary() -> dict[str, int]:
    """Token -> id: pad (0, the sampler's pad id), eos, bos, unk, the digits, one token per S."""
    tokens = [PAD, EOS, BOS, UNK] + [str(d) for d in range(10)]
    tokens += [f"S={s}" for s in range(MIN_TARGET, MAX_TARGET + 1)]
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The toy's tokenizer, built offline: WordLevel over whitespace, BOS prepended to prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with one space
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def digit_ids() -> np.ndarray:
    """Token ids of the digits 0..9 (index d holds the id of digit d)."""
    vocab = vocabulary()
    return np.array([vocab[str(d)] for d in range(10)], np.int32)


def prompt_text(target: int) -> str:
    """The prompt for target sum S (the tokenizer prepends BOS)."""
    if not MIN_TARGET <= target <= MAX_TARGET:
        raise ValueError(f"target={target} is outside [{MIN_TARGET}, {MAX_TARGET}]")
    return f"S={target}"


def prompt_ids(target: int) -> list[int]:
    """Token ids of the prompt for S = target: [bos, "S=target"]."""
    vocab = vocabulary()
    return [vocab[BOS], vocab[prompt_text(target)]]


def response_ids(digits: Sequence[int]) -> list[int]:
    """Token ids of a response: the digits, then EOS."""
    ids = digit_ids()
    return [int(ids[d]) for d in digits] + [vocabulary()[EOS]]


# ---------------------------------------------------------------------------------------------
# Reward
# ---------------------------------------------------------------------------------------------


def score(response: Sequence[int], target: int, variant: Variant) -> float:
    """The exact checker: 1.0 iff the response is 6 digits of the variant summing to S, then EOS.

    `response` holds the response token ids up to and including the stop token (nothing after it).
    """
    response = np.asarray(response, np.int64).reshape(1, -1)
    return float(score_responses(response, np.array([response.shape[1]]), [target], variant)[0])


def score_responses(
    responses: np.ndarray, lengths: np.ndarray, targets: Sequence[int], variant: Variant
) -> np.ndarray:
    """Rewards [N] float32 of the responses [N, W] (row i: its first lengths[i] token ids), by
    ``score``'s rule, in a few array operations rather than a Python loop over responses."""
    num_rows = responses.shape[0]
    width = NUM_DIGITS + 1
    vocab_size = len(vocabulary())
    tokens = np.full((num_rows, width), vocab_size, np.int64)  # vocab_size: not a token
    used = min(width, responses.shape[1])
    tokens[:, :used] = responses[:, :used]
    tokens = np.where((tokens >= 0) & (tokens < vocab_size), tokens, vocab_size)
    digit_of = np.full(vocab_size + 1, -1)
    digit_of[digit_ids()] = np.arange(10)
    digits = digit_of[tokens[:, :NUM_DIGITS]]
    correct = (
        (np.asarray(lengths) == width)
        & (tokens[:, NUM_DIGITS] == vocabulary()[EOS])
        & (digits >= 0).all(axis=1)
        & (digits <= variant.max_digit).all(axis=1)
        & (digits.sum(axis=1) == np.asarray(targets))
    )
    return correct.astype(np.float32)


def score_rollout(rollout: Rollout, targets: Sequence[int], variant: Variant) -> np.ndarray:
    """Rewards [N] float32 of a sampler Rollout whose row i answers prompt group_ids[i]."""
    responses = rollout.tokens[:, rollout.prompt_length :]
    return score_responses(
        responses, rollout.lengths, np.asarray(targets)[rollout.group_ids], variant
    )


# ---------------------------------------------------------------------------------------------
# Prompts and correct answers
# ---------------------------------------------------------------------------------------------


def sample_targets(rng: np.random.Generator, num: int, variant: Variant) -> np.ndarray:
    """`num` targets S drawn uniformly from the variant's range."""
    return rng.integers(variant.min_target, variant.max_target + 1, size=num)


@functools.cache
def _count_table(max_digit: int) -> np.ndarray:
    """count[k, s] = number of k-digit strings over 0..max_digit that sum to s (exact, int)."""
    max_sum = NUM_DIGITS * max_digit
    count = np.zeros((NUM_DIGITS + 1, max_sum + 1), np.int64)
    count[0, 0] = 1
    for k in range(1, NUM_DIGITS + 1):
        for d in range(max_digit + 1):
            count[k, d:] += count[k - 1, : max_sum + 1 - d]
    return count


def sample_correct(rng: np.random.Generator, targets: np.ndarray, variant: Variant) -> np.ndarray:
    """[len(targets), 6] digits, row i drawn uniformly among all correct answers for targets[i].

    Digit by digit: P(d | rest, k digits left) = count[k-1, rest-d] / count[k, rest].
    """
    count = _count_table(variant.max_digit)
    rest = np.asarray(targets, np.int64).copy()
    if np.any(rest < 0) or np.any(rest > NUM_DIGITS * variant.max_digit):
        raise ValueError(f"targets={targets}: some have no answer in digits 0..{variant.max_digit}")
    digits = np.zeros((len(rest), NUM_DIGITS), np.int64)
    choices = np.arange(variant.max_digit + 1)
    for pos in range(NUM_DIGITS):
        left = rest[:, None] - choices[None, :]
        ways = np.where(left >= 0, count[NUM_DIGITS - pos - 1, np.clip(left, 0, None)], 0)
        cdf = np.cumsum(ways, axis=1) / ways.sum(axis=1, keepdims=True)
        d = np.minimum((rng.random((len(rest), 1)) >= cdf).sum(axis=1), variant.max_digit)
        digits[:, pos] = d
        rest -= d
    return digits


# ---------------------------------------------------------------------------------------------
# The task the trainer runs
# ---------------------------------------------------------------------------------------------


class ToyTask:
    """The toy as a covjax.tasks.Task: prompt batch k is drawn from (seed, k)."""

    def __init__(self, variant: str, seed: int, eval_samples: int):
        self.variant = get_variant(variant)
        self.seed = seed
        self.tokenizer = build_tokenizer()
        self.stop_token_ids = (self.tokenizer.eos_token_id,)
        self.eval_samples = eval_samples
        self.position = 0  # prompt batches drawn so far

    def next_prompts(self, count: int) -> tuple[list[list[int]], list[int]]:
        rng = np.random.default_rng([self.seed, self.position])
        self.position += 1
        targets = [int(s) for s in sample_targets(rng, count, self.variant)]
        return [prompt_ids(s) for s in targets], targets

    def score(self, rollout: Rollout, truths: Sequence[int]) -> np.ndarray:
        return score_rollout(rollout, truths, self.variant)

    def score_metrics(self) -> dict[str, np.ndarray]:
        return {}

    def state(self) -> dict[str, int]:
        return {"position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])

    def evaluate(self, sampler: Sampler, rng: jax.Array, params: SamplingParams
                 ) -> dict[str, float]:
        """val/toy/accuracy: eval_samples responses for every target of the variant."""
        targets = list(range(self.variant.min_target, self.variant.max_target + 1))
        params = dataclasses.replace(params, n=self.eval_samples)
        rollout = sampler.generate([prompt_ids(s) for s in targets], params, rng=rng)
        return {names.val_accuracy("toy"): float(self.score(rollout, targets).mean())}
