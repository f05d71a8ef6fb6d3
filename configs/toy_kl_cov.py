"""The toy with KL-Cov: k = 0.4, beta = 2 (hard: k = 0.1).

    python -m covjax.train --config=configs/toy_kl_cov.py --workdir=runs/toy_kl_cov

KL-Cov's penalty has no gradient on the first, on-policy mini-batch, so the toy keeps 4
mini-batches per rollout step.
"""

import pathlib
import runpy

recipes = runpy.run_path(str(pathlib.Path(__file__).with_name("recipes.py")))


def get_config(arg=None):
    return recipes["toy_config"]("kl_cov", arg)
