"""covjax.rewards.sandbox: hostile programs are contained at each isolation level this machine
has (the rlimit level always, forced; bubblewrap's when it is installed), each scores 0, leaves
no process and no file behind, and the pool keeps working."""

import json
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import types

import pytest

from covjax.rewards import code, harness, sandbox
from covjax.rewards.sandbox import Limits, Sandbox
from tests.helpers import REPO

LEVELS = ["rlimit"] + ([] if sandbox._bwrap_works() else ["bwrap"])
LIMITS = Limits(
    test_s=1.0, program_s=3.0, memory_mb=1024, processes=16, file_mb=4, output_bytes=1 << 16
)
TRUTH = '{"inputs": ["1\\n"], "outputs": ["42\\n"]}'  # no hostile program prints 42
MARKER = b"The test runner that covjax.rewards.sandbox starts"  # in the harness's command line


def _harness_processes() -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if MARKER in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module", params=LEVELS)
def box(request):
    box = Sandbox(LIMITS, workers=2, isolation=request.param)
    yield box
    box.close()


@pytest.fixture(scope="module")
def hostile(box, tmp_path_factory):
    """Every hostile program run once, in parallel: {name: (reward, runs, seconds)} and what the
    test set up for them."""
    tmp = tmp_path_factory.mktemp(f"hostile_{box.level}")
    secret = tmp / "secret.txt"
    secret.write_text("host secret")
    secret.chmod(0o600)
    victim = tmp / "victim.txt"
    victim.write_text("keep me")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # loopback only
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    programs = {
        "infinite_loop": "while True:\n    pass",
        "fork_bomb": (
            "import os, time\nn = 0\nfor _ in range(300):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(100)\n"
            "        os._exit(0)\n    n += 1\nprint('forked', n)"
        ),
        "memory_8gb": "x = bytearray(8 << 30)\nprint(len(x))",
        "file_10gb": (
            "with open('big', 'wb') as f:\n    for _ in range(10 << 10):\n"
            "        f.write(b'0' * (1 << 20))"
        ),
        "print_1gb": "import sys\nfor _ in range(1 << 10):\n    sys.stdout.write('x' * (1 << 20))",
        "loopback": (
            f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), 1)\n"
            "    print('connected')\nexcept OSError as e:\n    print('refused', e)"
        ),
        "read_files": (
            "import os\nfor p in ["
            + repr(str(secret))
            + ", "
            + repr(str(REPO / "README.md"))
            + f", {str(pathlib.Path.home() / '.ssh')!r}]:\n    try:\n"
            "        print(p, 'read', len(open(p).read())"
            " if os.path.isfile(p) else os.listdir(p))\n"
            "    except OSError as e:\n        print(p, 'denied', type(e).__name__)"
        ),
        "delete_outside": (
            f"import os\ntry:\n    os.remove({str(victim)!r})\n    print('deleted')\n"
            "except OSError as e:\n    print('denied', type(e).__name__)"
        ),
        "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "signal_host": (
            f"import os\ntry:\n    os.kill({os.getpid()}, 0)\n    print('allowed')\n"
            "except OSError as e:\n    print('denied', type(e).__name__)"
        ),
        "os_system": "import os\nos.system('echo from-shell; sleep 100 &')",
        "close_stdout": "import os\nos.close(1)\nprint(42)",
        "ignore_stdin": "print(41)",
        "link_to_root": "import os\nos.symlink('/', 'root')\nos.symlink('/etc/passwd', 'pw')",
        "lock_directory": "import os\nos.mkdir('sub')\nos.chmod('sub', 0)\nos.chmod('.', 0)",
        "leave_session": (
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(100)\n"
            "print('left')"
        ),
        "forge_counts": "import os\nopen('output.txt', 'w').write('1 1')\nos._exit(0)",
    }
    names = list(programs)
    specs = {n: code.parse_ground_truth(TRUTH) for n in names}
    specs["ignore_stdin"] = {"inputs": ["9\n" * (1 << 20)], "outputs": ["42\n"]}  # 2 MB unread
    specs["infinite_loop"] = {"inputs": ["1\n"] * 5, "outputs": ["42\n"] * 5}
    specs["forge_counts"] = {"pytest": sandbox.SELF_TEST_PYTEST}  # '1 1' would be a pass
    t0 = time.monotonic()
    runs = box.run_many([code.make_job(f"```python\n{programs[n]}\n```", specs[n]) for n in names])
    elapsed = time.monotonic() - t0
    try:
        accepted = listener.accept()[0]
        accepted.close()
    except BlockingIOError:
        accepted = None
    listener.close()
    results = {n: (code.fraction_passed(r, specs[n]), r) for n, r in zip(names, runs, strict=True)}
    return types.SimpleNamespace(
        results=results,
        elapsed=elapsed,
        secret=secret,
        victim=victim,
        accepted=accepted is not None,
    )


def test_every_hostile_program_scores_zero_within_its_limits(box, hostile):
    assert all(score == 0.0 for score, _ in hostile.results.values()), hostile.results
    # 17 programs on 2 workers, each at most its 3 s budget + start-up
    assert hostile.elapsed < 7 * (LIMITS.program_s + sandbox.STARTUP_S)
    status = {n: r[0].status for n, (_, r) in hostile.results.items()}
    assert status["infinite_loop"] == "timeout"
    assert hostile.results["infinite_loop"][1][0].wall_s < LIMITS.test_s + 0.5
    assert status["memory_8gb"] == "error"  # MemoryError under RLIMIT_AS
    assert status["file_10gb"] == "output_limit"  # SIGXFSZ at the file-size limit
    assert status["print_1gb"] == "output_limit"
    assert status["close_stdout"] == "error"
    assert status["kill_parent"] == "killed"  # it killed the harness, the test is lost
    assert hostile.results["ignore_stdin"][1][0].output == "41\n"
    assert "from-shell" in hostile.results["os_system"][1][0].output
    assert status["link_to_root"] == status["lock_directory"] == "ok"
    assert hostile.results["leave_session"][1][0].output == "left\n"
    assert hostile.results["forge_counts"][1][0].output == ""  # pytest never reported


def test_the_program_budget_stops_its_tests(hostile):
    """5 tests of an infinite loop, 1 s each, in a 3 s budget: 3 run to their limit, the last
    never starts (the fourth may get what the first three left)."""
    runs = hostile.results["infinite_loop"][1]
    status = [r.status for r in runs]
    assert status[:3] == ["timeout"] * 3 and status[-1] == "budget", status
    assert set(status) == {"timeout", "budget"}
    assert sum(r.wall_s for r in runs) <= LIMITS.program_s + 0.1


def test_fork_bomb_is_bounded_where_the_process_limit_applies(box, hostile):
    run = hostile.results["fork_bomb"][1][0]
    if box.own_uid or os.geteuid() != 0:  # RLIMIT_NPROC does not bind root
        forked = int(run.output.split()[1])
        assert forked < LIMITS.processes, run
    else:
        assert run.output.startswith("forked"), run


def test_no_process_or_file_is_left(box, hostile):
    assert _harness_processes() == []
    leftovers = [p for p in os.listdir(tempfile.gettempdir()) if p.startswith("covjax-sandbox-")]
    assert leftovers == []


def test_a_process_that_left_the_session_is_killed_without_a_uid(box):
    """Without a uid of its own (no root) only the harness, a child subreaper, can find it."""
    job = code.make_job(
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(100)\nprint(1)",
        code.parse_ground_truth(TRUTH),
    )
    assert box._run(job, None)[0].output == "1\n"
    assert _harness_processes() == []


def test_the_harness_finds_its_children_with_and_without_the_kernels_list(monkeypatch):
    child = subprocess.Popen(["sleep", "10"])
    try:
        listed = harness._children()
        real_open = open

        def no_children_file(path, *args, **kwargs):
            if str(path).endswith("/children"):
                raise FileNotFoundError(path)
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(harness, "open", no_children_file, raising=False)
        assert child.pid in listed and sorted(harness._children()) == sorted(listed)
    finally:
        child.kill()
        child.wait()


def test_network_and_host_files_by_level(box, hostile):
    net = hostile.results["loopback"][1][0].output
    files = hostile.results["read_files"][1][0].output.splitlines()
    deleted = hostile.results["delete_outside"][1][0].output
    signalled = hostile.results["signal_host"][1][0].output
    if box.level == "bwrap":  # no network, no host files, no host processes
        assert net.startswith("refused") and not hostile.accepted
        assert all("denied" in line for line in files), files
        assert deleted.startswith("denied") and hostile.victim.exists()
        assert signalled.startswith("denied ProcessLookupError")
        return
    assert net == "connected\n" and hostile.accepted  # the rlimit level leaves the network
    assert "read" in files[1]  # ... and world-readable files such as the project's
    if box.own_uid:  # its own uid reads no private file, deletes nothing, signals no one
        assert "denied" in files[0]
        assert deleted.startswith("denied") and hostile.victim.exists()
        assert signalled.startswith("denied PermissionError")
    else:  # as root, nothing stops it: the log said so at start-up
        assert "read" in files[0]
        assert deleted == "deleted\n" and not hostile.victim.exists()
        assert signalled == "allowed\n"


def test_the_pool_keeps_working_and_scores(box, hostile):
    """Each kind of job after the hostile ones; pytest (KodCode) runs at this level too."""
    pytest_truth = json.dumps(
        {"pytest": "from solution import add\n\ndef test_add():\n    assert add(2, 3) == 5\n"}
    )
    truths = [TRUTH, '{"inputs": [[2, 3]], "outputs": [5], "fn_name": "add"}', pytest_truth]
    responses = ["```python\nprint(int(input()) * 42)\n```", "def add(a, b):\n    return a + b"]
    responses.append(responses[1])
    rewards, fractions = code.score_batch(responses * 2, truths * 2, box)
    assert rewards.tolist() == [1.0] * 6 and fractions.tolist() == [1.0] * 6


def test_without_bubblewrap_auto_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_bwrap_works", lambda: "bwrap is not installed")
    monkeypatch.setattr(sandbox, "_warned", False)
    with pytest.raises(ValueError, match="isolation='bwrap' is not available: bwrap is not"):
        sandbox.isolation_level("bwrap")
    assert [sandbox.isolation_level("auto") for _ in range(3)] == ["rlimit"] * 3
    warnings = [r for r in caplog.records if "bwrap is not installed" in r.getMessage()]
    assert len(warnings) == 1 and "apt-get install bubblewrap" in warnings[0].getMessage()


def test_bad_settings_fail_and_pytest_that_cannot_run_warns_at_start(monkeypatch, caplog):
    with pytest.raises(ValueError, match="isolation='none'"):
        sandbox.isolation_level("none")
    with pytest.raises(ValueError, match="workers"):
        Sandbox(workers=sandbox.MAX_WORKERS + 1, isolation="rlimit")
    monkeypatch.setattr(sandbox, "SELF_TEST_PYTEST", "def test_x():\n    assert False\n")
    Sandbox(workers=1, isolation="rlimit").close()
    assert "pytest does not run in it" in caplog.text
