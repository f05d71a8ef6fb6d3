"""One markdown table from the logs of benchmarks/gpu_suite.sh (its RESULT and JSON lines).

    python benchmarks/gpu_summary.py build/gpu_suite
"""

from __future__ import annotations

import json
import os
import sys


def _result(out_dir: str, name: str, prefix: str = "RESULT ") -> dict | None:
    """The last line of out_dir/name.log that starts with prefix, parsed as JSON."""
    path = os.path.join(out_dir, f"{name}.log")
    if not os.path.exists(path):
        return None
    lines = [ln[len(prefix):] for ln in open(path) if ln.startswith(prefix)]
    return json.loads(lines[-1]) if lines else None


def _fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}" if isinstance(x, float) else str(x)


def rows(out_dir: str) -> list[tuple[str, str, str]]:
    """(benchmark, figure, value) rows from every log that is there."""
    out = []
    if losses := _result(out_dir, "losses"):
        b, t = losses["size"]
        for name, ratio in losses["x_ppo"].items():
            out.append((f"loss fwd+bwd [{b}x{t}]", f"{name} ms (x ppo)",
                        f"{losses['median_ms'][name]:.3f} ({ratio:.2f}x)"))
        for name, ms in losses.get("primitives_ms", {}).items():
            out.append(("selection primitive", f"{name} ms", f"{ms:.3f}"))
    if step := _result(out_dir, "train_step"):
        for impl in ("covjax", "torch"):
            r = step.get(impl) or {}
            out.append(("train step", f"{impl} tokens/s | MFU | peak GiB",
                        f"{_fmt(r.get('tokens_per_s'), 0)} | {_fmt(r.get('mfu'))} | "
                        f"{_fmt(r.get('peak_memory_gib'), 1)}"))
        out.append(("train step", "covjax / torch", _fmt(step.get("speedup_vs_torch"), 2)))
    sampler_path = os.path.join(out_dir, "sampler_bench.json")
    if os.path.exists(sampler_path):
        sampler = json.load(open(sampler_path))
        for r in sampler["covjax"]["results"]:
            out.append(("sampler", f"covjax batch {r['batch']} new tok/s (% roofline)",
                        f"{r['new_tok_per_s']:,.0f} ({r['pct_roofline_e2e']}%)"))
        for r in sampler["covjax"].get("tail", []):
            if "ms_per_step" in r:
                out.append(("sampler tail", f"batch {r['batch']} active {r['active_fraction']} "
                            "ms/step", f"{r['ms_per_step']}"))
        for r in sampler.get("transformers") or []:
            out.append(("sampler peer", f"transformers batch {r.get('batch')} new tok/s",
                        _fmt(r.get("new_tok_per_s"), 0)))
    tunix_path = os.path.join(out_dir, "tunix_probe.json")
    if os.path.exists(tunix_path):
        for r in json.load(open(tunix_path))["results"]:
            out.append(("sampler peer", f"tunix batch {r.get('batch')} new tok/s",
                        _fmt(r.get("e2e_new_tok_per_s"), 0)))
    if rl := _result(out_dir, "rl_step"):
        for phase in ("rollout", "old_logp", "update"):
            out.append(("rl step", f"{phase} s (tokens/s)",
                        f"{rl[phase + '_s']:.3f} ({rl[phase + '_tokens_per_s']:,.0f})"))
        out.append(("rl step", "selection / update", f"{rl['selection_frac_of_update']:.2%}"))
        out.append(("rl step", "peak memory GiB", f"{rl['peak_memory_gib']:.1f}"))
    return out


def main(out_dir: str) -> None:
    print("| benchmark | figure | value |\n|---|---|---|")
    for bench, figure, value in rows(out_dir):
        print(f"| {bench} | {figure} | {value} |")


if __name__ == "__main__":
    main(sys.argv[1])
