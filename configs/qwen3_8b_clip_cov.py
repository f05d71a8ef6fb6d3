"""Qwen3-8B, Clip-Cov (eps 1/1, r = 2e-4, band [1, 5]): the paper's Qwen2.5-7B recipe (lr 5e-7,
micro-batches of 16) unchanged, as the paper has no Qwen3 run.

    python -m covjax.train --config=configs/qwen3_8b_clip_cov.py \
        --config.model.path=/models/Qwen3-8B \
        --config.data.train_files=/data/dapo-math-17k.parquet \
        --config.data.eval_files=math500=/data/math500.parquet,aime24=/data/aime24.parquet \
        --workdir=runs/qwen3_8b_clip_cov

Qwen3-8B (36 layers, width 4096, 32 query / 8 KV heads of 128, per-head q/k norms, untied
embeddings) is read from the folder's config.json. Its chat template renders the prompts with
Qwen3's default, thinking enabled, so responses open with a <think> block.
"""

import pathlib
import runpy

recipes = runpy.run_path(str(pathlib.Path(__file__).with_name("recipes.py")))


def get_config(arg=None):
    return recipes["paper_recipe"]("7b", "clip_cov", arg)
