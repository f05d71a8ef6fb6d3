"""Tests of covjax.sampler against independent references.

References: transformers' PyTorch models and their greedy `generate` (tiny random Qwen2, Qwen3,
Llama and Mistral models saved offline to tmp_path), closed-form softmax / top-k / top-p
distributions in NumPy float64 (chi-square goodness of fit, scipy), and the training forward of
covjax.model.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers import TINY_SHAPE, tiny_hf_model
from scipy import stats

from covjax.model import Transformer, from_pretrained
from covjax.model.transformer import decode_key_buckets
from covjax.sampler import (
    Rollout,
    Sampler,
    SamplingMode,
    SamplingParams,
    decode_responses,
    sample_tokens,
)
from covjax.sharding import make_mesh, shard_model

VOCAB = 128
TINY = dict(
    TINY_SHAPE,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    initializer_range=0.1,  # spread-out logits: clear greedy margins, a non-flat distribution
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)
FAMILIES = {  # name -> (family of helpers.HF_CLASSES, extra config)
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "llama": ("llama", dict(rope_theta=500000.0)),
    "mistral": ("mistral", dict(sliding_window=None)),
    # windows of 4 keys, shorter than the prompts and responses: every layer, or layer 1 only
    "mistral_window4": ("mistral", dict(sliding_window=4)),
    "qwen2_window4": ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=True,
                                    sliding_window=4, max_window_layers=1)),
    # per-head q/k norms; head_dim != 64 / 4
    "qwen3": ("qwen3", dict(head_dim=32, rope_theta=1e6)),
}


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (saved folder, torch model) for tiny random models of each FAMILIES entry."""
    out = {}
    for i, (name, (family, extra)) in enumerate(FAMILIES.items()):
        model = tiny_hf_model(family, seed=i, **{**TINY, **extra})
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


@pytest.fixture(scope="module")
def qwen(hf_models):
    """(covjax model, torch model) of the tiny Qwen2."""
    path, torch_model = hf_models["qwen2"]
    return from_pretrained(path, dtype=jnp.float32), torch_model


@pytest.fixture(scope="module")
def qwen_sampler(qwen):
    return Sampler(qwen[0], length_buckets=(16, 32), batch_buckets=(8, 16, 4096))


def _torch_probs(torch_model, prompt, temperature):
    """float64 softmax(logits / T) of the next token after `prompt`, from the PyTorch model."""
    with torch.no_grad():
        logits = torch_model(torch.tensor([prompt])).logits[0, -1].double().numpy()
    z = logits / temperature
    return np.exp(z - z.max()) / np.exp(z - z.max()).sum()


def _chi2_pvalue(counts, probs):
    """Chi-square goodness of fit; bins with expected count < 5 are pooled into one."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_greedy_matches_transformers_generate(hf_models, name):
    path, torch_model = hf_models[name]
    model = from_pretrained(path, dtype=jnp.float32)
    prompts = _prompts([3, 7, 12], seed=1)
    rollout = Sampler(model).generate(
        prompts, SamplingParams(max_new_tokens=8, temperature=0.0), rng=jax.random.key(0)
    )
    p = rollout.prompt_length
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = torch_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=0,
            )[0, len(prompt) :].numpy()
        np.testing.assert_array_equal(rollout.tokens[i, p:], ref, err_msg=f"prompt {i}")
        np.testing.assert_array_equal(rollout.tokens[i, p - len(prompt) : p], prompt)
    assert rollout.lengths.tolist() == [8, 8, 8] and not rollout.stopped.any()


def test_sampled_frequencies_match_softmax_over_temperature(qwen, qwen_sampler):
    _, torch_model = qwen
    prompt = _prompts([5], seed=2)[0]
    for i, temperature in enumerate((1.0, 0.7)):
        params = SamplingParams(max_new_tokens=1, temperature=temperature, n=4096)
        rollout = qwen_sampler.generate([prompt], params, rng=jax.random.key(3 + i))
        tokens = rollout.tokens[:, rollout.prompt_length]
        probs = _torch_probs(torch_model, prompt, temperature)
        counts = np.bincount(tokens, minlength=VOCAB)
        assert _chi2_pvalue(counts, probs) > 1e-3
        np.testing.assert_allclose(
            rollout.logprobs[:, rollout.prompt_length], np.log(probs[tokens]), atol=1e-4
        )
        # The test has power: the other temperature's distribution is rejected.
        wrong = _torch_probs(torch_model, prompt, 0.7 if temperature == 1.0 else 1.0)
        assert _chi2_pvalue(counts, wrong) < 1e-6
    assert qwen_sampler.num_compilations == 1  # temperature is not part of the compiled program


def _truncated_reference(probs, top_k, top_p):
    """Analytic allowed set and renormalised probs: top-k, then top-p on the renormalised rest."""
    order = np.argsort(-probs, kind="stable")
    if top_k:
        order = order[:top_k]
    kept = probs[order] / probs[order].sum()
    before = np.cumsum(kept) - kept
    order, kept = order[before < top_p], kept[before < top_p]
    out = np.zeros_like(probs)
    out[order] = kept / kept.sum()
    return out


def _assert_support(tokens, ref):
    """Only allowed tokens are sampled, and every allowed token expected >= 20 times appears."""
    sampled = set(tokens.tolist())
    assert sampled <= set(np.flatnonzero(ref).tolist())
    assert set(np.flatnonzero(ref * len(tokens) >= 20).tolist()) <= sampled


@pytest.mark.parametrize(
    "top_k,top_p", [(0, 1.0), (7, 1.0), (0, "mid"), (12, "mid")], ids=["none", "k", "p", "k+p"]
)
def test_sample_tokens_truncation_is_exact(top_k, top_p):
    vocab, rows = 40, 8192
    logits = np.random.default_rng(0).normal(scale=2.0, size=vocab).astype(np.float32)
    temperature = 0.8
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    if top_p == "mid":  # halfway between two cumulative masses, far from any boundary
        base = _truncated_reference(probs, top_k, 1.0)
        cum = np.cumsum(np.sort(base)[::-1])
        top_p = float((cum[3] + cum[4]) / 2)
    ref = _truncated_reference(probs, top_k, top_p)
    mode = SamplingMode(greedy=False, top_k=top_k, use_top_p=top_p < 1.0)
    keys = jax.random.split(jax.random.key(0), rows)
    tokens, logp = jax.jit(sample_tokens, static_argnums=4)(
        jnp.tile(jnp.asarray(logits), (rows, 1)),
        keys,
        jnp.float32(temperature),
        jnp.float32(top_p),
        mode,
    )
    tokens, logp = np.asarray(tokens), np.asarray(logp)
    _assert_support(tokens, ref)
    np.testing.assert_allclose(logp, np.log(ref[tokens]), atol=1e-5)
    assert _chi2_pvalue(np.bincount(tokens, minlength=vocab), ref) > 1e-3


def test_greedy_sample_tokens_reports_raw_log_softmax():
    logits = np.random.default_rng(1).normal(size=(5, 30)).astype(np.float32)
    mode = SamplingMode(greedy=True, top_k=0, use_top_p=False)
    keys = jax.random.split(jax.random.key(0), 5)
    tokens, logp = sample_tokens(jnp.asarray(logits), keys, jnp.float32(1), jnp.float32(1), mode)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    ref = logits.max(-1) - np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(logp, ref, atol=1e-5)


def test_top_k_top_p_in_generate_sample_only_allowed_tokens(qwen, qwen_sampler):
    _, torch_model = qwen
    prompt = _prompts([9], seed=4)[0]
    probs = _torch_probs(torch_model, prompt, 1.0)
    cum = np.cumsum(_truncated_reference(probs, 10, 1.0)[np.argsort(-probs)])
    top_p = float((cum[5] + cum[6]) / 2)
    ref = _truncated_reference(probs, 10, top_p)
    params = SamplingParams(max_new_tokens=1, temperature=1.0, top_k=10, top_p=top_p, n=4096)
    rollout = qwen_sampler.generate([prompt], params, rng=jax.random.key(5))
    tokens = rollout.tokens[:, rollout.prompt_length]
    _assert_support(tokens, ref)
    np.testing.assert_allclose(
        rollout.logprobs[:, rollout.prompt_length], np.log(ref[tokens]), atol=1e-4
    )


def _training_logprobs(model, rollout):
    """log p(tokens[:, t] | tokens[:, :t]) from one training forward, float32 [N, P+R-1]."""

    @nnx.jit
    def forward(model, tokens, positions, mask):
        logits = model(tokens, positions, attention_mask=mask)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
        return jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]

    return np.asarray(forward(model, rollout.tokens, rollout.positions, rollout.attention_mask))


def test_logprobs_equal_training_forward_and_n_responses_differ(qwen, qwen_sampler):
    model, _ = qwen
    rollout = qwen_sampler.generate(
        _prompts([4, 10, 15], seed=6),
        SamplingParams(max_new_tokens=16, temperature=1.0, n=3),
        rng=jax.random.key(7),
    )
    assert rollout.tokens.shape == (9, 32) and rollout.prompt_length == 16
    np.testing.assert_array_equal(rollout.group_ids, np.repeat(np.arange(3), 3))
    mask = rollout.response_mask[:, 1:]
    assert mask.sum() == 9 * 16
    ref = _training_logprobs(model, rollout)
    np.testing.assert_allclose(rollout.logprobs[:, 1:][mask], ref[mask], atol=1e-5, rtol=0)
    assert (rollout.logprobs[~rollout.response_mask] == 0).all()
    for g in range(3):
        responses = {tuple(r) for r in rollout.tokens[3 * g : 3 * g + 3, 16:].tolist()}
        assert len(responses) == 3


def test_decode_reads_a_prefix_of_the_cache_with_the_same_logprobs(qwen):
    """A cache of 256 + 20 slots is read in key ranges of 256 (the first step) or 276
    (decode_key_buckets): the rows get the training forward's log-probs (a whole-sequence
    causal attention, no cache)."""
    model = Transformer(qwen[0].config.replace(max_position_embeddings=512), rngs=nnx.Rngs(0))
    assert decode_key_buckets(276) == (256, 276)
    rollout = Sampler(model, length_buckets=(256,), batch_buckets=(4,)).generate(
        _prompts([200, 130], seed=14),
        SamplingParams(max_new_tokens=20, temperature=1.0, n=2),
        rng=jax.random.key(15),
        budgets=[20, 1, 12, 3],
    )
    np.testing.assert_array_equal(rollout.lengths, [20, 1, 12, 3])
    mask = rollout.response_mask[:, 1:]
    ref = _training_logprobs(model, rollout)
    np.testing.assert_allclose(rollout.logprobs[:, 1:][mask], ref[mask], atol=1e-5, rtol=0)


STOP_IDS = [t for t in range(VOCAB) if t % 12 == 1]
STOP_CASE = dict(
    params=SamplingParams(max_new_tokens=16, temperature=1.0, n=4, stop_token_ids=STOP_IDS),
    rng=jax.random.key(9),
)


@pytest.fixture(scope="module")
def stop_rollout(qwen_sampler):
    return qwen_sampler.generate(_prompts([6, 13], seed=8), **STOP_CASE)


def test_stop_tokens_end_sequences_and_mask_the_rest(stop_rollout):
    rollout, stop_ids = stop_rollout, STOP_IDS
    p = rollout.prompt_length
    assert rollout.stopped.any() and not rollout.stopped.all()
    for row in range(8):
        length = rollout.lengths[row]
        response = rollout.tokens[row, p : p + length]
        is_stop = np.isin(response, stop_ids)
        if rollout.stopped[row]:
            assert is_stop[-1] and not is_stop[:-1].any()
        else:
            assert length == 16 and not is_stop.any()
        assert rollout.response_mask[row, p : p + length].all()
        assert rollout.attention_mask[row, p : p + length].all()
        for field in ("response_mask", "attention_mask", "tokens", "logprobs"):
            assert not getattr(rollout, field)[row, p + length :].any()
        assert not rollout.response_mask[row, :p].any()
        np.testing.assert_array_equal(
            rollout.positions[row], np.maximum(np.cumsum(rollout.attention_mask[row]) - 1, 0)
        )


POOL_PROMPTS = _prompts([2, 15, 7, 11, 3, 14, 9, 5], seed=8)
POOL_BUDGETS = [1, 16, 2, 3, 16, 1, 12, 2, 5, 16, 1, 4, 16, 2, 7, 1]  # 8 prompts x n=2 rows


def _pool_case(temperature):
    params = SamplingParams(
        max_new_tokens=16, temperature=temperature, n=2, stop_token_ids=STOP_IDS
    )
    return dict(params=params, budgets=POOL_BUDGETS, rng=jax.random.key(9))


def _assert_same_rows(out, ref):
    """Tokens, lengths and masks equal; log-probs to float32 rounding (the decode batch's size
    changes XLA:CPU's matmul blocking, so the last bit may differ)."""
    for field in ("tokens", "lengths", "stopped", "attention_mask", "response_mask"):
        np.testing.assert_array_equal(getattr(out, field), getattr(ref, field))
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    ("name", "temperature"), [("qwen2", 0.0), ("qwen2", 1.0), ("mistral_window4", 0.0)]
)
def test_slot_pool_equals_static_batch(hf_models, qwen, qwen_sampler, name, temperature):
    """Rows of 1 to 16 tokens through 3 slots, 1 prefilled at a time: each row's tokens and
    log-probs are those of the static batch (every row in its own slot from the start); with
    a sliding window too (each slot's window at its own cache index)."""
    model, static = qwen[0], qwen_sampler
    if name != "qwen2":
        model = from_pretrained(hf_models[name][0], dtype=jnp.float32)
        static = Sampler(model, length_buckets=(16,), batch_buckets=(16,))
    ref = static.generate(POOL_PROMPTS, **_pool_case(temperature))
    sampler = Sampler(model, length_buckets=(16,), batch_buckets=(16,), slots=3, prefill_rows=1)
    out = sampler.generate(POOL_PROMPTS, **_pool_case(temperature))
    _assert_same_rows(out, ref)
    assert len(set(ref.lengths.tolist())) >= 5
    # slots decoded concurrently: fewer steps than the rows' lengths one after the other
    steps = sampler.last_decode_steps
    assert ref.lengths.max() <= steps < ref.lengths.sum() <= 3 * steps


def _while_bodies(hlo: str) -> dict[str, list[str]]:
    """The instructions of every computation reachable from a while loop's body, by name."""
    comps, name = {}, None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.endswith("{"):
            name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            comps[name] = []
        elif name:
            comps[name].append(line)
    callee = re.compile(r"(?:calls|body|condition|to_apply|computations)=\{?([%\w.\-, ]+)")
    body = re.compile(r"body=%?([\w.\-]+)")
    todo = {b for lines in comps.values() for ln in lines for b in body.findall(ln)}
    seen = {}
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen[name] = comps[name]
        for ln in comps[name]:
            for group in callee.findall(ln):
                todo.update(c.strip().lstrip("%") for c in group.split(","))
    return seen


def test_sharded_pool_equals_unsharded_static_and_gathers_no_weight_per_token(qwen, qwen_sampler):
    """8 fake devices (fsdp=8): 16 rows through 8 slots (one per device, prefilled 8 at a
    time) give the one-device static batch's rows, and no all-gather inside the compiled loops
    produces a weight (they are gathered once, before)."""
    mesh = make_mesh(fsdp=8)
    model = shard_model(nnx.clone(qwen[0]), mesh)
    sampler = Sampler(model, mesh=mesh, length_buckets=(16,), batch_buckets=(16,), slots=8)
    _assert_same_rows(
        sampler.generate(POOL_PROMPTS, **_pool_case(1.0)),
        qwen_sampler.generate(POOL_PROMPTS, **_pool_case(1.0)),
    )
    hlo = sampler.lower(16, 16, _pool_case(1.0)["params"]).compile().as_text()
    weight_shapes = {
        ",".join(map(str, x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))
    }
    gathered = [
        shape
        for lines in _while_bodies(hlo).values()
        for ln in lines
        for shape in re.findall(r"= f32\[([\d,]+)\]\S* all-gather\(", ln)
    ]
    assert "all-gather" in hlo and weight_shapes.isdisjoint(gathered), gathered


def test_temp_memory_grows_with_the_cache_only(qwen):
    """Prefill attends over the prompt alone: from R = 16 to 1024 new tokens the program's temp
    memory grows with the KV cache (and the layer's keys/values read from it), far below the
    [rows, heads, P, P + R] scores of a prefill over the whole cache (tens of times as much)."""
    sampler = Sampler(qwen[0], length_buckets=(96,), batch_buckets=(8,), slots=8)
    c = qwen[0].config

    def temp_and_cache(new_tokens):
        params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)
        stats = sampler.lower(8, 96, params).compile().memory_analysis()
        cache = 2 * c.num_hidden_layers * 8 * (96 + new_tokens) * c.num_key_value_heads
        return stats.temp_size_in_bytes, cache * c.head_dim * 4

    (t0, c0), (t1, c1) = temp_and_cache(16), temp_and_cache(1024)
    assert c1 - c0 <= t1 - t0 <= 1.6 * (c1 - c0), (t0, t1, c0, c1)


def test_buckets_bound_compilations_and_weights_are_read_live(hf_models):
    path, _ = hf_models["mistral"]
    model = from_pretrained(path, dtype=jnp.float32)
    sampler = Sampler(model, length_buckets=(16, 32), batch_buckets=(2,))
    p5, p11, p20 = _prompts([5, 11, 20], seed=12)
    kwargs = dict(params=SamplingParams(max_new_tokens=6, temperature=1.0), rng=jax.random.key(13))
    first = sampler.generate([p5], **kwargs)
    sampler.generate([p11], **kwargs)
    assert sampler.num_compilations == 1
    both = sampler.generate([p5, p20], **kwargs)
    assert sampler.num_compilations == 2 and both.prompt_length == 32
    # A row's sample does not depend on its padding or batch companions.
    np.testing.assert_array_equal(both.tokens[0, 32:], first.tokens[0, 16:])
    # An in-place update of the weights is seen without recompiling.
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: 3.0 * x, state))
    changed = sampler.generate([p5], **kwargs)
    assert sampler.num_compilations == 2
    assert not np.array_equal(changed.tokens, first.tokens)


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.5), "temperature"),
        (dict(n=0), "n must"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(top_k=-1), "top_k"),
        (dict(temperature="1.0"), "temperature"),
        (dict(n=None), "n must"),
    ],
)
def test_bad_sampling_params_are_named(override, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**(dict(max_new_tokens=4, temperature=1.0) | override))


def test_sampling_params_hold_stop_ids_as_a_hashable_tuple():
    params = SamplingParams(max_new_tokens=4, temperature=1.0, stop_token_ids=np.array([3, 1]))
    assert params.stop_token_ids == (3, 1) and hash(params) == hash(dataclasses.replace(params))


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(prompts=[[1, 2], []]), "prompts\\[1\\] is empty"),
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=[list(range(1, 100))], max_new_tokens=40), "max_position_embeddings"),
        (dict(prompts=[[1, VOCAB]]), "vocab_size"),
        (dict(max_new_tokens=128), "max_new_tokens"),
        (dict(rng=None), "rng"),
        (dict(budgets=[5]), "budgets"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(prompts=[1, 2, 3]), r"prompts\[0\] must be a list of int token ids, got int"),
        (dict(prompts=["1 2 3"]), r"prompts\[0\] must be a list of int token ids, got str"),
        (dict(prompts=[[1.0, 2.0]]), r"prompts\[0\] must be a list of int token ids"),
        (dict(prompts="1 2 3"), "prompts must be a list of token-id lists"),
        (dict(pad_id=VOCAB), "pad_id"),
        (dict(prompts=[[1] * 101]), r"prompts\[0\] has 101 tokens: .* max_prompt_length=100"),
        (dict(params=dict(max_new_tokens=4, temperature=1.0)), "params must be a SamplingParams"),
    ],
)
def test_bad_inputs_raise_before_compiling(qwen, override, match):
    """What only the model can check (context, vocabulary) and generate's own arguments."""
    sampler = Sampler(qwen[0], max_prompt_length=100)
    kwargs = dict(prompts=[[1, 2, 3]], max_new_tokens=4, stop_token_ids=(), rng=jax.random.key(0))
    kwargs |= override
    fields = {k: kwargs.pop(k) for k in ("max_new_tokens", "stop_token_ids")}
    kwargs.setdefault("params", SamplingParams(temperature=1.0, **fields))
    with pytest.raises(ValueError, match=match):
        sampler.generate(kwargs.pop("prompts"), **kwargs)
    assert sampler.num_compilations == 0


def test_bad_sampler_arguments_are_named(qwen):
    with pytest.raises(ValueError, match="compute_dtype must be one of .* got 'bf16'"):
        Sampler(qwen[0], compute_dtype="bf16")
    with pytest.raises(ValueError, match="batch_buckets"):
        Sampler(qwen[0], batch_buckets=(0,))
    with pytest.raises(ValueError, match="slots must be an int >= 1"):
        Sampler(qwen[0], slots=0)
    assert Sampler(qwen[0], compute_dtype=jnp.bfloat16).compute_dtype == "bfloat16"


def test_decode_responses_drops_stop_token():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(10)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    tokens = np.array([[0, 5, 3, 4, 9, 0], [7, 5, 2, 2, 2, 6]], np.int32)
    rollout = Rollout(
        tokens=tokens,
        attention_mask=tokens > -1,
        positions=np.zeros_like(tokens),
        response_mask=np.zeros_like(tokens, bool),
        logprobs=np.zeros(tokens.shape, np.float32),
        lengths=np.array([3, 4], np.int32),
        stopped=np.array([True, False]),
        group_ids=np.array([0, 1], np.int32),
        prompt_length=2,
    )
    assert decode_responses(rollout, tokenizer) == ["w3 w4", "w2 w2 w2 w6"]
