"""Pure JAX losses: log-probs and entropy, token covariance, Clip-Cov / KL-Cov selection, the
policy losses and their aggregation.

Implements sections 1-5 of ALGORITHMS.md ("The Entropy Mechanism of Reinforcement Learning for
Reasoning Language Models", Cui et al., 2025, and the reference ``clip_cov`` / ``kl_cov`` losses
of verl). Every per-token array is ``[B, T]`` (sequences x response positions); ``mask`` is True
on real response tokens. Values at masked positions never reach a loss, a gradient or a
selection: they are replaced by zeros first, so padding may hold anything (even NaN).

The hyperparameters (``method``, ``loss_agg_mode``, ratios, bounds, coefficients) travel in one
frozen, hashable ``LossConfig``, checked when it is made: under ``jax.jit`` pass it as a static
argument (or bind it with ``functools.partial``). Out-of-range values raise ``ValueError`` naming
the field and the value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import chex
import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("ppo", "dual_clip", "clip_cov", "kl_cov")
AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
    "token-sum",
)
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
LOG_RATIO_CLAMP = 20.0  # |logp - old_logp| is clamped to this before exp (ALGORITHMS.md section 3)
KL_CLAMP = 10.0  # the k3 estimate is clamped to [-KL_CLAMP, KL_CLAMP] (as verl's low_var_kl)
# A denominator of the aggregation: a Python number, a traced scalar (the global count of a
# mini-batch inside jit), or None for the count of the given arrays.
Count = int | float | jax.Array | None


# --------------------------------------------------------------------------------------------
# Log-probabilities and entropy (ALGORITHMS.md section 1)
# --------------------------------------------------------------------------------------------


def _check_temperature(temperature: float | jax.Array) -> None:
    if isinstance(temperature, numbers.Real) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got temperature={temperature!r}")


def _logprobs_entropy_lse(
    logits: jax.Array, targets: jax.Array, temperature: float | jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """log pi(target), H = logsumexp(z) - sum_v softmax(z)_v z_v and logsumexp(z), where
    z = logits / temperature."""
    z = logits.astype(jnp.float32) / temperature
    log_norm = jax.nn.logsumexp(z, axis=-1)
    target_z = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    entropy = log_norm - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)
    return target_z - log_norm, entropy, log_norm


def logprobs_and_entropy(
    logits: jax.Array, targets: jax.Array, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Token log-probability log pi(y_t | s_t) and entropy H_t of softmax(logits / temperature).

    Args:
      logits: ``[B, T, V]`` (any float dtype; the softmax runs in float32).
      targets: ``[B, T]`` int token ids.
      temperature: the sampling temperature (> 0).

    Returns:
      ``(logp, entropy)``, both ``[B, T]`` float32, with
      ``H_t = logsumexp(z) - sum_v softmax(z)_v * z_v`` (ALGORITHMS.md section 1).
    """
    _check_temperature(temperature)
    chex.assert_rank(logits, 3)
    chex.assert_shape(targets, logits.shape[:2])
    return _logprobs_entropy_lse(logits, targets, temperature)[:2]


def _chunk_logits(hidden_chunk: jax.Array, unembed: jax.Array) -> jax.Array:
    """[K, D] @ [D, V] -> [K, V] float32 logits (the matmul accumulates in float32)."""
    return jnp.dot(hidden_chunk, unembed, preferred_element_type=jnp.float32)


def _chunked_head_scan(hidden_chunks, unembed, target_chunks, temperature):
    """(logp, entropy, logsumexp) [C, K] of C chunks of K tokens, one [K, V] chunk at a time."""

    def body(carry, xs):
        return carry, _logprobs_entropy_lse(_chunk_logits(xs[0], unembed), xs[1], temperature)

    return jax.lax.scan(body, None, (hidden_chunks, target_chunks))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_head(hidden_chunks, unembed, target_chunks, temperature, entropy_grad):
    """(logp, entropy) [C, K]; with `entropy_grad` False the entropy's cotangent is ignored."""
    return _chunked_head_scan(hidden_chunks, unembed, target_chunks, temperature)[:2]


def _chunked_head_fwd(hidden_chunks, unembed, target_chunks, temperature, entropy_grad):
    # The inputs and the per-token statistics are saved, never a chunk's [K, V] logits.
    logp, entropy, log_norm = _chunked_head_scan(hidden_chunks, unembed, target_chunks,
                                                 temperature)
    return (logp, entropy), (hidden_chunks, unembed, target_chunks, temperature, entropy,
                             log_norm)


def _chunked_head_bwd(entropy_grad, residuals, cotangents):
    """Per chunk: recompute the logits, then their float32 cotangent in closed form from the
    saved logsumexp (d logp / dz = onehot(y) - p, d H / dz = p (lse - H - z), p = exp(z - lse)),
    the entropy's term skipped when `entropy_grad` is False. G = dz / temperature is cast to the
    matmul dtype (that of hidden @ unembed: bf16 in bf16 training, so the two backward GEMMs run
    in bf16, not TF32), then dh = G W^T and dW += h^T G, both accumulating in float32. dW is
    summed over the chunks in float32 and cast to unembed's dtype once at the end."""
    hidden_chunks, unembed, target_chunks, temperature, entropy, log_norm = residuals
    matmul_dtype = jnp.result_type(hidden_chunks.dtype, unembed.dtype)

    def body(carry, xs):
        d_unembed, d_temperature = carry
        hidden_chunk, target_chunk, lse, ent, d_logp, d_entropy = xs
        z = _chunk_logits(hidden_chunk, unembed) / temperature
        p = jnp.exp(z - lse[:, None])
        onehot = jnp.arange(z.shape[-1])[None, :] == target_chunk[:, None]
        d_z = d_logp[:, None] * (onehot - p)
        if entropy_grad:
            d_z = d_z + d_entropy[:, None] * p * ((lse - ent)[:, None] - z)
        d_temp = -jnp.sum(d_z * z) / temperature
        d_logits = (d_z / temperature).astype(matmul_dtype)
        d_hidden = jnp.dot(d_logits, unembed.T, preferred_element_type=jnp.float32)
        d_unembed = d_unembed + jnp.dot(
            hidden_chunk.T, d_logits, preferred_element_type=jnp.float32
        )
        return (d_unembed, d_temperature + d_temp), d_hidden.astype(hidden_chunk.dtype)

    init = (jnp.zeros(unembed.shape, jnp.float32), jnp.zeros_like(temperature))
    (d_unembed, d_temperature), d_hidden = jax.lax.scan(
        body, init, (hidden_chunks, target_chunks, log_norm, entropy, *cotangents)
    )
    return d_hidden, d_unembed.astype(unembed.dtype), None, d_temperature


_chunked_head.defvjp(_chunked_head_fwd, _chunked_head_bwd)


def logprobs_and_entropy_chunked(
    hidden: jax.Array,
    unembed: jax.Array,
    targets: jax.Array,
    temperature: float = 1.0,
    *,
    chunk_size: int = 1024,
    entropy_grad: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """``logprobs_and_entropy(hidden @ unembed, targets)`` without ``[B, T, V]`` float32 logits.

    The ``B * T`` tokens are cut into chunks of ``chunk_size`` tokens; a ``lax.scan`` computes one
    chunk's float32 logits ``[chunk_size, V]`` at a time, and the backward pass (a custom VJP)
    recomputes them chunk by chunk instead of storing them, so peak logit memory is one chunk in
    both passes. The backward matmuls take the logits' cotangent cast to the dtype of
    ``hidden @ unembed`` (bf16 GEMMs with float32 accumulation in bf16 training; exactly the
    float32 gradient when both are float32), and the gradient of ``unembed`` is summed over the
    chunks in float32 before one cast to ``unembed.dtype``.

    Args:
      hidden: ``[B, T, D]`` final hidden states (any float dtype).
      unembed: ``[D, V]`` output projection; the matmul accumulates in float32.
      targets: ``[B, T]`` int token ids.
      temperature: the sampling temperature (> 0).
      chunk_size: tokens per chunk (>= 1); the last chunk is zero-padded.
      entropy_grad: False treats the entropy as a constant (no gradient flows through it), so
        the backward skips its term (a loss without an entropy bonus).

    Returns:
      ``(logp, entropy)``, both ``[B, T]`` float32.
    """
    _check_temperature(temperature)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int, got chunk_size={chunk_size!r}")
    chex.assert_rank([hidden, unembed, targets], [3, 2, 2])
    chex.assert_shape(targets, hidden.shape[:2])
    chex.assert_axis_dimension(unembed, 0, hidden.shape[-1])
    batch, length, width = hidden.shape
    num_tokens = batch * length
    chunk = min(chunk_size, num_tokens)
    num_chunks = -(-num_tokens // chunk)
    pad = num_chunks * chunk - num_tokens
    hidden_chunks = jnp.pad(hidden.reshape(num_tokens, width), ((0, pad), (0, 0)))
    target_chunks = jnp.pad(targets.reshape(num_tokens).astype(jnp.int32), (0, pad))
    logp, entropy = _chunked_head(
        hidden_chunks.reshape(num_chunks, chunk, width),
        unembed,
        target_chunks.reshape(num_chunks, chunk),
        jnp.asarray(temperature, jnp.float32),
        entropy_grad,
    )
    if not entropy_grad:
        entropy = jax.lax.stop_gradient(entropy)
    logp = logp.reshape(-1)[:num_tokens].reshape(batch, length)
    entropy = entropy.reshape(-1)[:num_tokens].reshape(batch, length)
    return logp, entropy


# --------------------------------------------------------------------------------------------
# Validation and shared helpers
# --------------------------------------------------------------------------------------------


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {name}={value!r}")


def _check_ratio(name: str, value) -> None:
    if not (isinstance(value, numbers.Real) and 0 < value <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {name}={value!r}")


def _check_nonnegative(name: str, value) -> None:
    if not (isinstance(value, numbers.Real) and value >= 0):
        raise ValueError(f"{name} must be a number >= 0, got {name}={value!r}")


def _check_positive_count(name: str, value: Count) -> None:
    """Global denominators may be traced arrays; a Python number must be positive."""
    if isinstance(value, numbers.Real) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {name}={value!r}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The policy loss's hyperparameters (ALGORITHMS.md sections 3-5); defaults are the paper's.

    method: "ppo" (GRPO's clip; Clip-Higher when clip_high > clip_low), "dual_clip", "clip_cov"
    or "kl_cov". clip_low/clip_high: PPO's eps; dual_clip_c: dual-clip's c (> 1);
    clip_cov_ratio, clip_cov_lb, clip_cov_ub: Clip-Cov's r and its covariance band (lb, ub);
    kl_cov_ratio, kl_cov_coef: KL-Cov's k and beta; loss_agg_mode: ALGORITHMS.md section 4.
    """

    method: str
    loss_agg_mode: str = "token-mean"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip_c: float = 3.0
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-4
    kl_cov_coef: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        _check_nonnegative("clip_low", self.clip_low)
        _check_nonnegative("clip_high", self.clip_high)
        if not (isinstance(self.dual_clip_c, numbers.Real) and self.dual_clip_c > 1):
            raise ValueError(f"dual_clip_c must be > 1, got dual_clip_c={self.dual_clip_c!r}")
        _check_ratio("clip_cov_ratio", self.clip_cov_ratio)
        _check_ratio("kl_cov_ratio", self.kl_cov_ratio)
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(
                "clip_cov_lb must be < clip_cov_ub, got "
                f"clip_cov_lb={self.clip_cov_lb!r}, clip_cov_ub={self.clip_cov_ub!r}"
            )
        _check_nonnegative("kl_cov_coef", self.kl_cov_coef)

    @property
    def selects(self) -> bool:
        """Whether the method selects tokens by covariance (Clip-Cov, KL-Cov)."""
        return self.method in ("clip_cov", "kl_cov")


def _check_pair(logp, mask, *others) -> None:
    chex.assert_rank(logp, 2)
    chex.assert_equal_shape([logp, mask, *others])


def _masked(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x where mask else 0, in float32: padding values (even NaN) reach neither value nor grad."""
    return jnp.where(mask, x.astype(jnp.float32), 0.0)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """masked_mean(x) = sum(x m) / sum(m) (ALGORITHMS.md notation); 0 when nothing is valid."""
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _surrogates(logp, old_logp, advantages, clip_low, clip_high):
    """PPO surrogate losses L1 = -A rho and L2 = -A clip(rho, 1 - eps_low, 1 + eps_high)."""
    log_ratio = jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return loss1, loss2


def _ppo_clipped(logp, old_logp, advantages, mask, clip_low, clip_high):
    """The tokens PPO already clips: ``(L2 > L1) & m``, strict (ALGORITHMS.md section 3)."""
    loss1, loss2 = _surrogates(logp, old_logp, advantages, clip_low, clip_high)
    return (loss2 > loss1) & mask


# --------------------------------------------------------------------------------------------
# Covariance and the token selection (ALGORITHMS.md sections 2, 3 and 5)
# --------------------------------------------------------------------------------------------


def _covariance(logp: jax.Array, advantages: jax.Array, mask: jax.Array) -> jax.Array:
    """Eq. 10 on arrays already zeroed where masked (so plain sums are masked sums)."""
    logp = jax.lax.stop_gradient(logp)
    advantages = jax.lax.stop_gradient(advantages)
    num_valid = jnp.maximum(jnp.sum(mask, dtype=jnp.int32), 1)
    mean_logp = jnp.sum(jnp.sum(logp, axis=-1)) / num_valid  # row sums first: faster on the CPU
    mean_advantage = jnp.sum(jnp.sum(advantages, axis=-1)) / num_valid
    return jnp.where(mask, (logp - mean_logp) * (advantages - mean_advantage), 0.0)


def token_covariance(logp: jax.Array, advantages: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-token covariance, Eq. 10: cov_i = (logp_i - mean(logp)) * (A_i - mean(A)).

    Means are over the valid tokens of the given arrays (the selection scope); no gradient flows
    (stop_gradient). Masked positions hold 0. Returns ``[B, T]`` float32.
    """
    _check_pair(logp, mask, advantages)
    mask = mask.astype(bool)
    return _covariance(_masked(logp, mask), _masked(advantages, mask), mask)


@functools.lru_cache(maxsize=128)
def _floor_thresholds(ratio: float, size: int) -> np.ndarray:
    """``t[j-1]`` = the smallest N with ``int(ratio * N) >= j``, for j = 1 .. int(ratio * size).

    ``int(ratio * N)`` is the reference's count in Python float64; float32 on the device can round
    across an integer (float32(0.29) * 100 = 29.0, while 0.29 * 100 = 28.999999999999996), so the
    device counts thresholds instead: ``floor(ratio * N) = #{j : t[j-1] <= N}``, exact for every N.
    The table has int(ratio * size) entries: 3355 for r = 2e-4 over 2048 x 8192 tokens.
    """
    j = np.arange(1, int(ratio * size) + 1, dtype=np.int64)
    n = np.ceil(j / ratio).astype(np.int64)
    while True:
        too_small = np.floor(ratio * n) < j
        too_large = ~too_small & (np.floor(ratio * (n - 1)) >= j)
        if not (too_small.any() or too_large.any()):
            return n.astype(np.int32)
        n = n + too_small - too_large


def _floor_count(ratio: float, num_valid: jax.Array, size: int) -> jax.Array:
    """``floor(ratio * num_valid)`` for an int32 ``num_valid <= size``, as Python's int(r * N)."""
    thresholds = _floor_thresholds(float(ratio), size)
    if thresholds.size == 0:
        return jnp.zeros((), jnp.int32)
    return jnp.searchsorted(jnp.asarray(thresholds), num_valid, side="right").astype(jnp.int32)


def _selection_block(size: int, k: int) -> int:
    """Block length of ``_top_k``'s first stage: 2 ** round(log2(sqrt(size / k))), which balances
    its two ``lax.top_k`` calls (size / block maxima, then k * block candidates); 1 (no blocks)
    when that would not shrink the problem."""
    if size == 0 or k == 0:
        return 1
    block = 2 ** round(math.log2(math.sqrt(size / k)))
    return block if block >= 4 and k * block < size else 1


def _top_k(flat: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(flat, k)`` (ties: lower index first), computed in two smaller top-k passes.

    The entries are cut into blocks; the k blocks with the largest maxima hold every top-k entry
    (a block outside them has k block maxima that each beat all its entries, equal values
    ordered by index), so a top-k over those k blocks' entries, in index order, is exact. Over
    64 x 4096 float32 keys with k = 53 on the CPU this took 0.43 ms against 0.97 ms for one
    ``lax.top_k`` and 53 ms for a full sort (benchmarks/losses.py --primitives, BENCHMARKS.md).
    On an H200 a full sort of 16.7M floats was measured faster than one ``lax.top_k`` with
    k = 3355 (0.67 vs 4.85 ms); the two-stage form is not yet measured there (the same script's
    ``--size paper``).
    """
    block = _selection_block(flat.size, k)
    if block == 1:
        return jax.lax.top_k(flat, k)
    num_blocks = -(-flat.size // block)
    blocks = jnp.pad(flat, (0, num_blocks * block - flat.size), constant_values=-jnp.inf)
    blocks = blocks.reshape(num_blocks, block)
    top_blocks = jnp.sort(jax.lax.top_k(jnp.max(blocks, axis=1), k)[1])
    score, position = jax.lax.top_k(blocks[top_blocks].reshape(-1), k)
    return score, top_blocks[position // block] * block + position % block


def _select_top(score: jax.Array, count: jax.Array, k_max: int) -> jax.Array:
    """The ``count`` entries with the largest float32 ``score`` (ties: lower flat index first),
    never one scored -inf (the ineligible), so fewer when fewer are eligible. No NaN scores.

    ``k_max`` is the static top-k size, ``1 <= count <= k_max`` the dynamic number kept (by rank).
    """
    flat = jnp.where(score == 0, 0.0, score).reshape(-1)  # -0.0 and +0.0: one value, one rank
    if flat.size == 0:
        return jnp.zeros(score.shape, bool)
    top_score, top_index = _top_k(flat, k_max)
    # the chosen set is every entry at or above the last kept one in the order (score desc,
    # index asc): an elementwise test that fuses into its consumer, where a scatter would not
    last_score, last_index = top_score[count - 1], top_index[count - 1]
    index = jnp.arange(flat.size, dtype=top_index.dtype)
    chosen = (flat > last_score) | ((flat == last_score) & (index <= last_index))
    return (chosen & (flat > -jnp.inf)).reshape(score.shape)


def _fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _random_keys(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform random float32 sort keys, one per token, seeded by the JAX PRNG key ``rng``.

    Two 32-bit seeds come from ``rng``; each token's key is a counter-based hash of its index
    (fmix32 twice, a bijection, so no two tokens share a 32-bit hash), and its top 29 bits become
    the bit pattern of a positive normal float32, which orders like the integer. Drawing
    ``jax.random.bits`` for every token instead cost 8x the whole PPO loss on the CPU.
    """
    seed = jax.random.bits(rng, (2,), jnp.uint32)
    index = jnp.arange(math.prod(shape), dtype=jnp.uint32).reshape(shape)
    hashed = _fmix32(_fmix32(index ^ seed[0]) ^ seed[1])
    return jax.lax.bitcast_convert_type((hashed >> 3) + jnp.uint32(0x00800000), jnp.float32)


def select_tokens(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    config: LossConfig,
    *,
    rng: jax.Array | None = None,
) -> jax.Array:
    """The tokens Clip-Cov detaches or KL-Cov penalises, chosen over the given arrays (the scope).

    With N = sum(mask) valid tokens and cov from ``token_covariance`` (Eq. 10):

    - ``clip_cov``: candidates are valid tokens not already clipped by PPO
      (``-A clip(rho) > -A rho``, strict) with ``clip_cov_lb < cov < clip_cov_ub``; exactly
      ``min(max(floor(clip_cov_ratio * N), 1), #candidates)`` of them are chosen uniformly at random
      without replacement (the top-k of uniform random keys seeded by ``rng``).
    - ``kl_cov``: the ``max(floor(kl_cov_ratio * N), 1)`` valid tokens with the largest cov
      (deterministic; equal cov: the lower position in row-major order first).
    - ``ppo`` / ``dual_clip``: nothing.

    ``floor(r * N)`` equals Python's ``int(r * N)`` (float64) exactly. Shapes are static under
    jit: the top-k size is ``k_max = max(1, ceil(r * B * T))``, the dynamic count keeps the ranks
    below it.
    Call this on the whole optimizer mini-batch and pass the result to ``policy_loss(selected=)``
    for every micro-batch (ALGORITHMS.md section 5). Returns ``[B, T]`` bool, False where masked.
    """
    _check_pair(logp, mask, old_logp, advantages)
    if config.method == "clip_cov" and rng is None:
        raise ValueError("rng must be a JAX PRNG key for method='clip_cov', got rng=None")
    mask = mask.astype(bool)
    logp = jax.lax.stop_gradient(_masked(logp, mask))
    advantages = _masked(advantages, mask)
    ppo_clipped = _ppo_clipped(
        logp, _masked(old_logp, mask), advantages, mask, config.clip_low, config.clip_high
    )
    return _select(config, mask, _covariance(logp, advantages, mask), ppo_clipped, rng)


def _select(
    config: LossConfig, mask: jax.Array, cov: jax.Array, ppo_clipped: jax.Array, rng
) -> jax.Array:
    """``select_tokens`` given the covariance and the PPO-clipped tokens."""
    if not config.selects:
        return jnp.zeros(mask.shape, bool)
    if config.method == "clip_cov":
        band = (cov > config.clip_cov_lb) & (cov < config.clip_cov_ub)
        eligible = mask & ~ppo_clipped & band
        score = jnp.where(eligible, _random_keys(rng, mask.shape), -jnp.inf)
        ratio = config.clip_cov_ratio
    else:
        score = jnp.where(mask, cov, -jnp.inf)
        ratio = config.kl_cov_ratio
    size = mask.size
    count = jnp.maximum(_floor_count(ratio, jnp.sum(mask, dtype=jnp.int32), size), 1)
    return _select_top(score, count, min(size, max(1, math.ceil(ratio * size))))


# --------------------------------------------------------------------------------------------
# Aggregation, entropy bonus, KL to a reference (ALGORITHMS.md sections 3 and 4)
# --------------------------------------------------------------------------------------------


def aggregate(
    loss_mat: jax.Array,
    mask: jax.Array,
    mode: str,
    *,
    num_tokens: Count = None,
    num_seqs: Count = None,
    max_len: Count = None,
) -> jax.Array:
    """Reduce a per-token loss ``[B, T]`` to a scalar (ALGORITHMS.md section 4).

    - ``token-mean``: sum(L m) / num_tokens;
    - ``seq-mean-token-sum``: sum_b (sum_t L m) / num_seqs;
    - ``seq-mean-token-mean``: sum_b (sum_t L m / sum_t m) / num_seqs;
    - ``seq-mean-token-sum-norm`` (Dr. GRPO): sum(L m) / (num_seqs * max_len);
    - ``token-sum``: sum(L m).

    ``num_tokens`` (valid tokens) and ``num_seqs`` (non-empty sequences) default to the counts of
    the given arrays, ``max_len`` to T. Pass the whole mini-batch's counts when the mini-batch is
    cut into micro-batches (by sequence): the micro-batch losses then sum to the mini-batch loss.
    Empty denominators count as 1, so an empty batch gives 0.
    """
    _check_choice("loss_agg_mode", mode, AGG_MODES)
    _check_positive_count("num_tokens", num_tokens)
    _check_positive_count("num_seqs", num_seqs)
    _check_positive_count("max_len", max_len)
    _check_pair(loss_mat, mask)
    mask = mask.astype(bool)
    seq_sums = jnp.sum(_masked(loss_mat, mask), axis=-1)
    if mode == "token-sum":
        return jnp.sum(seq_sums)
    if mode == "token-mean":
        if num_tokens is None:
            num_tokens = jnp.sum(mask)
        return jnp.sum(seq_sums) / jnp.maximum(num_tokens, 1)
    seq_lengths = jnp.sum(mask, axis=-1)
    if num_seqs is None:
        num_seqs = jnp.sum(seq_lengths > 0)
    num_seqs = jnp.maximum(num_seqs, 1)
    if mode == "seq-mean-token-sum":
        return jnp.sum(seq_sums) / num_seqs
    if mode == "seq-mean-token-mean":
        return jnp.sum(seq_sums / jnp.maximum(seq_lengths, 1)) / num_seqs
    if max_len is None:
        max_len = mask.shape[-1]
    return jnp.sum(seq_sums) / (num_seqs * max_len)


def entropy_bonus(
    entropy: jax.Array,
    mask: jax.Array,
    *,
    entropy_coef: float,
    loss_agg_mode: str = "token-mean",
    num_tokens: Count = None,
    num_seqs: Count = None,
    max_len: Count = None,
) -> jax.Array:
    """The entropy-bonus loss term ``-entropy_coef * agg(H_t)`` (add it to the policy loss).

    ``entropy`` is H_t from ``logprobs_and_entropy`` (with gradient); aggregated like the policy
    loss (same mode and global denominators).
    """
    _check_nonnegative("entropy_coef", entropy_coef)
    return -entropy_coef * aggregate(
        entropy, mask, loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len
    )


def kl_penalty(
    logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, *, estimator: str
) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token (0 where masked).

    - ``k1``: logp - ref;
    - ``k2``: 0.5 (logp - ref)^2;
    - ``k3`` (alias ``low_var_kl``): exp(ref - logp) - (ref - logp) - 1, clamped to [-10, 10]
      (ref - logp is first clamped to [-20, 20] so that exp cannot overflow; this changes no
      value, the clamp at 10 is reached long before, and keeps the gradient finite).

    Aggregate with ``aggregate`` and scale by the KL coefficient.
    """
    _check_choice("estimator", estimator, KL_ESTIMATORS)
    _check_pair(logp, mask, ref_logp)
    mask = mask.astype(bool)
    log_ratio = _masked(logp, mask) - _masked(ref_logp, mask)
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * jnp.square(log_ratio)
    else:
        neg = jnp.clip(-log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = jnp.clip(jnp.exp(neg) - neg - 1.0, -KL_CLAMP, KL_CLAMP)
    return jnp.where(mask, kl, 0.0)


# --------------------------------------------------------------------------------------------
# Policy losses (ALGORITHMS.md section 3)
# --------------------------------------------------------------------------------------------


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    config: LossConfig,
    *,
    rng: jax.Array | None = None,
    selected: jax.Array | None = None,
    num_tokens: Count = None,
    num_seqs: Count = None,
    max_len: Count = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Policy-gradient loss with PPO clipping or covariance-based entropy control.

    With rho = exp(clip(logp - old_logp, -20, 20)), L1 = -A rho and
    L2 = -A clip(rho, 1 - clip_low, 1 + clip_high), the per-token loss L is (fields of `config`):

    - ``ppo``: max(L1, L2) (GRPO's clip; Clip-Higher when clip_high > clip_low, DAPO 0.2/0.28).
    - ``dual_clip``: as ppo, and for A < 0 also min(., -A c) with c = dual_clip_c.
    - ``clip_cov`` (Clip-Cov): max(L1, L2), except on the selected tokens where L = 0, so they get
      no gradient but stay in the token-mean denominator. The paper's recipe: clip_low =
      clip_high = 1, clip_cov_ratio = 2e-4, bounds (1, 5).
    - ``kl_cov`` (KL-Cov): no PPO clipping, L = L1 + kl_cov_coef * |logp - old_logp| on the
      selected tokens, L1 elsewhere. kl_cov_coef = 1 follows the paper and its recipes (the
      reference config file's default ppo_kl_coef is 0.1). On a fully on-policy update
      logp == old_logp and d|x|/dx at 0 is 0, so the penalty acts only on the later mini-batches
      of a rollout step; that is the reference behaviour.

    The selection (``select_tokens``) is made over the given arrays unless ``selected`` is passed
    (a selection made over the whole mini-batch, ALGORITHMS.md section 5); ``clip_cov`` then needs
    no ``rng``. L is aggregated by ``aggregate(L, mask, loss_agg_mode, num_tokens=, num_seqs=,
    max_len=)``; pass the mini-batch's counts to make micro-batch losses sum to its loss.

    Returns ``(loss, aux)``; aux metrics are over the valid tokens of the given arrays, without
    gradient: ``selected`` ([B, T] bool), ``num_selected``, ``cov_frac`` (selected / N),
    ``ppo_clip_frac`` (tokens with L2 > L1 where the PPO clip applies; 0 for kl_cov),
    ``dual_clip_frac`` (tokens bounded by -A c; 0 unless dual_clip), ``ppo_kl``
    (mean of old_logp - logp), ``cov_mean`` and ``cov_selected_mean`` (Eq. 10 covariance).
    """
    _check_pair(logp, mask, old_logp, advantages)
    method = config.method
    if method == "clip_cov" and selected is None and rng is None:
        raise ValueError("rng must be a JAX PRNG key for method='clip_cov', got rng=None")
    mask = mask.astype(bool)
    logp = _masked(logp, mask)
    old_logp = _masked(old_logp, mask)
    advantages = _masked(advantages, mask)
    loss1, loss2 = _surrogates(logp, old_logp, advantages, config.clip_low, config.clip_high)
    ppo_clipped = (loss2 > loss1) & mask
    cov = _covariance(logp, advantages, mask)
    if selected is None:
        # The barrier keeps XLA from sharing rho between the selection and the loss: each fusion
        # then recomputes exp, cheaper than writing rho out and reading it twice (measured on the
        # CPU only, 64 x 4096: clip_cov 0.87 ms instead of 0.95, BENCHMARKS.md). The ops are
        # those of ppo_clipped above; tests check that select_tokens chooses the same tokens.
        # (The trainer's default cov_scope="minibatch" passes `selected` and skips this.)
        selection_logp, selection_old_logp = jax.lax.optimization_barrier((logp, old_logp))
        selection_clipped = _ppo_clipped(
            selection_logp, selection_old_logp, advantages, mask, config.clip_low, config.clip_high
        )
        selected = _select(config, mask, cov, selection_clipped, rng)
    else:
        chex.assert_equal_shape([selected, mask])
        selected = selected.astype(bool) & mask

    zero = jnp.zeros((), jnp.float32)
    dual_clipped = jnp.zeros(mask.shape, bool)
    if method == "kl_cov":
        # |d| written as sign(d) * d: d|d|/dd = sign(d), 0 at d = 0 as in torch (jnp.abs gives 1)
        log_ratio = logp - old_logp
        penalty = config.kl_cov_coef * jax.lax.stop_gradient(jnp.sign(log_ratio)) * log_ratio
        loss_mat = loss1 + jnp.where(selected, penalty, 0.0)
        ppo_clip_frac = zero
    else:
        loss_mat = jnp.maximum(loss1, loss2)
        ppo_clip_frac = _masked_mean(ppo_clipped, mask)
        if method == "dual_clip":
            bound = -advantages * config.dual_clip_c
            dual_clipped = (advantages < 0) & (loss_mat > bound) & mask
            loss_mat = jnp.where(advantages < 0, jnp.minimum(loss_mat, bound), loss_mat)
        elif method == "clip_cov":
            loss_mat = jnp.where(selected, 0.0, loss_mat)
    loss = aggregate(
        loss_mat, mask, config.loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs,
        max_len=max_len,
    )

    num_selected = jnp.sum(selected, dtype=jnp.int32)
    aux = {
        "selected": selected,
        "num_selected": num_selected,
        "cov_frac": num_selected / jnp.maximum(jnp.sum(mask), 1),
        "ppo_clip_frac": ppo_clip_frac,
        "dual_clip_frac": _masked_mean(dual_clipped, mask),
        "ppo_kl": jax.lax.stop_gradient(_masked_mean(old_logp - logp, mask)),
        "cov_mean": _masked_mean(cov, mask),
        "cov_selected_mean": jnp.sum(jnp.where(selected, cov, 0.0)) / jnp.maximum(num_selected, 1),
    }
    return loss, aux
