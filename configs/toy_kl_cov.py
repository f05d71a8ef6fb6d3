"""The toy with KL-Cov (k = 0.4, beta = 2; hard variant k = 0.1, beta = 2).

    python -m covjax.train --config=configs/toy_kl_cov.py --workdir=runs/toy_kl_cov

Cost on 2 CPU cores (2026-11-26): 300 steps in about 85 s and 1.0 GB peak RSS, the 31 s
warm start (2000 steps; the hard variant's has 600) included; later runs of a seed read it from
data.toy.cache_dir (about 50 s).
Arguments: `configs/toy_kl_cov.py:smoke` runs 4 tiny steps (about 20 s); `:hard` the hard
variant (digits 0-9, S in 4..50; final reward 0.47-0.92 by method, 0.07-0.17 at step 0);
`:hard,smoke` both.

KL-Cov's penalty |logp - old_logp| has zero gradient on the first, on-policy mini-batch, so the
toy keeps 4 mini-batches per rollout step (16 prompts x 8 responses each), and a step that
dynamic sampling left short deals its kept groups over them (covjax.trainer).
All keys and their ranges: covjax/config.py (base_config, toy_config).
"""

from covjax.config import toy_config


def get_config(arg=None):
    return toy_config("kl_cov", arg)
