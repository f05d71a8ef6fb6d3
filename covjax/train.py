"""Entry point of the RL trainer.

    python -m covjax.train [--config=configs/X.py[:arg]] [--config.key=value ...] [--workdir=DIR]

Without --config it runs configs/default.py, the embedded toy with Clip-Cov. The workdir defaults
to runs/<config name>_<timestamp>; an existing workdir with checkpoints is resumed.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from covjax import trainer

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_REPO_ROOT, "configs", "default.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Config file (configs/*.py), optionally with ':arg' (e.g. ':smoke').",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder (default runs/<config name>_<timestamp>); resumed if it exists."
)


def _config_name() -> str:
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    return os.path.splitext(os.path.basename(path))[0]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    workdir = _WORKDIR.value or trainer.default_workdir(_config_name())
    logging.info("workdir: %s", workdir)
    trainer.train(_CONFIG.value, workdir)


if __name__ == "__main__":
    app.run(main)
