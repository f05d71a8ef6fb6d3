"""Rollout engine: batched autoregressive sampling with a KV cache, one jitted program per shape.

The flow of `Sampler.generate`:

1. Host: validate, left-pad every prompt to a length bucket P, repeat each prompt `n` times
   (responses of prompt i are rows i*n .. i*n+n-1) and pad the batch to a batch bucket B with
   dummy rows whose token budget is 0 (they are done from the start and dropped from the result).
2. Device, one `jax.jit` program per (B, P, R = max_new_tokens, sampling mode, number of stop
   ids, pool size S, prefill rows K), counted in `Sampler.num_compilations` and logged when
   traced: a slot pool with continuous batching. S decode slots each hold one row's KV cache of
   P + R positions. A `lax.while_loop` runs until every row is done; each iteration first
   admits waiting rows while at least min(K, rows waiting) slots are free (K rows prefilled
   over their P - 1 first prompt columns alone, causally, so the attention scores are
   [K, heads, P - 1, P - 1] whatever R; their keys/values written into the free slots), then
   decodes one token in every slot: feed the slot's last token, sample the next, write it into
   the row's line of a [B, R] buffer. A row ends at a stop token or its budget and frees its
   slot. With S = B (the default, `slots=None`) every row is admitted at once: a static batch.
   No host round trip per token; the cache is a loop carry, updated in place. The weights are
   cast and gathered over fsdp once, before the loop (`DECODE_RULES`), not at every token.
3. Host: one transfer of the [B, R] results (an all-gather when the mesh spans several
   processes: every process gets every row), assembled into a `Rollout` of numpy arrays.

The model's weights are read from the live module on every call (`nnx.split`) and passed to the
program as an argument, so the trainer's in-place `nnx.update` is seen without recompiling and
there is never a second copy on the host. They are cast to the sampling compute dtype inside the
program.

Sampling semantics (all in float32): z = logits / temperature; top-k keeps the k largest z
(exactly k tokens: the k returned by `lax.top_k`); top-p keeps, in descending order of
probability, every token whose preceding cumulative probability is < top_p (so at least one);
the token is drawn from softmax of the kept z. `logprobs` is the log-probability of the drawn
token under that final, renormalised distribution: exactly the `old_logp` of the policy that
sampled (with temperature 1 and no truncation it equals the training forward's log-softmax).
Greedy decoding (temperature 0; top-k/top-p are then moot) takes the argmax of the raw logits
and reports its log-softmax under the raw logits (temperature 1): the model's own log-probability
of the chosen token, which is what a training forward recomputes, rather than the degenerate 0 of
a point mass.

Randomness is drawn per row from fold_in(fold_in(rng, t), row) for its response token t: a row's
sample depends only on the key, its row index and its tokens, not on its slot, the pool size, the
order in which rows finish, the batch bucket, the padding or the sharding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from covjax.model import ModelConfig, init_cache
from covjax.model.config import DTYPES
from covjax.multihost import host_gather
from covjax.sharding import LOGICAL_RULES, data_sharding, logical_to_spec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_AXES = ("data", "fsdp")
# Decoding reads every weight at every token: they are gathered over fsdp once per generate call.
DECODE_RULES = tuple((name, None if axes == "fsdp" else axes) for name, axes in LOGICAL_RULES)


@dataclasses.dataclass(frozen=True)
class Rollout:
    """Host-side result of `Sampler.generate`: N = len(prompts) * n rows, P + R columns.

    Row i*n + j is response j of prompt i. Columns [0, P) hold the left-padded prompt, columns
    [P, P + R) the right-padded response. The training log-prob of tokens[:, t] comes from the
    logits at t - 1: targets = tokens[:, 1:], mask = response_mask[:, 1:].
    """

    tokens: np.ndarray  # [N, P+R] int32, pad id outside attention_mask
    attention_mask: np.ndarray  # [N, P+R] bool: real prompt tokens + response up to the stop token
    positions: np.ndarray  # [N, P+R] int32: clip(cumsum(attention_mask) - 1, 0)
    response_mask: np.ndarray  # [N, P+R] bool: response tokens, stop token included
    logprobs: np.ndarray  # [N, P+R] f32: sampling-distribution log-prob of response tokens, else 0
    lengths: np.ndarray  # [N] int32: response lengths (stop token included)
    stopped: np.ndarray  # [N] bool: True = ended by a stop token, False = by the length budget
    group_ids: np.ndarray  # [N] int32: prompt index
    prompt_length: int  # P


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How `Sampler.generate` samples: `n` responses of at most `max_new_tokens` per prompt.

    temperature 0 is greedy (top_p and top_k are then moot); top_k 0 and top_p 1 are off;
    a row ends at its first token in `stop_token_ids` (kept in the response) or at its budget.
    Checked when made, except the bounds that depend on the model (context, vocabulary).
    """

    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not _is_int(self.n, 1):
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if not _is_int(self.max_new_tokens, 1):
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        t = self.temperature
        if not (isinstance(t, numbers.Real) and t >= 0):
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {t!r}")
        if not (isinstance(self.top_p, numbers.Real) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k, 0):
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        # a list or numpy array of ids becomes a tuple, so the params stay hashable
        object.__setattr__(self, "stop_token_ids", tuple(int(s) for s in self.stop_token_ids))


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    """The static part of the sampling configuration (one compiled program per value)."""

    greedy: bool
    top_k: int  # 0 = no top-k truncation
    use_top_p: bool


def _is_int(value: Any, low: int) -> bool:
    """True for an integral number (4 or 4.0; not 4.5, nan or "4") that is >= low."""
    return (
        isinstance(value, numbers.Real)
        and math.isfinite(value)
        and int(value) == value
        and value >= low
    )


def _token_lists(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """The prompts as lists of Python ints; a ValueError names a prompt that is not one."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray)):
        raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    out = []
    for i, prompt in enumerate(prompts):
        try:
            ids = np.asarray(prompt)
            valid = ids.ndim == 1 and (ids.size == 0 or ids.dtype.kind in "iu")
        except ValueError:  # ragged nesting
            valid = False
        if not valid:
            raise ValueError(
                f"prompts[{i}] must be a list of int token ids, got {type(prompt).__name__} "
                f"{str(prompt)[:50]} (tokenize text first; one prompt is passed as [ids])"
            )
        out.append(ids.tolist())
    return out


def _bucket(value: int, buckets: Sequence[int], multiple: int = 1) -> int:
    """Smallest bucket >= value (past the largest: a multiple of it), rounded up to `multiple`."""
    fitting = [b for b in buckets if b >= value]
    size = min(fitting) if fitting else max(buckets) * math.ceil(value / max(buckets))
    return multiple * math.ceil(size / multiple)


def _check_buckets(name: str, buckets: Sequence[int]) -> tuple[int, ...]:
    buckets = tuple(int(b) for b in buckets)
    if not buckets or any(b < 1 for b in buckets):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {buckets}")
    return tuple(sorted(set(buckets)))


def sample_tokens(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    mode: SamplingMode,
) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row; returns (tokens [B] int32, log-prob under the sampling dist. [B]).

    logits [B, V] (any float dtype, computed in f32); keys [B] one PRNG key per row. See the module
    docstring for the exact temperature / top-k / top-p semantics.
    """
    chex.assert_rank(logits, 2)
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    if mode.greedy:
        tokens = jnp.argmax(logits, axis=-1)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, None], -1)[:, 0]
        return tokens.astype(jnp.int32), logp
    z = logits / temperature
    if mode.top_k or mode.use_top_p:
        # Candidates sorted by descending z: the top k, or the whole vocabulary for top-p alone.
        z, candidate_ids = jax.lax.top_k(z, min(mode.top_k or vocab, vocab))
        if mode.use_top_p:
            probs = jax.nn.softmax(z, -1)
            before = jnp.cumsum(probs, -1) - probs  # mass strictly before each candidate
            z = jnp.where(before < top_p, z, -jnp.inf)
    else:
        candidate_ids = None
    logp_all = jax.nn.log_softmax(z, -1)
    choice = jax.vmap(jax.random.categorical)(keys, z)
    logp = jnp.take_along_axis(logp_all, choice[:, None], -1)[:, 0]
    if candidate_ids is not None:
        choice = jnp.take_along_axis(candidate_ids, choice[:, None], -1)[:, 0]
    return choice.astype(jnp.int32), logp


def _cast_floats(tree: Any, dtype: jnp.dtype) -> Any:
    """Casts the floating-point leaves of a pytree to `dtype` (a no-op when they already are)."""

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def _with_compute_dtype(model: nnx.Module, dtype: jnp.dtype) -> nnx.Module:
    """Makes every submodule compute in `dtype` (the traced copy only; the live model is untouched).

    Without this a bfloat16 sampler over a float32-compute model would cast the weights back up
    inside every layer of every decode step.
    """
    for _, node in nnx.iter_graph(model):
        config = getattr(node, "config", None)
        if isinstance(config, ModelConfig) and config.compute_dtype != dtype.name:
            node.config = config.replace(compute_dtype=dtype.name)
    return model


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one compiled generate program besides the array shapes."""

    max_new_tokens: int
    mode: SamplingMode
    compute_dtype: str
    slots: int
    prefill_rows: int


class Sampler:
    """Generates rollouts from the live parameters of a `covjax.model.Transformer`.

    Args:
      model: the policy (an nnx module with `config` and the KV-cache call of
        covjax.model.Transformer). Its state is read on every `generate`, so in-place updates by
        the trainer are always seen.
      mesh: optional device mesh with axes ("data", "fsdp", ...): the batch is sharded over
        ("data", "fsdp"); the parameters stay where they are and are gathered over fsdp inside
        the program, once per call.
      compute_dtype: dtype of the sampling weights, activations and KV cache (default: the model
        config's compute_dtype). Weights are cast inside the program.
      length_buckets: padded prompt lengths; a longer prompt pads to a multiple of the largest.
      batch_buckets: padded batch sizes (len(prompts) * n rounds up to one), rounded up to a
        multiple of the number of batch shards.
      slots: decode slots of the pool over the whole mesh (rounded up to a multiple of the
        batch shards, capped at B); None: one per row, a static batch.
      prefill_rows: rows prefilled together when slots free up (default slots // 32), rounded up
        to a multiple of the batch shards.
      max_prompt_length: prompts longer than this are refused before compiling (None: only the
        model's context bounds them).
    After each `generate`, `last_decode_steps` is the number of decode steps the pool ran
    (slot-steps = last_decode_steps x slots).
    """

    def __init__(
        self,
        model: nnx.Module,
        *,
        mesh: jax.sharding.Mesh | None = None,
        compute_dtype: Any = None,
        length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
        batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
        slots: int | None = None,
        prefill_rows: int | None = None,
        max_prompt_length: int | None = None,
    ):
        self.model = model
        self.config = model.config
        self.mesh = mesh
        dtype = compute_dtype if compute_dtype is not None else self.config.compute_dtype
        self.compute_dtype = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {DTYPES}, got {compute_dtype!r}")
        self.length_buckets = _check_buckets("length_buckets", length_buckets)
        self.batch_buckets = _check_buckets("batch_buckets", batch_buckets)
        for name, value in dict(
            slots=slots, prefill_rows=prefill_rows, max_prompt_length=max_prompt_length
        ).items():
            if value is not None and not _is_int(value, 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
        self.slots, self.prefill_rows = slots, prefill_rows
        self.max_prompt_length = max_prompt_length
        self.num_compilations = 0
        self.last_decode_steps = 0
        self._graphdef = None
        self._generate_fn = None
        if mesh is not None:
            missing = [a for a in BATCH_AXES if a not in mesh.axis_names]
            if missing:
                raise ValueError(f"mesh lacks batch axes {missing}: axis_names={mesh.axis_names}")
            self._batch_shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
        else:
            self._batch_shards = 1

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        rng: jax.Array,
        pad_id: int = 0,
        budgets: Sequence[int] | None = None,
    ) -> Rollout:
        """Samples `params.n` responses for each prompt (token-id lists); see the module docstring.

        `budgets` (optional, one int in [1, max_new_tokens] per response row) caps each row's
        response length below max_new_tokens: the benchmark uses it to end rows at preset lengths.
        """
        prompts = _token_lists(prompts)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        budgets = self._validate(prompts, params, rng, budgets, pad_id)
        n, num_rows = params.n, len(prompts) * params.n
        prompt_len = _bucket(max(len(p) for p in prompts), self.length_buckets)
        batch = _bucket(num_rows, self.batch_buckets, self._batch_shards)
        ids = np.full((batch, prompt_len), pad_id, np.int32)
        mask = np.zeros((batch, prompt_len), bool)
        for row in range(batch):
            prompt = prompts[row // n] if row < num_rows else prompts[0]  # dummy rows: prompt 0
            ids[row, prompt_len - len(prompt) :] = prompt
            mask[row, prompt_len - len(prompt) :] = True
        row_budget = np.zeros((batch,), np.int32)
        row_budget[:num_rows] = budgets
        args = (ids, mask, row_budget)
        if self.mesh is not None:
            args = tuple(jax.device_put(a, data_sharding(self.mesh, a.ndim)) for a in args)
        fn, static, state, rest = self._program(batch, params, rng, pad_id)
        with self._mesh_context():
            out = fn(static, state, *args, *rest, pad_id)
        # every process gets all rows (an all-gather when the mesh spans several processes)
        resp_tokens, resp_logp, lengths, stopped, steps = host_gather(out)
        self.last_decode_steps = int(steps)
        return _assemble(
            ids[:num_rows],
            mask[:num_rows],
            resp_tokens[:num_rows],
            resp_logp[:num_rows],
            lengths[:num_rows],
            stopped[:num_rows],
            n,
            pad_id,
        )

    def lower(self, num_rows: int, prompt_len: int, params: SamplingParams) -> jax.stages.Lowered:
        """The generate program for `num_rows` rows (padded to a batch bucket) of `prompt_len`
        prompt columns, lowered from abstract arrays, nothing allocated: for
        `.compile().memory_analysis()` and for reading its HLO. The model may be abstract
        (`nnx.eval_shape`) with shardings on its leaves."""
        batch = _bucket(num_rows, self.batch_buckets, self._batch_shards)
        sharding = None if self.mesh is None else data_sharding(self.mesh, 2)
        row_sharding = None if self.mesh is None else data_sharding(self.mesh, 1)
        args = (
            jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=sharding),
            jax.ShapeDtypeStruct((batch, prompt_len), jnp.bool_, sharding=sharding),
            jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=row_sharding),
        )
        fn, static, state, rest = self._program(batch, params, jax.random.key(0), 0)
        state = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            state,
        )
        with self._mesh_context():
            return fn.lower(static, state, *args, *rest, 0)

    # ------------------------------------------------------------------ internals

    def _program(self, batch: int, params: SamplingParams, rng: jax.Array, pad_id: int):
        """(jitted fn, its static part, the live weights, the arguments after the prompt arrays)
        for a padded batch of `batch` rows: the pool is `slots` of them (all when None)."""
        shards, temperature = self._batch_shards, params.temperature
        slots = batch if self.slots is None else min(shards * math.ceil(self.slots / shards), batch)
        # whole rows on every batch shard: an uneven prefill batch would be replicated
        prefill_rows = shards * math.ceil((self.prefill_rows or max(1, slots // 32)) / shards)
        prefill_rows = min(prefill_rows, slots)
        if slots == batch:  # a static batch: every row is prefilled at once
            prefill_rows = slots
        mode = SamplingMode(
            greedy=temperature == 0,
            top_k=0
            if temperature == 0 or params.top_k >= self.config.vocab_size
            else int(params.top_k),
            use_top_p=temperature != 0 and params.top_p < 1.0,
        )
        static = _Static(int(params.max_new_tokens), mode, self.compute_dtype, slots, prefill_rows)
        graphdef, state = nnx.split(self.model)
        rest = (
            jnp.asarray(sorted(set(params.stop_token_ids)), jnp.int32),
            rng,
            jnp.float32(max(temperature, 1e-6)),
            jnp.float32(params.top_p),
        )
        return self._compiled(graphdef), static, state, rest

    def _mesh_context(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _validate(self, prompts, params: SamplingParams, rng, budgets, pad_id) -> np.ndarray:
        """Raises ValueError naming the bad argument; returns the per-row budgets [N]."""
        if not prompts:
            raise ValueError("prompts is empty: need at least one prompt")
        context = self.config.max_position_embeddings
        max_new_tokens, stops = params.max_new_tokens, params.stop_token_ids
        if not max_new_tokens < context:
            raise ValueError(
                f"max_new_tokens must be an int in [1, max_position_embeddings={context}), "
                f"got {max_new_tokens!r}"
            )
        if rng is None:
            raise ValueError("rng must be a JAX PRNG key (jax.random.key(seed)), got None")
        vocab = self.config.vocab_size
        if not (_is_int(pad_id, 0) and pad_id < vocab):
            raise ValueError(f"pad_id must be an int in [0, vocab_size={vocab}), got {pad_id!r}")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompts[{i}] is empty")
            if self.max_prompt_length is not None and len(prompt) > self.max_prompt_length:
                raise ValueError(
                    f"prompts[{i}] has {len(prompt)} tokens: longer than max_prompt_length="
                    f"{self.max_prompt_length}"
                )
            if len(prompt) > context - max_new_tokens:
                raise ValueError(
                    f"prompts[{i}] has {len(prompt)} tokens: longer than the model's context "
                    f"max_position_embeddings={context} minus max_new_tokens={max_new_tokens}"
                )
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise ValueError(f"prompts[{i}] has token ids outside [0, vocab_size={vocab})")
        if any(not 0 <= int(s) < vocab for s in stops):
            raise ValueError(f"stop_token_ids must lie in [0, vocab_size={vocab}), got {stops}")
        num_rows = len(prompts) * params.n
        if budgets is None:
            return np.full((num_rows,), max_new_tokens, np.int32)
        budgets = np.asarray(budgets, np.int32)
        if budgets.shape != (num_rows,) or budgets.min() < 1 or budgets.max() > max_new_tokens:
            raise ValueError(
                f"budgets must hold len(prompts)*n={num_rows} ints in [1, max_new_tokens="
                f"{max_new_tokens}], got shape {budgets.shape}"
            )
        return budgets

    def _compiled(self, graphdef):
        """The jitted generate for this model structure (rebuilt if the structure changes)."""
        if self._generate_fn is None or graphdef != self._graphdef:
            self._graphdef = graphdef
            self._generate_fn = jax.jit(
                functools.partial(self._generate_impl, graphdef), static_argnums=(0, 9)
            )
        return self._generate_fn

    def _generate_impl(
        self,
        graphdef,
        static: _Static,
        state,
        prompt_ids: jax.Array,
        prompt_mask: jax.Array,
        budgets: jax.Array,
        stop_ids: jax.Array,
        rng: jax.Array,
        temperature: jax.Array,
        top_p: jax.Array,
        pad_id: int,
    ):
        """Traced once per compiled program: the slot pool's loop (module docstring)."""
        self.num_compilations += 1
        num_rows, prompt_len = prompt_ids.shape
        slots, prefill_rows, num_new = static.slots, static.prefill_rows, static.max_new_tokens
        logger.info(
            "covjax.sampler: compiling generate #%d: rows=%d slots=%d prefill_rows=%d "
            "prompt_len=%d max_new_tokens=%d %s dtype=%s",
            self.num_compilations, num_rows, slots, prefill_rows, prompt_len, num_new,
            static.mode, static.compute_dtype,
        )  # fmt: skip
        chex.assert_shape([prompt_mask], (num_rows, prompt_len))
        chex.assert_shape([budgets], (num_rows,))
        dtype = jnp.dtype(static.compute_dtype)
        model = _with_compute_dtype(nnx.merge(graphdef, _cast_floats(state, dtype)), dtype)
        self._lay_out_for_decoding(model)
        positions = jnp.maximum(jnp.cumsum(prompt_mask, -1, dtype=jnp.int32) - 1, 0)
        num_real = jnp.sum(budgets > 0)  # the padding rows (budget 0) are last and never admitted
        cache = init_cache(self.config, slots, prompt_len + num_new, dtype)
        pool = dict(
            cache=self._constrain_cache(
                dataclasses.replace(cache, index=jnp.zeros((slots,), jnp.int32))
            ),
            row=jnp.full((slots,), num_rows, jnp.int32),  # num_rows: an empty slot
            token=jnp.full((slots,), pad_id, jnp.int32),
            position=jnp.zeros((slots,), jnp.int32),
            length=jnp.zeros((slots,), jnp.int32),
            budget=jnp.zeros((slots,), jnp.int32),
            done=jnp.ones((slots,), bool),
            next_row=jnp.int32(0),
            steps=jnp.int32(0),
        )
        out = dict(
            tokens=jnp.full((num_rows, num_new), pad_id, jnp.int32),
            logprobs=jnp.zeros((num_rows, num_new), jnp.float32),
            length=jnp.zeros((num_rows,), jnp.int32),
            stopped=jnp.zeros((num_rows,), bool),
        )

        def can_admit(p):
            waiting = num_real - p["next_row"]
            return (waiting > 0) & (jnp.sum(p["done"]) >= jnp.minimum(prefill_rows, waiting))

        def admit(p):
            """Prefills the next `prefill_rows` waiting rows (their prompts alone, causal) and
            writes their keys/values and decode state into the first free slots."""
            rows = p["next_row"] + jnp.arange(prefill_rows, dtype=jnp.int32)
            valid = rows < num_real
            rows = jnp.where(valid, rows, num_rows - 1)
            ids, mask, pos = prompt_ids[rows], prompt_mask[rows], positions[rows]
            free_slots = jnp.argsort(~p["done"], stable=True)[:prefill_rows]
            target = jnp.where(valid, free_slots, slots)  # out of range: dropped
            cache = p["cache"]
            key_mask = jnp.zeros((prefill_rows, cache.key_mask.shape[1]), bool)
            k, v = cache.k, cache.v
            if prompt_len > 1:
                fresh = init_cache(self.config, prefill_rows, prompt_len - 1, dtype)
                _, fresh = model(ids[:, :-1], pos[:, :-1], attention_mask=mask[:, :-1], cache=fresh)
                k = k.at[:, target, : prompt_len - 1].set(fresh.k, mode="drop", unique_indices=True)
                v = v.at[:, target, : prompt_len - 1].set(fresh.v, mode="drop", unique_indices=True)
                key_mask = key_mask.at[:, : prompt_len - 1].set(mask[:, :-1])
            cache = dataclasses.replace(
                cache, k=k, v=v, key_mask=cache.key_mask.at[target].set(key_mask, mode="drop")
            )

            def put(name, value):
                return p[name].at[target].set(value, mode="drop")

            return p | dict(
                cache=self._constrain_cache(cache),
                row=put("row", rows),
                token=put("token", ids[:, -1]),
                position=put("position", pos[:, -1]),
                length=put("length", 0),
                budget=put("budget", budgets[rows]),
                done=put("done", False),
                next_row=p["next_row"] + jnp.sum(valid, dtype=jnp.int32),
            )

        def decode(p, o):
            """One token for every slot; a row's randomness is fold_in(fold_in(rng, t), row)."""
            cache = dataclasses.replace(p["cache"], index=prompt_len - 1 + p["length"])
            logits, cache = model(
                p["token"][:, None],
                p["position"][:, None],
                attention_mask=jnp.ones((slots, 1), bool),
                cache=cache,
            )
            keys = jax.vmap(lambda t, r: jax.random.fold_in(jax.random.fold_in(rng, t), r))(
                p["length"], p["row"]
            )
            token, logp = sample_tokens(logits[:, -1], keys, temperature, top_p, static.mode)
            active = ~p["done"]
            token = jnp.where(active, token, pad_id)
            row = jnp.where(active, p["row"], num_rows)  # out of range: dropped
            length = p["length"] + active
            hit_stop = active & jnp.any(token[:, None] == stop_ids[None, :], -1)
            o = o | dict(
                tokens=o["tokens"].at[row, p["length"]].set(token, mode="drop"),
                logprobs=o["logprobs"].at[row, p["length"]].set(logp, mode="drop"),
                length=o["length"].at[row].set(length, mode="drop"),
                stopped=o["stopped"].at[row].set(hit_stop, mode="drop"),
            )
            p = p | dict(
                cache=cache,
                token=token,
                position=p["position"] + 1,
                length=length,
                done=p["done"] | hit_stop | (length >= p["budget"]),
                steps=p["steps"] + 1,
            )
            return p, o

        def body(carry):
            p, o = carry
            return decode(jax.lax.while_loop(can_admit, admit, p), o)

        def cond(carry):
            p = carry[0]
            return jnp.any(~p["done"]) | (p["next_row"] < num_real)

        pool, out = jax.lax.while_loop(cond, body, (pool, out))
        return out["tokens"], out["logprobs"], out["length"], out["stopped"], pool["steps"]

    def _lay_out_for_decoding(self, model: nnx.Module) -> None:
        """Gathers the weights' fsdp shards once, before the loop (each stays split over the
        tensor axis), so that no decode step all-gathers a weight."""
        if self.mesh is None:
            return
        for _, var in nnx.iter_graph(model):
            if isinstance(var, nnx.Param):
                value = var.get_value()
                spec = logical_to_spec(
                    var.get_metadata()["logical_axes"], value.shape, dict(self.mesh.shape),
                    DECODE_RULES,
                )  # fmt: skip
                sharding = NamedSharding(self.mesh, spec)
                var.set_value(jax.lax.with_sharding_constraint(value, sharding))

    def _constrain_cache(self, cache):
        """Shards the KV cache's slot dimension like the batch (k, v: [L, slots, S, H, D])."""
        if self.mesh is None:
            return cache
        free = P.UNCONSTRAINED
        kv = NamedSharding(self.mesh, P(None, BATCH_AXES, free, free, free))
        return dataclasses.replace(
            cache,
            k=jax.lax.with_sharding_constraint(cache.k, kv),
            v=jax.lax.with_sharding_constraint(cache.v, kv),
            key_mask=jax.lax.with_sharding_constraint(
                cache.key_mask, NamedSharding(self.mesh, P(BATCH_AXES, free))
            ),
        )


def _assemble(ids, mask, resp_tokens, resp_logp, lengths, stopped, n, pad_id) -> Rollout:
    """Builds the host-side Rollout from the prompt arrays and the decode results (numpy)."""
    num_rows, prompt_len = ids.shape
    num_new = resp_tokens.shape[1]
    resp_mask = np.arange(num_new)[None, :] < lengths[:, None]
    tokens = np.concatenate([ids, np.where(resp_mask, resp_tokens, pad_id)], 1).astype(np.int32)
    attention_mask = np.concatenate([mask, resp_mask], 1)
    response_mask = np.concatenate([np.zeros_like(mask), resp_mask], 1)
    positions = np.maximum(np.cumsum(attention_mask, -1) - 1, 0).astype(np.int32)
    logprobs = np.concatenate(
        [np.zeros(mask.shape, np.float32), np.where(resp_mask, resp_logp, 0.0)], 1
    ).astype(np.float32)
    return Rollout(
        tokens=tokens,
        attention_mask=attention_mask,
        positions=positions,
        response_mask=response_mask,
        logprobs=logprobs,
        lengths=lengths.astype(np.int32),
        stopped=stopped.astype(bool),
        group_ids=(np.arange(num_rows) // n).astype(np.int32),
        prompt_length=int(prompt_len),
    )


def decode_responses(
    rollout: Rollout, tokenizer: PreTrainedTokenizerBase, *, skip_special_tokens: bool = True
) -> list[str]:
    """Response texts of a rollout: each row's response tokens, without its stop token."""
    start = rollout.prompt_length
    ends = start + rollout.lengths - rollout.stopped.astype(np.int32)
    rows = [rollout.tokens[i, start:end].tolist() for i, end in enumerate(ends)]
    return tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)
