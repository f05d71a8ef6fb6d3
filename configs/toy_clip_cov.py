"""The toy with Clip-Cov (r = 0.1, hard variant 5e-2; band lb = 1, ub = 5; PPO eps 1/1).

    python -m covjax.train --config=configs/toy_clip_cov.py --workdir=runs/toy_clip_cov

Cost on 2 CPU cores (2026-11-26): 300 steps in about 60 s and 1.1 GB peak RSS, the 10 s
warm start included (later runs of a seed read it from data.toy.cache_dir: ~50 s).
Arguments: `configs/toy_clip_cov.py:smoke` runs 4 tiny steps (about 20 s); `:hard` the hard
variant (digits 0-9, S in 4..50; final reward 0.47-0.92 by method, 0.07-0.17 at step 0);
`:hard,smoke` both.

The paper's 2e-4 touches one token of an 896-token mini-batch and does nothing (TOY.md); late
in training the band [1, 5], not r, decides how many tokens are touched.
All keys and their ranges: covjax/config.py (base_config, toy_config).
"""

from covjax.config import toy_config


def get_config(arg=None):
    return toy_config("clip_cov", arg)
