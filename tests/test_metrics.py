"""covjax.metrics against references written here in plain Python/NumPy: the token covariance
(Eq. 10), the entropy metrics (verl's token mean, the paper's Eq. 5), the token-weighted update
summary, and the writer's metrics.jsonl, TensorBoard events and W&B run across a resume and a full
disk."""

import errno
import json
import math
import struct
import threading

import numpy as np
import pytest
from etils import epath
from helpers import fake_object_store

from covjax import metrics


def _batch(seed: int = 0):
    """[4, 6] log-probs, advantages, entropies and a mask with an empty row (row 2)."""
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.5, 1.0, size=(4, 6)).astype(np.float32)
    adv = np.repeat(rng.normal(size=(4, 1)), 6, axis=1).astype(np.float32)  # one per response
    entropy = rng.uniform(0.0, 3.0, size=(4, 6)).astype(np.float32)
    lengths = [6, 3, 0, 1]
    mask = np.arange(6)[None, :] < np.array(lengths)[:, None]
    return logp, adv, entropy, mask


def test_token_covariance_is_eq_10_over_the_valid_tokens():
    logp, adv, _, mask = _batch()
    valid = [(float(logp[i, j]), float(adv[i, j])) for i in range(4) for j in range(6)
             if mask[i, j]]
    mean_lp = sum(lp for lp, _ in valid) / len(valid)
    mean_a = sum(a for _, a in valid) / len(valid)
    expected = [(lp - mean_lp) * (a - mean_a) for lp, a in valid]
    cov = metrics.token_covariance_np(logp, adv, mask)
    assert cov.dtype == np.float32 and cov.shape == (len(valid),)
    np.testing.assert_allclose(cov, expected, rtol=1e-5, atol=1e-7)
    # their mean is the (population) covariance of log-prob and advantage over the tokens
    lp_column, a_column = np.array(valid).T
    assert cov.mean() == pytest.approx(np.cov(lp_column, a_column, bias=True)[0, 1], rel=1e-5)
    assert metrics.token_covariance_np(logp, adv, np.zeros_like(mask)).size == 0


def test_entropy_metrics_token_and_sequence_means():
    _, _, entropy, mask = _batch(1)
    tokens = [float(entropy[i, j]) for i in range(4) for j in range(6) if mask[i, j]]
    per_response = [np.mean([entropy[i, j] for j in range(6) if mask[i, j]]) for i in range(4)
                    if mask[i].any()]  # the empty response has no mean: left out
    got = metrics.entropy_metrics(entropy, mask)
    assert got == {
        "entropy/token_mean": pytest.approx(sum(tokens) / len(tokens), rel=1e-6),
        "entropy/seq_mean": pytest.approx(sum(per_response) / len(per_response), rel=1e-6),
    }
    empty = metrics.entropy_metrics(entropy, np.zeros_like(mask))
    assert math.isnan(empty["entropy/token_mean"]) and math.isnan(empty["entropy/seq_mean"])


def test_summarize_updates_weights_by_tokens_and_selected_tokens():
    updates = [
        {"num_tokens": 100, "num_selected": 2, "cov_selected_mean": 3.0, "ppo_clip_frac": 0.1,
         "ppo_kl": 0.01, "grad_norm": 1.0, "lr": 1e-6, "loss": 0.5},
        {"num_tokens": 300, "num_selected": 0, "cov_selected_mean": 0.0, "ppo_clip_frac": 0.3,
         "ppo_kl": 0.03, "grad_norm": 3.0, "lr": 2e-6, "loss": 1.5},
        {"num_tokens": 100, "num_selected": 6, "cov_selected_mean": 5.0, "ppo_clip_frac": 0.0,
         "ppo_kl": -0.01, "grad_norm": 2.0, "lr": 3e-6, "loss": 1.0},
    ]
    assert metrics.summarize_updates(updates) == pytest.approx({
        "cov/selected_mean": (2 * 3.0 + 6 * 5.0) / 8,
        "cov/num_selected": 8.0,
        "cov/frac_selected": 8 / 500,
        "ppo/clip_frac": (100 * 0.1 + 300 * 0.3) / 500,
        "ppo/kl": (100 * 0.01 + 300 * 0.03 - 100 * 0.01) / 500,
        "optim/grad_norm": 2.0,
        "optim/lr": 3e-6,  # the last update's
        "optim/loss": 1.0,
        "optim/num_updates": 3.0,
    })
    none_selected = metrics.summarize_updates(updates[1:2])
    assert none_selected["cov/selected_mean"] == 0.0 and none_selected["cov/frac_selected"] == 0.0
    assert metrics.summarize_updates([]) == {}


def test_writer_drops_the_steps_after_the_resumed_checkpoint(tmp_path):
    writer = metrics.MetricsWriter(tmp_path, resume_step=0)
    for step in range(5):
        writer.write(step, {"reward/mean": step / 4, "cov/mean": math.nan if step == 1 else 0.0})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1]) == {"step": 1, "cov/mean": None, "reward/mean": 0.25}
    assert lines[1] == '{"step": 1, "cov/mean": null, "reward/mean": 0.25}'  # keys sorted

    resumed = metrics.MetricsWriter(tmp_path, resume_step=3)  # checkpoint after 3 steps
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:3]
    resumed.write(3, {"reward/mean": 0.0})
    resumed.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text()
             .splitlines()]
    assert steps == [0, 1, 2, 3]


def test_summary_table_first_and_last_of_the_headline_metrics():
    records = [{"step": 0, "reward/mean": 0.25}, {"step": 1, "reward/mean": None},
               {"step": 2, "reward/mean": 0.75, "time/step": 2.0}]
    rows = metrics.summary_table(records).splitlines()
    assert rows[0].split() == ["metric", "first", "last"]
    assert [row.split() for row in rows[1:]] == [["reward/mean", "0.25", "0.75"],
                                                  ["time/step", "2", "2"]]


def test_names_round_trip():
    assert metrics.cov_file(12) == "step_000012.npy"
    assert int(metrics.COV_FILE_RE.match(metrics.cov_file(1234567)).group(1)) == 1234567
    assert metrics.VAL_ACCURACY_RE.match(metrics.val_accuracy("aime24")).group(1) == "aime24"
    assert metrics.VAL_ACCURACY_RE.match(metrics.VAL_AVERAGE_ACCURACY) is None


def _events(tb_dir):
    """(tag, step, value) of every scalar in a TensorBoard events folder, read by the TFRecord
    framing (length, crc, data, crc) and tensorboardX's Event proto."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for path in sorted(tb_dir.iterdir()):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_tensorboard_events_hold_every_finite_scalar(tmp_path):
    writer = metrics.MetricsWriter(tmp_path, resume_step=0)
    writer.write(0, {"reward/mean": 0.5, "cov/mean": math.nan})
    writer.write(1, {"reward/mean": 0.75, "cov/mean": -2.0})
    writer.close()
    assert _events(tmp_path / "tensorboard") == [
        ("reward/mean", 0, 0.5), ("reward/mean", 1, 0.75), ("cov/mean", 1, -2.0)
    ]


def test_a_full_disk_raises_naming_the_metrics_file(tmp_path):
    writer = metrics.MetricsWriter(tmp_path, resume_step=0)
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    with pytest.raises(OSError, match=r"No space left on device: '.*metrics\.jsonl'"):
        writer.write(0, {"reward/mean": 0.5})


def test_a_full_disk_under_tensorboard_raises_at_once_instead_of_blocking(tmp_path, monkeypatch):
    """A failed event write must surface in the writing thread: a writer thread that dies on it
    leaves the next writes blocked on its full queue for ever."""
    import tensorboardX.record_writer

    monkeypatch.setattr(tensorboardX.record_writer, "open_file", lambda p: open("/dev/full", "wb"))
    errors = []

    def write_steps():
        try:
            writer = metrics.MetricsWriter(tmp_path, resume_step=0)
            for step in range(100):
                writer.write(step, {f"m/{i}": float(i) for i in range(30)})
        except OSError as error:
            errors.append(error)

    thread = threading.Thread(target=write_steps, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "the metrics writer blocked"
    assert len(errors) == 1 and errors[0].errno == errno.ENOSPC
    assert errors[0].filename == str(tmp_path / "tensorboard")


def test_resume_drops_a_torn_last_line_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "reward/mean": s / 4}) for s in range(3)]
    path.write_text("\n".join(lines) + '\n{"step": 3, "reward/me')  # a crash mid-write
    with caplog.at_level("WARNING"):
        metrics.MetricsWriter(tmp_path, resume_step=3).close()
    assert path.read_text().splitlines() == lines
    assert f"{path}: its last line 4 is torn" in caplog.text
    path.write_text(lines[0] + "\n{oops\n" + lines[1] + "\n")  # not a crash: named, kept
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not JSON"):
        metrics.MetricsWriter(tmp_path, resume_step=3)
    path.write_text(lines[0] + "\n\n\n{oops\n" + lines[1] + "\n")  # blank lines counted
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 4 is not JSON"):
        metrics.MetricsWriter(tmp_path, resume_step=3)
    path.write_text("\n".join(lines) + "\n\n" + '{"step": 3, "reward/me')
    with caplog.at_level("WARNING"):
        metrics.MetricsWriter(tmp_path, resume_step=3).close()
    assert f"{path}: its last line 5 is torn" in caplog.text


def test_on_an_object_store_the_files_are_rewritten_whole_not_appended(monkeypatch, caplog):
    workdir = epath.Path(fake_object_store(monkeypatch)) / "run"  # opens "a" as "w", as gcsfs
    workdir.mkdir(parents=True)
    writer = metrics.MetricsWriter(workdir, resume_step=0)
    for step in range(4):
        writer.write(step, {"reward/mean": step / 4})
    writer.close()
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": step, "reward/mean": step / 4} for step in range(4)
    ]
    path.write_text("\n".join(lines) + '\n{"step": 4, "rew')  # a crash mid-write
    with caplog.at_level("WARNING"):
        resumed = metrics.MetricsWriter(workdir, resume_step=2)  # checkpoint after 2 steps
    assert f"{path}: its last line 5 is torn" in caplog.text
    assert path.read_text().splitlines() == lines[:2]
    resumed.write(2, {"reward/mean": 0.0})
    resumed.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert _events(workdir / "tensorboard") == [
        ("reward/mean", 0, 0.0), ("reward/mean", 1, 0.25), ("reward/mean", 2, 0.5),
        ("reward/mean", 3, 0.75), ("reward/mean", 2, 0.0),
    ]


def _wandb_records(run_file):
    """The records of a W&B run file (run-ID.wandb, what an offline run writes and `wandb sync`
    uploads), read by its framing and wandb's Record proto: a 7-byte header (":W&B", magic,
    version), then LevelDB-log chunks (crc32c, length, type; FULL, or FIRST..MIDDLE..LAST) in
    32 KiB blocks whose tails under 7 bytes are padding. wandb has no Python reader for it."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, at, block, out, record = run_file.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while at + 7 <= len(data):
        if block - at % block < 7:
            at += block - at % block
            continue
        length, kind = struct.unpack("<HB", data[at + 4 : at + 7])
        record, at = record + data[at + 7 : at + 7 + length], at + 7 + length
        if kind in (1, 4):  # FULL, LAST
            out.append(Record.FromString(record))
            record = b""
    return out


def test_the_wandb_run_holds_the_metrics_and_the_config_and_a_resume_continues_it(
    tmp_path, monkeypatch
):
    """A real W&B run (offline): each run file's history holds the steps' metrics as
    metrics.jsonl does (NaN where it holds null), its run record the config; the resumed writer
    continues the run of the id wandb_id kept, from the checkpoint's step."""
    import wandb

    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = tmp_path / "run"
    workdir.mkdir()
    run_config = {"loss.method": "clip_cov", "optim.lr": 5e-4, "log.wandb": "covjax-test"}
    first = {s: {"reward/mean": s / 4, "cov/mean": math.nan if s == 1 else -s} for s in range(4)}
    again = {s: {"reward/mean": 1 - s / 4, "cov/mean": s / 8} for s in (2, 3)}
    for resume_step, steps in ((0, first), (2, again)):  # a crash after step 3, checkpoint at 2
        writer = metrics.MetricsWriter(workdir, resume_step, wandb_project="covjax-test",
                                       run_config=run_config)  # fmt: skip
        for step, values in steps.items():
            writer.write(step, values)
        writer.close()
    wandb.teardown()  # finish() may return before W&B's service has written the run files

    run_id = (workdir / "wandb_id").read_text().strip()
    files = list((workdir / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"))
    runs = []  # (start time, run record, {step: history}) of each start
    for records in map(_wandb_records, files):
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        history = {}
        for r in records:
            if r.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in r.history.item}
                history[items.pop("_step")] = {k: v for k, v in items.items() if k[0] != "_"}
        runs.append((run.start_time.ToNanoseconds(), run, history))
    (_, run0, history0), (_, run1, history1) = sorted(runs, key=lambda r: r[0])
    assert run0.run_id == run1.run_id == run_id and run0.project == "covjax-test"
    for run in (run0, run1):
        config = {i.key: json.loads(i.value_json) for i in run.config.update if i.key != "_wandb"}
        assert config == run_config
    jsonl = {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text()
                                           .splitlines())}  # fmt: skip
    assert sorted(jsonl) == [0, 1, 2, 3]
    logged = {**{s: history0[s] for s in (0, 1)}, **history1}  # the resume reran 2 and 3
    assert sorted(history0) == [0, 1, 2, 3] and sorted(history1) == [2, 3]
    for step, record in jsonl.items():
        expected = {k: math.nan if v is None else v for k, v in record.items() if k != "step"}
        assert logged[step].keys() == expected.keys()
        np.testing.assert_array_equal([logged[step][k] for k in expected], list(expected.values()))
    assert jsonl[1]["cov/mean"] is None and math.isnan(logged[1]["cov/mean"])
    assert jsonl[3]["reward/mean"] == 0.25  # the rerun's


def test_a_wandb_run_that_cannot_start_names_the_key(tmp_path, monkeypatch):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(ValueError, match=r"^config.log.wandb='p': W&B did not start: No API key"):
        metrics.MetricsWriter(tmp_path, 0, wandb_project="p")
    assert not (tmp_path / "wandb_id").exists()
