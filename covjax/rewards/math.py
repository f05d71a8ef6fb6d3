"""Verifiable math reward: extract the final answer, check it against the ground truth with
math-verify, under a hard wall-clock limit per check.

The reward of the paper's recipe (ALGORITHMS.md section 7) is rule-based: 1 when the final answer
is equivalent to the ground truth, else 0 (or -1, the DAPO recipe's choice). The final answer is
the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces allowed) or the last line
that starts with ``Answer:`` (the DAPO-Math-17k prompts ask for one), whichever comes later; a
response with neither scores ``incorrect``. Equivalence is math-verify's (fractions, decimals,
LaTeX forms, intervals, sets; units, degrees and ``\\text{...}`` stripped by its LaTeX
normalisation).

Sympy can run for hours on an answer such as ``9^{9^{9^{9}}}``. math-verify's own timeout uses
``signal.alarm``, which only works in the main thread, so it is disabled here and the limit is
enforced from outside instead: every check runs in a worker process (a fresh interpreter, never a
fork of a process that holds JAX threads) and a worker that misses its deadline is killed and
replaced; the item scores ``incorrect``. Workers are started once and reused across calls.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from covjax.rewards import default_workers

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_LIMIT_MB = 4096
WORKER_START_TIMEOUT_S = 120.0  # importing math-verify (sympy) takes seconds, not minutes
MAX_START_FAILURES = 3  # in a row, within one call: then the environment is broken, not a worker

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "Answer: ..." at the start of a line (after markdown quote, heading, list or emphasis marks, a
# "1." or "1)", and "Final"), so a later sentence such as "let me check the answer: ..." does
# not replace a box; an empty "Answer:" line is no answer
_ANSWER_LINE = re.compile(
    r"(?im)^[ \t>*#_+-]*(?:\d+[.)][ \t]*)?(?:final\s+)?answer[*_]*[ \t]*:[ \t*_]*([^\s*_][^\n]*)"
)
_DELIMITERS = re.compile(r"^[\s$]+|[\s$.]+$")


def _last_box(text: str) -> tuple[int, str] | None:
    """(start, contents) of the last complete ``\\boxed{...}`` or ``\\fbox{...}`` in `text`
    (nested braces matched), or None. An unclosed box (a truncated response) is skipped."""
    for match in reversed(list(_BOX_OPEN.finditer(text))):
        depth = 1
        for i in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return match.start(), text[match.end() : i]
    return None


def _strip_math(answer: str) -> str:
    """Drop surrounding whitespace, ``$`` delimiters and a trailing full stop."""
    return _DELIMITERS.sub("", answer)


def extract_answer(text: str) -> str | None:
    """The final answer: the last complete box or the last ``Answer:`` line, whichever comes
    later (a box inside that line wins), or None."""
    box = _last_box(text)
    lines = list(_ANSWER_LINE.finditer(text))
    if lines and (box is None or lines[-1].start() > box[0]):
        line = lines[-1].group(1).rstrip().rstrip("*_")  # "Answer: **5**"
        inner = _last_box(line)
        return _strip_math(inner[1] if inner else line)
    return _strip_math(box[1]) if box else None


def _parse(answer: str) -> list:
    """math-verify parse of one bare answer, its own (signal-based) timeout disabled."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    return parse("\\boxed{" + answer + "}", extraction_config=config, parsing_timeout=None)


def is_correct(response: str, ground_truth: str) -> bool:
    """True when the response's final answer is equivalent to `ground_truth` (math-verify).

    No time limit: call it only in a process that may be killed (the workers of `VerifierPool`).
    """
    from math_verify import verify

    answer = extract_answer(response)
    gold_box = _last_box(ground_truth)
    gold_text = _strip_math(gold_box[1] if gold_box else ground_truth)
    if not answer or not gold_text:
        return False
    gold, pred = _parse(gold_text), _parse(answer)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=None))


def serve(memory_limit_mb: int) -> None:
    """Worker loop: read ``[response, ground_truth]`` JSON lines from stdin, write ``true|false``.

    The protocol uses a private copy of stdout; anything the libraries print goes to stderr.
    """
    if sys.platform == "linux":
        import resource

        limit = memory_limit_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  (import before announcing readiness)

    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        response, ground_truth = json.loads(line)
        try:
            ok = is_correct(response, ground_truth)
        except Exception:
            ok = False
        out.write("true\n" if ok else "false\n")
        out.flush()


class _Worker:
    """One worker process running `serve`, talking JSON lines over pipes."""

    def __init__(self, memory_limit_mb: int):
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        code = f"from covjax.rewards.math import serve; serve({int(memory_limit_mb)})"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.ready = False
        self.item: int | None = None
        self.deadline = time.monotonic() + WORKER_START_TIMEOUT_S  # to be ready; then per item

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, item: int, response: str, ground_truth: str, timeout_s: float) -> bool:
        """Hands the worker one item; False when it has died (its pipe is broken)."""
        try:
            self.proc.stdin.write((json.dumps([response, ground_truth]) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            return False
        self.item, self.deadline = item, time.monotonic() + timeout_s
        return True

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:  # unflushed input to a dead process
                pass


class VerifierPool:
    """Worker processes that run `is_correct` with a hard per-item deadline.

    A worker past its deadline, or one that died (while checking, idle or starting), is killed
    and replaced; the item it was checking is False, an item it had not taken goes to another.
    A worker that is not ready within WORKER_START_TIMEOUT_S counts as a failed start; after
    MAX_START_FAILURES in a row a call raises RuntimeError. `num_restarts` counts the
    replacements. Calls from several threads take turns.
    """

    def __init__(self, num_workers: int, *, memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.memory_limit_mb = memory_limit_mb
        self.workers = [_Worker(memory_limit_mb) for _ in range(num_workers)]
        self.num_restarts = 0
        self._lock = threading.Lock()

    def grow(self, num_workers: int) -> None:
        """Start workers until there are `num_workers`."""
        with self._lock:
            while len(self.workers) < num_workers:
                self.workers.append(_Worker(self.memory_limit_mb))

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self.workers[self.workers.index(worker)] = _Worker(self.memory_limit_mb)
        self.num_restarts += 1

    def check(
        self, responses: Sequence[str], ground_truths: Sequence[str], *, timeout_s: float
    ) -> list[bool]:
        """`is_correct` of each pair, order preserved; an item past `timeout_s` seconds of
        checking (worker start-up not counted) is False."""
        if len(responses) != len(ground_truths):
            raise ValueError(
                f"responses and ground_truths differ in length: "
                f"{len(responses)} != {len(ground_truths)}"
            )
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if not self.workers:
            raise RuntimeError("VerifierPool is closed")
        with self._lock:
            try:
                return self._check(responses, ground_truths, timeout_s)
            except BaseException:  # a worker still busy with this call's item must not answer
                for worker in [w for w in self.workers if w.item is not None]:  # the next one's
                    self._replace(worker)
                raise

    def _check(self, responses, ground_truths, timeout_s: float) -> list[bool]:
        """Feed idle workers, collect answers, kill and replace workers past their deadline."""
        results = [False] * len(responses)
        pending = collections.deque(range(len(responses)))
        start_failures = 0

        def failed_start(workers: list[_Worker], why: str) -> None:
            """One failure however many workers it hit (they start together), then replace."""
            nonlocal start_failures
            start_failures += 1
            if start_failures >= MAX_START_FAILURES:
                raise RuntimeError(
                    f"math-verify workers failed to start {start_failures} times in a row (last: "
                    f"{why}); check `python -c 'import math_verify'`"
                )
            for worker in workers:
                self._replace(worker)

        while True:
            for worker in list(self.workers):
                if worker.ready and worker.item is None and pending:
                    i = pending.popleft()
                    if not worker.send(i, str(responses[i]), str(ground_truths[i]), timeout_s):
                        pending.appendleft(i)  # it died idle: the item goes to another worker
                        self._replace(worker)
            busy = [w for w in self.workers if w.item is not None]
            if not busy and not pending:
                return results
            waiting = busy + [w for w in self.workers if not w.ready]
            wait_s = min(w.deadline for w in waiting)
            readable, _, _ = select.select(waiting, [], [], max(0.0, wait_s - time.monotonic()))
            for worker in readable:
                line = worker.proc.stdout.readline()
                if not worker.ready:
                    if line == b"ready\n":
                        worker.ready, start_failures = True, 0
                    else:
                        failed_start([worker], f"a worker exited with code {worker.proc.wait()}")
                elif line:
                    results[worker.item] = line == b"true\n"
                    worker.item = None
                else:
                    self._replace(worker)
            now = time.monotonic()
            for worker in [w for w in self.workers if w.item is not None and w.deadline <= now]:
                self._replace(worker)
            slow = [w for w in self.workers if not w.ready and w.deadline <= now]
            if slow:
                failed_start(slow, f"not ready within {WORKER_START_TIMEOUT_S:g} s")

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        self.workers = []


_POOL: VerifierPool | None = None


def shared_pool(num_workers: int) -> VerifierPool:
    """The process-wide pool, grown to at least `num_workers` workers (closed at exit)."""
    global _POOL
    if _POOL is None:
        _POOL = VerifierPool(num_workers)
        atexit.register(_POOL.close)
    _POOL.grow(num_workers)
    return _POOL


def score_batch(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    *,
    correct: float = 1.0,
    incorrect: float = 0.0,
    num_workers: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[float]:
    """Rule reward of each response (`correct` / `incorrect`), order preserved, each check
    limited to `timeout_s` seconds. `num_workers` defaults to the CPUs this process may use,
    at most 64 (covjax.rewards.default_workers)."""
    if num_workers is None:
        num_workers = default_workers()
    if not num_workers >= 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    ok = shared_pool(num_workers).check(responses, ground_truths, timeout_s=timeout_s)
    return [correct if o else incorrect for o in ok]


def compute_score(
    response: str,
    ground_truth: str,
    *,
    correct: float = 1.0,
    incorrect: float = 0.0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> float:
    """Rule reward of one response: `correct` if its final answer equals `ground_truth`."""
    return score_batch(
        [response],
        [ground_truth],
        correct=correct,
        incorrect=incorrect,
        num_workers=1,
        timeout_s=timeout_s,
    )[0]
