"""The embedded toy task: "digits that sum to S" (shared/TOY.md).

The prompt is a target sum S, the response exactly six digits followed by EOS; the reward is 1 if
the digits sum to S, else 0. Many responses are correct for each S, so the policy's entropy over
correct answers is meaningful: that is where the paper's entropy collapse shows.

- easy: digits 0-4, S in 8..16 (random guessing is right about 11% of the time, reward saturates);
- hard: digits 0-9, S in 4..50 (the extreme sums have few solutions, reward does not saturate).

Everything a real model run gets from outside is made here offline: a WordLevel tokenizer wrapped
as a `transformers.PreTrainedTokenizerFast` (so the toy runs the real models' code path), a tiny
Qwen2-shaped model config (~100k parameters), and a supervised warm start that gives the RL run a
policy with some but not full accuracy, cached per seed so that every method starts from the same
policy.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from covjax.model import ModelConfig
    from covjax.sampler import Rollout

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
    ``score``'s rule, in a few array operations (the per-response loop cost ~20 us a row)."""
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
# Prompts and warm-start data
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


def warm_start_batch(
    rng: np.random.Generator, batch_size: int, variant: Variant, frac_correct: float
) -> tuple[np.ndarray, np.ndarray]:
    """Supervised warm-start examples: (tokens [B, 9] int32, loss_mask [B, 9] bool).

    A `frac_correct` share of the rows are correct answers drawn uniformly among the solutions, the
    rest six uniform random digits of the variant's range (a random string is sometimes right by
    chance). tokens = bos, S, 6 digits, eos; the mask marks the response tokens (digits and eos).
    """
    targets = sample_targets(rng, batch_size, variant)
    correct = rng.random(batch_size) < frac_correct
    random_digits = rng.integers(0, variant.max_digit + 1, (batch_size, NUM_DIGITS))
    digits = np.where(correct[:, None], sample_correct(rng, targets, variant), random_digits)
    vocab = vocabulary()
    tokens = np.concatenate(
        [
            np.full((batch_size, 1), vocab[BOS]),
            (vocab[f"S={MIN_TARGET}"] + targets - MIN_TARGET)[:, None],
            digit_ids()[digits],
            np.full((batch_size, 1), vocab[EOS]),
        ],
        axis=1,
    ).astype(np.int32)
    loss_mask = np.zeros_like(tokens, bool)
    loss_mask[:, 2:] = True
    return tokens, loss_mask


# ---------------------------------------------------------------------------------------------
# Model and warm start
# ---------------------------------------------------------------------------------------------


def model_config(*, param_dtype: str = "float32", compute_dtype: str = "float32") -> ModelConfig:
    """A tiny Qwen2-shaped decoder (2 layers, width 64, 4 heads, GQA 2 KV heads, ~94k params)."""
    from covjax.model import ModelConfig

    return ModelConfig(
        architecture="qwen2",
        vocab_size=len(vocabulary()),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        rope_scaling=None,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,  # tied embeddings learned the sum 2-3x slower (measured)
        attention_bias=True,
        max_position_embeddings=64,
        param_dtype=param_dtype,
        compute_dtype=compute_dtype,
    )


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """The supervised warm start of TOY.md: Adam steps on a mix of correct and random answers."""

    # 2000 steps (easy): step-0 reward 0.59-0.67 on seeds 0-3, where 600 left seed 2 at 0.18;
    # covjax/config.py's hard variant keeps 600 (2000 starts it at 0.44-0.64, little room to rise)
    steps: int = 2000
    batch_size: int = 256
    lr: float = 3e-3
    frac_correct: float = 0.65  # TOY.md: 25% learned nothing, 100% hit 0.91


def _param_leaves(model: nnx.Module) -> list[tuple[str, jax.Array]]:
    """(path string, array) of the model's parameters, in flattening order."""
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    return [(jax.tree_util.keystr(p), x) for p, x in leaves]


def _cache_path(
    cache_dir: str,
    variant: Variant,
    seed: int,
    ws: WarmStart,
    model: nnx.Module,
    batches: list[tuple[np.ndarray, np.ndarray]],
) -> Path:
    """The cache file of this warm start. Its key hashes the settings and also the initial
    parameter values and the training batches themselves, so that a change of the model's
    initialisation or of the data generation can never read a warm start made by older code."""
    digest = hashlib.sha256(
        json.dumps([variant.name, seed, dataclasses.asdict(ws)], sort_keys=True).encode()
    )
    for name, x in _param_leaves(model):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(np.asarray(x)).tobytes())
    for tokens, mask in batches:
        digest.update(tokens.tobytes())
        digest.update(mask.tobytes())
    name = f"toy_{variant.name}_seed{seed}_{digest.hexdigest()[:12]}.npz"
    return Path(cache_dir).expanduser() / name


def _warm_start_batches(
    variant: Variant, seed: int, ws: WarmStart
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ws.steps (tokens, mask) batches of the warm start, drawn from the seed."""
    rng = np.random.default_rng(seed)
    return [
        warm_start_batch(rng, ws.batch_size, variant, ws.frac_correct) for _ in range(ws.steps)
    ]


def _train_supervised(
    model: nnx.Module, ws: WarmStart, batches: list[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """Runs the warm start in place on `model`: next-token cross-entropy on the response tokens.

    Returns the loss of every step."""
    tokens = jnp.asarray(np.stack([b[0] for b in batches]))
    masks = jnp.asarray(np.stack([b[1] for b in batches]))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(ws.lr)

    def loss_fn(p, toks, mask):
        logits = nnx.merge(graphdef, p, rest)(toks[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:])
        m = mask[:, 1:].astype(jnp.float32)
        return jnp.sum(ce * m) / jnp.sum(m)

    def step(carry, batch):
        p, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(p, *batch)
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    @jax.jit
    def train(p, tokens, masks):
        (p, _), losses = jax.lax.scan(step, (p, tx.init(p)), (tokens, masks))
        return p, losses

    new_params, step_losses = train(params, tokens, masks)
    nnx.update(model, new_params)
    return np.asarray(step_losses)


def warm_start(
    model: nnx.Module,
    *,
    variant: Variant,
    seed: int,
    ws: WarmStart = WarmStart(),
    cache_dir: str = "",
) -> bool:
    """Puts the warm-started policy for (variant, seed) into `model` in place.

    Deterministic for a given seed; with a cache_dir the result is stored there once
    (toy_<variant>_seed<seed>_<hash>.npz, written atomically) and read back by every later run, so
    all methods start from bit-identical policies. Returns True when it came from the cache.
    """
    batches = _warm_start_batches(variant, seed, ws)
    path = _cache_path(cache_dir, variant, seed, ws, model, batches) if cache_dir else None
    if path is not None and path.exists():
        with np.load(path) as cached:
            values = [cached[k] for k, _ in _param_leaves(model)]
        state = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.unflatten(jax.tree.structure(state), values))
        return True
    _train_supervised(model, ws, batches)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **{k: np.asarray(x) for k, x in _param_leaves(model)})
        os.replace(tmp, path)
    return False
