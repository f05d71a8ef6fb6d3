"""notebooks/entropy_mechanism.ipynb executed end to end on a shortened sweep (nbclient), and its
table checked against numbers recomputed here with NumPy from the metrics files the runs wrote
(definitions: covjax/analysis/toy_sweep.py's docstring, ALGORITHMS.md sections 1-2)."""

import json
import os

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from covjax.analysis import toy_sweep

NOTEBOOK = os.path.join(toy_sweep.REPO_ROOT, "notebooks", "entropy_mechanism.ipynb")
STEPS = 7  # smoke configs evaluate and dump cov every 2 steps: evaluations at 0, 2, 4, 6
FINAL_WINDOW = 3
METHODS = ["grpo", "clip_cov"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _execute(tmp_path, monkeypatch) -> nbformat.NotebookNode:
    """Runs the notebook with its parameters overridden in a cell after the "parameters" cell
    (what papermill injects). The kernel imports covjax from this checkout, installed or not."""
    path = [toy_sweep.REPO_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    overrides = {"steps": STEPS, "seeds": [0], "variants": ["easy"], "methods": METHODS,
                 "out_dir": str(tmp_path / "sweep"), "report_dir": str(tmp_path / "report"),
                 "smoke": True, "final_window": FINAL_WINDOW, "concentration_min_step": 0,
                 "equal_reward_levels": {"easy": [0.2]},
                 # a warm start with a non-zero reward, trained once and shared by both runs
                 "overrides": ["data.toy.warm_start_steps=200",
                               f"data.toy.cache_dir={tmp_path / 'warm_start'}"]}
    source = "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
        source, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


def _records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _law(entropy: np.ndarray, accuracy: np.ndarray) -> tuple[float, float, float]:
    """(a, b, R^2) of R = -a exp(H) + b: a straight line in exp(H) (np.polyfit)."""
    slope, intercept = np.polyfit(np.exp(entropy), accuracy, 1)
    predicted = slope * np.exp(entropy) + intercept
    r2 = 1 - np.sum((accuracy - predicted) ** 2) / np.sum((accuracy - accuracy.mean()) ** 2)
    return -slope, intercept, r2


def _expected_row(workdir: str) -> dict[str, float]:
    """The table's numbers recomputed from metrics.jsonl and cov/*.npy."""
    records = _records(workdir)
    rl = [r for r in records if "entropy/token_mean" in r]
    entropy = np.array([r["entropy/token_mean"] for r in rl])
    reward = np.array([r["reward/mean"] for r in rl])
    evaluated = [r for r in rl if "val/toy/accuracy" in r]
    h_val = np.array([r["entropy/token_mean"] for r in evaluated])
    acc_val = np.array([r["val/toy/accuracy"] for r in evaluated])
    a, b, r2 = _law(h_val, acc_val)
    half = len(evaluated) // 2  # fit on the first half, predict the rest
    a_half, b_half, _ = _law(h_val[:half], acc_val[:half])
    mae = np.mean(np.abs(-a_half * np.exp(h_val[half:]) + b_half - acc_val[half:]))
    _, _, reward_r2 = _law(entropy, reward)
    filtered = {r["step"] for r in rl if r["filter/kept_group_frac"] == 0}
    concentrations = []
    for name in sorted(os.listdir(os.path.join(workdir, "cov"))):
        step = int(name[len("step_"):-len(".npy")])
        cov = np.load(os.path.join(workdir, "cov", name)).astype(np.float64)
        if step in filtered or not np.any(cov):
            continue
        k = max(cov.size // 100, 1)
        concentrations.append(np.sort(cov)[-k:].mean() / np.abs(cov).mean())
    return {
        "initial_entropy": entropy[0], "final_entropy": entropy[-FINAL_WINDOW:].mean(),
        "entropy_lost": 1 - entropy[-FINAL_WINDOW:].mean() / entropy[0],
        "final_reward": reward[-FINAL_WINDOW:].mean(),
        "final_accuracy": records[-1]["val/toy/accuracy"],
        "law_a": a, "law_b": b, "law_r2": r2, "ceiling": b - a, "half_fit_mae": mae,
        "half_fit_ceiling": b_half - a_half, "reward_law_r2": reward_r2,
        "tokens_touched": np.mean([r["cov/num_selected"] for r in rl if "cov/num_selected" in r]),
        "concentration": np.median(concentrations),
    }


def _table(path: str) -> dict[str, dict[str, str]]:
    """{run: {column title: cell}} of a markdown table."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, body = split[0], split[2:]
    return {row[0]: dict(zip(header, row, strict=True)) for row in body}


def test_notebook_runs_and_its_table_matches_the_metrics(tmp_path, monkeypatch):
    nb = _execute(tmp_path, monkeypatch)
    report = tmp_path / "report"
    names = [f"easy_{m}_s0" for m in METHODS]

    # Every run finished (the trainer's final evaluation is the last record), from the same
    # warm start: the same first rollout, so the same step-0 entropy and reward.
    first = [_records(str(tmp_path / "sweep" / name))[0] for name in names]
    for name in names:
        assert _records(str(tmp_path / "sweep" / name))[-1]["step"] == STEPS
    assert first[0]["entropy/token_mean"] == first[1]["entropy/token_mean"]
    assert first[0]["reward/mean"] == first[1]["reward/mean"] > 0

    # The figures: PNG files, and the notebook displayed them.
    figures = sorted(os.listdir(report / "figures"))
    expected = {"overview.png", "entropy_reward_easy_s0.png", "law_fit_easy_s0.png",
                "cov_hist_easy_grpo_s0.png", "cov_hist_easy_clip_cov_s0.png",
                "entropy_check_easy_s0.png"}
    assert expected <= set(figures), figures
    for figure in figures:
        assert (report / "figures" / figure).read_bytes()[:8] == PNG_SIGNATURE
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == len(figures)
    shown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert (report / "table.md").read_text() in shown

    # The table equals the numbers recomputed from the metrics files (4 significant digits).
    table = _table(str(report / "table.md"))
    assert sorted(table) == sorted(names)
    columns = {field: title for title, field, _ in toy_sweep.TABLE_COLUMNS}
    rows_json = {r["name"]: r for r in json.loads((report / "rows.json").read_text())}
    for name in names:
        expected_row = _expected_row(str(tmp_path / "sweep" / name))
        for field, value in expected_row.items():
            assert rows_json[name][field] == pytest.approx(value, rel=1e-6, abs=1e-9), field
            if field not in columns:
                continue
            cell = table[name][columns[field]]
            if field == "entropy_lost":
                assert float(cell.rstrip("%")) == pytest.approx(100 * value, abs=0.051), field
            else:
                assert float(cell) == pytest.approx(value, rel=5e-4, abs=1e-9), field
        # One evaluation bin (30 steps) and one reward bin (10 steps): no binned fit.
        assert table[name]["R² binned"] == table[name]["R² reward binned"] == "n/a"
        assert table[name]["run"] == name

    # The targets: grpo's entropy loss with its numbers; clip_cov against grpo.
    targets = (report / "targets.md").read_text()
    grpo = _expected_row(str(tmp_path / "sweep" / "easy_grpo_s0"))
    assert f"lost {100 * grpo['entropy_lost']:.1f}%" in targets
    assert "clip_cov: >= 3x grpo's entropy" in targets
    assert "entropy at equal reward 0.200" in targets


def test_run_names_and_commands():
    assert toy_sweep.run_name("hard", "kl_cov", 1) == "hard_kl_cov_s1"
    command = toy_sweep.train_command("hard", "clip_higher", 1, "/w", steps=5, smoke=True)
    assert command[1:] == [
        "-m", "covjax.train",
        f"--config={toy_sweep.REPO_ROOT}/configs/toy_clip_higher.py:hard,smoke",
        "--config.seed=1", "--config.train.steps=5", "--workdir=/w"]
    with pytest.raises(ValueError, match="variant 'medium'"):
        toy_sweep.run_name("medium", "grpo", 0)
    with pytest.raises(ValueError, match="method 'ppo'"):
        toy_sweep.train_command("easy", "ppo", 0, "/w", steps=5)


def test_is_complete_needs_the_final_record(tmp_path):
    assert not toy_sweep.is_complete(str(tmp_path), 3)
    lines = [{"step": s, "entropy/token_mean": 1.0} for s in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert not toy_sweep.is_complete(str(tmp_path), 3)
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 3, "val/toy/accuracy": 0.5}) + "\n")
    assert toy_sweep.is_complete(str(tmp_path), 3)
