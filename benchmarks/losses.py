"""Forward + backward time of each policy loss over a [B, T] batch, and of the selection alone.

Run from an install (pip install -e .) or with PYTHONPATH=. from the repository root:

    python benchmarks/losses.py                    # CPU: 64 x 4096 tokens
    python benchmarks/losses.py --size paper       # GPU: 2048 x 8192 (256 prompts x 8 x 8192)
    python benchmarks/losses.py --size minibatch   # 256 x 8192: one of the recipe's 8 mini-batches
    python benchmarks/losses.py --primitives       # also lax.top_k against a full sort

Each timing is jax.grad of the loss with respect to logp (jit, block_until_ready), the median of
--repeats runs after --warmup runs. Hyperparameters follow the paper's recipes (ALGORITHMS.md
section 7): ppo 0.2 / 0.2, dual_clip c = 3, clip_cov eps 1 / 1 with r = 2e-4 in (1, 5), kl_cov
r = 2e-4 (2e-3 for 7B) with coefficient 1. Target: clip_cov and kl_cov within 2x ppo.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp

from covjax import losses

SIZES = {"cpu": (64, 4096), "minibatch": (256, 8192), "paper": (2048, 8192)}
RECIPES = {
    "ppo": losses.LossConfig("ppo", clip_low=0.2, clip_high=0.2),
    "dual_clip": losses.LossConfig("dual_clip", clip_low=0.2, clip_high=0.2, dual_clip_c=3.0),
    "clip_cov": losses.LossConfig("clip_cov", clip_low=1.0, clip_high=1.0, clip_cov_ratio=2e-4),
    "kl_cov": losses.LossConfig("kl_cov", kl_cov_ratio=2e-4, kl_cov_coef=1.0),
    "kl_cov(r=2e-3)": losses.LossConfig("kl_cov", kl_cov_ratio=2e-3, kl_cov_coef=1.0),
}


def make_inputs(batch: int, length: int, seed: int = 0):
    """Ragged responses (lengths uniform in [T/4, T]), GRPO-like +-1 sequence advantages."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    logp = -jax.random.exponential(k1, (batch, length)) * 1.5
    old_logp = logp + 0.05 * jax.random.normal(k2, (batch, length))
    advantages = jnp.broadcast_to(
        jnp.where(jax.random.bernoulli(k3, 0.5, (batch, 1)), 1.0, -1.0), (batch, length)
    )
    lengths = jax.random.randint(k4, (batch, 1), length // 4, length + 1)
    mask = jnp.arange(length)[None, :] < lengths
    return logp, old_logp, advantages, mask


def timings_ms(fns: dict, args: tuple, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Times of each ``fn(*args)`` in ms, interleaved: every round runs each function once, so a
    change of load on a shared machine hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


def loss_grad_fn(recipe: losses.LossConfig):
    def loss(logp, old_logp, advantages, mask, rng):
        return losses.policy_loss(logp, old_logp, advantages, mask, recipe, rng=rng)[0]

    return jax.jit(jax.grad(loss))


def select_fn(recipe: losses.LossConfig):
    def select(logp, old_logp, advantages, mask, rng):
        return losses.select_tokens(logp, old_logp, advantages, mask, recipe, rng=rng)

    return jax.jit(select)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--primitives", action="store_true", help="time lax.top_k vs sort")
    args = parser.parse_args()

    batch, length = SIZES[args.size]
    inputs = make_inputs(batch, length)
    args_in = (*inputs, jax.random.key(1))
    fns = {name: loss_grad_fn(recipe) for name, recipe in RECIPES.items()}
    selections = {name: select_fn(recipe) for name, recipe in RECIPES.items() if recipe.selects}
    fns.update({f"select {name}": fn for name, fn in selections.items()})
    times = timings_ms(fns, args_in, args.warmup, args.repeats)
    median = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}

    print(f"# {datetime.date.today()}  jax {jax.__version__}  device {jax.devices()[0]}")
    print(
        f"# [B, T] = [{batch}, {length}], valid tokens {int(inputs[3].sum())}, "
        f"median and min of {args.repeats} interleaved runs"
    )
    header = ["method", "median ms", "x ppo", "min ms", "x ppo", "select ms", "selected"]
    print(f"{header[0]:<16}" + "".join(f"{h:>11}" for h in header[1:]))
    for name in RECIPES:
        select_ms, num_selected = float("nan"), 0
        if name in selections:
            select_ms = median[f"select {name}"]
            num_selected = int(selections[name](*args_in).sum())
        row = [median[name], median[name] / median["ppo"], best[name], best[name] / best["ppo"]]
        print(
            f"{name:<16}{row[0]:>11.3f}{row[1]:>11.2f}{row[2]:>11.3f}{row[3]:>11.2f}"
            f"{select_ms:>11.3f}{num_selected:>11}"
        )

    result = {
        "size": [batch, length],
        "median_ms": median,
        "x_ppo": {name: median[name] / median["ppo"] for name in RECIPES},
    }
    if args.primitives:
        size = batch * length
        k_max = max(1, math.ceil(2e-4 * size))
        keys = jax.random.normal(jax.random.key(2), (size,))
        primitives = {
            f"lax.top_k(k={k_max})": jax.jit(lambda x: jax.lax.top_k(x, k_max)[1]),
            "covjax two-stage top-k": jax.jit(lambda x: losses._top_k(x, k_max)[1]),
            "jnp.sort": jax.jit(jnp.sort),
            "jnp.argsort": jax.jit(jnp.argsort),
        }
        times = timings_ms(primitives, (keys,), args.warmup, args.repeats)
        print(f"# selection primitives over {size} float32 keys: median ms")
        for name, t in times.items():
            print(f"{name:<24}{statistics.median(t):>10.3f}")
        result["primitives_ms"] = {name: statistics.median(t) for name, t in times.items()}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
