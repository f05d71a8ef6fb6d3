"""Code reward: the response's program, run on its tests in covjax.rewards.sandbox.

The program is the last fenced block opened by three backticks and ``python`` (or ``py``), up
to its closing fence or the end of the response; a response without such a fence is taken whole,
as the reference graders (PRIME's, KodCode's) take it. The reward is 1 when every test passes,
else 0; the fraction of tests passed is reported beside it.

Ground truths are JSON strings, as covjax.data writes them for the code task:

- ``{"inputs": [...], "outputs": [...]}`` (Eurus-2-RL-Code, APPS-style): each input is a
  program's standard input (a string, or a list of its lines); a test passes when the standard
  output equals the expected one up to whitespace (the same whitespace-separated tokens);
- ``{"inputs": [...], "outputs": [...], "fn_name": "f"}``: call-based; each input is the
  argument list of ``f`` (or of ``Solution().f``); a test passes when the JSON of the return
  value equals the expected output, or its only element (APPS wraps return values in a list);
- ``{"pytest": "<source>"}`` (KodCode): the source, saved as ``test_solution.py``, imports the
  program as the module ``solution``; each collected test function is one test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from covjax.rewards.sandbox import Job, Outcome, Sandbox

_FENCE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_program(response: str) -> str:
    """The last fenced Python block of `response` (an unclosed last block runs to the end), or
    the whole response when it has none."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def parse_ground_truth(ground_truth: str) -> dict[str, Any]:
    """The test spec of a ground-truth JSON string; ValueError saying what is wrong."""
    try:
        spec = json.loads(ground_truth)
    except json.JSONDecodeError as e:
        raise ValueError(f"is not JSON ({e})") from e
    if not isinstance(spec, dict):
        raise ValueError(f"is a JSON {type(spec).__name__}, not an object")
    if "pytest" in spec:
        if not isinstance(spec["pytest"], str) or not spec["pytest"].strip():
            raise ValueError("'pytest' is not a non-empty source string")
        return spec
    inputs, outputs = spec.get("inputs"), spec.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or not inputs:
        raise ValueError("has no 'pytest' source and no non-empty 'inputs' and 'outputs' lists")
    if len(inputs) != len(outputs):
        raise ValueError(f"has {len(inputs)} inputs but {len(outputs)} outputs")
    fn_name = spec.get("fn_name")
    if fn_name is not None:
        if not isinstance(fn_name, str) or not fn_name.isidentifier():
            raise ValueError(f"'fn_name' {fn_name!r} is not a Python name")
        if not all(isinstance(args, list) for args in inputs):
            raise ValueError("'inputs' of a call-based problem are not argument lists")
        return spec
    texts = [_lines(x) for x in inputs + outputs]
    if None in texts:
        raise ValueError("'inputs' and 'outputs' of a standard-input problem are not strings")
    return {"inputs": texts[: len(inputs)], "outputs": texts[len(inputs) :]}


def _lines(value: Any) -> str | None:
    """A standard-input test's text: a string, or a list of lines (some APPS rows); else None."""
    if isinstance(value, list) and all(isinstance(line, str) for line in value):
        return "".join(line + "\n" for line in value)
    return value if isinstance(value, str) else None


def make_job(response: str, spec: dict[str, Any]) -> Job:
    """The sandbox job of a response's program on the tests of `spec`."""
    files = {"solution.py": extract_program(response)}
    if "pytest" in spec:
        return Job("pytest", {**files, "test_solution.py": spec["pytest"]})
    if spec.get("fn_name"):
        return Job("call", files, spec["inputs"], spec["fn_name"])
    return Job("stdin", files, spec["inputs"])


def _call_passes(output: str, expected: Any) -> bool:
    try:
        value = json.loads(output)
    except json.JSONDecodeError:
        return False
    return value == expected or (
        isinstance(expected, list) and len(expected) == 1 and value == expected[0]
    )


def fraction_passed(runs: Sequence[Outcome], spec: dict[str, Any]) -> float:
    """The fraction of the spec's tests that `runs` (the sandbox's) pass."""
    if "pytest" in spec:
        try:  # no counts (the program exited before pytest reported): it passes nothing
            passed, collected = (int(x) for x in runs[0].output.split())
        except ValueError:
            return 0.0
        ok = runs[0].status == "ok" and 0 <= passed <= collected
        return passed / collected if ok and collected else 0.0
    check = _call_passes if spec.get("fn_name") else (lambda out, exp: out.split() == exp.split())
    ok = [
        r.status == "ok" and check(r.output, e) for r, e in zip(runs, spec["outputs"], strict=True)
    ]
    return float(np.mean(ok))


def score_batch(
    responses: Sequence[str], ground_truths: Sequence[str], sandbox: Sandbox
) -> tuple[np.ndarray, np.ndarray]:
    """(rewards [N]: 1 when every test passes, else 0; fractions of tests passed [N]), the
    programs run `sandbox.workers` at a time. A malformed ground truth raises ValueError."""
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    specs = [parse_ground_truth(g) for g in ground_truths]
    runs = sandbox.run_many([make_job(r, s) for r, s in zip(responses, specs, strict=True)])
    fractions = np.asarray(
        [fraction_passed(r, s) for r, s in zip(runs, specs, strict=True)], np.float32
    )
    return (fractions == 1.0).astype(np.float32), fractions
