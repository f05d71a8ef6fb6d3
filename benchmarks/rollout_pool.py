"""The sampler's slot pool: slot utilisation on long-tailed lengths, decode-step time against the
filled length, and the memory of the real rollout program at the recipes' shapes.

    python benchmarks/rollout_pool.py utilisation   # CPU, tiny model: pool against static batch
    python benchmarks/rollout_pool.py step_time     # CPU, tiny model: ms per step at fills
    python benchmarks/rollout_pool.py memory        # abstract compile, fake CPU devices

utilisation: response tokens produced / slot-steps computed (decode steps x slots). Response
lengths are long-tailed: lognormal with median 0.2 of the cap, 5% of the rows at the cap; each
row is ended at its length by its budget, which ends a row as a stop token does. The same rows
go through the pool and through a static batch (every row in its own slot from the start).

memory: `Sampler.lower(...).compile().memory_analysis()` of covjax's rollout program for one
RL step's 256 x 8 rows (prompts 2048, responses 8192 tokens, bf16) with the pool size that
covjax.rollouts.rollout_slots derives for the mesh (the KV caches in SLOT_MEMORY_FRACTION of the
usable memory, beside the weights), compiled from abstract arrays on fake CPU
devices (nothing allocated), beside the training state that lives through the rollout (fp32
params + AdamW moments, sharded).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __name__ == "__main__" and "memory" in sys.argv:  # fake CPU devices for the meshes
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=32")

import jax
import numpy as np
from flax import nnx

from covjax import memory
from covjax.model import ModelConfig, Transformer
from covjax.rollouts import SLOT_MEMORY_FRACTION
from covjax.sampler import Sampler, SamplingParams
from covjax.sharding import logical_sharding, make_mesh

TINY = ModelConfig(
    architecture="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    attention_bias=True, tie_word_embeddings=True, max_position_embeddings=4096,
)  # fmt: skip
MEMORY_SETUPS = (  # (name, model, HBM GB, mesh): launch/README.md's GPU columns
    ("Qwen2.5-7B, 8 x H200 141GB", memory.QWEN2_5_7B, 141, memory.MeshShape(fsdp=8)),
    ("Qwen2.5-7B, 8 x H100 80GB", memory.QWEN2_5_7B, 80, memory.MeshShape(fsdp=8)),
    ("Qwen2.5-32B, 8 x H200 141GB", memory.QWEN2_5_32B, 141, memory.MeshShape(fsdp=8)),
    ("Qwen2.5-32B, 8 x H200 141GB", memory.QWEN2_5_32B, 141, memory.MeshShape(fsdp=4, tensor=2)),
    ("Qwen2.5-32B, 4 x 8 H100 80GB", memory.QWEN2_5_32B, 80, memory.MeshShape(fsdp=32)),
    ("Qwen2.5-32B, 4 x 8 H100 80GB", memory.QWEN2_5_32B, 80, memory.MeshShape(fsdp=16, tensor=2)),
    ("Qwen2.5-32B, TPU v5p-64", memory.QWEN2_5_32B, 95, memory.MeshShape(fsdp=8, tensor=4)),
)
USABLE = 0.9


def long_tailed_lengths(rows: int, cap: int, seed: int) -> np.ndarray:
    """Lognormal lengths with median 0.2 cap (sigma 1), clipped to [1, cap - 1]; 5% set to cap."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(0.2 * cap * rng.lognormal(0.0, 1.0, rows)), 1, cap - 1).astype(int)
    lengths[rng.permutation(rows)[: round(0.05 * rows)]] = cap
    return lengths


def utilisation(args) -> None:
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    rows, cap = args.prompts * 8, args.cap
    lengths = long_tailed_lengths(rows, cap, args.seed)
    prompts = np.random.default_rng(1).integers(1, 512, (args.prompts, 16)).tolist()
    params = SamplingParams(max_new_tokens=cap, temperature=1.0, n=8)
    for slots in (None, args.slots):
        sampler = Sampler(
            model, length_buckets=(16,), batch_buckets=(rows,), slots=slots,
            prefill_rows=args.prefill_rows,
        )  # fmt: skip
        t0 = time.perf_counter()
        out = sampler.generate(prompts, params, rng=jax.random.key(0), budgets=lengths)
        seconds = time.perf_counter() - t0
        assert (out.lengths == lengths).all()
        pool = slots or rows
        used = out.lengths.sum() / (sampler.last_decode_steps * pool)
        print(
            f"{'static batch' if slots is None else 'slot pool'}: rows={rows} slots={pool} "
            f"cap={cap} decode steps={sampler.last_decode_steps} response tokens="
            f"{out.lengths.sum()} utilisation={used:.3f} (median length "
            f"{np.median(lengths):.0f}, {np.mean(lengths == cap):.0%} at cap; {seconds:.1f}s "
            "incl. compile)",
            flush=True,
        )


def step_time(args) -> None:
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    prompts = np.random.default_rng(1).integers(1, 512, (args.slots, 16)).tolist()
    params = SamplingParams(max_new_tokens=args.cap, temperature=1.0)
    sampler = Sampler(model, length_buckets=(16,), batch_buckets=(args.slots,))

    def seconds(fill):
        best = []
        for _ in range(3):
            t0 = time.perf_counter()
            sampler.generate(prompts, params, rng=jax.random.key(0), budgets=[fill] * args.slots)
            best.append(time.perf_counter() - t0)
        return min(best)

    seconds(1)  # compile
    previous, previous_s = 1, seconds(1)
    for fill in (args.cap // 8, args.cap // 4, args.cap // 2, args.cap):
        fill_s = seconds(fill)
        ms = 1e3 * (fill_s - previous_s) / (fill - previous)
        print(f"slots={args.slots} cache={16 + args.cap}: {ms:.3f} ms per decode step at "
              f"response lengths {previous + 1}..{fill}", flush=True)  # fmt: skip
        previous, previous_s = fill, fill_s


def _abstract_model(config: ModelConfig, mesh) -> nnx.Module:
    """The model with ShapeDtypeStruct weights placed as covjax.sharding places them."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            value = var.get_value()
            sharding = logical_sharding(mesh, var.get_metadata()["logical_axes"], value.shape)
            var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
    return model


def memory_table(args) -> None:
    """One row per setup. The program is compiled in float32: XLA:CPU computes bf16 in float32
    and adds converted copies of the bf16 buffers (the cache among them) that a GPU does not
    make, so the bf16 program's temp is read as half the float32 one (its buffers are all in
    the compute dtype but the small f32 logits)."""
    print(
        "| setup | mesh | slots per device | KV cache (bf16) | program arguments | temp f32 "
        "(CPU compile) | temp bf16 (= f32 / 2) | + AdamW moments | total / usable (GB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    seq = args.prompt_len + args.cap
    for name, config, hbm, shape in MEMORY_SETUPS:
        usable = USABLE * hbm * memory.GB
        per_device = memory.rollout_sequences(config, shape, seq, SLOT_MEMORY_FRACTION * usable)
        if per_device < 1:
            print(f"| {name} | {shape} | 0: the weights gathered for decoding do not fit beside "
                  "the training state | | | | | | |", flush=True)  # fmt: skip
            continue
        mesh = make_mesh(data=shape.data, fsdp=shape.fsdp, tensor=shape.tensor,
                         devices=jax.devices()[: shape.devices])  # fmt: skip
        model = _abstract_model(config.replace(max_position_embeddings=32768), mesh)
        sampler = Sampler(model, mesh=mesh, length_buckets=(args.prompt_len,),
                          batch_buckets=(2048,), slots=per_device * shape.data * shape.fsdp,
                          compute_dtype="float32")  # fmt: skip
        params = SamplingParams(max_new_tokens=args.cap, temperature=1.0, n=8)
        t0 = time.perf_counter()
        stats = sampler.lower(2048, args.prompt_len, params).compile().memory_analysis()
        adam = memory.training_state_bytes(config, shape)["adam"]
        kv = per_device * memory.kv_cache_bytes_per_sequence(config, shape, seq)
        temp = stats.temp_size_in_bytes
        total = stats.argument_size_in_bytes + temp / 2 + stats.output_size_in_bytes + adam
        gb = [x / memory.GB for x in (kv, stats.argument_size_in_bytes, temp, temp / 2, adam,
                                      total, usable)]  # fmt: skip
        print(
            f"| {name} | {shape} | {per_device} | {gb[0]:.1f} | {gb[1]:.1f} | {gb[2]:.1f} | "
            f"{gb[3]:.1f} | {gb[4]:.1f} | **{gb[5]:.1f}** / {gb[6]:.1f} |",
            flush=True,
        )
        print(f"  (compiled in {time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["utilisation", "step_time", "memory"])
    p.add_argument("--prompts", type=int, default=32, help="utilisation: prompts (x 8 rows)")
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--prefill_rows", type=int, default=None, help="default: the sampler's")
    p.add_argument("--cap", type=int, default=None, help="max new tokens")
    p.add_argument("--prompt_len", type=int, default=2048, help="memory: prompt columns")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.cap = args.cap or {"utilisation": 64, "step_time": 1024, "memory": 8192}[args.what]
    {"utilisation": utilisation, "step_time": step_time, "memory": memory_table}[args.what](args)


if __name__ == "__main__":
    main()
