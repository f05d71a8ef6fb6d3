"""The embedded toy with Clip-Cov: what `python -m covjax.train` runs without --config.

    python -m covjax.train --config=configs/default.py --workdir=runs/default

The same run as toy_clip_cov.py: base_config's defaults, locked.
"""

import pathlib
import runpy

recipes = runpy.run_path(str(pathlib.Path(__file__).with_name("recipes.py")))


def get_config(arg=None):
    return recipes["toy_config"]("clip_cov", arg)
