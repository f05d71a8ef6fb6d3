"""Rollout throughput of covjax.sampler against the roofline and against transformers' generate.

    python benchmarks/sampler.py --batch 64,256 [--peer transformers]  # GPU
    python benchmarks/sampler.py --tiny                                       # CPU smoke test

Model: random weights shaped like Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads, 2 KV heads,
head_dim 64, MLP 4864, vocab 151936, tied embeddings, q/k/v bias), bfloat16 weights, activations
and KV cache. Workload: `batch` prompts of 128 random tokens, 256 new tokens each at temperature 1,
no stop token (every row runs its full length, like the Tunix probe in shared/peers/).
One program is compiled per batch size (a static batch: one slot per row); everything else below
reuses it, since per-row length budgets are a runtime argument.

Printed per batch size:
- e2e new tokens/s: batch * new_tokens / wall time of one `Sampler.generate` call (host padding,
  prefill, decode loop, transfer back and Rollout assembly; compiled beforehand);
- decode tokens/s: from that time minus the time of the same call with every row's budget 1
  (prefill + first token);
- % of roofline: the roofline time over the measured time. Per decode step the roofline is the
  larger of (bf16 weight bytes + bytes of the KV cache slots that hold tokens) / measured HBM
  bandwidth and FLOPs / measured bf16 matmul rate; the prefill is FLOP-bound. The bandwidth is
  measured with a large array copy, the matmul rate with a large bf16 matmul, in the same run.
- tail (largest batch): time per decode step when only a fraction of the rows is still active
  (the others reach their preset length after 1 token), and useful tokens/s with lengths drawn
  uniformly in [1, new_tokens]. Finished rows keep running with the batch's static shape, so
  this is what the tail costs in a static batch (benchmarks/rollout_pool.py measures the slot
  pool, which refills finished slots).
`--peer transformers` runs transformers' `generate` (PyTorch, bf16 on CUDA; fp32 on CPU) on the
same shapes in a child process first (so the two frameworks never share GPU memory). The Tunix
peer is shared/peers/tunix_probe.py, run in the same call. The last line is a JSON record.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

if importlib.util.find_spec("covjax") is None:  # run from a checkout: import the repo's covjax
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shapes import QWEN2_5_0_5B  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

SHAPES = {
    "0.5b": QWEN2_5_0_5B,
    "tiny": dict(  # the same model family, shrunk for a CPU smoke run
        QWEN2_5_0_5B,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=16,
        max_position_embeddings=512,
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", default="64,256", help="comma-separated batch sizes")
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="timed calls (the median is reported)")
    p.add_argument("--tail", default="1,0.5,0.25", help="active fractions for the tail ('': skip)")
    p.add_argument("--peer", default="", choices=["", "transformers"])
    p.add_argument("--tiny", action="store_true", help="small model and shapes, for the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.size = "tiny"
        if args.batch == "64,256":
            args.batch = "4,16"
        args.prompt_len = min(args.prompt_len, 16)
        args.new_tokens = min(args.new_tokens, 16)
    else:
        args.size = "0.5b"
    args.batch = [int(b) for b in args.batch.split(",") if b]
    args.tail = [float(f) for f in args.tail.split(",") if f]
    return args


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- transformers peer


def run_transformers_peer(args) -> list[dict]:
    """transformers' generate (sampling, temperature 1, forced length) at each batch size."""
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shape = SHAPES[args.size]
    config = transformers.Qwen2Config(**shape, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(config).to(dtype).eval()
    results = []
    for batch in args.batch:
        ids = torch.randint(1, shape["vocab_size"], (batch, args.prompt_len), device=device)
        kwargs = dict(
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            min_new_tokens=args.new_tokens,
            max_new_tokens=args.new_tokens,
            pad_token_id=0,
        )

        def call(kwargs=kwargs, ids=ids):
            with torch.no_grad():
                out = model.generate(ids, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            return out

        call(kwargs | dict(min_new_tokens=4, max_new_tokens=4))  # warm-up
        t0 = time.perf_counter()
        out = call()
        seconds = time.perf_counter() - t0
        assert out.shape == (batch, args.prompt_len + args.new_tokens), out.shape
        results.append(
            dict(
                batch=batch,
                seconds=round(seconds, 4),
                new_tok_per_s=round(batch * args.new_tokens / seconds, 1),
            )
        )
        print(
            f"[transformers] batch={batch:5d} {results[-1]['new_tok_per_s']:>10.1f} new tok/s",
            flush=True,
        )
    return results


def transformers_peer_in_child(args) -> list[dict] | dict:
    """Runs the transformers peer in a fresh process (its own GPU context, freed on exit)."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--peer_child",
        "--batch",
        ",".join(map(str, args.batch)),
        "--prompt_len",
        str(args.prompt_len),
        "--new_tokens",
        str(args.new_tokens),
        "--seed",
        str(args.seed),
    ]
    if args.tiny:
        cmd.append("--tiny")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode:
        sys.stdout.write(proc.stderr[-3000:])
        return {"error": proc.stderr[-1000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- covjax


def measure_ceilings(jax, jnp):
    """(HBM bytes/s from a large elementwise copy, bf16 matmul FLOP/s from a large matmul)."""
    on_cpu = jax.default_backend() == "cpu"
    n = (1 << 22) if on_cpu else (1 << 29)  # 8 MiB on CPU, 1 GiB on an accelerator
    x = jax.random.normal(jax.random.key(1), (n,), jnp.bfloat16)
    copy = jax.jit(lambda a: a * 2)
    jax.block_until_ready(copy(x))
    seconds = _median_time(lambda: jax.block_until_ready(copy(x)), 10)
    bandwidth = 2 * x.nbytes / seconds
    m = 1024 if on_cpu else 8192
    a = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(3), (m, m), jnp.bfloat16)
    matmul = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(matmul(a, b))
    seconds = _median_time(lambda: jax.block_until_ready(matmul(a, b)), 10)
    return bandwidth, 2 * m**3 / seconds


def roofline_seconds(config, num_params, batch, prompt_len, new_tokens, bandwidth, flop_rate):
    """(prefill, decode) roofline seconds of one generate call; see the module docstring."""
    c = config
    kv_bytes_per_slot = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2  # bf16
    attn_flops_per_slot = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim
    embed = c.vocab_size * c.hidden_size
    # Matmul weights touched per token: every layer weight plus the unembedding (the embedding
    # lookup reads one row; tied, the matrix is counted once, as the unembedding).
    matmul_params = num_params - (0 if c.tie_word_embeddings else embed)
    weight_bytes = 2 * num_params
    prefill_tokens = batch * (prompt_len - 1)
    prefill = (
        2 * (matmul_params - embed) * prefill_tokens
        + attn_flops_per_slot * batch * prompt_len**2 / 2
    ) / flop_rate
    decode = 0.0
    for step in range(new_tokens):
        context = prompt_len + step
        byte_count = weight_bytes + batch * context * kv_bytes_per_slot
        flops = 2 * matmul_params * batch + attn_flops_per_slot * batch * context
        decode += max(byte_count / bandwidth, flops / flop_rate)
    return prefill, decode


def measure_tail(generate, batch, first_s, args) -> list[dict]:
    """Time per decode step when only some rows are active (the rest stop after one token)."""
    import numpy as np

    tail = []
    name = f"tail batch={batch}"
    for active in sorted({max(1, round(f * batch)) for f in args.tail}, reverse=True):
        budgets = [args.new_tokens] * active + [1] * (batch - active)
        seconds = _median_time(lambda b=budgets: generate(args.new_tokens, b, key=3), args.repeats)
        step_ms = 1e3 * (seconds - first_s) / (args.new_tokens - 1)
        tail.append(
            dict(
                batch=batch,
                active_fraction=active / batch,
                ms_per_step=round(step_ms, 3),
                useful_tok_per_s=round(sum(budgets) / seconds, 1),
            )
        )
        print(
            f"[covjax] {name} active={active / batch:.3f}: {step_ms:.3f} ms/step, "
            f"{tail[-1]['useful_tok_per_s']:.1f} useful tok/s",
            flush=True,
        )
    budgets = np.random.default_rng(args.seed).integers(1, args.new_tokens + 1, batch).tolist()
    seconds = _median_time(lambda: generate(args.new_tokens, budgets), args.repeats)
    tail.append(
        dict(
            batch=batch,
            active_fraction="uniform lengths",
            useful_tok_per_s=round(sum(budgets) / seconds, 1),
            seconds=round(seconds, 4),
        )
    )
    print(
        f"[covjax] {name} uniform lengths in [1, {args.new_tokens}]: "
        f"{tail[-1]['useful_tok_per_s']:.1f} useful tok/s",
        flush=True,
    )
    return tail


def run_covjax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from covjax.model import ModelConfig, Transformer
    from covjax.sampler import Sampler, SamplingParams

    bandwidth, flop_rate = measure_ceilings(jax, jnp)
    device = jax.devices()[0]
    print(
        f"[covjax] device={getattr(device, 'device_kind', device.platform)} "
        f"HBM copy {bandwidth / 1e9:.0f} GB/s, bf16 matmul {flop_rate / 1e12:.1f} TFLOP/s",
        flush=True,
    )
    config = ModelConfig(
        architecture="qwen2",
        attention_bias=True,
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
        **SHAPES[args.size],
    )
    t0 = time.perf_counter()
    model = Transformer(config, rngs=nnx.Rngs(args.seed))
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    results, tail = [], []
    total_compilations = 0
    for batch in args.batch:
        sampler = Sampler(model, length_buckets=(args.prompt_len,), batch_buckets=(batch,))
        prompts = rng.integers(1, config.vocab_size, (batch, args.prompt_len)).tolist()

        def generate(new_tokens, budgets=None, key=0, sampler=sampler, prompts=prompts):
            return sampler.generate(
                prompts,
                SamplingParams(max_new_tokens=new_tokens, temperature=1.0),
                rng=jax.random.key(key),
                budgets=budgets,
            )

        t0 = time.perf_counter()
        rollout = generate(args.new_tokens)
        compile_s = time.perf_counter() - t0
        assert (rollout.lengths == args.new_tokens).all()
        e2e_s = _median_time(
            lambda generate=generate: generate(args.new_tokens, key=1), args.repeats
        )
        # Every row's budget 1: the same program runs the prefill and one decode step.
        first_s = _median_time(
            lambda generate=generate, b=[1] * batch: generate(args.new_tokens, b, key=2),
            args.repeats,
        )
        decode_s = e2e_s - first_s
        prefill_roof, decode_roof = roofline_seconds(
            config, num_params, batch, args.prompt_len, args.new_tokens, bandwidth, flop_rate
        )
        res = dict(
            batch=batch,
            compile_and_first_call_s=round(compile_s, 2),
            e2e_s=round(e2e_s, 4),
            new_tok_per_s=round(batch * args.new_tokens / e2e_s, 1),
            prefill_plus_first_token_s=round(first_s, 4),
            decode_s=round(decode_s, 4),
            decode_tok_per_s=round(batch * (args.new_tokens - 1) / decode_s, 1),
            ms_per_decode_step=round(1e3 * decode_s / (args.new_tokens - 1), 3),
            roofline_e2e_s=round(prefill_roof + decode_roof, 4),
            pct_roofline_e2e=round(100 * (prefill_roof + decode_roof) / e2e_s, 1),
            pct_roofline_decode=round(100 * decode_roof / decode_s, 1),
        )
        results.append(res)
        print(
            f"[covjax] batch={batch:5d} e2e {res['new_tok_per_s']:>10.1f} new tok/s "
            f"(call {e2e_s:.3f}s; prefill+1 {first_s:.3f}s; decode {res['decode_tok_per_s']:.1f}"
            f" tok/s, {res['ms_per_decode_step']:.3f} ms/step); roofline "
            f"{res['pct_roofline_e2e']}% e2e, {res['pct_roofline_decode']}% decode",
            flush=True,
        )

        if batch == max(args.batch) and args.tail:
            tail = measure_tail(generate, batch, first_s, args)
        total_compilations += sampler.num_compilations
    return dict(
        device=str(device),
        device_kind=getattr(device, "device_kind", None),
        jax=jax.__version__,
        hbm_copy_gb_per_s=round(bandwidth / 1e9, 1),
        bf16_matmul_tflop_per_s=round(flop_rate / 1e12, 1),
        num_params=int(num_params),
        model_build_s=round(build_s, 2),
        num_compilations=total_compilations,
        results=results,
        tail=tail,
    )


def main(argv=None):
    args = parse_args(argv)
    if args.peer_child:
        print(json.dumps(run_transformers_peer(args)))
        return
    record = dict(
        benchmark="covjax.sampler",
        size=args.size,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        temperature=1.0,
        batches=args.batch,
    )
    if args.peer == "transformers":
        record["transformers"] = transformers_peer_in_child(args)
    record["covjax"] = run_covjax(args)
    for peer in ("transformers",):
        if isinstance(record.get(peer), list):
            for ours, theirs in zip(record["covjax"]["results"], record[peer], strict=True):
                ratio = ours["new_tok_per_s"] / theirs["new_tok_per_s"]
                ours[f"speedup_vs_{peer}"] = round(ratio, 2)
    line = json.dumps(record)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "sampler_bench.json"), "w") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
