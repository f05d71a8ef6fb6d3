"""Memory per device of the paper's recipes (covjax.memory), and a check of that model against
XLA's compiled memory analysis of covjax's own update step.

    python benchmarks/memory_model.py tables          # launch/README.md's tables (instant)
    python benchmarks/memory_model.py check           # CPU, 8 fake devices: ~5 min on 2 cores
    python benchmarks/memory_model.py check --scale=medium --dtype=bfloat16 --run   # on a GPU

`check` builds a scaled-down Qwen2-shaped covjax.model (scan over layers, remat="layer"),
compiles the largest program of covjax.train_step's update, one micro-batch's gradients at the
full response length (Clip-Cov selection as an input, the gradient sum donated) on a (data,
fsdp, tensor) mesh, and compares `memory_analysis()` with covjax.memory: argument bytes against
params + gradients + batch, temp bytes against activations (the AdamW moments stay beside it).
`--run` also runs the update once and reads the device's peak bytes in use.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

if __name__ == "__main__" and "check" in sys.argv:  # 8 fake CPU devices for the sharded cases
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from covjax import memory
from covjax.memory import GB, QWEN2_5_7B, QWEN2_5_32B, MeshShape
from covjax.rollouts import SLOT_MEMORY_FRACTION

PROMPT_LEN, RESPONSE_LEN = 2048, 8192  # the recipe (ALGORITHMS.md 7)
MINI_BATCH = 32 * 8  # sequences per optimizer update: 32 prompts x 8 responses
SEQ_LEN = PROMPT_LEN + RESPONSE_LEN - 1  # the update's input is tokens[:, :-1]
USABLE = 0.9  # of HBM: XLA_PYTHON_CLIENT_MEM_FRACTION on GPUs, runtime reserve on TPUs


@dataclasses.dataclass(frozen=True)
class Setup:
    """One column of the README table: a model on an accelerator slice with a mesh."""

    name: str
    model_name: str
    hbm_gb: float
    mesh: MeshShape
    micro_batch: int  # sequences per device per micro-batch
    fused_attention: bool  # cuDNN flash attention (GPU) or XLA's materialised scores (TPU)

    @property
    def model(self):
        return {"Qwen2.5-7B": QWEN2_5_7B, "Qwen2.5-32B": QWEN2_5_32B}[self.model_name]


SETUPS = (
    Setup("TPU v5p-32 (16 chips)", "Qwen2.5-7B", 95, MeshShape(fsdp=16), 1, False),
    Setup("1 node x 8 H100 80GB", "Qwen2.5-7B", 80, MeshShape(fsdp=8), 2, True),
    Setup("1 node x 8 H200 141GB", "Qwen2.5-7B", 141, MeshShape(fsdp=8), 2, True),
    Setup("TPU v5p-64 (32 chips)", "Qwen2.5-32B", 95, MeshShape(fsdp=8, tensor=4), 1, False),
    Setup("4 nodes x 8 H100 80GB", "Qwen2.5-32B", 80, MeshShape(fsdp=32), 1, True),
    Setup("1 node x 8 H200 141GB", "Qwen2.5-32B", 141, MeshShape(fsdp=8), 1, True),
)

ROWS = (
    ("params", "parameters (fp32)"),
    ("grads", "gradients (fp32: accumulator + micro-batch)"),
    ("adam", "AdamW moments (fp32)"),
    ("compute_weights", "bf16 copy of the weights"),
    ("gathered_weights", "all-gathered weights (2 layers + embeddings, bf16)"),
    ("layer_inputs", "saved layer inputs (remat per layer)"),
    ("layer_working", "one layer's recompute + backward"),
    ("attention_scores", "attention scores (XLA attention, not fused)"),
    ("logits", "one 1024-token chunk of f32 logits"),
)


def setup_estimate(s: Setup) -> dict[str, float]:
    """Every component of the update step's peak, the total, and the rollout KV cache."""
    act = dict(
        micro_batch=s.micro_batch,
        seq_len=SEQ_LEN,
        response_len=RESPONSE_LEN,
        fused_attention=s.fused_attention,
    )
    parts = {
        **memory.training_state_bytes(s.model, s.mesh),
        **memory.activation_bytes(s.model, s.mesh, **act),
    }
    budget = USABLE * s.hbm_gb * GB
    parts["total"] = memory.update_peak_bytes(s.model, s.mesh, **act)
    per_shard = MINI_BATCH // (s.mesh.data * s.mesh.fsdp)
    fits = [
        b
        for b in range(1, per_shard + 1)
        if per_shard % b == 0
        and memory.update_peak_bytes(s.model, s.mesh, **{**act, "micro_batch": b}) <= budget
    ]
    parts["max_micro_batch"] = max(fits, default=0)
    parts["kv_per_seq"] = memory.kv_cache_bytes_per_sequence(
        s.model, s.mesh, PROMPT_LEN + RESPONSE_LEN
    )
    parts["rollout_seqs"] = memory.rollout_sequences(
        s.model, s.mesh, PROMPT_LEN + RESPONSE_LEN, SLOT_MEMORY_FRACTION * budget
    )
    return parts


def markdown_tables() -> str:
    """The README's memory table, one column per setup, GB = 1e9 bytes per device."""
    head = "| per device, GB | " + " | ".join(
        f"{s.model_name}<br>{s.name}<br>mesh fsdp={s.mesh.fsdp}"
        + (f" tensor={s.mesh.tensor}" if s.mesh.tensor > 1 else "")
        + f"<br>micro-batch {s.micro_batch}"
        for s in SETUPS
    )
    lines = [head + " |", "|---" * (len(SETUPS) + 1) + "|"]
    est = [setup_estimate(s) for s in SETUPS]
    for key, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{e[key] / GB:.1f}" for e in est) + " |")
    lines.append(
        "| **update peak** (of usable) | "
        + " | ".join(
            f"**{e['total'] / GB:.1f}** ({USABLE * s.hbm_gb:.0f})"
            for e, s in zip(est, SETUPS, strict=True)
        )
        + " |"
    )
    lines.append(
        "| largest micro-batch that fits (divides the mini-batch) | "
        + " | ".join(str(e["max_micro_batch"]) for e in est)
        + " |"
    )
    lines.append(
        "| rollout KV cache per sequence (10240 tokens, bf16) | "
        + " | ".join(f"{e['kv_per_seq'] / GB:.2f}" for e in est)
        + " |"
    )
    lines.append(
        "| rollout slots per device (KV caches in 90% of usable, beside params + AdamW + bf16 "
        "weights gathered over fsdp) | "
        + " | ".join(str(e["rollout_seqs"]) for e in est)
        + " |"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The check against XLA
# ---------------------------------------------------------------------------------------------

SCALES = {  # scaled-down Qwen2 shapes: (hidden, layers, heads, kv heads, intermediate, vocab)
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=384, vocab_size=512),
    "medium": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=2, intermediate_size=2816, vocab_size=32768),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
    """One compiled update: model scale, dtype, mesh, sequences per device, lengths."""

    scale: str = "tiny"
    dtype: str = "float32"
    mesh: MeshShape = MeshShape()
    micro_batch: int = 2
    prompt_len: int = 64
    response_len: int = 192
    attention: str = "xla"
    logits_chunk: int = 64


def check_case(case: Case, *, run: bool = False) -> dict[str, float]:
    """Compile covjax's update for `case`; XLA's bytes per device next to covjax.memory's."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from covjax import config as config_lib
    from covjax import losses, sharding, train_step
    from covjax.model import ModelConfig, Transformer

    shape = SCALES[case.scale]
    config = ModelConfig(
        architecture="qwen2",
        head_dim=shape["hidden_size"] // shape["num_attention_heads"],
        attention_bias=True,
        compute_dtype=case.dtype,
        remat="layer",
        scan_layers=True,
        attention_impl=case.attention,
        **shape,
    )
    m = case.mesh
    mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor, devices=jax.devices()[: m.devices])
    model = Transformer(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, schedule = train_step.make_optimizer(1e-6, 0.0, 1.0, 0)
    state = train_step.init_state(params, tx)
    rows_per_micro = case.micro_batch * m.data * m.fsdp
    num_micro = 2  # accumulation, as in every recipe mini-batch
    rows, seq, resp = (
        rows_per_micro * num_micro,
        case.prompt_len + case.response_len - 1,
        case.response_len,
    )
    batch = dict(
        input_ids=jnp.ones((rows, seq), jnp.int32),
        positions=jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq)),
        attention_mask=jnp.ones((rows, seq), bool),
        targets=jnp.ones((rows, resp), jnp.int32),
        mask=jnp.ones((rows, resp), bool),
        advantages=jnp.linspace(-1, 1, rows * resp, dtype=jnp.float32).reshape(rows, resp),
        old_logp=jnp.full((rows, resp), -1.0, jnp.float32),
    )
    cfg = dataclasses.replace(  # the schema's step (no entropy or KL term), the paper's loss
        train_step.StepConfig.from_config(config_lib.base_config()),
        loss=losses.LossConfig("clip_cov"), micro_batch_size=rows_per_micro,
        chunk_size=case.logits_chunk,
    )
    with jax.set_mesh(mesh):
        state_sharding = train_step.state_shardings(
            state, sharding.model_shardings(model, mesh), mesh
        )
        batch_sharding = train_step.batch_shardings(batch, mesh)
        fn = train_step.CompiledUpdate(
            graphdef=graphdef, rest=rest, tx=tx, schedule=schedule, cfg=cfg,
            state_sharding=state_sharding, batch_sharding=batch_sharding, mesh=mesh,
        )  # fmt: skip
        analysis = fn.lower_micro_batch(state, batch).compile().memory_analysis()
        result = {}
        if run:
            state = jax.device_put(state, state_sharding)
            batch = jax.device_put(batch, batch_sharding)
            jax.block_until_ready(fn(state, batch, jax.random.key(0)))
            stats = jax.devices()[0].memory_stats() or {}  # None on CPU
            result["measured_peak"] = float(stats.get("peak_bytes_in_use", "nan"))

    st = memory.training_state_bytes(config, m)
    act = memory.activation_bytes(
        config, m, micro_batch=case.micro_batch, seq_len=seq, response_len=resp,
        logits_chunk=case.logits_chunk, fused_attention=case.attention != "xla",
    )  # fmt: skip
    batch_bytes = sum(x.nbytes for x in batch.values()) / (m.data * m.fsdp)
    result.update(
        xla_argument=float(analysis.argument_size_in_bytes),
        xla_output=float(analysis.output_size_in_bytes),
        xla_alias=float(analysis.alias_size_in_bytes),
        xla_temp=float(analysis.temp_size_in_bytes),
        est_argument=st["params"] + st["grads"] + batch_bytes,  # the gradient sum is an argument
        est_temp=sum(act.values()),
    )
    # the AdamW moments stay on the device beside the micro-batch program
    result["est_peak"] = result["est_argument"] + result["est_temp"] + st["adam"]
    return result


def check(cases: list[Case], *, run: bool) -> list[dict]:
    """Prints one markdown row per case: XLA's argument and temp bytes against the estimate."""
    print("| scale | dtype | attention | mesh (data, fsdp, tensor) | micro-batch x tokens | "
          "arguments XLA / est. (MB) | temp XLA / est. (MB) | temp ratio |"
          + (" measured peak / est. (MB) |" if run else ""))  # fmt: skip
    print("|---" * (9 if run else 8) + "|")
    out = []
    for case in cases:
        r = check_case(case, run=run)
        m = case.mesh
        row = (
            f"| {case.scale} | {case.dtype} | {case.attention} | {m.data}, {m.fsdp}, {m.tensor} | "
            f"{case.micro_batch} x {case.prompt_len + case.response_len - 1} | "
            f"{r['xla_argument'] / 1e6:.2f} / {r['est_argument'] / 1e6:.2f} | "
            f"{r['xla_temp'] / 1e6:.2f} / {r['est_temp'] / 1e6:.2f} | "
            f"{r['xla_temp'] / r['est_temp']:.2f} |"
        )
        if run:
            row += f" {r['measured_peak'] / 1e6:.1f} / {r['est_peak'] / 1e6:.1f} |"
        print(row, flush=True)
        out.append({**dataclasses.asdict(case), **r})
    return out


def default_cases(scale: str, dtype: str, attention: str) -> list[Case]:
    """Vary depth, micro-batch, length and mesh around one base case."""
    base = Case(scale=scale, dtype=dtype, attention=attention)
    if scale == "medium":
        base = dataclasses.replace(base, prompt_len=512, response_len=1536, logits_chunk=1024)
    return [
        base,
        dataclasses.replace(base, micro_batch=4),
        dataclasses.replace(
            base, prompt_len=2 * base.prompt_len, response_len=2 * base.response_len
        ),
        dataclasses.replace(base, mesh=MeshShape(fsdp=8)),
        dataclasses.replace(base, mesh=MeshShape(fsdp=4, tensor=2)),
        dataclasses.replace(base, mesh=MeshShape(data=2, fsdp=4)),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tables", help="print launch/README.md's memory table")
    chk = sub.add_parser("check", help="compare with XLA's memory analysis")
    chk.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    chk.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    chk.add_argument("--attention", choices=("xla", "cudnn"), default="xla")
    chk.add_argument("--single-device", action="store_true", help="skip the sharded cases")
    chk.add_argument("--run", action="store_true", help="also run once; read the peak bytes")
    chk.add_argument("--case", type=int, help="only this case (one process per measured peak)")
    chk.add_argument("--json", default="", help="write the results to this file")
    args = parser.parse_args(argv)
    if args.command == "tables":
        print(markdown_tables())
        return
    import jax

    cases = default_cases(args.scale, args.dtype, args.attention)
    cases = [
        c for c in cases if c.mesh.devices <= (1 if args.single_device else jax.device_count())
    ]
    if args.case is not None:
        cases = cases[args.case : args.case + 1]
    results = check(cases, run=args.run)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": str(jax.devices()[0].device_kind), "cases": results}, f, indent=1)


if __name__ == "__main__":
    main()
