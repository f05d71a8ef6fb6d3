"""Training-step speed of the covjax model against transformers' PyTorch model (issue 3).

One step = forward + backward + AdamW update of a Qwen2.5-0.5B-shaped model (random weights,
float32 master weights, bfloat16 matmuls) on 8 x 2048 tokens, loss = mean token cross-entropy.

    python benchmarks/train_step.py --peer torch          # one H100/H200: covjax and PyTorch
    python benchmarks/train_step.py --tiny --peer torch   # a small shape on CPU (seconds)

Prints tokens/s, step time, MFU and peak memory per implementation, then one JSON line
(prefix "RESULT ") for benchmarks/gpu_suite.sh to collect.

MFU = (6 * N_params * tokens + attention FLOPs) / step time / peak bf16 FLOP/s, with N_params
including the (tied) output projection and causal attention counted as 6 * L * H * Dh * T per
token (forward + backward, the masked half not counted). Peak: 989e12 for H100/H200 SXM dense.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from covjax.model import ModelConfig, Transformer

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


@dataclasses.dataclass(frozen=True)
class Shape:
    """Model and batch shape of the benchmark (defaults: Qwen2.5-0.5B at 8 x 2048 tokens)."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    batch: int = 8
    seq_len: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


TINY = Shape(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    batch=2,
    seq_len=32,
)


def num_params(s: Shape) -> int:
    """Parameters of the tied Qwen2 model (q/k/v biases included)."""
    q, kv = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    attn = s.hidden_size * (q + 2 * kv) + (q + 2 * kv) + q * s.hidden_size
    mlp = 3 * s.hidden_size * s.intermediate_size
    layer = attn + mlp + 2 * s.hidden_size
    return s.vocab_size * s.hidden_size + s.num_hidden_layers * layer + s.hidden_size


def step_flops(s: Shape) -> float:
    """Training FLOPs of one step: 6 N per token plus causal attention (module docstring)."""
    tokens = s.batch * s.seq_len
    attention = 6 * s.num_hidden_layers * s.num_attention_heads * s.head_dim * s.seq_len
    return float(tokens * (6 * num_params(s) + attention))


def peak_flops(override: float | None) -> float | None:
    if override:
        return override
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind), None)


def _token_batch(s: Shape, seed: int) -> np.ndarray:
    """[B, T + 1] random token ids: inputs are [:, :-1], targets [:, 1:]."""
    return np.random.default_rng(seed).integers(0, s.vocab_size, (s.batch, s.seq_len + 1))


def _covjax_ce(hidden, unembed, targets, chunk_size: int = 1024):
    """log p(target) via covjax.losses (float32 logits one chunk of tokens at a time)."""
    from covjax.losses import logprobs_and_entropy_chunked

    logp, _ = logprobs_and_entropy_chunked(hidden, unembed, targets, chunk_size=chunk_size)
    return logp


def covjax_config(s: Shape, args) -> ModelConfig:
    """The Qwen2.5-style covjax config of the benchmark shape."""
    return ModelConfig(
        architecture="qwen2",
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        head_dim=s.head_dim,
        rope_theta=1e6,
        tie_word_embeddings=True,
        attention_bias=True,
        max_position_embeddings=32768,
        param_dtype="float32",
        compute_dtype="bfloat16",
        remat=args.remat,
        scan_layers=not args.no_scan,
        attention_impl=args.attention,
    )


def make_covjax_step(s: Shape, args):
    """(jitted train_step(params, opt_state, tokens), params, opt_state, tokens)."""
    config = covjax_config(s, args)
    model = nnx.jit(lambda: Transformer(config, rngs=nnx.Rngs(0)))()
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-5, b1=0.9, b2=0.95, weight_decay=0.01)
    opt_state = jax.jit(tx.init)(params)

    def loss_fn(params, tokens):
        m = nnx.merge(graphdef, params)
        hidden = m.hidden_states(tokens[:, :-1])
        return -jnp.mean(_covjax_ce(hidden, m.unembed_kernel(), tokens[:, 1:]))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    tokens = jnp.asarray(_token_batch(s, 0), jnp.int32)
    return train_step, params, opt_state, tokens


def run_covjax(s: Shape, args) -> dict:
    train_step, params, opt_state, tokens = make_covjax_step(s, args)
    t0 = time.perf_counter()
    params, opt_state, loss = train_step(params, opt_state, tokens)
    first_loss = float(loss)
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        params, opt_state, loss = train_step(params, opt_state, tokens)
    loss.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        params, opt_state, loss = train_step(params, opt_state, tokens)
    last_loss = float(loss)
    step_s = (time.perf_counter() - t0) / args.steps
    stats = jax.devices()[0].memory_stats() or {}
    return _summary(
        "covjax",
        s,
        step_s,
        args,
        peak_bytes=stats.get("peak_bytes_in_use"),
        first_loss=first_loss,
        last_loss=last_loss,
        compile_s=compile_s,
        attention=args.attention,
        remat=args.remat,
        scan_layers=not args.no_scan,
        device=jax.devices()[0].device_kind,
    )


def run_torch(s: Shape, args) -> dict:
    """transformers' Qwen2ForCausalLM: fp32 parameters, bf16 autocast, sdpa attention, AdamW."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The same model as covjax's side: its config written as Hugging Face's config.json.
    hf_config = transformers.Qwen2Config(**covjax_config(s, args).to_hf_config())
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(hf_config).to(device).train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=1e-5,
        betas=(0.9, 0.95),
        weight_decay=0.01,
        fused=device == "cuda",
    )
    tokens = torch.as_tensor(_token_batch(s, 0), device=device)

    def train_step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            logits = model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, s.vocab_size), tokens[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    first_loss = float(train_step().detach())
    for _ in range(args.warmup):
        train_step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step()
    sync()
    step_s = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return _summary(
        "torch",
        s,
        step_s,
        args,
        peak_bytes=peak,
        first_loss=first_loss,
        last_loss=float(loss.detach()),
        num_params=sum(p.numel() for p in model.parameters()),
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch_version=torch.__version__,
    )


def _summary(name: str, s: Shape, step_s: float, args, *, peak_bytes, **extra) -> dict:
    tokens = s.batch * s.seq_len
    peak = peak_flops(args.peak_tflops * 1e12 if args.peak_tflops else None)
    result = {
        "impl": name,
        "tokens_per_s": tokens / step_s,
        "step_s": step_s,
        "mfu": step_flops(s) / step_s / peak if peak else None,
        "peak_memory_gib": peak_bytes / 2**30 if peak_bytes else None,
        **extra,
    }
    mfu = f"{result['mfu']:.3f}" if result["mfu"] is not None else "n/a (unknown peak)"
    mem = f"{result['peak_memory_gib']:.1f} GiB" if peak_bytes else "n/a"
    print(
        f"{name:>7}: {result['tokens_per_s']:,.0f} tokens/s  step {step_s * 1e3:.1f} ms  "
        f"MFU {mfu}  peak memory {mem}  loss {extra['first_loss']:.3f} -> "
        f"{extra['last_loss']:.3f}",
        flush=True,
    )
    return result


def _run_subprocess(impl: str, argv) -> dict:
    """Runs this script with --impl in a fresh process; returns its RESULT dict."""
    cmd = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv), "--impl", impl]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    lines = proc.stdout.splitlines()
    print("\n".join(line for line in lines if not line.startswith(("RESULT ", "shape "))))
    results = [line for line in lines if line.startswith("RESULT ")]
    if proc.returncode or not results:
        return {"impl": impl, "error": f"exit status {proc.returncode}"}
    return json.loads(results[-1][len("RESULT ") :])


def long_tailed_lengths(rows: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Response lengths [rows] in 1..cap: lognormal with median 0.2 * cap, 5% cut at the cap
    (sigma = ln 5 / z_0.95, so P(length > cap) = 0.05), as reasoning models' responses."""
    sigma = np.log(5.0) / 1.6448536
    lengths = np.exp(np.log(0.2 * cap) + sigma * rng.standard_normal(rows))
    return np.clip(np.ceil(lengths), 1, cap).astype(np.int64)


def token_counts(args) -> dict:
    """Computed / real tokens of the old-log-prob pass and the update on long-tailed responses,
    rows computed as covjax.train_step plans them against every row computed to P + R - 1.

    The 7B recipe's shapes: 256 prompts x 8 responses per step, mini-batches of 32 x 8 rows,
    micro-batches of 16; prompts fill their P columns (the sampler's prompt buckets are not
    counted here), so the real tokens of a row are P + its response length - 1 inputs.
    """
    from covjax.train_step import computed_tokens, plan_micro_batches

    rng = np.random.default_rng(0)
    rows, mini, micro, cap, prompt = 2048, 256, 16, 8192, args.prompt_columns
    ratios: dict[str, list[float]] = {}
    for _ in range(args.steps):
        mask = np.arange(cap)[None, :] < long_tailed_lengths(rows, cap, rng)[:, None]
        real = rows * (prompt - 1) + int(mask.sum())
        response = int(mask.sum())
        for name, group, granularity in (
            ("old_logp", rows, args.granularity),
            ("update", mini, args.granularity),
            ("padded", rows, cap),
        ):
            plan = [mb for start in range(0, rows, group)
                    for mb in plan_micro_batches(mask[start:start + group], micro, granularity)]
            ratios.setdefault(name, []).append(computed_tokens(plan, prompt) / real)
            cols = sum(len(mb.rows) * mb.length for mb in plan)
            ratios.setdefault(name + "_response", []).append(cols / response)
    result = {k: float(np.mean(v)) for k, v in ratios.items()}
    print(f"{args.steps} steps of {rows} rows, responses <= {cap} (lognormal, median 0.2 cap, "
          f"5% at cap), P = {prompt}, micro-batches of {micro}, granularity {args.granularity}")
    print("| pass | computed / real tokens | response columns / response tokens |")
    print("|---|---|---|")
    for name in ("padded", "old_logp", "update"):
        print(f"| {name} | {result[name]:.3f} | {result[name + '_response']:.3f} |")
    return {"benchmark": "token_counts", "granularity": args.granularity, **result}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer", choices=("none", "torch"), default="none")
    parser.add_argument("--tiny", action="store_true", help="small shape, runs on CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--remat", choices=("none", "layer", "dots"), default="none")
    parser.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto")
    parser.add_argument("--no-scan", action="store_true", help="Python loop over layers")
    parser.add_argument(
        "--impl",
        choices=("covjax", "torch"),
        default=None,
        help="run only this implementation in this process (the default runs each in a fresh "
        "subprocess, so JAX's preallocated GPU memory never starves PyTorch)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the peak")
    parser.add_argument(
        "--token-count", action="store_true",
        help="only count computed / real tokens of the update on long-tailed lengths (CPU)",
    )
    parser.add_argument("--granularity", type=int, default=256, help="train.length_granularity")
    parser.add_argument("--prompt-columns", type=int, default=256, help="P of --token-count")
    args = parser.parse_args(argv)
    if args.token_count:
        print("RESULT " + json.dumps(token_counts(args)), flush=True)
        return

    shape = TINY if args.tiny else Shape()
    if args.batch:
        shape = dataclasses.replace(shape, batch=args.batch)
    if args.seq_len:
        shape = dataclasses.replace(shape, seq_len=args.seq_len)
    print(
        f"shape {shape}, {num_params(shape) / 1e6:.1f}M params, "
        f"{step_flops(shape) / 1e12:.2f} TFLOP/step, jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}",
        flush=True,
    )
    if args.impl is not None:
        run = run_covjax if args.impl == "covjax" else run_torch
        print("RESULT " + json.dumps(run(shape, args)), flush=True)
        return
    results = {"benchmark": "train_step", "shape": dataclasses.asdict(shape)}
    results["num_params"] = num_params(shape)
    for impl in ("covjax", "torch") if args.peer == "torch" else ("covjax",):
        results[impl] = _run_subprocess(impl, argv)
    if "tokens_per_s" in results["covjax"] and "tokens_per_s" in results.get("torch", {}):
        results["speedup_vs_torch"] = (
            results["covjax"]["tokens_per_s"] / results["torch"]["tokens_per_s"]
        )
        print(f"covjax / torch tokens/s: {results['speedup_vs_torch']:.2f}x")
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
