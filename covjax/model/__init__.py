"""Flax decoder LM (Qwen2/Qwen2.5, Qwen3, Llama 3.x, Mistral), its config, and Hugging Face I/O."""

from covjax.model.config import HF_ARCHITECTURES, ModelConfig
from covjax.model.hf import (
    check_pretrained,
    from_pretrained,
    hf_state_dict,
    load_tokenizer,
    save_pretrained,
    stop_ids,
)
from covjax.model.transformer import Block, KVCache, Transformer, init_cache

__all__ = [
    "HF_ARCHITECTURES",
    "Block",
    "KVCache",
    "ModelConfig",
    "Transformer",
    "check_pretrained",
    "from_pretrained",
    "hf_state_dict",
    "init_cache",
    "load_tokenizer",
    "save_pretrained",
    "stop_ids",
]
