"""Qwen3-8B-Base, Clip-Cov (eps 1/1, r = 2e-4, band [1, 5]): the paper's Qwen2.5-7B recipe (lr
5e-7, micro-batches of 16) unchanged, as the paper has no Qwen3 run.

    python -m covjax.train --config=configs/qwen3_8b_clip_cov.py \
        --config.model.path=/models/Qwen3-8B-Base \
        --config.data.train_files=/data/dapo-math-17k.parquet \
        --config.data.eval_files=math500=/data/math500.parquet,aime24=/data/aime24.parquet \
        --workdir=runs/qwen3_8b_clip_cov

Qwen3-8B-Base (36 layers, width 4096, 32 query / 8 KV heads of 128, per-head q/k norms, untied
embeddings) is read from the folder's config.json. The paper's runs start from base models, as
this one does. The post-trained Qwen3-8B also loads, but its chat template turns thinking on by
default: its responses open with a <think> block whose traces often outgrow the recipe's 8192
new tokens, and a cut response scores 0.
"""

import pathlib
import runpy

recipes = runpy.run_path(str(pathlib.Path(__file__).with_name("recipes.py")))


def get_config(arg=None):
    return recipes["paper_recipe"]("7b", "clip_cov", arg)
