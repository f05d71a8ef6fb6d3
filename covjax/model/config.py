"""Model hyper-parameters, read from and written back to a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

# Hugging Face class name -> our architecture name. DeepSeek-Math-7B is a LlamaForCausalLM.
HF_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
}
_HF_NAME = {v: k for k, v in HF_ARCHITECTURES.items()}
REMAT_POLICIES = ("none", "layer", "dots", "minimal", "save_attention")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names, in config.json
LLAMA3_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid_id(value: Any) -> int | None:
    return value if _is_token_id(value) else None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only LM (Qwen2/Qwen2.5, Qwen3, Llama 3.x, Mistral).

    `param_dtype` is the storage dtype of the weights (float32 = the learner's master weights);
    `compute_dtype` is the dtype of the matmuls (bfloat16 on accelerators). Norms, softmax and
    logits are always float32. `remat`: "none", "layer" (recompute each block in the backward
    pass, MaxText's "full"), "dots" (per block, keep matmul outputs and recompute the rest),
    "minimal" (keep the attention's matmul outputs, q/k/v, attention and out projection, and
    recompute the MLP's) or "save_attention" (keep only the attention outputs).
    `scan_layers` stacks the blocks and runs them with `lax.scan`, so compile time is flat in
    depth. `sliding_window` (Mistral, Qwen2's `use_sliding_window`): in a sliding layer the
    query at slot i (its index in the row, padding included, as transformers' cache positions)
    sees the keys at slots j with i - sliding_window < j <= i; every layer slides but those in
    `full_attention_layers` (sorted layer indices; Qwen2/3's `max_window_layers` or `layer_types`).
    `qk_norm` (Qwen3, and only Qwen3) applies an RMSNorm over head_dim to every query and key
    head before RoPE. `bos_token_id`, `eos_token_id` (one id or a tuple) and `pad_token_id` are
    carried from config.json to the config.json written back.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    attention_out_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    full_attention_layers: tuple[int, ...] = ()
    attention_impl: str = "auto"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in _HF_NAME:
            raise ValueError(
                f"architecture={self.architecture!r} is not supported; use one of "
                f"{sorted(_HF_NAME)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even (RoPE pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if self.sliding_window is not None and not (
            isinstance(self.sliding_window, int) and self.sliding_window > 0
        ):
            raise ValueError(
                f"ModelConfig.sliding_window must be None or a positive int, "
                f"got {self.sliding_window!r}"
            )
        self._check_sliding_layers()
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; use one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl={self.attention_impl!r}; use one of {ATTENTION_IMPLS}"
            )
        for name in ("param_dtype", "compute_dtype"):
            value = getattr(self, name)
            if value not in DTYPES:
                raise ValueError(f"ModelConfig.{name}={value!r}; use one of {DTYPES}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise ValueError(
                f"rope_scaling rope_type={rope_type!r} is not supported; use 'default' or 'llama3'"
            )
        if rope_type == "llama3":
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling with rope_type='llama3' lacks {missing}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, tuple) and name == "eos_token_id" else (value,)
            if value is not None and not all(_is_token_id(i) for i in ids):
                raise ValueError(f"ModelConfig.{name} must be None or a token id, got {value!r}")
        # checked here, not only when saving, so that a run cannot fail at its very end
        if self.architecture == "qwen2" and not (
            self.attention_bias and not self.attention_out_bias
        ):
            raise ValueError(
                "a qwen2 config must have attention_bias=True, attention_out_bias=False"
            )
        if self.architecture != "qwen2" and self.attention_bias != self.attention_out_bias:
            raise ValueError(f"{self.architecture} has one attention_bias flag for q/k/v/o")
        if self.qk_norm != (self.architecture == "qwen3"):
            raise ValueError(
                f"a {self.architecture} config must have qk_norm={not self.qk_norm}: the q/k "
                "norms are Qwen3's alone"
            )

    def _check_sliding_layers(self) -> None:
        """One representation per pattern: no exempt layers without a window, not all exempt."""
        full, layers = self.full_attention_layers, self.num_hidden_layers
        indices = isinstance(full, tuple) and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in full
        )
        if not (indices and list(full) == sorted(set(full))):
            raise ValueError(
                f"ModelConfig.full_attention_layers={full!r} must be a sorted tuple of distinct "
                f"layer indices below num_hidden_layers={layers}"
            )
        if full and self.sliding_window is None:
            raise ValueError("ModelConfig.full_attention_layers is set without a sliding_window")
        if len(full) == layers:
            raise ValueError(
                "ModelConfig.full_attention_layers holds every layer; use sliding_window=None"
            )
        if self.sliding_window is not None and self.architecture == "llama":
            raise ValueError("a llama config has no sliding_window")
        if full and self.architecture == "mistral":
            raise ValueError(
                "a mistral config slides every layer (transformers' MistralConfig has no "
                "layer_types); full_attention_layers must be empty"
            )

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer, whether it attends within `sliding_window` (False for all without one)."""
        full = set(self.full_attention_layers)
        return tuple(
            self.sliding_window is not None and i not in full
            for i in range(self.num_hidden_layers)
        )

    def __hash__(self) -> int:
        # rope_scaling is a dict; hash its items so configs can be static jit/nnx metadata.
        fields = dataclasses.astuple(self)
        scaling = tuple(sorted((self.rope_scaling or {}).items()))
        return hash(tuple(scaling if isinstance(f, dict) else f for f in fields))

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        """The storage dtype of the weights as a jnp.dtype."""
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_compute_dtype(self) -> jnp.dtype:
        """The matmul dtype as a jnp.dtype."""
        return jnp.dtype(self.compute_dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: dict, **overrides: Any) -> ModelConfig:
        """Builds a config from a parsed Hugging Face `config.json` (transformers 4.x or 5.x keys).

        `overrides` set the fields that HF does not store (dtypes, remat, scan_layers, ...).
        """
        archs = hf.get("architectures") or []
        arch_name = archs[0] if archs else None
        if arch_name not in HF_ARCHITECTURES:
            raise ValueError(
                f"config.json architectures={archs!r} is not supported; supported: "
                f"{sorted(HF_ARCHITECTURES)}"
            )
        architecture = HF_ARCHITECTURES[arch_name]
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if key not in hf:
                raise ValueError(f"config.json has no field {key!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(
                f"config.json hidden_act={hf['hidden_act']!r}; only 'silu' is supported"
            )
        if hf.get("mlp_bias", False):
            raise ValueError("config.json mlp_bias=True is not supported")
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = float(hf.get("rope_theta", rope.pop("rope_theta", 10000.0)))
        rope.pop("rope_theta", None)
        scaling = hf.get("rope_scaling") or (rope or None)
        if scaling is not None:
            scaling = dict(scaling)
            if "type" in scaling and "rope_type" not in scaling:
                scaling["rope_type"] = scaling.pop("type")
            if scaling.get("rope_type", "default") == "default":
                scaling = None
        heads = hf["num_attention_heads"]
        window, full_layers = None, ()
        if architecture == "qwen2":
            attention_bias, out_bias = True, False
        else:
            attention_bias = bool(hf.get("attention_bias", False))
            out_bias = attention_bias
        if architecture in ("qwen2", "qwen3"):
            window, full_layers = _qwen_sliding_layers(hf)
        if architecture == "mistral":
            # MistralConfig's default window is 4096 when config.json does not name one
            window = hf.get("sliding_window", 4096)
        # Qwen3Config's head_dim defaults to 128, the others' to hidden_size / heads
        default_head_dim = 128 if architecture == "qwen3" else hf["hidden_size"] // heads
        # ids that are not token ids (Llama conversions of transformers 4.28 wrote pad -1) are
        # dropped: covjax only carries them back to the config.json it writes
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(i for i in eos if _is_token_id(i)) or None
        else:
            eos = _valid_id(eos)
        fields = dict(
            architecture=architecture,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or default_head_dim,
            rope_theta=rope_theta,
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            attention_out_bias=out_bias,
            qk_norm=architecture == "qwen3",
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            sliding_window=window,
            full_attention_layers=full_layers,
            bos_token_id=_valid_id(hf.get("bos_token_id")),
            eos_token_id=eos,
            pad_token_id=_valid_id(hf.get("pad_token_id")),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf_config(self) -> dict:
        """The `config.json` dict that transformers' AutoConfig reads back to this model."""
        hf = {
            "architectures": [_HF_NAME[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.param_dtype,
            "use_cache": True,
        }
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # unset: the family default
            value = getattr(self, name)
            if value is not None:
                hf[name] = list(value) if isinstance(value, tuple) else value
        if self.architecture in ("qwen2", "qwen3"):
            sliding = self.sliding_layers
            hf["use_sliding_window"] = self.sliding_window is not None
            hf["sliding_window"] = self.sliding_window
            hf["layer_types"] = [LAYER_TYPES[1] if s else LAYER_TYPES[0] for s in sliding]
            # for readers without layer_types (transformers < 4.53): the leading full layers
            hf["max_window_layers"] = sliding.index(True) if any(sliding) else len(sliding)
        if self.architecture != "qwen2":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        if self.architecture == "mistral":
            hf["sliding_window"] = self.sliding_window
        return hf


def _qwen_sliding_layers(hf: dict) -> tuple[int | None, tuple[int, ...]]:
    """(sliding_window, full_attention_layers) of a Qwen2 or Qwen3 config.json, as they read it.

    The window applies only with use_sliding_window (default window 4096), to the layers that
    `layer_types` calls "sliding_attention" or, without layer_types (transformers 4), to the
    layers >= max_window_layers (default 28). No sliding layer: (None, ()).
    """
    if not hf.get("use_sliding_window", False) or hf.get("sliding_window", 4096) is None:
        return None, ()
    layers = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        first = hf.get("max_window_layers", 28)
        types = [LAYER_TYPES[1] if i >= first else LAYER_TYPES[0] for i in range(layers)]
    if not (isinstance(types, list) and len(types) == layers and set(types) <= set(LAYER_TYPES)):
        raise ValueError(
            f"config.json layer_types={types!r} must list one of {LAYER_TYPES} per layer "
            f"({layers} layers)"
        )
    full = tuple(i for i, t in enumerate(types) if t == "full_attention")
    if len(full) == layers:
        return None, ()
    return hf.get("sliding_window", 4096), full
