"""Entry point of the RL trainer.

    python -m covjax.train [--config=configs/X.py[:arg]] [--config.key=value ...] [--workdir=DIR]

Without --config it runs configs/default.py, the embedded toy with Clip-Cov. The workdir defaults
to runs/<config name>_<timestamp>; an existing workdir with checkpoints is resumed (with the
config it was started with: checkpointing.check_resume names what may change). SIGTERM or SIGINT
checkpoints the step in progress and exits with status 128 + the signal (a second one quits at
once). A run that cannot go on (a full disk, a non-finite loss) stops with one line and status 1;
the checkpoints saved before it resume.

Several processes (TPU pod hosts, GPU nodes) run the same command; they join through
jax.distributed, found from the Cloud TPU metadata or SLURM, or given explicitly:

    python -m covjax.train ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I

(same workdir, on a file system every process sees or an object store's URL such as gs://B/RUN;
process 0 writes the metrics and logs).
"""

from __future__ import annotations

import logging as pylogging
import os
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from covjax import cli, multihost, trainer
from covjax import config as config_lib

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_REPO_ROOT, "configs", "default.py")

# Here, not beside app.run below: ml_collections applies the overrides of the default config as
# the flag is defined, and stops on an unknown key with a traceback.
if __name__ == "__main__":
    if _unknown := config_lib.unknown_override_keys(sys.argv):
        cli.fail(f"{'; '.join(_unknown)}: not a known config key (every key with its default "
                 "and range: covjax/config.py)")

_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Config file (configs/*.py), optionally with ':arg' (e.g. ':smoke').",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Output folder or object store URL, e.g. gs://BUCKET/RUN (default runs/<config "
    "name>_<timestamp>); a run of the same config in it is resumed, one of another config refused.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process run: HOST:PORT of process 0's jax.distributed coordinator (with "
    "--num_processes and --process_id; unset: detected on Cloud TPU / SLURM, else one process).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process run: processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process run: this process, 0-based.")


def _config_name() -> str:
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    return os.path.splitext(os.path.basename(path))[0]


def _covjax_info_or_library_warning(record: pylogging.LogRecord) -> bool:
    """Keeps covjax's INFO lines and the libraries' warnings (orbax logs each save at INFO), these
    without their tracebacks (orbax logs a failed background save's from each of its threads;
    covjax's own line names what failed)."""
    if record.pathname.startswith(_PACKAGE_DIR):
        return True
    record.exc_info, record.exc_text = None, None
    return record.levelno >= pylogging.WARNING


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is not None and not _WORKDIR.value.strip():
        cli.fail(f"--workdir={_WORKDIR.value!r} is empty: give a folder, or leave the flag out for "
                 "runs/<config name>_<timestamp>")
    logging.get_absl_handler().addFilter(_covjax_info_or_library_warning)
    multihost.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    # one log: process 0 logs progress, the others only warnings and errors
    logging.set_verbosity(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    if _WORKDIR.value is None and jax.process_count() > 1:
        raise app.UsageError(
            f"--workdir is required with {jax.process_count()} processes (each would pick its "
            "own timestamped default)"
        )
    try:  # a config file that failed to load raises when its values are first read
        config = _CONFIG.value
        config.to_dict()
    except Exception as error:  # noqa: BLE001 - a config file that does not load is bad input
        cli.fail(f"{flags.FLAGS['config'].serialize()}: {error}", kind="bad input")
    workdir = _WORKDIR.value or trainer.default_workdir(_config_name())
    logging.info("workdir: %s", workdir)
    try:
        trainer.train(config, workdir)
    except config_lib.ConfigError as error:
        cli.fail(str(error), kind="bad input")
    except trainer.RunFailed as error:
        # the checkpoint in flight is written (trainer._stop_run); the interpreter's shutdown
        # would only add the orbax threads' tracebacks after the one line
        cli.fail(str(error), kind="run failed", at_once=True)
    except trainer.StoppedBySignal as stopped:
        # exit as a process killed by the signal would, so `train && eval` does not go on
        logging.warning("%s", stopped)
        sys.exit(128 + (stopped.signum or signal.SIGTERM))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
