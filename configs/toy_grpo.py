"""The toy with the GRPO baseline (PPO eps 0.2 / 0.2): the run whose entropy collapses.

    python -m covjax.train --config=configs/toy_grpo.py --workdir=runs/toy_grpo
"""

import pathlib
import runpy

recipes = runpy.run_path(str(pathlib.Path(__file__).with_name("recipes.py")))


def get_config(arg=None):
    return recipes["toy_config"]("grpo", arg)
