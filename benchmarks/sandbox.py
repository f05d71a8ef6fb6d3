"""Scoring throughput of the code sandbox: programs per second for a typical standard-input
problem with 10 tests, at each isolation level this machine has, against bare subprocesses.

Run from an install (pip install -e .) or with PYTHONPATH=. from the repository root:

    python benchmarks/sandbox.py                   # 64 programs, workers = the cores
    python benchmarks/sandbox.py --programs 256 --workers 8

"bare" runs each test as `python solution.py` in a subprocess with its input and a timeout, the
same pool of threads and nothing else: no limits, no directory of its own, no isolation. The
sandbox levels run the same programs through covjax.rewards.code.score_batch; every program is
correct, so each level runs all 10 tests of every program.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time

from covjax.rewards import code, sandbox

PROGRAM = "import sys\nn, *xs = map(int, sys.stdin.read().split())\nprint(sum(xs[:n]))\n"
INPUTS = [f"{k}\n" + " ".join(str(i * k) for i in range(k)) + "\n" for k in range(1, 11)]
TRUTH = json.dumps(
    {"inputs": INPUTS, "outputs": [f"{k * k * (k - 1) // 2}\n" for k in range(1, 11)]}
)


def bare(programs: int, workers: int) -> float:
    """Programs per second of unconfined `python solution.py` runs, one per test."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "solution.py")
        with open(path, "w") as f:
            f.write(PROGRAM)

        def run(_):
            for stdin in INPUTS:
                subprocess.run(
                    [sys.executable, path], input=stdin.encode(), capture_output=True, timeout=5
                )

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, range(programs)))
        return programs / (time.perf_counter() - start)


def level(name: str, programs: int, workers: int) -> float:
    """Programs per second through the sandbox at isolation level `name`."""
    box = sandbox.Sandbox(workers=workers, isolation=name)
    response = f"```python\n{PROGRAM}```"
    start = time.perf_counter()
    rewards, _ = code.score_batch([response] * programs, [TRUTH] * programs, box)
    elapsed = time.perf_counter() - start
    box.close()
    assert rewards.min() == 1.0, "a correct program failed"
    return programs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    levels = ["rlimit"] + ([] if sandbox._bwrap_works() else ["bwrap"])
    results = {"bare": bare(args.programs, args.workers)}
    results |= {name: level(name, args.programs, args.workers) for name in levels}
    print(
        json.dumps(
            {
                "programs": args.programs,
                "workers": args.workers,
                "tests": len(INPUTS),
                "cpus": os.cpu_count(),
                "programs_per_s": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
