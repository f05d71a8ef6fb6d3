"""Qwen2.5-32B, GRPO baseline (PPO eps 0.2 / 0.2): the paper's recipe (ALGORITHMS.md 7).

    python -m covjax.train --config=configs/qwen2_5_32b_grpo.py \
        --config.model.path=/models/Qwen2.5-32B \
        --config.data.train_files=/data/dapo-math-17k.parquet \
        --config.data.eval_files=math500=/data/math500.parquet,aime24=/data/aime24.parquet \
        --workdir=runs/qwen2_5_32b_grpo

model.path and data.train_files are required (local folders/files only: nothing is downloaded);
the run stops before compiling anything if they are missing.
Cost: not measured by covjax. Each step samples 256 prompts x 8 responses of up to 8192 tokens
(up to ~17M response tokens, ~3e18 training FLOPs plus the rollout): a multi-host GPU or TPU
job of days, as in the paper. benchmarks/rl_step.py measures one step of a 0.5B model on a GPU.
Argument: `configs/qwen2_5_32b_grpo.py:smoke` runs 2 steps of 8 prompts x 2 responses
of at most 256 tokens, to check the plumbing on one accelerator.
All keys and their ranges: covjax/config.py (base_config, paper_recipe).
"""

from covjax.config import paper_recipe


def get_config(arg=None):
    return paper_recipe("32b", "grpo", arg)
