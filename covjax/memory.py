"""Per-device memory of an RL step on a (data, fsdp, tensor) mesh: training state, activations of
one micro-batch under per-layer rematerialisation, and the rollout KV cache.

The model is the one covjax runs (covjax.model with scan_layers and remat="layer", the update of
covjax.train_step, the sharding rules of covjax.sharding): matrices are sharded over fsdp x tensor,
biases over tensor, norms replicated; a micro-batch of `micro_batch` sequences per device.
`python benchmarks/memory_model.py tables` prints launch/README.md's tables for Qwen2.5-7B/32B;
`... check` compares the method with XLA's compiled memory analysis. All sizes are bytes per device.

Update step (one micro-batch of b sequences of S tokens, d = hidden, L = layers):
  params 4 P, AdamW moments 8 P (fp32, sharded);
  gradients 2 x 4 P (the accumulator carried over micro-batches + this micro-batch's gradient);
  compute weights 2 P (the bf16 cast of the master weights) when computing in bf16;
  saved per layer L b S s c, s by the remat policy (ModelConfig.remat): "layer" d (the layer
    input only), "save_attention" d + Hq Dh, "minimal" 2 d + (2 Hq + 2 Hkv) Dh (input, q, k, v,
    attention, out projection), "dots" 3 d + (Hq + 2 Hkv) Dh + 2 I, "none" the working set;
  layer working set b S (4 d + 2 (Hq + 2 Hkv) Dh + 5 I) c (one layer recomputed + backward:
    normed input, residual, normed residual, incoming gradient; q, k, v and their gradients;
    SwiGLU gate, up, product and the gradients of gate and up);
  attention scores b Hq S^2 (4 + 2 c) when the attention is not fused (f32 logits and their
    gradient, probabilities and their gradient in the compute dtype; XLA's implementation, which
    covjax uses on TPU), 0 for a fused kernel (cuDNN flash attention on GPU);
  gathered weights (2 layers + embeddings) c under fsdp (the all-gathered layer in use and the
    next one, prefetched);
  logits chunk C V 12 (f32 logits, softmax and gradient of one chunk of C tokens, remat per
    chunk);
with c = bytes of the compute dtype, P = parameters, Hq/Hkv/Dh/I as in the HF config. Rollout:
  KV cache 2 L Hkv Dh S c per sequence, next to the persistent params + AdamW state and the
  weights gathered for decoding (c P / tensor under fsdp).
"""

from __future__ import annotations

import dataclasses

from covjax.model import ModelConfig

GB = 1e9
LOGITS_BYTES_PER_ELEMENT = 12  # f32 logits + softmax + gradient of one chunk
WORKING_D, WORKING_QKV, WORKING_I = 4, 2, 5  # per-token elements of one layer's working set


def _qwen2(**shape) -> ModelConfig:
    return ModelConfig(
        architecture="qwen2",
        attention_bias=True,
        compute_dtype="bfloat16",
        remat="layer",
        scan_layers=True,
        **shape,
    )


# Hugging Face config.json numbers of the paper's models, with the recipes' numerics
# (configs/qwen2_5_*: fp32 master weights, bf16 compute, per-layer remat).
QWEN2_5_7B = _qwen2(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, head_dim=128,
)  # fmt: skip
QWEN2_5_32B = _qwen2(
    vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
    num_attention_heads=40, num_key_value_heads=8, head_dim=128,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Sizes of the ("data", "fsdp", "tensor") mesh axes (covjax.sharding.make_mesh)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        for name in ("data", "fsdp", "tensor"):
            if getattr(self, name) < 1:
                raise ValueError(f"MeshShape.{name}={getattr(self, name)} must be >= 1")

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Parameters by how covjax.sharding shards them: matrices, biases, norms."""

    matrices: int  # sharded over fsdp x tensor
    biases: int  # sharded over tensor
    norms: int  # replicated

    @property
    def total(self) -> int:
        return self.matrices + self.biases + self.norms

    def per_device(self, mesh: MeshShape) -> float:
        return self.matrices / (mesh.fsdp * mesh.tensor) + self.biases / mesh.tensor + self.norms


def check_mesh(c: ModelConfig, mesh: MeshShape) -> None:
    """The estimates assume every sharded dimension divides evenly (else covjax.sharding
    replicates it); raise ValueError naming the dimension otherwise."""
    dims = {
        "hidden_size": (c.hidden_size, mesh.fsdp, "fsdp"),
        "num_attention_heads": (c.num_attention_heads, mesh.tensor, "tensor"),
        "num_key_value_heads": (c.num_key_value_heads, mesh.tensor, "tensor"),
        "intermediate_size": (c.intermediate_size, mesh.tensor, "tensor"),
        "vocab_size": (c.vocab_size, mesh.tensor, "tensor"),
    }
    for name, (size, shards, axis) in dims.items():
        if size % shards:
            raise ValueError(f"{name}={size} is not divisible by mesh {axis}={shards}")


def layer_param_counts(c: ModelConfig) -> ParamCounts:
    """One decoder layer: q, k, v, o projections, SwiGLU MLP, two RMSNorms (four with Qwen3's
    per-head q/k norms, replicated like the others)."""
    d, dh, hq, hkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    attention = d * dh * (2 * hq + 2 * hkv)
    mlp = 3 * d * c.intermediate_size
    biases = (hq + 2 * hkv) * dh if c.attention_bias else 0
    # the o bias is replicated like a norm
    norms = 2 * d + (d if c.attention_out_bias else 0) + (2 * dh if c.qk_norm else 0)
    return ParamCounts(matrices=attention + mlp, biases=biases, norms=norms)


def param_counts(c: ModelConfig) -> ParamCounts:
    """The whole model: embedding, layers, final norm, and the output projection unless tied."""
    layer = layer_param_counts(c)
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return ParamCounts(
        matrices=embeddings + c.num_hidden_layers * layer.matrices,
        biases=c.num_hidden_layers * layer.biases,
        norms=c.num_hidden_layers * layer.norms + c.hidden_size,
    )


def _dtype_bytes(dtype: str) -> int:
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2}
    if dtype not in sizes:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(sizes)}")
    return sizes[dtype]


def compute_weight_bytes(c: ModelConfig, mesh: MeshShape) -> float:
    """The weights cast to the compute dtype (0 when it is the parameter dtype)."""
    cb = _dtype_bytes(c.compute_dtype)
    return param_counts(c).per_device(mesh) * cb if cb < _dtype_bytes(c.param_dtype) else 0.0


def training_state_bytes(c: ModelConfig, mesh: MeshShape) -> dict[str, float]:
    """fp32 master weights, AdamW's two moments, and the gradients (accumulator + micro-batch)."""
    check_mesh(c, mesh)
    p = param_counts(c).per_device(mesh) * _dtype_bytes(c.param_dtype)
    return {"params": p, "adam": 2 * p, "grads": 2 * p}


def activation_bytes(
    c: ModelConfig,
    mesh: MeshShape,
    *,
    micro_batch: int,
    seq_len: int,
    response_len: int,
    logits_chunk: int = 1024,
    fused_attention: bool = True,
) -> dict[str, float]:
    """One micro-batch's forward/backward under c.remat (see the module docstring).

    micro_batch: sequences per device; seq_len: prompt + response tokens; response_len: tokens
    whose log-probs are computed (the output projection runs on those only, in chunks).
    """
    if micro_batch < 1 or seq_len < 1 or not 1 <= response_len <= seq_len:
        raise ValueError(
            f"micro_batch={micro_batch}, seq_len={seq_len}, response_len={response_len}: need "
            "micro_batch >= 1 and 1 <= response_len <= seq_len"
        )
    check_mesh(c, mesh)
    cb = _dtype_bytes(c.compute_dtype)
    t = mesh.tensor
    d, dh = c.hidden_size, c.head_dim
    hq, hkv = c.num_attention_heads / t, c.num_key_value_heads / t
    tokens = micro_batch * seq_len
    working = (
        WORKING_D * d + WORKING_QKV * (hq + 2 * hkv) * dh + WORKING_I * c.intermediate_size / t
    )
    gathered = 0.0
    if mesh.fsdp > 1:  # two layers in flight (this one and the prefetched next) + embeddings
        layer = layer_param_counts(c).matrices
        embeddings = param_counts(c).matrices - c.num_hidden_layers * layer
        gathered = (2 * layer + embeddings) * cb / t
    scores = 0.0 if fused_attention else micro_batch * hq * seq_len**2 * (4 + 2 * cb)
    # losses.logprobs_and_entropy_chunked cuts the flattened micro-batch (all devices' rows) into
    # chunks of `logits_chunk` tokens; counted whole on every device (an upper bound).
    chunk = min(logits_chunk, micro_batch * mesh.data * mesh.fsdp * response_len)
    return {
        "compute_weights": compute_weight_bytes(c, mesh),
        "gathered_weights": gathered,
        "layer_inputs": c.num_hidden_layers * tokens * _saved_per_token(c, t) * cb,
        "layer_working": tokens * working * cb,
        "attention_scores": scores,
        "logits": chunk * c.vocab_size / t * LOGITS_BYTES_PER_ELEMENT,
    }


def _saved_per_token(c: ModelConfig, tensor: int) -> float:
    """Elements per token one layer keeps for its backward under c.remat (module docstring)."""
    d, dh, i = c.hidden_size, c.head_dim, c.intermediate_size / tensor
    attention = c.num_attention_heads / tensor * dh
    qkv = attention + 2 * c.num_key_value_heads / tensor * dh
    return {
        "layer": d,
        "save_attention": d + attention,
        "minimal": 2 * d + qkv + attention,
        "dots": 3 * d + qkv + 2 * i,
        "none": WORKING_D * d + WORKING_QKV * qkv + WORKING_I * i,
    }[c.remat]


REMAT_BY_SPEED = ("minimal", "save_attention", "layer")  # least recomputation first


def choose_remat(c: ModelConfig, mesh: MeshShape, budget: float, **activation_kwargs) -> str:
    """The remat policy of least recomputation whose update peak fits `budget` bytes per device
    ("layer", the smallest, when none does)."""
    for policy in REMAT_BY_SPEED:
        cfg = dataclasses.replace(c, remat=policy)
        if update_peak_bytes(cfg, mesh, **activation_kwargs) <= budget:
            return policy
    return REMAT_BY_SPEED[-1]


def kv_cache_bytes_per_sequence(c: ModelConfig, mesh: MeshShape, seq_len: int) -> float:
    """Keys and values of every layer for one sequence (kv heads sharded over tensor)."""
    check_mesh(c, mesh)
    kv_heads = c.num_key_value_heads / mesh.tensor
    return 2 * c.num_hidden_layers * kv_heads * c.head_dim * seq_len * _dtype_bytes(c.compute_dtype)


def update_peak_bytes(c: ModelConfig, mesh: MeshShape, **activation_kwargs) -> float:
    """Training state plus one micro-batch's activations: the update's high-water mark."""
    state = training_state_bytes(c, mesh)
    return sum(state.values()) + sum(activation_bytes(c, mesh, **activation_kwargs).values())


def decode_weight_bytes(c: ModelConfig, mesh: MeshShape) -> float:
    """The weights the sampler decodes with: cast to the compute dtype and gathered over fsdp
    (split over tensor only, covjax.sampler.DECODE_RULES); none beyond the master copy when it
    is already one of those."""
    if mesh.fsdp == 1:
        return compute_weight_bytes(c, mesh)
    return param_counts(c).per_device(MeshShape(tensor=mesh.tensor)) * _dtype_bytes(c.compute_dtype)


def rollout_sequences(c: ModelConfig, mesh: MeshShape, seq_len: int, budget: float) -> int:
    """Sequences per device whose KV cache fits in `budget` bytes next to params + AdamW and
    the weights the sampler decodes with (decode_weight_bytes)."""
    state = training_state_bytes(c, mesh)
    persistent = state["params"] + state["adam"] + decode_weight_bytes(c, mesh)
    return max(int((budget - persistent) // kv_cache_bytes_per_sequence(c, mesh, seq_len)), 0)
