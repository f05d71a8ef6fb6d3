"""launch/ scripts (shellcheck; the gcloud and srun commands they issue, through stand-ins that
record their arguments) and covjax.memory against closed forms and the model's own parameters."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from covjax import memory
from covjax.memory import MeshShape

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu"
SBATCH = REPO / "launch" / "gpu" / "train.sbatch"
CONFIG = "configs/default.py"

# A stand-in for gcloud/srun: appends its argv and chosen environment variables to $RECORD as
# one JSON line; answers a queued-resource poll from $STATES; answers the Nth status.sh ssh from
# the Nth of $REPLIES ("EXIT:LINE;LINE|EXIT:..." the last one repeated: each worker's line, then
# gcloud's exit status); exits 1 on an argument in $FAIL_ON.
STAND_IN = """#!{python}
import json, os, sys
args = sys.argv[1:]
env = {{k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_LOCAL_DEVICE_IDS")}}
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({{"argv": [os.path.basename(sys.argv[0])] + args, "env": env}}) + "\\n")
if "describe" in args:
    states = os.environ["STATES"].split(",")
    polls = sum(1 for line in open(os.environ["RECORD"]) if '"describe"' in line)
    print(states[min(polls, len(states)) - 1])
if any("left no exit status" in a for a in args):
    replies = os.environ["REPLIES"].split("|")
    polls = sum(1 for line in open(os.environ["RECORD"]) if "left no exit status" in line)
    code, _, lines = replies[min(polls, len(replies)) - 1].partition(":")
    print(*lines.split(";"), sep="\\n") if lines else None
    sys.exit(int(code))
fail = os.environ.get("FAIL_ON", "")
sys.exit(1 if fail and any(fail in a for a in args) else 0)
"""

SETTINGS = {
    "PROJECT": "proj-1",
    "ZONE": "us-east5-a",
    "TPU_NAME": "tpu-a",
    "ACCELERATOR_TYPE": "v5p-64",
    "BUCKET": "gs://bkt",
}
WHERE = ["--project=proj-1", "--zone=us-east5-a", "--quiet"]
# run.sh's, status.sh's and stop.sh's commands for RUN_NAME=default, as the workers read them.
PID, BOOT, EXIT, LOG = (f"$HOME/covjax-logs/default.{x}" for x in ("pid", "boot", "exit", "log"))
BOOT_ID = "/proc/sys/kernel/random/boot_id"
RUNNING = (
    f'[ -e {PID} ] && [ ! -e {EXIT} ] && [ "$(cat {BOOT} 2>/dev/null)" = "$(cat {BOOT_ID})" ]'
    f' && kill -0 "$(cat {PID})" 2>/dev/null'
)
START = (
    f"--command=mkdir -p $HOME/covjax-logs && if {RUNNING}; then"
    f' echo "$(hostname):" default "is running already (pid $(cat {PID})); launch/tpu/stop.sh'
    f' stops it" >&2; exit 1; fi && rm -f {PID} {BOOT} {EXIT} && {{ nohup setsid bash -c'
    r" cat\ /proc/sys/kernel/random/boot_id\ \>\$HOME/covjax-logs/default.boot\ \&\&"
    r"\ echo\ \$\$\ \>\$HOME/covjax-logs/default.pid\ \&\&\ \{\ echo\ \"===\ \$\(date\ -u"
    r"\ +%FT%TZ\):\ start\ of\"\ default\ \"===\"\ \&\&\ cd\ \$HOME/covjax\ \&\&"
    r"\ python3\ -m\ covjax.train\ --config=configs/default.py\ --workdir=gs://bkt/default"
    r"\ --config.train.steps=3\;\ \}\ \>\>\$HOME/covjax-logs/default.log\ 2\>\&1\ \</dev/null\;"
    r"\ echo\ \$\?\ \>\$HOME/covjax-logs/default.exit.partial\ \&\&\ mv"
    r"\ \$HOME/covjax-logs/default.exit.partial\ \$HOME/covjax-logs/default.exit"
    f" >/dev/null 2>&1 </dev/null & }} && for _ in $(seq 100); do [ -e {PID} ] && break;"
    f" sleep 0.1; done && [ -e {PID} ]"
    f' && echo "$(hostname): started" default "(pid $(cat {PID}))"'
)
STATUS = (
    f'--command=if {RUNNING}; then echo "$(hostname):" default "is running (pid $(cat {PID}))";'
    f' elif [ -e {EXIT} ]; then echo "$(hostname):" default "exited with status $(cat {EXIT})";'
    ' else echo "$(hostname):" default "is not running and left no exit status"; fi'
)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """PATH with the stand-ins first; no real gcloud/srun can be reached through them."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        for name in ("gcloud", "srun"):
            (bin_dir / name).write_text(STAND_IN.format(python=sys.executable))
            (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "RECORD": str(tmp_path / "calls.jsonl"),
        "STATES": "ACTIVE",
        "REPLIES": "0:tpu-a-w-0: default exited with status 0",
        "POLL_SECONDS": "0",
    }
    env.update(extra)
    return env


def _calls(tmp_path: Path) -> list[dict]:
    record = tmp_path / "calls.jsonl"
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def _expected_tpu_job(archive: str) -> list[list[str]]:
    """Every gcloud command of launch.sh for SETTINGS, CONFIG and one extra training flag: the
    job starts detached, status.sh waits for its end (the stand-in reports no job running)."""
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu-a", "--worker=all"]
    install = (
        "--command=rm -rf $HOME/covjax && tar -xzf $HOME/covjax.tar.gz -C $HOME"
        " && python3 -m pip install --quiet --upgrade pip"
        ' && python3 -m pip install --quiet "$HOME/covjax[tpu,gcs]"'
    )
    return [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "tpu-a", "--accelerator-type=v5p-64",
         "--version=v2-alpha-tpuv5", *WHERE],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, "tpu-a:covjax.tar.gz",
         "--worker=all", *WHERE],
        [*ssh, install, *WHERE],
        [*ssh, START, *WHERE],
        [*ssh, STATUS, *WHERE],
        [*ssh, f"--command=cat {LOG}",
         "--output-directory=logs/default", *WHERE],
        ["gcloud", "storage", "rsync", "--recursive", "--exclude=^checkpoints/",
         "gs://bkt/default", "logs/default/workdir", "--project=proj-1"],
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "tpu-a", *WHERE],
    ]  # fmt: skip


def test_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    scripts = sorted(str(p) for p in TPU.glob("*.sh")) + [str(SBATCH)]
    assert len(scripts) == 10
    result = subprocess.run(
        [shellcheck, "--external-sources", *scripts], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_tpu_dry_run_prints_the_commands_and_runs_none(tmp_path):
    env = _env(tmp_path, **SETTINGS)
    cmd = [
        str(TPU / "launch.sh"),
        f"--config={CONFIG}",
        "--dry-run",
        "--",
        "--config.train.steps=3",
    ]
    result = _run(cmd, env, tmp_path)
    assert result.returncode == 0, result.stderr
    archive = str(tmp_path / "covjax-tpu-a.tar.gz")
    printed = [shlex.split(line) for line in result.stdout.splitlines()]
    git_archive = ["git", "-C", str(REPO), "archive", "--format=tar.gz", "--prefix=covjax/",
                   f"--output={archive}", "HEAD"]  # fmt: skip
    mkdir = ["mkdir", "-p", "logs/default/workdir"]
    expected = _expected_tpu_job(archive)
    assert printed == expected[:1] + [git_archive] + expected[1:5] + [mkdir] + expected[5:]
    assert _calls(tmp_path) == []
    assert not (tmp_path / "logs").exists() and not Path(archive).exists()


def test_tpu_run_issues_the_commands_with_the_parameters(tmp_path):
    env = _env(tmp_path)  # settings as flags this time, the bucket without gs://
    flags = [f"--{k.lower().replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    flags[-1] = "--bucket=bkt"
    result = _run([str(TPU / "launch.sh"), *flags, f"--config={CONFIG}", "--",
                   "--config.train.steps=3"], env, tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    archive = tmp_path / "covjax-tpu-a.tar.gz"
    assert [c["argv"] for c in _calls(tmp_path)] == _expected_tpu_job(str(archive))
    listing = subprocess.run(["tar", "-tzf", archive], capture_output=True, text=True).stdout
    assert "covjax/setup.py" in listing.split()
    assert (tmp_path / "logs" / "default" / "workdir").is_dir()


def test_tpu_queued_spot_git_install_and_staging(tmp_path):
    env = _env(tmp_path, **SETTINGS, STATES="WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE")
    queued = ["--queued", "--spot", "--runtime-version=v2-alpha-tpuv5-custom"]
    create = _run([str(TPU / "create.sh"), *queued], env, tmp_path)
    install = _run(
        [str(TPU / "install.sh"), "--git-url=https://example.com/covjax.git", "--git-ref=v1",
         "--stage=gs://bkt/models/Qwen2.5-7B,gs://bkt/data/dapo.parquet"], env, tmp_path,
    )  # fmt: skip
    delete = _run([str(TPU / "delete.sh"), "--queued"], env, tmp_path)
    assert create.returncode == install.returncode == delete.returncode == 0, create.stderr
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    describe = [*qr, "describe", "tpu-a", "--format=value(state.state)", *WHERE]
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu-a", "--worker=all"]
    assert [c["argv"] for c in _calls(tmp_path)] == [
        [*qr, "create", "tpu-a", "--node-id=tpu-a", "--accelerator-type=v5p-64",
         "--runtime-version=v2-alpha-tpuv5-custom", "--spot", *WHERE],
        describe, describe, describe,  # polled until ACTIVE
        [*ssh, "--command=rm -rf $HOME/covjax && git clone --quiet "
         "https://example.com/covjax.git $HOME/covjax && git -C $HOME/covjax checkout --quiet v1"
         " && python3 -m pip install --quiet --upgrade pip"
         ' && python3 -m pip install --quiet "$HOME/covjax[tpu,gcs]"', *WHERE],
        [*ssh, "--command=mkdir -p $HOME/stage && gcloud storage cp --recursive "
         "gs://bkt/models/Qwen2.5-7B gs://bkt/data/dapo.parquet $HOME/stage/", *WHERE],
        [*qr, "delete", "tpu-a", "--force", *WHERE],
    ]  # fmt: skip


@pytest.mark.parametrize(
    "failure, status_polls, exit_status, message",
    [
        ({"FAIL_ON": "covjax.train"}, 0, 1, "the run failed (exit 1)"),
        ({"REPLIES": "0:w0: default exited with status 0;w1: default exited with status 1"}, 1,
         1, "the run failed (exit 1)"),
        ({"REPLIES": "255:", "STATUS_RETRIES": "2"}, 3, 3, "the workers did not answer"),
    ],
)  # fmt: skip
def test_tpu_failed_run_fetches_logs_and_keeps_the_vm(
    tmp_path, failure, status_polls, exit_status, message
):
    """The start fails (no status poll), the job ends badly on a worker (status.sh fails), or
    every ssh of status.sh fails (1 + STATUS_RETRIES tries): the job may run on, not 'ended'."""
    env = _env(tmp_path, **SETTINGS, **failure)
    result = _run([str(TPU / "launch.sh"), f"--config={CONFIG}"], env, tmp_path)
    assert result.returncode == exit_status
    assert message in result.stderr and "tpu-a is kept" in result.stderr
    argv = [c["argv"] for c in _calls(tmp_path)]
    assert any("rsync" in a for a in argv)
    assert not any("delete" in a for a in argv)
    assert sum(STATUS in a for a in argv) == status_polls


def test_tpu_status_retries_a_failed_ssh_and_reads_only_every_workers_report(tmp_path):
    """status.sh --wait through ssh failures (gcloud's 255, with no line or one worker's line
    only, or no line at all): each is asked again, none read as the job's end."""
    replies = [
        "255:",
        "0:w0: default is running (pid 7);w1: default is running (pid 8)",
        "0:",
        "255:w0: default exited with status 0",
        "0:w0: default exited with status 0;w1: default exited with status 0",
    ]
    env = _env(tmp_path, **SETTINGS, REPLIES="|".join(replies), STATUS_RETRIES="2")
    result = _run([str(TPU / "status.sh"), f"--config={CONFIG}", "--wait"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "w0: default is running (pid 7)\nw1: default is running (pid 8)\n"
        "w0: default exited with status 0\nw1: default exited with status 0\n"
    )
    assert result.stderr.count("could not reach the workers of tpu-a; asking again") == 3
    assert [c["argv"] for c in _calls(tmp_path)] == [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu-a", "--worker=all", STATUS, *WHERE]
    ] * 5
    bad = _run([str(TPU / "status.sh"), f"--config={CONFIG}"], {**env, "STATUS_RETRIES": "x"},
               tmp_path)  # fmt: skip
    assert bad.returncode == 2 and "STATUS_RETRIES=x: give a number" in bad.stderr


def _worker_commands(tmp_path: Path, env: dict[str, str], *scripts: list[str]) -> list[str]:
    """The --command of each script's one ssh to the workers (through the stand-in gcloud)."""
    commands = []
    for script in scripts:
        (tmp_path / "calls.jsonl").unlink(missing_ok=True)
        result = _run([str(TPU / script[0]), *script[1:]], env, tmp_path)
        assert result.returncode == 0, result.stderr
        ((command,),) = [[a for a in c["argv"] if a.startswith("--command=")] for c in
                         _calls(tmp_path)]  # fmt: skip
        commands.append(command.removeprefix("--command="))
    return commands


def test_tpu_job_runs_detached_and_status_stop_and_logs_follow_it(tmp_path):
    """run.sh's, status.sh's, stop.sh's and logs.sh --tail's commands, run by bash as a worker
    would with a stand-in python3: the job outlives the shell that started it, in its own
    session; a second start is refused while it runs; SIGTERM from stop.sh ends it with the
    trainer's 143; a job that exits is reported with its status; each start appends to the log;
    a pid file from another boot of the worker names no running job."""
    env = _env(tmp_path, **SETTINGS)
    name = ["--run-name=r 1", f"--config={CONFIG}"]
    start, status, stop, tail = _worker_commands(
        tmp_path, env, ["run.sh", *name, "--", "--config.train.steps=3"], ["status.sh", *name],
        ["stop.sh", *name], ["logs.sh", *name, "--tail=2"],
    )  # fmt: skip
    home = tmp_path / "worker"
    (home / "covjax").mkdir(parents=True)
    bin_dir = tmp_path / "worker-bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(
        '#!/bin/bash\necho "python3 $* in $PWD"\nprintf "step 0\\rstep 1\\n"\n'
        '[ -n "$JOB_EXIT" ] && exit "$JOB_EXIT"\n'
        "sleep 60 & trap 'echo stopped; kill $!; exit 143' TERM\nwait\n"
    )
    (bin_dir / "python3").chmod(0o755)
    worker = {**env, "HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    files = home / "covjax-logs"

    def on_worker(command, **extra):
        return subprocess.run(["bash", "-c", command], env={**worker, **extra},
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    def ended():
        deadline = time.monotonic() + 30
        while not (files / "r 1.exit").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return (files / "r 1.exit").read_text()

    started = on_worker(start)
    pid = int((files / "r 1.pid").read_text())
    assert started.returncode == 0 and started.stdout == f"{host}: started r 1 (pid {pid})\n"
    assert os.getsid(pid) == pid  # its own session: the ssh session's end does not reach it
    again = on_worker(start)
    assert again.returncode == 1 and again.stderr.startswith(f"{host}: r 1 is running already")
    assert on_worker(status).stdout == f"{host}: r 1 is running (pid {pid})\n"
    assert on_worker(stop).stdout == f"{host}: sent SIGTERM to r 1\n"
    assert ended() == "143\n"
    done = on_worker(status)  # a reachable worker's report succeeds: status.sh reads the line
    assert done.returncode == 0 and done.stdout == f"{host}: r 1 exited with status 143\n"
    marker = r"=== \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ: start of r 1 ===\n"
    first_run = (
        f"python3 -m covjax.train --config={CONFIG} --workdir=gs://bkt/r 1"
        f" --config.train.steps=3 in {home / 'covjax'}\nstep 0\rstep 1\nstopped\n"
    )
    assert re.fullmatch(marker + re.escape(first_run), (files / "r 1.log").read_bytes().decode())
    assert (files / "r 1.boot").read_text() == Path(BOOT_ID).read_text()
    assert on_worker(tail).stdout == f"{host}: step 1\n{host}: stopped\n"
    assert on_worker(stop).stdout == f"{host}: r 1 is not running\n"

    assert on_worker(start, JOB_EXIT="0").returncode == 0
    assert ended() == "0\n"
    assert on_worker(status).stdout == f"{host}: r 1 exited with status 0\n"
    log = (files / "r 1.log").read_bytes().decode()
    assert re.fullmatch(marker + re.escape(first_run) + marker + re.escape(first_run[:-8]), log)
    (files / "r 1.exit").unlink()  # the job's shell was killed with the VM...
    (files / "r 1.pid").write_text(f"{os.getpid()}\n")  # ...and its pid is a live process's now
    (files / "r 1.boot").write_text("another boot\n")
    assert on_worker(status).stdout == f"{host}: r 1 is not running and left no exit status\n"
    assert on_worker(start, JOB_EXIT="0").returncode == 0
    assert ended() == "0\n" and int((files / "r 1.pid").read_text()) != os.getpid()


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("run.sh", [f"--config={CONFIG}"], "missing --bucket=... (or environment variable BUCKET)"),
        ("logs.sh", ["--bucket=b", f"--config={CONFIG}", "--tail=0"], "--tail=0: give a number"),
        ("create.sh", ["--accelerator-type=v9x-8"], "missing --runtime-version=..."),
        ("run.sh", ["--bucket=b", "--config=configs/nope.py"], "--config=configs/nope.py: no file"),
        ("delete.sh", ["--zones=x"], "unknown argument '--zones=x'"),
    ],
)
def test_tpu_bad_settings_stop_before_any_command(tmp_path, script, args, message):
    env = _env(tmp_path, **{k: v for k, v in SETTINGS.items() if k != "BUCKET"})
    result = _run([str(TPU / script), *args], env, tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert _calls(tmp_path) == []


def _slurm_env(tmp_path: Path, nodes: int, tasks_per_node: int, **extra: str) -> dict[str, str]:
    return _env(
        tmp_path,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_NTASKS=str(nodes * tasks_per_node),
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_CPUS_ON_NODE="96",
        SLURM_GPUS_ON_NODE="8",
        **extra,
    )


@pytest.mark.parametrize("tasks_per_node, local_ids", [(1, "0,1,2,3,4,5,6,7"), (8, None)])
def test_slurm_script_launches_one_process_per_node_or_per_gpu(tmp_path, tasks_per_node, local_ids):
    env = _slurm_env(tmp_path, 4, tasks_per_node, XLA_FLAGS="--xla_dump_to=/tmp/x")
    args = ["bash", str(SBATCH), CONFIG, "/shared/run 1", "--config.train.steps=3"]
    result = _run(args, env, tmp_path)
    assert result.returncode == 0, result.stderr
    (call,) = _calls(tmp_path)
    assert call["argv"] == [
        "srun", "--nodes=4", f"--ntasks-per-node={tasks_per_node}",
        f"--cpus-per-task={96 // tasks_per_node}", "--kill-on-bad-exit=1", "python", "-m",
        "covjax.train", f"--config={CONFIG}", "--workdir=/shared/run 1", "--config.train.steps=3",
    ]  # fmt: skip
    assert call["env"]["JAX_LOCAL_DEVICE_IDS"] == local_ids
    flags = call["env"]["XLA_FLAGS"].split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert flags[-1] == "--xla_dump_to=/tmp/x"  # the user's flags come last and win
    dry = _run(args, {**env, "DRY_RUN": "1"}, tmp_path)
    assert shlex.split(dry.stdout) == call["argv"]
    assert len(_calls(tmp_path)) == 1


@pytest.mark.parametrize(
    "env_changes, message",
    [
        ({"SLURM_NTASKS": "8"}, "--ntasks-per-node=4: use 1 (a process per node) or 8"),
        ({"SLURM_JOB_ID": ""}, "not inside a SLURM allocation"),
    ],
)
def test_slurm_script_rejects_bad_layouts(tmp_path, env_changes, message):
    env = _slurm_env(tmp_path, 2, 1)
    env.update(env_changes)
    result = _run(["bash", str(SBATCH), CONFIG, "/shared/run"], env, tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert _calls(tmp_path) == []


def test_slurm_xla_flags_are_known_to_the_installed_jaxlib(tmp_path):
    env = _slurm_env(tmp_path, 1, 1, DRY_RUN="1")
    result = _run(["bash", str(SBATCH), CONFIG, "/shared/run"], env, tmp_path)
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("XLA_FLAGS=")]
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.numpy.zeros(2).block_until_ready()"],
        env={**os.environ, "XLA_FLAGS": line.removeprefix("XLA_FLAGS="), "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-2000:]  # an unknown flag aborts XLA


# ---------------------------------------------------------------------------------------------
# covjax.memory
# ---------------------------------------------------------------------------------------------

TOY = memory.ModelConfig(
    architecture="qwen2", vocab_size=32, hidden_size=8, intermediate_size=16,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=2,
    attention_bias=True, compute_dtype="bfloat16", remat="layer",
)  # fmt: skip


QWEN3_8B = memory.ModelConfig(  # Qwen/Qwen3-8B's config.json
    architecture="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    qk_norm=True, rope_theta=1e6,
)  # fmt: skip


def test_param_counts_match_published_qwen_sizes_and_the_model():
    # Hugging Face's counts of Qwen/Qwen2.5-7B and Qwen/Qwen2.5-32B (safetensors metadata).
    assert memory.param_counts(memory.QWEN2_5_7B).total == 7_615_616_512
    assert memory.param_counts(memory.QWEN2_5_32B).total == 32_763_876_352
    # Qwen3-8B's model card: 8.2B parameters, 6.95B of them outside the two embedding tables
    qwen3 = memory.param_counts(QWEN3_8B).total
    embeddings = 2 * QWEN3_8B.vocab_size * QWEN3_8B.hidden_size
    assert (round(qwen3 / 1e9, 1), round((qwen3 - embeddings) / 1e9, 2)) == (8.2, 6.95)
    from flax import nnx

    from covjax.model import Transformer

    for config in (TOY, TOY.replace(tie_word_embeddings=True), QWEN3_8B):
        model = nnx.eval_shape(lambda config=config: Transformer(config, rngs=nnx.Rngs(0)))
        params = nnx.state(model, nnx.Param)
        sizes = [np.size(x) for x in __import__("jax").tree.leaves(params)]
        assert memory.param_counts(config).total == sum(sizes)


def test_memory_estimate_equals_the_closed_form_on_a_toy_config():
    # Layer: q 8*4*2 + k, v 8*2*2 each + o 4*2*8 = 192; MLP 3*8*16 = 384; biases (4+4)*2 = 16;
    # norms 2*8 = 16. Model: 2 layers + embedding and lm_head 2*32*8 = 512, final norm 8.
    counts = memory.param_counts(TOY)
    assert (counts.matrices, counts.biases, counts.norms) == (512 + 2 * 576, 32, 40)
    mesh = MeshShape(data=2, fsdp=2, tensor=2)
    per_device = 1664 / 4 + 32 / 2 + 40  # matrices / (fsdp tensor) + biases / tensor + norms
    state = memory.training_state_bytes(TOY, mesh)
    assert state == {"params": 4 * per_device, "adam": 8 * per_device, "grads": 8 * per_device}
    b, s, r = 3, 40, 24  # sequences per device, tokens, response tokens
    act = memory.activation_bytes(
        TOY, mesh, micro_batch=b, seq_len=s, response_len=r, logits_chunk=16, fused_attention=False
    )
    hq, hkv, d, i, dh = 4 / 2, 2 / 2, 8, 16 / 2, 2
    assert act == pytest.approx({
        "compute_weights": 2 * per_device,
        "gathered_weights": 2 * (2 * 576 + 512) / 2,
        "layer_inputs": 2 * b * s * d * 2,
        "layer_working": b * s * (4 * d + 2 * (hq + 2 * hkv) * dh + 5 * i) * 2,
        "attention_scores": b * hq * s * s * (4 + 2 * 2),
        "logits": 16 * 32 / 2 * 12,
    })  # fmt: skip
    fused = memory.activation_bytes(TOY, mesh, micro_batch=b, seq_len=s, response_len=r)
    assert fused["attention_scores"] == 0
    peak = memory.update_peak_bytes(
        TOY, mesh, micro_batch=b, seq_len=s, response_len=r, logits_chunk=16, fused_attention=False
    )
    assert peak == pytest.approx(sum(state.values()) + sum(act.values()))
    kv = memory.kv_cache_bytes_per_sequence(TOY, MeshShape(), 100)
    assert kv == 2 * 2 * 2 * 2 * 100 * 2  # k and v, layers, kv heads, head_dim, tokens, bf16
    persistent = 12 * 1736 + 2 * 1736  # params + AdamW, bf16 weights; one device, 1736 params
    assert memory.rollout_sequences(TOY, MeshShape(), 100, persistent + 10.5 * kv) == 10
    with pytest.raises(ValueError, match="response_len=50"):
        memory.activation_bytes(TOY, mesh, micro_batch=1, seq_len=40, response_len=50)
    with pytest.raises(ValueError, match="MeshShape.fsdp=0"):
        MeshShape(fsdp=0)
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by mesh tensor=4"):
        memory.training_state_bytes(TOY, MeshShape(tensor=4))


def test_per_device_params_follow_the_sharding_rules():
    """covjax.sharding's shardings of the toy model on 8 CPU devices hold exactly
    ParamCounts.per_device parameters per device."""
    import jax
    from flax import nnx

    from covjax import sharding
    from covjax.model import Transformer

    config = TOY.replace(hidden_size=16, head_dim=4)
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    params = nnx.state(model)  # the model holds parameters only
    for shape in ((1, 8, 1), (1, 4, 2), (2, 2, 2)):
        mesh = sharding.make_mesh(*shape)
        shardings = sharding.model_shardings(model, mesh)
        held = sum(
            np.prod(s.shard_shape(x.shape))
            for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True)
        )
        expected = memory.param_counts(model.config).per_device(MeshShape(*shape))
        assert held == expected, shape


def test_ci_runs_the_readme_test_command_with_one_q():
    """CI logs end with pytest's pass/fail counts: .ci/run runs README.md's test command, whose
    -q is the only one (pyproject's addopts adding another makes -qq, which hides them)."""

    def pytest_lines(path):
        return [ln for ln in path.read_text().splitlines() if ln.startswith("python -m pytest")]

    readme, ci = pytest_lines(REPO / "README.md"), pytest_lines(REPO / ".ci" / "run")
    assert readme == ci == ["python -m pytest -q tests"]
    addopts = re.search(r'^addopts\s*=\s*"(.*)"', (REPO / "pyproject.toml").read_text(), re.M)
    quiet = shlex.split(ci[0]) + (shlex.split(addopts.group(1)) if addopts else [])
    assert quiet.count("-q") == 1
