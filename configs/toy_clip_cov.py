"""The toy with Clip-Cov (r = 0.2, band [0.5, 5]; hard variant r = 5e-2, band [1, 5]; eps 1/1).

    python -m covjax.train --config=configs/toy_clip_cov.py --workdir=runs/toy_clip_cov

Cost on 2 CPU cores (2026-11-26): 300 steps in about 85 s and 1.0 GB peak RSS, the 31 s
warm start (2000 steps; the hard variant's has 600) included; later runs of a seed read it from
data.toy.cache_dir (about 50 s).
Arguments: `configs/toy_clip_cov.py:smoke` runs 4 tiny steps (about 20 s); `:hard` the hard
variant (digits 0-9, S in 4..50; final reward 0.47-0.92 by method, 0.07-0.17 at step 0);
`:hard,smoke` both.

The paper's 2e-4 touches one token of an 896-token mini-batch and does nothing (TOY.md). From
r = 0.2 on, the band, not r, decides how many tokens are touched (r = 0.4 changed no bit), so the
easy variant widens the paper's band [1, 5] to [0.5, 5] (docs/toy_results.md, "Settings").
All keys and their ranges: covjax/config.py (base_config, toy_config).
"""

from covjax.config import toy_config


def get_config(arg=None):
    return toy_config("clip_cov", arg)
