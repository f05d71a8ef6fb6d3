"""The toy's tiny model and its supervised warm start (covjax/tasks/toy.py is the task).

The warm start gives the RL run a policy with some but not full accuracy, so that reward can rise
and entropy can collapse; it is cached per seed, so that every method starts from the same policy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from covjax.model import ModelConfig
from covjax.tasks.toy import (
    BOS,
    EOS,
    MIN_TARGET,
    NUM_DIGITS,
    Variant,
    digit_ids,
    sample_correct,
    sample_targets,
    vocabulary,
)


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


def model_config(*, param_dtype: str = "float32", compute_dtype: str = "float32") -> ModelConfig:
    """A tiny Qwen2-shaped decoder (2 layers, width 64, 4 heads, GQA 2 KV heads, ~94k params)."""
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
        tie_word_embeddings=False,  # tied embeddings learned the sum slower
        attention_bias=True,
        max_position_embeddings=64,
        param_dtype=param_dtype,
        compute_dtype=compute_dtype,
    )


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """The supervised warm start: Adam steps on a mix of correct and random answers (the
    values, and why: config.py's data.toy section)."""

    steps: int
    batch_size: int
    lr: float
    frac_correct: float


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


def _read_cache(path: Path, model: nnx.Module) -> list[np.ndarray] | None:
    """The cached parameter values in flattening order, or None (with a warning naming the file
    and why) for an entry that does not load, which the caller then rebuilds."""
    try:
        with np.load(path) as cached:
            values = [cached[k] for k, _ in _param_leaves(model)]
    except Exception as error:  # noqa: BLE001 - np.load raises many types on a damaged file
        logging.warning("toy warm-start cache %s does not load (%s: %s); rebuilding it", path,
                        type(error).__name__, error)
        return None
    return values


def warm_start(
    model: nnx.Module,
    *,
    variant: Variant,
    seed: int,
    ws: WarmStart,
    cache_dir: str = "",
) -> bool:
    """Puts the warm-started policy for (variant, seed) into `model` in place.

    Deterministic for a given seed; with a cache_dir the result is stored there once
    (toy_<variant>_seed<seed>_<hash>.npz, written atomically) and read back by every later run, so
    all methods start from bit-identical policies; an entry that does not load is rebuilt.
    Returns True when it came from the cache.
    """
    batches = _warm_start_batches(variant, seed, ws)
    path = _cache_path(cache_dir, variant, seed, ws, model, batches) if cache_dir else None
    values = _read_cache(path, model) if path is not None and path.exists() else None
    if values is not None:
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
