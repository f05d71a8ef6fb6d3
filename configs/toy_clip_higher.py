"""The toy with Clip-Higher (DAPO): PPO eps 0.2 low / 0.28 high.

    python -m covjax.train --config=configs/toy_clip_higher.py --workdir=runs/toy_clip_higher
"""

import pathlib
import runpy

recipes = runpy.run_path(str(pathlib.Path(__file__).with_name("recipes.py")))


def get_config(arg=None):
    return recipes["toy_config"]("clip_higher", arg)
