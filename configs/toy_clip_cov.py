"""The toy with Clip-Cov: eps 1/1, r = 0.2, band [0.5, 5] (hard: r = 5e-2, band [1, 5]).

    python -m covjax.train --config=configs/toy_clip_cov.py --workdir=runs/toy_clip_cov

Why not the paper's r = 2e-4 and band [1, 5]: covjax/config.py's loss section.
"""

import pathlib
import runpy

recipes = runpy.run_path(str(pathlib.Path(__file__).with_name("recipes.py")))


def get_config(arg=None):
    return recipes["toy_config"]("clip_cov", arg)
