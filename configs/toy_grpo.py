"""The toy with the GRPO baseline (PPO eps 0.2 / 0.2): the run whose entropy collapses.

    python -m covjax.train --config=configs/toy_grpo.py --workdir=runs/toy_grpo

Cost on 2 CPU cores (2026-11-26): 300 steps in about 85 s and 1.0 GB peak RSS, the 31 s
warm start (2000 steps; the hard variant's has 600) included; later runs of a seed read it from
data.toy.cache_dir (about 50 s).
Arguments: `configs/toy_grpo.py:smoke` runs 4 tiny steps (about 20 s); `:hard` the hard
variant (digits 0-9, S in 4..50; final reward 0.47-0.92 by method, 0.07-0.17 at step 0);
`:hard,smoke` both.

TOY.md: on the easy variant GRPO lost 93-94% of its entropy in 300 steps.
All keys and their ranges: covjax/config.py (base_config, toy_config).
"""

from covjax.config import toy_config


def get_config(arg=None):
    return toy_config("grpo", arg)
