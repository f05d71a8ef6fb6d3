"""Qwen2.5-7B, Clip-Cov, on code: the paper's recipe with rewards from running each response's
program on its tests (covjax/tasks/code.py, in the sandbox of covjax/rewards/sandbox.py).

    python -m covjax.train --config=configs/qwen2_5_7b_code_clip_cov.py \
        --config.model.path=/models/Qwen2.5-7B \
        --config.data.train_files=/data/eurus2_rl_code.parquet,/data/kodcode.parquet \
        --config.data.eval_files=kodcode=/data/kodcode_test.parquet \
        --workdir=runs/qwen2_5_7b_code_clip_cov

The sandbox runs data.code.workers programs at once (0: one per core): 256 prompts x 8
responses are 2048 programs a step, so give the host its cores. Install bubblewrap
(apt-get install bubblewrap) to isolate them; without it the log warns and they run at the
rlimit level. `:smoke` runs 2 steps of 8 prompts x 2 responses.
"""

import pathlib
import runpy

recipes = runpy.run_path(str(pathlib.Path(__file__).with_name("recipes.py")))


def get_config(arg=None):
    c = recipes["paper_recipe"]("7b", "clip_cov", arg)
    c.data.task = "code"
    return c
