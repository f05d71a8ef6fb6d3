"""The embedded toy with Clip-Cov: what `python -m covjax.train` runs by default.

    python -m covjax.train --config=configs/default.py --workdir=runs/default

Cost on 2 CPU cores (2026-11-26): 300 steps in about 85 s and 1.0 GB peak RSS, the 31 s
warm start (2000 steps; the hard variant's has 600) included; later runs of a seed read it from
data.toy.cache_dir (about 50 s).
Arguments: `configs/default.py:smoke` runs 4 tiny steps (about 20 s); `:hard` the hard
variant (digits 0-9, S in 4..50; final reward 0.47-0.92 by method, 0.07-0.17 at step 0);
`:hard,smoke` both.

Clip-Cov (ALGORITHMS.md 3) with the toy's ratio r = 0.2 and band [0.5, 5]: the paper's 2e-4
touches one token of an 896-token mini-batch and does nothing (TOY.md; docs/toy_results.md,
"Settings"). Measured (seed 0): reward 0.65 -> 1.00, token entropy 1.23 -> 0.64 (mean of the last
20 steps; toy_grpo: 1.23 -> 0.20).
All keys and their ranges: covjax/config.py (base_config, toy_config).
"""

from covjax.config import toy_config


def get_config(arg=None):
    return toy_config("clip_cov", arg)
