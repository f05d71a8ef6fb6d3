"""`python -m covjax.analyze` in a subprocess: its report against covjax.analysis' own numbers on
the same fake runs, and one line naming the flag for every bad flag value."""

import json
import os
import subprocess
import sys

import pytest
from helpers import assert_one_fatal_line, cli_runner
from test_analysis_plots import assert_png
from test_analysis_runs import write_run

import covjax
from covjax.analysis import runs, stats


def run_analyze(*args):
    root = os.path.dirname(os.path.dirname(covjax.__file__))
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "covjax.analyze", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_analyze_cli_end_to_end(tmp_path):
    """Two fake runs -> figures and summary.md whose numbers are analysis' own on the same data."""
    run_a, run_b, out = (str(tmp_path / n) for n in ("A", "B", "report"))
    write_run(run_a, a=0.3, b=0.9, seed=1, final_eval=True)  # still 60 steps
    write_run(run_b, a=0.2, b=0.8, seed=2, check=False)
    result = run_analyze(f"--workdir={run_a},{run_b}", f"--out={out}", "--fit_fraction=0.6",
                         "--accuracy_key=accuracy/mean")
    assert result.returncode == 0, result.stderr
    for name in ("entropy_reward.png", "law_fit.png", "cov_hist_A.png", "cov_hist_B.png",
                 "entropy_check.png"):
        assert_png(os.path.join(out, name))
    summary = open(os.path.join(out, "summary.md")).read()
    for name, workdir in (("A", run_a), ("B", run_b)):
        records = runs.read_metrics(workdir)
        s = stats.summarize_run(name, workdir, records, accuracy_key="accuracy/mean",
                                fit_fraction=0.6)
        row = next(line for line in summary.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "60" and cells[6] == "`accuracy/mean`"
        assert float(cells[7]) == pytest.approx(s.fit.a, rel=1e-3)
        assert float(cells[9]) == pytest.approx(s.fit.r2, abs=1e-3)
        assert float(cells[11]) == pytest.approx(s.fit.b - s.fit.a, rel=1e-3)
        assert float(cells[13]) == pytest.approx(s.extrapolation.rmse, rel=1e-3)
        assert float(cells[14]) == 3.0
        assert s.fit.r2 > 0.9 and abs(s.fit.a - (0.3 if name == "A" else 0.2)) < 0.05
        assert s.extrapolation.num_fit == 36
    assert "| A | natural | 60 | 1.000 | 1.00 | 20 |" in summary
    assert "points only" not in summary and "outside [0, 1]" not in summary  # 60 points, 0.6
    assert "Entropy at equal reward" in summary


FATAL = "FATAL Flags parsing error: "


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    """Exit status non-zero and stderr one line, naming the flag and value, with no traceback."""
    assert result.returncode != 0, result.stdout
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(FATAL), result.stderr
    for text in expected:
        assert text in result.stderr, (text, result.stderr)


@pytest.fixture
def analyze_cli(monkeypatch):
    """The command line in this process: the absl flags parsed as app.run parses them, then main;
    returns the message it exits with. The report is never written (an AssertionError if so)."""
    from absl import flags

    from covjax import analyze

    def fail_if_written(*args, **kwargs):
        raise AssertionError("the report was written: the flags were not rejected")

    monkeypatch.setattr(analyze, "_write_report", fail_if_written)

    yield cli_runner(analyze.main, "analyze")
    flags.FLAGS.unparse_flags()


@pytest.fixture
def workdirs(tmp_path):
    run, empty, a_file = (str(tmp_path / n) for n in ("A", "empty", "file"))
    write_run(run)
    os.makedirs(empty)
    open(a_file, "w").close()
    return dict(run=run, empty=empty, file=a_file, absent=str(tmp_path / "absent"),
                out=str(tmp_path / "out"))


BAD_FLAGS = [  # (flags, what the line names); {run}, {empty}, ... from the workdirs fixture
    (["--workdir={absent}", "--out={out}"], ["--workdir={absent}: ", "does not exist"]),
    (["--workdir={run},{empty}", "--out={out}"],
     ["--workdir={empty}: ", "{empty}/metrics.jsonl", "not found"]),
    (["--workdir=", "--out={out}"], ["--workdir='': names no workdir"]),
    (["--workdir={run}"], ["--out is required"]),
    (["--out={out}"], ["--workdir is required"]),
    (["--workdir={run}", "--out={file}"], ["--out={file}: exists and is not a directory"]),
    (["--workdir={run}", "--out={out}", "--bogus=3"], ["--bogus=3: ", "'bogus'"]),
    (["--workdir={run}", "--out={out}", "--fit_fraction=1.5"],
     ["--fit_fraction=1.5: must be in (0, 1)"]),
    (["--workdir={run}", "--out={out}", "--bin_steps=0"], ["--bin_steps=0: "]),
    (["--workdir={run}", "--out={out}", "--window=ten"], ["--window=ten: "]),
    (["--workdir={run}", "--out={out}", "--concentration_min_step=-1"],
     ["--concentration_min_step=-1: "]),
    (["--workdir={run}", "--out={out}", "--equal_reward=inf"],
     ["--equal_reward=inf: must be a finite number"]),
    (["--workdir={run}", "--out={out}", "--entropy_key=entropy/typo"],
     ["--entropy_key=entropy/typo: not a metric of {run}/metrics.jsonl"]),
    (["--workdir={run}", "--out={out}", "--accuracy_key=val/math/accuracy"],
     ["--accuracy_key=val/math/accuracy: not a metric of "]),
    (["--workdir={run}", "--out={out}", "--kl_cov_ratio=2"],
     ["--kl_cov_ratio=2.0: ", "0 < kl_cov_ratio <= 1"]),
    (["--workdir={run}", "--out={out}", "stray"], ["unexpected arguments ['stray']"]),
]


@pytest.mark.parametrize("args, expected", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_a_bad_flag_stops_with_one_line_naming_it(analyze_cli, workdirs, args, expected):
    message = analyze_cli(*(a.format(**workdirs) for a in args))
    assert_one_fatal_line(message, [text.format(**workdirs) for text in expected])
    assert not os.path.exists(workdirs["out"])


def test_the_process_prints_the_line_alone(workdirs):
    """What a user sees: status 1 and the one line on stderr, no traceback, nothing on stdout."""
    result = run_analyze(f"--workdir={workdirs['absent']}", f"--out={workdirs['out']}")
    assert_one_line_error(result, f"--workdir={workdirs['absent']}: ")
    assert result.returncode == 1 and result.stdout == ""
    result = run_analyze(f"--workdir={workdirs['run']}", f"--out={workdirs['out']}", "--bogus")
    assert_one_line_error(result, "--bogus: ")
    assert not os.path.exists(workdirs["out"])


def test_analyze_cli_marks_from_the_run_config_and_flags(tmp_path):
    """The CLI takes the marks from config.json, lets a flag override one, and names a bad one."""
    run, out = str(tmp_path / "A"), str(tmp_path / "report")
    write_run(run, a=0.3, b=0.9, seed=1)
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"loss": {"clip_cov_lb": 0.5, "clip_cov_ub": 5.0, "kl_cov_ratio": 0.2}}, f)
    result = run_analyze(f"--workdir={run}", f"--out={out}", "--clip_cov_lb=2")
    assert result.returncode == 0, result.stderr
    assert_png(os.path.join(out, "cov_hist_A.png"))
    result = run_analyze(f"--workdir={run}", f"--out={tmp_path / 'bad'}", "--clip_cov_lb=6")
    assert not os.path.exists(tmp_path / "bad")  # before any work
    assert_one_line_error(result, "--clip_cov_lb=6.0: ", "need 0 < clip_cov_lb < clip_cov_ub",
                          "clip_cov_lb': 6.0")
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"loss": {"clip_cov_lb": 0.5}}, f)  # a broken config.json: --workdir is named
    result = run_analyze(f"--workdir={run}", f"--out={tmp_path / 'bad'}")
    assert_one_line_error(result, f"--workdir={run}: ", "lacks a number for 'clip_cov_ub'")
