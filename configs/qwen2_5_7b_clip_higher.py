"""Qwen2.5-7B (lr 5e-7), Clip-Higher (PPO eps 0.2 low / 0.28 high): the paper's recipe.

    python -m covjax.train --config=configs/qwen2_5_7b_clip_higher.py \
        --config.model.path=/models/Qwen2.5-7B \
        --config.data.train_files=/data/dapo-math-17k.parquet \
        --config.data.eval_files=math500=/data/math500.parquet,aime24=/data/aime24.parquet \
        --workdir=runs/qwen2_5_7b_clip_higher
"""

import pathlib
import runpy

recipes = runpy.run_path(str(pathlib.Path(__file__).with_name("recipes.py")))


def get_config(arg=None):
    return recipes["paper_recipe"]("7b", "clip_higher", arg)
