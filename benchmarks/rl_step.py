"""One complete RL step of covjax, timed by phase (issue 9).

A Qwen2.5-0.5B-shaped model with random weights (fp32 master weights, bf16 compute, scanned
layers, per-layer remat): 64 prompts x 8 responses, prompts of 256 random tokens, responses of up
to 1024 tokens whose lengths are forced at random (the sampler's per-row budgets, uniform in
[1, 1024]; no stop token), random 0/1 rewards, GRPO advantages, then exactly the trainer's
update path: old log-probs over the whole batch, and per mini-batch the Clip-Cov selection
pre-pass and the accumulated micro-batch update (covjax.train_step).

    python benchmarks/rl_step.py            # one H100/H200
    python benchmarks/rl_step.py --tiny     # a small shape on the CPU (seconds)

Phases (each compiled first, then timed on a second call with other random inputs):
  rollout      Sampler.generate of all responses;             tokens/s = new tokens / s
  old_logp     no-grad forwards over the whole batch;          tokens/s = all tokens / s
  selection    per mini-batch: the update's pre-pass (no-grad micro-batch forwards, as
               CompiledUpdate plans them) plus select_tokens, and
               select_tokens alone (the issue's "selection" target: < 1% of the update)
  update       all mini-batch updates (pre-pass + micro-batch forward/backward + AdamW);
               tokens/s = all tokens / s
Prints a table and one JSON line (prefix "RESULT ") for benchmarks/gpu_suite.sh; peak device
memory from the device's memory_stats (the process's peak RSS on the CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from shapes import QWEN2_5_0_5B

from covjax import advantages, losses, sharding, train_step
from covjax import config as config_lib
from covjax.model import ModelConfig, Transformer
from covjax.sampler import Sampler, SamplingParams

TINY = dict(  # the same family, shrunk for a CPU smoke run
    QWEN2_5_0_5B, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8, help="responses per prompt")
    p.add_argument("--prompt_len", type=int, default=256)
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--mini_batches", type=int, default=4, help="optimizer updates per step")
    p.add_argument("--micro_batch", type=int, default=16, help="responses per forward/backward")
    p.add_argument("--method", default="clip_cov", choices=losses.METHODS)
    p.add_argument("--ratio", type=float, default=2e-4, help="clip_cov / kl_cov ratio")
    p.add_argument("--tiny", action="store_true", help="small model and shapes, for the CPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.prompts, args.n, args.prompt_len = min(args.prompts, 8), min(args.n, 4), 16
        args.max_new_tokens, args.micro_batch = min(args.max_new_tokens, 32), 8
    return args


def build_model(args) -> Transformer:
    shape = TINY if args.tiny else QWEN2_5_0_5B
    config = ModelConfig(
        architecture="qwen2", attention_bias=True, param_dtype="float32",
        compute_dtype="float32" if args.tiny else "bfloat16",
        remat="none" if args.tiny else "layer", scan_layers=True,
        **dict(shape, max_position_embeddings=args.prompt_len + args.max_new_tokens),
    )
    return Transformer(config, rngs=nnx.Rngs(args.seed))


def timed(fn, *a):
    """(result, seconds) of fn(*a), waiting for device results."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*a))
    return out, time.perf_counter() - t0


def peak_memory_bytes() -> tuple[int, str]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host RSS"


def main(argv=None) -> dict:
    args = parse_args(argv)
    num_rows, mini_rows = args.prompts * args.n, args.prompts * args.n // args.mini_batches
    if mini_rows % args.micro_batch:
        raise ValueError(f"--micro_batch={args.micro_batch} does not divide {mini_rows} rows")
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = build_model(args)
    vocab = model.config.vocab_size
    eps = 1.0 if args.method == "clip_cov" else 0.2
    loss = losses.LossConfig(args.method, clip_low=eps, clip_high=eps, clip_cov_ratio=args.ratio,
                             kl_cov_ratio=args.ratio)
    # the schema's step around it (no entropy or KL term, temperature 1)
    cfg = dataclasses.replace(train_step.StepConfig.from_config(config_lib.base_config()),
                              loss=loss, micro_batch_size=args.micro_batch)
    tx, schedule = train_step.make_optimizer(1e-6, 0.0, 1.0, 0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    p_sharding = train_step.param_shardings(params, mesh)
    state = train_step.init_state(params, tx)
    s_sharding = train_step.state_shardings(state, p_sharding, mesh)
    sampler = Sampler(model, mesh=mesh, length_buckets=(args.prompt_len,),
                      batch_buckets=(num_rows,))
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=cfg.temperature,
                              n=args.n)

    def rollout(seed):
        rng = np.random.default_rng(seed)
        prompts = rng.integers(10, vocab, (args.prompts, args.prompt_len)).tolist()
        budgets = rng.integers(1, args.max_new_tokens + 1, num_rows).tolist()
        return sampler.generate(prompts, sampling, budgets=budgets, rng=jax.random.key(seed))

    def host_batch(ro, seed):
        rewards = np.random.default_rng(seed).integers(0, 2, num_rows).astype(np.float32)
        adv = advantages.compute(jnp.asarray(rewards), jnp.asarray(ro.group_ids),
                                 estimator="grpo")
        return train_step.make_batch(ro, ro.prompt_length, np.asarray(adv))

    results: dict[str, float] = {}
    with jax.set_mesh(mesh):
        rollout(args.seed + 100)  # compile
        ro, results["rollout_s"] = timed(rollout, args.seed)
        new_tokens = int(ro.lengths.sum())
        host = host_batch(ro, args.seed)
        all_tokens = int(host["attention_mask"].sum()) + num_rows  # + the last target

        b_sharding = train_step.batch_shardings(host, mesh)
        logprob_fn = train_step.LogProbs(
            graphdef=graphdef, rest=rest, cfg=cfg,
            batch_sharding={k: b_sharding[k] for k in train_step.LOGPROB_KEYS}, mesh=mesh,
        )
        lp_batch = {k: jax.device_put(host[k], b_sharding[k]) for k in train_step.LOGPROB_KEYS}
        state = jax.device_put(state, s_sharding)
        timed(logprob_fn, state.params, lp_batch)  # compile
        (old_logp, _), results["old_logp_s"] = timed(logprob_fn, state.params, lp_batch)
        host["old_logp"] = np.asarray(old_logp)

        mbs = [{k: v[s : s + mini_rows] for k, v in host.items()}
               for s in range(0, num_rows, mini_rows)]
        mb_sharding = train_step.batch_shardings(mbs[0], mesh)
        mbs = [{k: jax.device_put(v, mb_sharding[k]) for k, v in mb.items()} for mb in mbs]
        update_fn = train_step.CompiledUpdate(
            graphdef=graphdef, rest=rest, tx=tx, schedule=schedule, cfg=cfg,
            state_sharding=s_sharding, batch_sharding=mb_sharding, mesh=mesh,
        )
        results.update(_selection_times(update_fn, cfg, state.params, mbs[0]))

        def all_updates(state):  # the first mini-batch selects on old_logp, as the trainer
            metrics = []
            for i, mb in enumerate(mbs):
                state, m = update_fn(state, mb, jax.random.key(2 + i), logp_is_old=i == 0)
                metrics.append(m)
            return state, metrics

        (state, _), _ = timed(all_updates, state)  # compiles every micro-batch length
        (state, metrics), results["update_s"] = timed(all_updates, state)

    peak, where = peak_memory_bytes()
    results.update(
        rollout_tokens_per_s=new_tokens / results["rollout_s"],
        old_logp_tokens_per_s=all_tokens / results["old_logp_s"],
        update_tokens_per_s=all_tokens / results["update_s"],
        selection_frac_of_update=results["select_tokens_s"] * args.mini_batches
        / results["update_s"],
        new_tokens=new_tokens, all_tokens=all_tokens, peak_memory_gib=peak / 2**30,
        num_selected=float(np.sum([m["num_selected"] for m in jax.device_get(metrics)])),
    )
    print_table(args, results, where)
    print("RESULT " + json.dumps({"benchmark": "rl_step", "device": jax.devices()[0].device_kind,
                                  "args": vars(args), **results}))
    return results


def _selection_times(update_fn, cfg, params, mb) -> dict[str, float]:
    """Seconds per mini-batch of the update's selection pre-pass (its no-grad micro-batch
    forwards, as it plans them, + select_tokens) and of select_tokens alone."""

    @jax.jit
    def select(logp, mb, rng):
        return losses.select_tokens(logp, mb["old_logp"], mb["advantages"], mb["mask"], cfg.loss,
                                    rng=rng)

    plan = update_fn.plan(np.asarray(mb["mask"]))

    def prepass(params, mb, rng):
        logp, _ = update_fn.logprobs.run(params, mb, plan)
        return select(logp, mb, rng)

    key = jax.random.key(0)
    timed(prepass, params, mb, key)
    _, prepass_s = timed(prepass, params, mb, key)
    select_s = min(timed(select, mb["old_logp"], mb, key)[1] for _ in range(5))
    return {"prepass_s": prepass_s, "select_tokens_s": select_s}


def print_table(args, r: dict, where: str) -> None:
    rows = [
        ("rollout", r["rollout_s"], r["rollout_tokens_per_s"], "new tokens"),
        ("old log-probs", r["old_logp_s"], r["old_logp_tokens_per_s"], "all tokens"),
        ("selection pre-pass (x1 mini-batch)", r["prepass_s"], None, ""),
        ("select_tokens alone (x1 mini-batch)", r["select_tokens_s"], None, ""),
        (f"update ({args.mini_batches} mini-batches)", r["update_s"], r["update_tokens_per_s"],
         "all tokens"),
    ]
    print(f"\nRL step, {jax.devices()[0].device_kind}: {args.prompts} prompts x {args.n}, "
          f"prompt {args.prompt_len}, responses <= {args.max_new_tokens} "
          f"({r['new_tokens']} new tokens), method {args.method}")
    print("| phase | ms | tokens/s | counted |\n|---|---|---|---|")
    for name, seconds, rate, what in rows:
        rate_text = "" if rate is None else f"{rate:,.0f}"
        print(f"| {name} | {1e3 * seconds:.3f} | {rate_text} | {what} |")
    print(f"selection (select_tokens x {args.mini_batches}) / update: "
          f"{100 * r['selection_frac_of_update']:.2f}%; peak memory ({where}): "
          f"{r['peak_memory_gib']:.2f} GiB; tokens selected: {r['num_selected']:.0f}")


if __name__ == "__main__":
    main()
