"""Qwen2.5-32B (lr 1e-6), GRPO baseline (PPO eps 0.2 / 0.2): the paper's recipe.

    python -m covjax.train --config=configs/qwen2_5_32b_grpo.py \
        --config.model.path=/models/Qwen2.5-32B \
        --config.data.train_files=/data/dapo-math-17k.parquet \
        --config.data.eval_files=math500=/data/math500.parquet,aime24=/data/aime24.parquet \
        --workdir=runs/qwen2_5_32b_grpo
"""

import pathlib
import runpy

recipes = runpy.run_path(str(pathlib.Path(__file__).with_name("recipes.py")))


def get_config(arg=None):
    return recipes["paper_recipe"]("32b", "grpo", arg)
