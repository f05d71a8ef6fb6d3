"""covjax.rewards.math: answer extraction, math-verify equivalence, the hard per-check timeout."""

import os
import select
import time

import pytest

from covjax import rewards
from covjax.rewards import math as math_reward

# (response, ground truth, expected reward): each expectation is the mathematical truth.
CASES = [
    # fractions
    (r"The answer is \boxed{\frac{1}{2}}.", "1/2", 1.0),
    (r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}", 1.0),
    (r"\boxed{\tfrac{3}{4}}", "0.75", 1.0),
    (r"\boxed{\frac{6}{8}}", r"\frac34", 1.0),
    (r"\boxed{\frac{2}{3}}", r"\frac{3}{2}", 0.0),
    (r"\boxed{-\frac{1}{2}}", r"\frac{1}{2}", 0.0),
    (r"\boxed{\frac{-1}{2}}", r"-\frac{1}{2}", 1.0),
    (r"\boxed{1/3}", r"\frac{1}{3}", 1.0),
    # decimals
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{2.50}", "2.5", 1.0),
    (r"\boxed{3.14}", r"\pi", 0.0),
    (r"\boxed{0.333}", r"\frac{1}{3}", 0.0),
    (r"\boxed{1.25}", "1.2", 0.0),
    (r"\boxed{100}", "100.0", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    # integers
    (r"\boxed{42}", "42", 1.0),
    (r"\boxed{41}", "42", 0.0),
    (r"\boxed{-7}", "7", 0.0),
    (r"\boxed{007}", "7", 1.0),
    # roots and latex forms
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", 1.0),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt2}{2}", 1.0),
    (r"\boxed{\sqrt{3}}", r"\sqrt{2}", 0.0),
    (r"\boxed{3+2\sqrt{2}}", r"(1+\sqrt{2})^2", 1.0),
    (r"\boxed{\pi/2}", r"\frac{\pi}{2}", 1.0),
    (r"\boxed{2^{10}}", "1024", 1.0),
    (r"\boxed{\left(\frac{1}{2}\right)^{2}}", "0.25", 1.0),
    (r"\boxed{x^2+2x+1}", r"(x+1)^2", 1.0),
    (r"\boxed{x^2+1}", r"(x+1)^2", 0.0),
    (r"\boxed{\binom{5}{2}}", "10", 1.0),
    (r"\boxed{\frac{10}{4}}", "2.5", 1.0),
    # intervals
    (r"\boxed{(1, 2]}", "(1,2]", 1.0),
    (r"\boxed{[1, 2]}", "(1,2]", 0.0),
    (r"\boxed{(-\infty, 3)}", r"(-\infty,3)", 1.0),
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3)", 0.0),
    (r"\boxed{[0,1)\cup(1,2]}", r"[0,1)\cup(1,2]", 1.0),
    (r"\boxed{[0,2]}", r"[0,1)\cup(1,2]", 0.0),
    # sets and tuples
    (r"\boxed{\{1, 2, 3\}}", r"\{3,2,1\}", 1.0),
    (r"\boxed{\{1, 2\}}", r"\{1,2,3\}", 0.0),
    (r"\boxed{1, 2}", "2, 1", 1.0),
    (r"\boxed{(3, 4)}", "(3,4)", 1.0),
    (r"\boxed{(4, 3)}", "(3,4)", 0.0),
    # units and degrees
    (r"\boxed{30^\circ}", "30", 1.0),
    (r"\boxed{30}", r"30^\circ", 1.0),
    (r"\boxed{45^{\circ}}", r"30^\circ", 0.0),
    (r"\boxed{5\text{ cm}}", "5", 1.0),
    (r"\boxed{12 \text{ inches}}", "12", 1.0),
    (r"\boxed{12 \text{ inches}}", "13", 0.0),
    (r"\boxed{\$18.90}", "18.90", 1.0),
    (r"\boxed{20\%}", r"20\%", 1.0),
    (r"\boxed{\text{(B)}}", "B", 1.0),
    (r"\boxed{\text{(C)}}", "B", 0.0),
    # equations
    (r"\boxed{x=3}", "3", 1.0),
    (r"\boxed{y = 2x + 1}", "y=2x+1", 1.0),
    # no box
    ("The answer is 42.", "42", 0.0),
    ("", "42", 0.0),
    (r"I think \boxed{42", "42", 0.0),
    # several boxes: the last wins
    (r"First \boxed{41}, no wait, \boxed{42}.", "42", 1.0),
    (r"First \boxed{42}, no wait, \boxed{41}.", "42", 0.0),
    (r"\boxed{42} and then a truncated \boxed{4", "42", 1.0),
    # nested braces
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0),
    (r"\boxed{{{7}}}", "7", 1.0),
    (r"\boxed{\frac{1}{\frac{1}{2}}}", "2", 1.0),
    # boxed inside text and fbox
    (r"So the total is $\boxed{18}$ dollars in all.", "18", 1.0),
    (r"Therefore $x = \boxed{-2}$ is the only root.", "-2", 1.0),
    (r"\fbox{12}", "12", 1.0),
    (r"\boxed 12", "12", 0.0),
    # Answer: lines (the DAPO prompt's format)
    ("Step 1 ...\nAnswer: 34", "34", 1.0),
    ("Reasoning.\nAnswer: $\\frac{1}{2}$", "0.5", 1.0),
    ("answer: 33\nwait.\nAnswer: 34.", "34", 1.0),
    ("Answer: 33", "34", 0.0),
    ("Maybe \\boxed{3} at first.\nAnswer: 5", "5", 1.0),
    ("Answer: 5\nCheck: \\boxed{3}", "5", 0.0),
    ("Answer: \\boxed{\\frac{1}{2}} (checked)", "0.5", 1.0),
    ("\\boxed{5}\nLet me double check the answer: it is 5", "5", 1.0),  # prose, not a line
    ("**Answer:** 5", "5", 1.0),
    ("> Final Answer: $7$", "7", 1.0),
    ("- Answer: 5", "5", 1.0),
    ("**Final Answer**: 5", "5", 1.0),
    ("Answer: **5**", "5", 1.0),
    ("\\boxed{5}\n**Answer:** \n", "5", 1.0),  # an empty Answer line is no answer
    # ground truth written with $...$ or a box
    (r"\boxed{5}", "$5$", 1.0),
    (r"\boxed{5}", r"\boxed{5}", 1.0),
]

# sympy does not finish evaluating this power tower (measured: still running after 60 s).
PATHOLOGICAL = r"\boxed{9^{9^{9^{9}}}}"


def test_table_of_answers():
    assert len(CASES) >= 60
    responses, truths, expected = zip(*CASES, strict=True)
    scores = math_reward.score_batch(responses, truths, num_workers=2, timeout_s=30.0)
    mismatches = [(c, s) for c, s in zip(CASES, scores, strict=True) if s != c[2]]
    assert mismatches == []


def test_extract_answer():
    assert math_reward.extract_answer(r"a \boxed{\frac{1}{2}} b \fbox{x^{2}}") == "x^{2}"
    assert math_reward.extract_answer(r"\boxed{ $5$. }") == "5"
    assert math_reward.extract_answer(r"\boxed{\boxed{5}}") == "5"
    assert math_reward.extract_answer("Answer: $7$.\n") == "7"
    assert math_reward.extract_answer("no final answer") is None


def test_reward_values_and_compute_score():
    assert math_reward.compute_score(r"\boxed{2}", "2", correct=1.0, incorrect=-1.0) == 1.0
    assert math_reward.compute_score(r"\boxed{3}", "2", correct=1.0, incorrect=-1.0) == -1.0
    assert math_reward.compute_score("no answer", "2", correct=1.0, incorrect=-1.0) == -1.0
    assert math_reward.compute_score(r"\boxed{2}", "2") == 1.0
    assert math_reward.compute_score(r"\boxed{3}", "2") == 0.0


def test_timeout_kills_the_stuck_worker_and_keeps_order():
    pool = math_reward.shared_pool(2)
    pool.check([r"\boxed{1}"] * 2, ["1"] * 2, timeout_s=30.0)  # workers started and warm
    restarts = pool.num_restarts
    limit = 1.0
    responses = [r"\boxed{1}", PATHOLOGICAL, r"\boxed{3}", r"\boxed{5}", r"\boxed{4}"]
    truths = ["1", "1", "3", "4", "4"]
    start = time.monotonic()
    scores = math_reward.score_batch(
        responses, truths, correct=1.0, incorrect=-1.0, num_workers=2, timeout_s=limit
    )
    elapsed = time.monotonic() - start
    assert scores == [1.0, -1.0, 1.0, -1.0, 1.0]
    assert pool.num_restarts == restarts + 1  # the deadline fired, not a quick False
    # Correctness of the deadline, not a speed target: without it the call never returns.
    # The slack covers the other items and a replacement worker's start-up on a loaded machine.
    assert elapsed < limit + 20.0
    # The replacement worker serves later calls.
    assert math_reward.score_batch([r"\boxed{8}"] * 3, ["8"] * 3, num_workers=2) == [1.0] * 3


def _wait_until_ready(pool):
    """Drives `pool` until every worker has announced it is ready: waits (bounded) for a
    starting worker to write, then lets a call read it. No sleeping on the start-up time."""
    deadline = time.monotonic() + math_reward.WORKER_START_TIMEOUT_S
    while starting := [w for w in pool.workers if not w.ready]:
        readable, _, _ = select.select(starting, [], [], max(0.0, deadline - time.monotonic()))
        assert readable, f"workers not ready in {math_reward.WORKER_START_TIMEOUT_S:g} s"
        # The call's first wait sees every readable starting worker and reads its line.
        assert pool.check([r"\boxed{1}"], ["1"], timeout_s=30.0) == [True]


def test_dead_workers_are_replaced_whether_idle_or_starting():
    pool = math_reward.VerifierPool(2)
    try:
        _wait_until_ready(pool)
        assert pool.check([r"\boxed{1}"] * 2, ["1"] * 2, timeout_s=30.0) == [True, True]
        assert pool.num_restarts == 0
        pool.workers[0].proc.kill()  # idle and ready: its pipe breaks on the next item
        pool.workers[0].proc.wait()
        assert pool.check([r"\boxed{2}", r"\boxed{3}", r"\boxed{4}"], ["2", "3", "5"],
                          timeout_s=30.0) == [True, True, False]
        assert pool.num_restarts == 1
        pool.workers.append(math_reward._Worker(pool.memory_limit_mb))
        pool.workers[-1].proc.kill()  # dies before it is ready: a failed start, replaced
        pool.workers[-1].proc.wait()  # its pipe is closed: the next call's first wait sees it
        assert pool.check([r"\boxed{6}"] * 3, ["6"] * 3, timeout_s=30.0) == [True] * 3
        assert pool.num_restarts == 2 and all(w.proc.poll() is None for w in pool.workers)
        _wait_until_ready(pool)  # the replacements start and serve
        assert pool.check([r"\boxed{7}"] * 3, ["7"] * 3, timeout_s=30.0) == [True] * 3
        assert pool.num_restarts == 2 and len(pool.workers) == 3
    finally:
        pool.close()


def test_an_interrupted_call_leaves_no_stale_answers(monkeypatch):
    pool = math_reward.VerifierPool(2)
    try:
        _wait_until_ready(pool)  # so that the interrupted call hands an item to each worker
        assert pool.num_restarts == 0
        real_select = math_reward.select.select

        def interrupted(*args):
            raise KeyboardInterrupt

        monkeypatch.setattr(math_reward.select, "select", interrupted)
        with pytest.raises(KeyboardInterrupt):  # both workers hold an item of this call
            pool.check([r"\boxed{1}", r"\boxed{2}"], ["1", "2"], timeout_s=30.0)
        monkeypatch.setattr(math_reward.select, "select", real_select)
        assert pool.check([r"\boxed{3}"], ["4"], timeout_s=30.0) == [False]  # not item 0's True
        assert pool.num_restarts == 2
    finally:
        pool.close()


def test_batch_order_preserved():
    answers = [str(i) for i in range(24)]
    responses = [rf"\boxed{{{a}}}" for a in answers]
    truths = [a if i % 3 else str(int(a) + 1) for i, a in enumerate(answers)]
    expected = [0.0 if i % 3 == 0 else 1.0 for i in range(24)]
    assert math_reward.score_batch(responses, truths, num_workers=2) == expected


def test_bad_arguments():
    with pytest.raises(ValueError, match="length"):
        math_reward.score_batch(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="timeout_s"):
        math_reward.score_batch(["a"], ["a"], timeout_s=0)
    with pytest.raises(ValueError, match="num_workers"):
        math_reward.VerifierPool(0)
    with pytest.raises(ValueError, match="num_workers must be >= 1, got 0"):
        math_reward.score_batch(["a"], ["a"], num_workers=0)


def test_the_default_pool_follows_the_usable_cpus(monkeypatch):
    """The affinity mask, not the machine's count, sizes the pool; without a mask, the count;
    never more than MAX_WORKERS (a TPU host reports 200+ CPUs)."""
    monkeypatch.delattr(os, "process_cpu_count", raising=False)  # Python 3.13+
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    assert rewards.usable_cpus() == 3
    sizes = []

    class Pool:
        def check(self, responses, ground_truths, *, timeout_s):
            return [True] * len(responses)

    monkeypatch.setattr(math_reward, "shared_pool", lambda n: sizes.append(n) or Pool())
    assert math_reward.score_batch(["a", "b"], ["a", "b"]) == [1.0, 1.0]
    assert sizes == [3]
    monkeypatch.delattr(os, "sched_getaffinity")
    assert rewards.usable_cpus() == 96
    assert math_reward.score_batch(["a"], ["a"]) == [1.0]
    assert sizes == [3, rewards.MAX_WORKERS] and rewards.MAX_WORKERS == 64
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # undeterminable
    assert rewards.usable_cpus() == 1
    monkeypatch.setattr(os, "process_cpu_count", lambda: 12, raising=False)
    assert rewards.usable_cpus() == 12
