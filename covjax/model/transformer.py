"""A decoder-only transformer (Qwen2/Qwen2.5, Qwen3, Llama 3.x, Mistral) in Flax NNX.

One file, nanoGPT style: RMSNorm -> GQA attention with RoPE -> residual -> RMSNorm -> SwiGLU ->
residual, repeated, then a final RMSNorm and the output projection. Numerics follow the
Hugging Face PyTorch implementation op for op, so float32 logits agree to ~1e-6.

Parameter layout (logical axes in brackets; `covjax.sharding.LOGICAL_RULES` maps them to the mesh):
  embed.embedding   [vocab, embed]
  layers.q_proj     [embed, q_heads, head_dim]    (+ bias [q_heads, head_dim] for Qwen2)
  layers.k_proj     [embed, kv_heads, head_dim]   layers.v_proj the same
  layers.o_proj     [q_heads, head_dim, embed]
  layers.q_norm     [head_dim]                    layers.k_norm the same (Qwen3 only)
  layers.gate_proj  [embed, mlp]   layers.up_proj [embed, mlp]   layers.down_proj [mlp, embed]
  layers.input_norm [norm]         layers.post_norm [norm]   final_norm [norm]
  lm_head           [embed, vocab] (absent when the embeddings are tied)
With `scan_layers` every layer parameter has a leading [layers] axis.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name
from jax.typing import DTypeLike

from covjax.model.config import ModelConfig
from covjax.sharding import constrain

_INIT_STD = 0.02  # transformers' initializer_range
KV = tuple[jax.Array, jax.Array]  # keys, values of all layers [L, B, S, Hkv, Dh]
Masks = tuple[jax.Array | None, jax.Array | None]  # (visibility [B, 1, T, S], query_valid [B, T])
# (full attention, sliding window) masks; the second None where no window is shorter than the keys
LayerMasks = tuple[Masks, Masks | None]


def _param(rngs: nnx.Rngs | None, shape, logical_axes, dtype, init: str) -> nnx.Param:
    """A parameter with logical axis names in its metadata (read by covjax.sharding)."""
    if init == "normal":
        value = _INIT_STD * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = jnp.zeros(shape, dtype)
    return nnx.Param(value, logical_axes=tuple(logical_axes))


@struct.dataclass
class KVCache:
    """Keys/values of all layers for incremental decoding; the sampler owns it.

    k, v: [L, B, S, Hkv, Dh] in the compute dtype; key_mask [B, S] (True = a real token was
    written there); index: next slot to write, shared by all rows ([]) or per row ([B], the
    sampler's slot pool, whose rows are at different lengths). Sliding-window layers keep all
    S slots too (no rolling buffer): their keys older than the window are masked, not evicted.
    """

    k: jax.Array
    v: jax.Array
    key_mask: jax.Array
    index: jax.Array

    @staticmethod
    def logical_axes() -> KVCache:
        """Logical axis names of each field (for covjax.sharding.logical_sharding)."""
        kv = ("cache_layers", "act_batch", "cache_length", "act_kv_heads", "act_head_dim")
        return KVCache(k=kv, v=kv, key_mask=("act_batch", "cache_length"), index=())


def init_cache(
    config: ModelConfig, batch_size: int, max_len: int, dtype: DTypeLike | None = None
) -> KVCache:
    """An empty cache of `max_len` slots (dtype defaults to the compute dtype)."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"init_cache batch_size={batch_size}, max_len={max_len}: must be >= 1")
    dtype = config.jnp_compute_dtype if dtype is None else jnp.dtype(dtype)
    shape = (
        config.num_hidden_layers,
        batch_size,
        max_len,
        config.num_key_value_heads,
        config.head_dim,
    )
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        key_mask=jnp.zeros((batch_size, max_len), bool),
        index=jnp.zeros((), jnp.int32),
    )


@functools.lru_cache(maxsize=32)
def rope_inv_freq(head_dim: int, theta: float, scaling: tuple | None) -> np.ndarray:
    """RoPE inverse frequencies theta^(-2i/d), with Llama 3 frequency-dependent scaling.

    Mirrors transformers' `_compute_default_rope_parameters` / `_compute_llama3_parameters`.
    """
    inv_freq = 1.0 / (
        theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)
    )
    inv_freq = inv_freq.astype(np.float32)
    cfg = dict(scaling or ())
    if cfg.get("rope_type", "default") != "llama3":
        return inv_freq
    factor = cfg["factor"]
    low_freq_factor, high_freq_factor = cfg["low_freq_factor"], cfg["high_freq_factor"]
    old_len = cfg["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, Dh] float32 for integer positions [B, T]."""
    scaling = tuple(sorted((config.rope_scaling or {}).items())) or None
    inv_freq = jnp.asarray(rope_inv_freq(config.head_dim, config.rope_theta, scaling))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin on [B, T, H, Dh] (the non-interleaved HF convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """weight * x / sqrt(mean(x^2) + eps), statistics in float32, result in x's dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


def _attention_impl(config: ModelConfig, dtype, decoding: bool) -> str:
    """cuDNN flash attention for 16-bit training/prefill on GPU, XLA everywhere else."""
    if config.attention_impl != "auto":
        return config.attention_impl
    ok = (
        jax.default_backend() == "gpu"
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and config.head_dim % 8 == 0
        and config.head_dim <= 128
        and not decoding
    )
    return "cudnn" if ok else "xla"


def causal_attention_even(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    implementation: str = "cudnn",
    local_window_size: tuple[int, int] | None = None,
) -> jax.Array:
    """Causal self-attention (T queries over the same T keys) padded to an even length.

    cuDNN's fused attention with a mask rejects an odd sequence length, and a training row of
    P + R tokens has P + R - 1 inputs. One extra position at the end changes nothing before it:
    causality hides its key from every real query, and its own query row (sliced off) sees keys,
    so it produces no NaN in the backward pass. `local_window_size` (left, 0) is passed on.
    """
    attend = functools.partial(jax.nn.dot_product_attention, is_causal=True,
                               local_window_size=local_window_size, implementation=implementation)
    length = q.shape[1]
    if mask is None or length % 2 == 0:
        return attend(q, k, v, mask=mask)
    pad = [(0, 0), (0, 1), (0, 0), (0, 0)]
    q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 1), (0, 1)), constant_values=True)
    return attend(q, k, v, mask=mask)[:, :length]


def static_layer_slides(config: ModelConfig) -> bool:
    """Whether tracing knows each layer's `layer_slides` (unstacked layers, or all alike)."""
    return not config.scan_layers or len(set(config.sliding_layers)) == 1


def layer_slides(config: ModelConfig, layer: jax.Array | int | None) -> bool | jax.Array:
    """Whether `layer` attends within the sliding window: a Python bool where tracing knows it
    (an unstacked layer, or every layer alike), else a lookup by the scanned layer index."""
    sliding = config.sliding_layers
    if isinstance(layer, int):
        return sliding[layer]
    if len(set(sliding)) == 1:
        return sliding[0]
    if layer is None:
        raise ValueError("a Block of a config with sliding and full layers needs its layer index")
    return jnp.asarray(sliding)[layer]


def sliding_window_masks(
    masks: Masks, query_slots: jax.Array, num_keys: int, window: int, dense: bool
) -> Masks:
    """`masks` of a sliding layer: the query at slot i sees only the keys at slots j with
    i - window < j <= i (transformers' sliding_window_causal mask).

    query_slots [B or 1, T] are the queries' slots among the `num_keys` keys. `dense`: the
    window is in the returned mask; else the mask stays as given (padding only) and the caller
    passes the window as dot_product_attention's local_window_size. Either way a query whose
    window holds no visible key gets query_valid False (zeros, never NaN), as a padding query.
    """
    mask, query_valid = masks
    if not dense and query_valid is None:
        return masks
    keys = jnp.arange(num_keys)
    visible = (keys <= query_slots[..., None]) & (keys > query_slots[..., None] - window)
    visible = visible[:, None] if mask is None else mask & visible[:, None]
    query_valid = None if query_valid is None else jnp.any(visible[:, 0], axis=-1)
    return (visible if dense else mask), query_valid


def _write_slots(cache: jax.Array, new: jax.Array, layer, index: jax.Array) -> jax.Array:
    """Writes new [B, T, H, D] into cache [L, B, S, H, D] at (layer, b, index[b]) for every row.

    A shared index is one dynamic_update_slice; a per-row one a scatter with unique indices
    (a vmapped dynamic_update_slice would copy the cache). Either updates it in place in a loop.
    """
    new = new[None].astype(cache.dtype)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(cache, new, (layer, 0, index, 0, 0))
    rows = jnp.arange(cache.shape[1])
    slots = index[:, None] + jnp.arange(new.shape[2])[None, :]
    return cache.at[layer, rows[:, None], slots].set(new[0], unique_indices=True, mode="drop")


DECODE_MIN_BUCKET = 256  # shortest key range a decode step reads; below it the choice costs more


def decode_key_buckets(cache_len: int) -> tuple[int, ...]:
    """Key ranges a decode step may read: powers of two from DECODE_MIN_BUCKET, then the cache."""
    buckets, n = [], DECODE_MIN_BUCKET
    while n < cache_len:
        buckets.append(n)
        n *= 2
    return (*buckets, cache_len)


def decode_attention(
    q: jax.Array, k_all: jax.Array, v_all: jax.Array, layer, mask: jax.Array, implementation: str
) -> jax.Array:
    """One query per row [B, 1, Hq, Dh] over the cache's first n slots of `layer`, n the
    smallest bucket (decode_key_buckets) past every row's last visible key.

    The slots beyond n are masked for every row, so the result is attention over the whole
    cache, while a step reads keys/values in proportion to the filled length (a sliding layer's
    too: the slots before its window are masked, and read).
    """
    _, b, size, heads, dh = k_all.shape
    buckets = decode_key_buckets(size)
    visible = jnp.any(mask, axis=(0, 1, 2))
    filled = jnp.max(jnp.where(visible, jnp.arange(size), 0)) + 1
    branch = jnp.searchsorted(jnp.asarray(buckets), filled)

    def attend(n, q, k_all, v_all, mask):
        k, v = (
            jax.lax.dynamic_slice(a, (layer, 0, 0, 0, 0), (1, b, n, heads, dh))[0].astype(q.dtype)
            for a in (k_all, v_all)
        )
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask[..., :n], implementation=implementation
        )

    branches = [functools.partial(attend, n) for n in buckets]
    return jax.lax.switch(branch, branches, q, k_all, v_all, mask)


class Block(nnx.Module):
    """One pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c, dt = config, config.jnp_param_dtype
        d, nq, nkv, dh, f = (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.intermediate_size,
        )
        self.config = config
        self.input_norm = _param(rngs, (d,), ("norm",), dt, "ones")
        self.q_proj = _param(rngs, (d, nq, dh), ("embed", "q_heads", "head_dim"), dt, "normal")
        self.k_proj = _param(rngs, (d, nkv, dh), ("embed", "kv_heads", "head_dim"), dt, "normal")
        self.v_proj = _param(rngs, (d, nkv, dh), ("embed", "kv_heads", "head_dim"), dt, "normal")
        self.o_proj = _param(rngs, (nq, dh, d), ("q_heads", "head_dim", "embed"), dt, "normal")
        if c.attention_bias:
            self.q_bias = _param(rngs, (nq, dh), ("q_heads", "head_dim"), dt, "zeros")
            self.k_bias = _param(rngs, (nkv, dh), ("kv_heads", "head_dim"), dt, "zeros")
            self.v_bias = _param(rngs, (nkv, dh), ("kv_heads", "head_dim"), dt, "zeros")
        if c.attention_out_bias:
            self.o_bias = _param(rngs, (d,), ("norm",), dt, "zeros")
        if c.qk_norm:
            self.q_norm = _param(rngs, (dh,), ("head_dim",), dt, "ones")
            self.k_norm = _param(rngs, (dh,), ("head_dim",), dt, "ones")
        self.post_norm = _param(rngs, (d,), ("norm",), dt, "ones")
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), dt, "normal")
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), dt, "normal")
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), dt, "normal")

    def _w(self, name: str) -> jax.Array:
        return getattr(self, name)[...].astype(self.config.jnp_compute_dtype)

    def attention(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        masks: LayerMasks,
        kv: KV | None,
        index: jax.Array | None,
        layer: jax.Array | int | None,
    ) -> tuple[jax.Array, KV | None]:
        """GQA self-attention; with `kv` the new keys/values are written at slot `index`.

        kv = (k, v) of ALL layers [L, B, S, Hkv, Dh] (or None): this block writes its T new
        keys/values at (layer, :, index) with one dynamic_update_slice and attends to k[layer],
        so under lax.scan / while_loop XLA updates the cache in place instead of copying it.

        masks = (full, window) LayerMasks of (mask [B, 1, T, S] bool or None, query_valid [B, T]
        bool or None), built once by the Transformer. Without a cache the causal mask is implicit
        (`is_causal`, so cuDNN skips the masked blocks), `mask` only hides padding keys and a
        sliding layer known at trace time passes its window as `local_window_size` (so cuDNN
        skips the blocks outside it too); with a cache, or a per-layer choice in a scan, `mask`
        is the whole visibility pattern.
        """
        c = self.config
        mask, query_valid, local_window = *masks[0], None
        if masks[1] is not None:
            slides = layer_slides(c, layer)
            if isinstance(slides, bool):
                mask, query_valid = masks[1] if slides else masks[0]
                local_window = (c.sliding_window - 1, 0) if slides and kv is None else None
            else:
                full, window = masks
                mask = jnp.where(slides, window[0], True if full[0] is None else full[0])
                if query_valid is not None:
                    query_valid = jnp.where(slides, window[1], full[1])
        q = jnp.einsum("btd,dnh->btnh", x, self._w("q_proj"))
        k = jnp.einsum("btd,dnh->btnh", x, self._w("k_proj"))
        v = jnp.einsum("btd,dnh->btnh", x, self._w("v_proj"))
        if c.attention_bias:
            q, k, v = q + self._w("q_bias"), k + self._w("k_bias"), v + self._w("v_bias")
        q, k, v = (checkpoint_name(t, "qkv_proj") for t in (q, k, v))
        if c.qk_norm:  # Qwen3: every head normalised over head_dim, before RoPE
            q = rms_norm(q, self.q_norm[...], c.rms_norm_eps)
            k = rms_norm(k, self.k_norm[...], c.rms_norm_eps)
        q = constrain(apply_rope(q, cos, sin), ("act_batch", "act_length", "act_heads", None))
        k = constrain(apply_rope(k, cos, sin), ("act_batch", "act_length", "act_kv_heads", None))
        v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None))
        new_kv = None
        if kv is not None:
            new_kv = (_write_slots(kv[0], k, layer, index), _write_slots(kv[1], v, layer, index))
            k_all, v_all = new_kv
            k = jax.lax.dynamic_index_in_dim(k_all, layer, keepdims=False).astype(q.dtype)
            v = jax.lax.dynamic_index_in_dim(v_all, layer, keepdims=False).astype(q.dtype)
        impl = _attention_impl(c, q.dtype, decoding=kv is not None)
        if kv is not None and q.shape[1] == 1:
            out = decode_attention(q, *new_kv, layer, mask, impl)
        elif impl == "cudnn" and kv is None:
            # cuDNN takes the window with a padding mask (as a bias) from cuDNN 9.10.2 on.
            out = causal_attention_even(q, k, v, mask, local_window_size=local_window)
        else:
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=kv is None, local_window_size=local_window,
                implementation=impl,
            )
        if query_valid is not None:
            # A query with no visible key (padding) gets zeros, never NaN.
            out = jnp.where(query_valid[:, :, None, None], out, 0)
        out = checkpoint_name(constrain(out, ("act_batch", "act_length", "act_heads", None)),
                              "attention")
        y = jnp.einsum("btnh,nhd->btd", out, self._w("o_proj"))
        if c.attention_out_bias:
            y = y + self._w("o_bias")
        return checkpoint_name(y, "out_proj"), new_kv

    def mlp(self, x: jax.Array) -> jax.Array:
        """SwiGLU: down(silu(gate(x)) * up(x))."""
        gate = jnp.einsum("btd,df->btf", x, self._w("gate_proj"))
        up = jnp.einsum("btd,df->btf", x, self._w("up_proj"))
        h = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        return jnp.einsum("btf,fd->btd", h, self._w("down_proj"))

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        masks: LayerMasks,
        kv: KV | None = None,
        index: jax.Array | None = None,
        layer: jax.Array | int | None = None,
    ) -> tuple[jax.Array, KV | None]:
        """(x', kv'): kv is the all-layer cache (or None), `layer` this block's index (in it, and
        for its sliding window)."""
        eps = self.config.rms_norm_eps
        attn, new_kv = self.attention(
            rms_norm(x, self.input_norm[...], eps), cos, sin, masks, kv, index, layer
        )
        x = constrain(x + attn, ("act_batch", "act_length", "act_embed"))
        x = x + self.mlp(rms_norm(x, self.post_norm[...], eps))
        return constrain(x, ("act_batch", "act_length", "act_embed")), new_kv


def _stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> Block:
    """All layers as one Block whose parameters carry a leading [layers] axis."""

    @nnx.split_rngs(splits=config.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return Block(config, rngs=rngs)

    blocks = make(rngs)
    for _, var in nnx.iter_graph(blocks):
        if isinstance(var, nnx.Variable):
            var.set_metadata(logical_axes=("layers",) + var.get_metadata()["logical_axes"])
    return blocks


_REMAT_SAVED = {  # what each ModelConfig.remat policy keeps from a block's forward pass
    "layer": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "minimal": jax.checkpoint_policies.save_only_these_names("qkv_proj", "attention", "out_proj"),
    "save_attention": jax.checkpoint_policies.save_only_these_names("attention"),
}


def _remat(fn, policy: str, in_scan: bool):
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=_REMAT_SAVED[policy], prevent_cse=not in_scan)


class Transformer(nnx.Module):
    """Decoder-only LM. `model(ids)` -> logits [B, T, V] float32; with a cache (logits, cache)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c, dt = config, config.jnp_param_dtype
        self.config = config
        self.embed = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), dt, "normal")
        if c.scan_layers:
            self.layers = _stacked_blocks(c, rngs)
        else:
            self.layers = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_hidden_layers)])
        self.final_norm = _param(rngs, (c.hidden_size,), ("norm",), dt, "ones")
        if not c.tie_word_embeddings:
            self.lm_head = _param(
                rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), dt, "normal"
            )

    def unembed_kernel(self) -> jax.Array:
        """The output projection [D, V] in the compute dtype (tied: the embedding transposed)."""
        w = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return w.astype(self.config.jnp_compute_dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        *,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits [B, T, V] float32; with `cache`, (logits, the cache with these T tokens)."""
        h, new_cache = self._forward(input_ids, positions, attention_mask, cache)
        logits = jnp.einsum(
            "btd,dv->btv", h, self.unembed_kernel(), preferred_element_type=jnp.float32
        )
        logits = constrain(logits, ("act_batch", "act_length", "act_vocab"))
        return logits if cache is None else (logits, new_cache)

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        *,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Final-norm hidden states [B, T, D] (compute dtype); logits = this @ unembed_kernel()."""
        return self._forward(input_ids, positions, attention_mask, None)[0]

    def _forward(self, input_ids, positions, attention_mask, cache):
        c = self.config
        chex.assert_rank(input_ids, 2)
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integer, got dtype {input_ids.dtype}")
        b, t = input_ids.shape
        if attention_mask is not None:
            chex.assert_shape(attention_mask, (b, t))
            attention_mask = attention_mask.astype(bool)
        if positions is None:
            start = 0 if cache is None else jnp.reshape(cache.index, (-1, 1))
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        chex.assert_shape(positions, (b, t))

        # Gather the fsdp-sharded table first (as for any weight) so the lookup is a plain
        # vocab-parallel gather whose output follows the batch sharding.
        table = constrain(self.embed[...], ("vocab", None))
        x = table[input_ids].astype(c.jnp_compute_dtype)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        cos, sin = rope_tables(c, positions)

        new_cache = None
        if cache is None:
            masks, kv = (None, None), None
            if attention_mask is not None:
                keys = jnp.broadcast_to(attention_mask[:, None, None, :], (b, 1, t, t))
                masks = (keys, jnp.cumsum(attention_mask, axis=1) > 0)
        else:
            if cache.k.shape[1] != b:
                raise ValueError(f"cache batch {cache.k.shape[1]} != input batch {b}")
            real = jnp.ones((b, t), bool) if attention_mask is None else attention_mask
            key_mask = _write_slots(cache.key_mask[None, ..., None, None], real[..., None, None],
                                    0, cache.index)[0, ..., 0, 0]
            slots = jnp.arange(cache.k.shape[2])
            last = jnp.reshape(cache.index, (-1, 1, 1)) + jnp.arange(t)[None, :, None]
            mask = (slots[None, None, :] <= last) & key_mask[:, None, :]
            mask = mask[:, None]
            masks = (mask, jnp.any(mask[:, 0], axis=-1))
            kv = (cache.k, cache.v)

        window_masks = None
        num_keys = t if cache is None else cache.k.shape[2]
        if c.sliding_window is not None and num_keys > c.sliding_window:  # else it hides none
            start = 0 if cache is None else jnp.reshape(cache.index, (-1, 1))
            dense = cache is not None or not static_layer_slides(c)
            window_masks = sliding_window_masks(
                masks, start + jnp.arange(t)[None, :], num_keys, c.sliding_window, dense
            )
        x, new_kv = self._run_layers(
            x, cos, sin, (masks, window_masks), kv, None if cache is None else cache.index
        )
        if cache is not None:
            new_cache = KVCache(k=new_kv[0], v=new_kv[1], key_mask=key_mask, index=cache.index + t)
        return rms_norm(x, self.final_norm[...], c.rms_norm_eps), new_cache

    def _run_layers(self, x, cos, sin, masks, kv, index):
        """The blocks, stacked under lax.scan or as a Python loop; both call the same Block."""
        c = self.config

        def run_block(graphdef, layer, state, x, kv):
            return nnx.merge(graphdef, state)(x, cos, sin, masks, kv, index, layer)

        # The all-layer cache rides in the carry (not as scan xs/ys, nor rebuilt with jnp.stack)
        # and each block updates its own slice, so a decode step writes one slot, not the cache.
        if c.scan_layers:
            graphdef, state = nnx.split(self.layers)
            step = _remat(functools.partial(run_block, graphdef), c.remat, in_scan=True)

            def body(carry, xs):
                return step(xs[1], xs[0], *carry), None

            layers = jnp.arange(c.num_hidden_layers, dtype=jnp.int32)
            return jax.lax.scan(body, (x, kv), (state, layers))[0]
        for i, block in enumerate(self.layers):
            graphdef, state = nnx.split(block)
            # the layer index is bound, not an argument, so remat keeps it a Python int
            step = _remat(functools.partial(run_block, graphdef, i), c.remat, in_scan=False)
            x, kv = step(state, x, kv)
        return x, kv
