"""The toy with Clip-Cov: eps 1/1, r = 0.2, band [0.5, 5] (hard: r = 5e-2, band [1, 5]).

    python -m covjax.train --config=configs/toy_clip_cov.py --workdir=runs/toy_clip_cov

The paper's r = 2e-4 touches one token of the toy's 896-token mini-batch; from r = 0.2 on
the band decides how many are touched, so the easy variant widens the paper's [1, 5]
(docs/toy_results.md, "Settings").
"""

import pathlib
import runpy

recipes = runpy.run_path(str(pathlib.Path(__file__).with_name("recipes.py")))


def get_config(arg=None):
    return recipes["toy_config"]("clip_cov", arg)
