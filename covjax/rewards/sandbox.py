"""A sandbox for untrusted programs: each runs in its own process under limits, isolated by
bubblewrap where the machine allows it, and a pool runs many in parallel.

A `Job` is a program (``solution.py``, plus the files its tests need) and its tests; the sandbox
runs covjax/rewards/harness.py in a fresh interpreter, which runs each test in a forked child and
reports its output (the sandbox compares nothing: see covjax.rewards.code). Every program gets:

- its own session and process group, killed as a whole, with every process it left, when the
  program ends or overruns (the harness is a child subreaper: it inherits and kills what a test
  left outside its group, and its descendants are killed with it); a wall-clock and a CPU-time
  limit per test (the harness) and per program (the harness's budget, and a hard kill of the
  whole sandbox here);
- rlimits on address space, processes, file size (its standard output included) and open
  files; as root, its own uid (one per pool slot), so the process limit is its own, it cannot
  signal or delete what is not its, and every process of that uid is killed afterwards;
- a fresh, empty working directory, deleted afterwards; an environment holding PATH only;
  standard input from the test; output read up to `Limits.output_bytes`.

Isolation levels (`isolation_level`), stated in the log when a `Sandbox` starts:

- ``bwrap``: bubblewrap (the Debian package ``bubblewrap``) unshares the network, PID, IPC and
  UTS namespaces; the program sees a read-only system (/usr, /etc, the Python installation and
  its virtual environment), an empty /tmp, its working directory as /sandbox, and nothing of
  the home directory, the project or the host's /tmp. Killing the sandbox kills its PID
  namespace.
- ``rlimit``: without bubblewrap, the limits, the directory and (as root) the uid still hold,
  but the program can reach the network and read whatever its uid may read; the log warns once.
  Without a uid of its own, a program that kills the harness can leave a process that left its
  session running (nothing then links it to the sandbox).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from covjax.rewards import MAX_WORKERS, default_workers

ISOLATION_LEVELS = ("auto", "bwrap", "rlimit")
JOB_KINDS = ("stdin", "call", "pytest")
STARTUP_S = 5.0  # the interpreter's start-up, granted beyond a program's own budget
# As root, pool slot s of process p runs as uid UID_BASE + (p mod 10000) * MAX_WORKERS + s: far
# above the ranges distributions give to users, and one uid per concurrent program.
UID_BASE = 1_500_000_000
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc")
HARNESS = Path(__file__).with_name("harness.py")
SELF_TEST_PYTEST = "from solution import x\n\n\ndef test_x():\n    assert x == 1\n"


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one program may use; `test_s` and `program_s` bound wall-clock and CPU time."""

    test_s: float = 5.0
    program_s: float = 30.0
    memory_mb: int = 2048
    processes: int = 32
    file_mb: int = 16
    open_files: int = 64
    output_bytes: int = 1 << 20


@dataclasses.dataclass(frozen=True)
class Job:
    """A program and its tests. `files` (name -> text) are written into the working directory,
    ``solution.py`` among them; `tests` are standard inputs (kind "stdin") or argument lists
    (kind "call", of `fn_name`); kind "pytest" runs ``test_solution.py`` as one test."""

    kind: str
    files: Mapping[str, str]
    tests: Sequence[Any] = ()
    fn_name: str | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One test's run. status: ok (exited 0), error (non-zero exit, an exception), timeout
    (a time limit), output_limit, signal (killed by another signal), budget (not run: the
    program's budget was spent) or killed (the whole sandbox was killed or died)."""

    status: str
    output: str
    wall_s: float = 0.0
    cpu_s: float = 0.0


def _bwrap_args(workdir: str) -> list[str]:
    """bubblewrap's command line: new namespaces, a read-only system and Python, `workdir` as
    /sandbox, nothing else of the host's files."""
    args = [
        "bwrap",
        "--unshare-net",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--new-session",
        "--die-with-parent",
    ]
    for d in SYSTEM_DIRS:
        args += ["--ro-bind-try", d, d]
    python_dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    python_dirs.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    made = set()
    for path in sorted(python_dirs):
        if any(path == d or path.startswith(d + "/") for d in SYSTEM_DIRS):
            continue
        parents = Path(path).parents
        for parent in reversed([str(p) for p in parents if str(p) != "/"]):
            if parent not in made:  # bubblewrap would make them 0700, closed to the program's uid
                args += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        args += ["--ro-bind", path, path]
    return args + [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--bind",
        workdir,
        "/sandbox",
        "--chdir",
        "/sandbox",
    ]


@functools.cache
def _bwrap_works() -> str:
    """'' when bubblewrap runs this Python in a sandbox here, else why not."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed"
    with tempfile.TemporaryDirectory(prefix="covjax-bwrap-probe-") as probe:
        try:
            done = subprocess.run(
                [*_bwrap_args(probe), sys.executable, "-I", "-S", "-c", "pass"],
                capture_output=True,
                timeout=30,
                env=_environment(),
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"bwrap failed to start: {e}"
    if done.returncode:
        return f"bwrap exited with {done.returncode}: {done.stderr.decode(errors='replace')[-300:]}"
    return ""


@functools.cache
def _others_can_run_python() -> bool:
    """Whether a uid of the sandbox's range can start this Python and import from it."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import json"],
            user=UID_BASE,
            group=UID_BASE,
            extra_groups=[],
            capture_output=True,
            timeout=30,
            env=_environment(),
            cwd="/",
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


_warned = False


def isolation_level(requested: str = "auto") -> str:
    """The level in force: "bwrap" when requested or "auto" and bubblewrap works, else "rlimit"
    (warned once; ValueError when "bwrap" was requested and does not work)."""
    global _warned
    if requested not in ISOLATION_LEVELS:
        raise ValueError(f"isolation={requested!r} is not one of {list(ISOLATION_LEVELS)}")
    if requested == "rlimit":
        return "rlimit"
    why = _bwrap_works()
    if not why:
        return "bwrap"
    if requested == "bwrap":
        raise ValueError(f"isolation='bwrap' is not available: {why}")
    if not _warned:
        logging.warning(
            "code sandbox: %s, so programs run at the rlimit level (limits, own directory%s) but "
            "can reach the network and read the host's files; install bubblewrap "
            "(apt-get install bubblewrap) to isolate them",
            why,
            ", own uid" if os.geteuid() == 0 else "",
        )
        _warned = True
    return "rlimit"


def _environment() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", os.defpath)}


def _session_uid_parent(pid: str) -> tuple[int, int, int]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()  # after "pid (comm)"
    return int(fields[3]), os.stat(f"/proc/{pid}").st_uid, int(fields[1])


def kill_all(session: int, uid: int | None) -> int:
    """Kills every process of `session`, every descendant of its leader (the harness is a child
    subreaper, so they include processes that left the session while it lived) and, when given,
    every process of `uid`; returns how many were found. Repeats until none is left."""
    found = 0
    for _ in range(100):
        processes = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                processes[int(pid)] = _session_uid_parent(pid)
            except (OSError, ValueError):  # it exited meanwhile
                continue
        victims = {
            pid
            for pid, (sid, owner, _) in processes.items()
            if sid == session or (uid is not None and owner == uid)
        }
        grown = True
        while grown:  # the leader's descendants, whatever their session
            below = {p for p, (_, _, parent) in processes.items() if parent in victims}
            grown = not below <= victims
            victims |= below
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        found += len(victims)
        if not victims:
            return found
    return found


def _own_processes() -> int:
    uid = os.getuid()
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            count += os.stat(f"/proc/{pid}").st_uid == uid
        except OSError:
            pass
    return count


def _remove(path: str) -> None:
    """Deletes a working directory whatever the program did to it (its permissions, links to
    elsewhere, which are removed and never followed); a failure is logged, never raised, so a
    hostile program cannot stop the training step."""
    try:
        os.chmod(path, 0o700)
        for root, dirs, _ in os.walk(path):
            for name in dirs:  # os.walk descends into them after this, so they must open
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), 0o700)
        shutil.rmtree(path)
    except OSError as error:
        logging.warning("code sandbox: could not delete %s: %s", path, error)


class Sandbox:
    """Runs `Job`s under `limits` at isolation level `isolation`, at most `workers` at once."""

    def __init__(
        self, limits: Limits = Limits(), *, workers: int | None = None, isolation: str = "auto"
    ):
        workers = workers or default_workers()
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be in [1, {MAX_WORKERS}], got {workers}")
        self.limits = limits
        self.workers = workers
        self.level = isolation_level(isolation)
        # as root, each program runs as its own uid, which must be able to run this Python:
        # bubblewrap shows it the installation, the rlimit level needs it readable by all
        self.own_uid = os.geteuid() == 0 and (self.level == "bwrap" or _others_can_run_python())
        if os.geteuid() == 0 and not self.own_uid:
            logging.warning(
                "code sandbox: %s is not readable by other users, so at the rlimit level "
                "programs run as root (no process limit, full file access)",
                sys.base_prefix,
            )
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(workers):
            self._slots.put(slot)
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "covjax-sandbox")
        self._harness = HARNESS.read_text(encoding="utf-8")
        logging.info(
            "code sandbox: isolation level %s, %s, %d workers, %s",
            self.level,
            "own uid per program" if self.own_uid else f"uid {os.geteuid()}",
            workers,
            limits,
        )
        self._self_test()

    def _self_test(self) -> None:
        """Known programs must give known results here: RuntimeError when a standard-input
        program does not run (nothing could be scored), a warning when pytest does not (KodCode
        problems would all score 0)."""
        stdin, pytest_run = self.run_many(
            [
                Job("stdin", {"solution.py": "print(int(input()) + 1)"}, ["41\n"]),
                Job("pytest", {"solution.py": "x = 1", "test_solution.py": SELF_TEST_PYTEST}),
            ]
        )
        if (stdin[0].status, stdin[0].output) != ("ok", "42\n"):
            raise RuntimeError(f"code sandbox ({self.level}): a known program fails: {stdin[0]}")
        if (pytest_run[0].status, pytest_run[0].output) != ("ok", "1 1"):
            logging.warning(
                "code sandbox (%s): pytest does not run in it (%s), so pytest-tested problems "
                "(KodCode) score 0; install covjax's [test] extra into this Python",
                self.level,
                pytest_run[0],
            )

    def _uid(self, slot: int) -> int | None:
        if not self.own_uid:
            return None
        return UID_BASE + (os.getpid() % 10000) * MAX_WORKERS + slot

    def run_many(self, jobs: Sequence[Job]) -> list[list[Outcome]]:
        """Each job's test runs, in order, run `workers` at a time."""
        return list(self._pool.map(self.run, jobs))

    def run(self, job: Job) -> list[Outcome]:
        """The job's test runs (kind "pytest": one), in order."""
        if job.kind not in JOB_KINDS:
            raise ValueError(f"job kind {job.kind!r} is not one of {list(JOB_KINDS)}")
        slot = self._slots.get()
        try:
            return self._run(job, self._uid(slot))
        finally:
            self._slots.put(slot)

    def _run(self, job: Job, uid: int | None) -> list[Outcome]:
        lim = self.limits
        spec = {
            "kind": job.kind,
            "tests": list(job.tests),
            "fn_name": job.fn_name,
            "uid": uid,
            "test_s": lim.test_s,
            "program_s": lim.program_s,
            "memory_bytes": lim.memory_mb << 20,
            "processes": lim.processes,
            "file_bytes": lim.file_mb << 20,
            "open_files": lim.open_files,
            "output_bytes": lim.output_bytes,
        }
        if uid is None:  # RLIMIT_NPROC counts every process of the uid, these included
            spec["processes"] += _own_processes()
        num_tests = 1 if job.kind == "pytest" else len(job.tests)
        workdir = tempfile.mkdtemp(prefix="covjax-sandbox-")
        private = tempfile.mkdtemp(prefix="covjax-sandbox-io-")  # never shown to the program
        try:
            for name, text in job.files.items():
                Path(workdir, name).write_text(text, encoding="utf-8")
            if uid is not None:
                for path in [workdir, *(os.path.join(workdir, n) for n in job.files)]:
                    os.chown(path, uid, uid)
            Path(private, "job.json").write_text(json.dumps(spec), encoding="utf-8")
            prefix = _bwrap_args(workdir) if self.level == "bwrap" else []
            with (
                open(Path(private, "job.json"), "rb") as stdin,
                open(Path(private, "results"), "wb") as stdout,
            ):
                proc = subprocess.Popen(
                    [*prefix, sys.executable, "-c", self._harness],
                    stdin=stdin,
                    stdout=stdout,
                    stderr=subprocess.DEVNULL,
                    cwd=workdir,
                    env=_environment(),
                    start_new_session=True,
                )
            try:
                proc.wait(timeout=lim.program_s + STARTUP_S)
            except subprocess.TimeoutExpired:
                pass
            finally:
                kill_all(proc.pid, uid)
                proc.wait()
            lines = Path(private, "results").read_text(encoding="utf-8").splitlines()
        finally:
            _remove(workdir)
            shutil.rmtree(private)
        runs = []
        for line in lines[:num_tests]:
            try:
                runs.append(Outcome(**json.loads(line)))
            except (ValueError, TypeError):  # a line cut short when the sandbox was killed
                break
        return runs + [Outcome("killed", "")] * (num_tests - len(runs))

    def close(self) -> None:
        self._pool.shutdown()
