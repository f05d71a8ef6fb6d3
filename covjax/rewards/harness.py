"""The test runner that covjax.rewards.sandbox starts inside the sandbox (standard library only).

It reads one JSON job from standard input, applies the program's limits to itself, gives up
root (to the job's uid) and runs each test in a forked child: the program's code from
``solution.py`` in the working directory, with the test's standard input from a file and its
standard output to a file bounded by the file-size limit. A child gets the test's CPU-time limit
(RLIMIT_CPU) and is killed with its process group at the test's wall-clock limit; tests stop
once the program's wall-clock or CPU-time budget is spent. Forking from one interpreter pays the
interpreter's start-up once per program, not once per test.

It never judges an answer: it writes one JSON line per test (status, the test's output, wall and
CPU seconds) to its standard output and the sandbox compares the outputs, which never enter the
sandbox. Job kinds:

- ``stdin``: run ``solution.py`` as ``__main__``; the output is its standard output.
- ``call``: run ``solution.py`` as a module and call ``fn_name(*args)`` (or the method of a
  ``Solution`` instance, LeetCode style); the output is the JSON of the return value.
- ``pytest``: run ``pytest test_solution.py`` (which imports ``solution``) with a wall-clock
  limit per test function; the output is ``"<passed> <collected>"``, which the child writes to
  a pipe the harness reads (the program runs in pytest's process, so it could write there too,
  but a program that exits early, before pytest reports, passes nothing).

A child subreaper, the harness inherits every process a test leaves outside its process group
and kills them after each test.
"""

import ctypes
import io
import json
import os
import resource
import runpy
import select
import signal
import sys
import time

PR_SET_DUMPABLE = 4  # prctl option: the children may not open /proc/<harness>/fd or ptrace it
PR_SET_CHILD_SUBREAPER = 36  # prctl option: orphans of the tests become the harness's children


def _limit(which: int, value: int) -> None:
    resource.setrlimit(which, (value, value))


def _setup(job: dict) -> None:
    """Limits shared by the harness and every child, then the job's uid (root gives up all
    capabilities with it)."""
    _limit(resource.RLIMIT_AS, job["memory_bytes"])
    _limit(resource.RLIMIT_NPROC, job["processes"])
    _limit(resource.RLIMIT_NOFILE, job["open_files"])
    _limit(resource.RLIMIT_CORE, 0)
    if job["uid"] is not None:
        os.setgroups([])
        os.setgid(job["uid"])
        os.setuid(job["uid"])
    libc = ctypes.CDLL(None)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _call(fn_name: str, args: list, out_fd: int) -> None:
    """Calls the solution's function on `args`; writes the JSON of its value to `out_fd`."""
    namespace = runpy.run_path("solution.py", run_name="solution")
    fn = namespace.get(fn_name)
    if fn is None and hasattr(namespace.get("Solution"), fn_name):
        fn = getattr(namespace["Solution"](), fn_name)
    value = fn(*args)
    os.write(out_fd, json.dumps(list(value) if isinstance(value, tuple) else value).encode())


class _Counter:
    """pytest plugin: collected and passed test functions, a wall-clock limit per test."""

    def __init__(self, test_s: float):
        self.test_s = test_s
        self.collected = self.passed = 0

    def pytest_collection_modifyitems(self, items):
        self.collected = len(items)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            self.passed += 1

    def _expire(self, signum, frame):
        raise TimeoutError(f"test over its {self.test_s} s limit")

    def pytest_runtest_call(self, item):
        signal.signal(signal.SIGALRM, self._expire)
        signal.setitimer(signal.ITIMER_REAL, self.test_s)

    def pytest_runtest_teardown(self, item):
        signal.setitimer(signal.ITIMER_REAL, 0)


def _pytest(test_s: float, out_fd: int) -> None:
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # the installed plugins cost seconds
    import pytest

    counter = _Counter(test_s)
    pytest.main(["-q", "-p", "no:cacheprovider", "test_solution.py"], plugins=[counter])
    os.write(out_fd, f"{counter.passed} {counter.collected}".encode())


def _child(job: dict, test, cpu_s: int, result_fd: int, counts_fd: int) -> None:
    """The forked child of one test: its own process group, limits, files; never returns.
    pytest's counts go to `counts_fd`, a pipe the harness reads, not a file the program could
    write before it exits."""
    code = 1
    try:
        os.setpgid(0, 0)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU, then SIGKILL
        _limit(resource.RLIMIT_FSIZE, job["file_bytes"])
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it: report the limit
        os.close(result_fd)
        with open("input.txt", "w", encoding="utf-8") as f:
            f.write(test if job["kind"] == "stdin" else "")
        stdin = os.open("input.txt", os.O_RDONLY)
        output = os.open("output.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        program_out = output if job["kind"] == "stdin" else os.open(os.devnull, os.O_WRONLY)
        for fd, target in ((stdin, 0), (program_out, 1), (os.open(os.devnull, os.O_WRONLY), 2)):
            os.dup2(fd, target)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        for name, fd in (("stdout", 1), ("stderr", 2)):
            stream = io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8")
            setattr(sys, name, stream)
        sys.argv = ["solution.py"]
        if job["kind"] == "stdin":
            runpy.run_path("solution.py", run_name="__main__")
        elif job["kind"] == "call":
            _call(job["fn_name"], test, output)
        else:
            _pytest(job["test_s"], counts_fd)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        code = 1
    finally:
        try:  # what the program printed last; an error here (it closed fd 1) fails the test
            sys.stdout.flush()
        except BaseException:
            code = 1
        os._exit(code)


def _wait(pid: int, wall_s: float) -> tuple[int, bool, float]:
    """(wait status, whether the wall-clock limit expired, CPU seconds) of a child; on expiry
    the child is killed with its process group."""
    pidfd = os.pidfd_open(pid)
    try:
        expired = not select.select([pidfd], [], [], wall_s)[0]
    finally:
        os.close(pidfd)
    if expired:
        os.killpg(pid, signal.SIGKILL)
    _, status, usage = os.wait4(pid, 0)
    try:  # what the test left running in its group
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return status, expired, usage.ru_utime + usage.ru_stime


def _children() -> list[int]:
    """The harness's child processes: the kernel's list (CONFIG_PROC_CHILDREN), else a scan of
    /proc, which costs a file read per process on the host."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children", encoding="ascii") as f:
            return [int(pid) for pid in f.read().split()]
    except FileNotFoundError:
        pass
    children = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if int(f.read().rpartition(b")")[2].split()[1]) == me:
                    children.append(int(pid))
        except (OSError, ValueError):  # it exited meanwhile
            continue
    return children


def _kill_orphans() -> None:
    """Kills what a test left outside its process group (it called setsid, say): a child
    subreaper, the harness inherits those processes, so its children are all that is left."""
    for _ in range(100):
        children = _children()
        if not children:
            return
        for pid in children:
            os.kill(pid, signal.SIGKILL)  # its children become the harness's in turn
        for pid in children:
            os.waitpid(pid, 0)


def _status(status: int, expired: bool) -> str:
    if expired:
        return "timeout"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return {
            signal.SIGXCPU: "timeout",
            signal.SIGKILL: "timeout",
            signal.SIGXFSZ: "output_limit",
        }.get(sig, "signal")
    return "ok" if os.WEXITSTATUS(status) == 0 else "error"


def main() -> None:
    job = json.loads(sys.stdin.read())
    _setup(job)
    results = os.fdopen(os.dup(1), "w")
    tests = job["tests"] if job["kind"] != "pytest" else [None]
    test_s = job["test_s"] if job["kind"] != "pytest" else job["program_s"]
    wall_left = cpu_left = job["program_s"]
    for test in tests:
        if min(wall_left, cpu_left) <= 0:
            results.write(json.dumps({"status": "budget", "output": ""}) + "\n")
            continue
        cpu_s = max(1, int(min(test_s, cpu_left) + 0.999))  # RLIMIT_CPU counts whole seconds
        counts_r, counts_w = os.pipe()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os.close(counts_r)
            _child(job, test, cpu_s, results.fileno(), counts_w)
        os.close(counts_w)
        status, expired, cpu = _wait(pid, min(test_s, wall_left))
        wall = time.monotonic() - start
        _kill_orphans()
        wall_left, cpu_left = wall_left - wall, cpu_left - cpu
        output = b""
        if job["kind"] == "pytest":
            os.set_blocking(counts_r, False)
            try:
                output = os.read(counts_r, 64)
            except BlockingIOError:  # the program exited before pytest reported
                pass
        elif os.path.isfile("output.txt"):
            with open("output.txt", "rb") as f:
                output = f.read(job["output_bytes"] + 1)
        os.close(counts_r)
        result = _status(status, expired)
        if result == "ok" and len(output) > job["output_bytes"]:
            result = "output_limit"
        results.write(
            json.dumps(
                {
                    "status": result,
                    "output": output[: job["output_bytes"]].decode("utf-8", "replace"),
                    "wall_s": wall,
                    "cpu_s": cpu,
                }
            )
            + "\n"
        )
        results.flush()


if __name__ == "__main__":
    main()
