"""covjax.tasks.toy and covjax.tasks.toy_warm_start: the tokenizer, the exact reward checker,
the warm-start data and the deterministic, cached warm start. References: brute-force
enumeration and hand-made cases."""

import itertools

import jax
import numpy as np
import pytest
from flax import nnx
from scipy import stats
from transformers import AutoTokenizer

from covjax.model import Transformer
from covjax.sampler import Rollout
from covjax.tasks import toy
from covjax.tasks import toy_warm_start as toy_ws

EASY, HARD = toy.get_variant("easy"), toy.get_variant("hard")


def solutions(variant, target):
    """All 6-digit answers for `target`, by brute force."""
    digits = range(variant.max_digit + 1)
    return [d for d in itertools.product(digits, repeat=6) if sum(d) == target]


def test_tokenizer_round_trip_and_saved_copy(tmp_path):
    tok = toy.build_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert tok("S=12").input_ids == toy.prompt_ids(12) == [tok.bos_token_id, tok.vocab["S=12"]]
    ids = toy.response_ids([1, 2, 3, 0, 4, 9])
    assert tok.convert_ids_to_tokens(ids) == ["1", "2", "3", "0", "4", "9", "<eos>"]
    assert tok.decode(ids, skip_special_tokens=True) == "1 2 3 0 4 9"
    assert tok.decode(toy.prompt_ids(50) + ids) == "<bos> S=50 1 2 3 0 4 9 <eos>"
    text = "S=7 0 0 9 9 1 2"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again(text).input_ids == tok(text).input_ids
    assert len(tok) == len(toy.vocabulary()) == toy_ws.model_config().vocab_size == 61
    with pytest.raises(ValueError, match="target=51"):
        toy.prompt_ids(51)
    with pytest.raises(ValueError, match="variant='medium'"):
        toy.get_variant("medium")


@pytest.mark.parametrize(
    "digits, eos, target, variant, expected",
    [
        ([1, 2, 3, 0, 4, 2], True, 12, EASY, 1.0),
        ([4, 4, 4, 4, 0, 0], True, 16, EASY, 1.0),
        ([1, 2, 3, 0, 4, 2], True, 13, EASY, 0.0),  # wrong sum
        ([1, 2, 3, 0, 4, 2], False, 12, EASY, 0.0),  # no EOS (truncated)
        ([1, 2, 3, 0, 6], True, 12, EASY, 0.0),  # five digits
        ([1, 2, 3, 0, 4, 2, 0], True, 12, EASY, 0.0),  # seven digits
        ([9, 0, 0, 0, 0, 0], True, 9, EASY, 0.0),  # 9 is not an easy digit
        ([9, 0, 0, 0, 0, 0], True, 9, HARD, 1.0),
        ([9, 9, 9, 9, 9, 5], True, 50, HARD, 1.0),
    ],
)
def test_score_hand_cases(digits, eos, target, variant, expected):
    ids = toy.response_ids(digits)
    if not eos:
        ids = ids[:-1]
    assert toy.score(ids, target, variant) == expected


def test_score_rejects_non_digit_tokens():
    vocab = toy.vocabulary()
    bad = toy.response_ids([1, 2, 3, 0, 4, 2])
    bad[2] = vocab["S=12"]
    assert toy.score(bad, 12, EASY) == 0.0
    assert toy.score([vocab["<eos>"]], 0, EASY) == 0.0


def test_score_rollout_reads_each_row_up_to_its_length():
    rows = [toy.response_ids([1, 2, 3, 0, 4, 2]), toy.response_ids([4, 4, 4, 4, 4, 4])]
    tokens = np.zeros((2, 2 + 7), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :2] = toy.prompt_ids(12)
        tokens[i, 2:] = r
    rollout = Rollout(tokens=tokens, attention_mask=tokens > 0, positions=tokens * 0,
                      response_mask=tokens > 0, logprobs=np.zeros(tokens.shape, np.float32),
                      lengths=np.array([7, 7]), stopped=np.array([True, True]),
                      group_ids=np.array([0, 0]), prompt_length=2)
    np.testing.assert_array_equal(toy.score_rollout(rollout, [12], EASY), [1.0, 0.0])


def _reference_score(response, target, variant):
    """The rule written out per response: 6 digit tokens of the variant, then EOS, summing to S."""
    vocab = toy.vocabulary()
    digit = {vocab[str(d)]: d for d in range(10)}
    if len(response) != 7 or response[6] != vocab["<eos>"]:
        return 0.0
    if any(t not in digit or digit[t] > variant.max_digit for t in response[:6]):
        return 0.0
    return float(sum(digit[t] for t in response[:6]) == target)


@pytest.mark.parametrize("variant", [EASY, HARD])
def test_score_responses_matches_the_rule_per_response(variant):
    """3000 random responses, a third of them correct or near misses, ids beyond the vocabulary."""
    rng = np.random.default_rng(0)
    vocab = toy.vocabulary()
    n, width = 3000, 9
    responses = rng.integers(0, len(vocab) + 5, (n, width))
    digits = rng.integers(0, variant.max_digit + 1, (n, 6))
    near = rng.random(n) < 0.6
    responses[near, :6] = toy.digit_ids()[digits[near]]
    responses[near, 6] = vocab["<eos>"]
    lengths = np.where(rng.random(n) < 0.8, 7, rng.integers(0, width + 1, n))
    targets = np.where(rng.random(n) < 0.5, digits.sum(1), rng.integers(0, 55, n))
    rewards = toy.score_responses(responses, lengths, targets, variant)
    expected = [_reference_score(list(r[:k]), t, variant)
                for r, k, t in zip(responses, lengths, targets, strict=True)]
    np.testing.assert_array_equal(rewards, expected)
    assert 0.1 < rewards.mean() < 0.5


@pytest.mark.parametrize("variant", [EASY, HARD])
def test_count_table_matches_enumeration(variant):
    table = toy._count_table(variant.max_digit)
    for target in (variant.min_target, variant.max_target, 12):
        assert table[6, target] == len(solutions(variant, target))


def test_sample_correct_is_uniform_over_the_answers():
    """S=4 with digits 0-9 has 126 answers; 12600 draws, chi-square against uniform."""
    answers = solutions(HARD, 4)
    draws = toy.sample_correct(np.random.default_rng(0), np.full(12600, 4), HARD)
    assert (draws.sum(1) == 4).all()
    index = {a: i for i, a in enumerate(answers)}
    counts = np.bincount([index[tuple(d)] for d in draws], minlength=len(answers))
    assert stats.chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("variant", [EASY, HARD])
def test_warm_start_batch_layout_and_fraction_correct(variant):
    frac, size = 0.65, 20000
    tokens, mask = toy_ws.warm_start_batch(np.random.default_rng(1), size, variant, frac)
    assert tokens.shape == mask.shape == (size, 9) and tokens.dtype == np.int32
    assert not mask[:, :2].any() and mask[:, 2:].all()
    vocab = toy.vocabulary()
    targets = tokens[:, 1] - vocab["S=4"] + 4
    assert (tokens[:, 0] == vocab["<bos>"]).all() and (tokens[:, -1] == vocab["<eos>"]).all()
    assert targets.min() == variant.min_target and targets.max() == variant.max_target
    rewards = np.array([toy.score(t[2:], s, variant) for t, s in zip(tokens, targets, strict=True)])
    # random strings are right by chance with probability E_S[#answers(S) / (max_digit+1)^6]
    table = toy._count_table(variant.max_digit)
    span = range(variant.min_target, variant.max_target + 1)
    p_chance = np.mean([table[6, s] for s in span]) / (variant.max_digit + 1) ** 6
    expected = frac + (1 - frac) * p_chance
    assert abs(rewards.mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / size)


def test_model_config_is_tiny_qwen2():
    cfg = toy_ws.model_config()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert cfg.architecture == "qwen2" and cfg.num_hidden_layers == 2 and cfg.hidden_size == 64
    assert cfg.num_attention_heads == 4 and 80_000 < num_params < 120_000


def test_warm_start_is_deterministic_and_cached(tmp_path, caplog):
    ws = toy_ws.WarmStart(steps=3, batch_size=16, lr=3e-3, frac_correct=0.65)

    def params(cache_dir, init_seed=0):
        model = Transformer(toy_ws.model_config(), rngs=nnx.Rngs(init_seed))
        cached = toy_ws.warm_start(model, variant=EASY, seed=3, ws=ws, cache_dir=cache_dir)
        return cached, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]

    fresh = Transformer(toy_ws.model_config(), rngs=nnx.Rngs(0))
    initial = [np.asarray(x) for x in jax.tree.leaves(nnx.state(fresh, nnx.Param))]
    cached_a, a = params(str(tmp_path))
    cached_b, b = params(str(tmp_path))
    cached_c, c = params("")
    assert (cached_a, cached_b, cached_c) == (False, True, False)
    assert len(list(tmp_path.glob("toy_easy_seed3_*.npz"))) == 1
    for x, y, z in zip(a, b, c, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    assert any(not np.array_equal(x, w) for x, w in zip(a, initial, strict=True))
    # other initial parameters (as after a change of the model's init): never the stale cache
    cached_d, d = params(str(tmp_path), init_seed=1)
    assert not cached_d and any(not np.array_equal(x, w) for x, w in zip(a, d, strict=True))
    assert len(list(tmp_path.glob("toy_easy_seed3_*.npz"))) == 2
    # an entry cut short (a crash, a full disk) is rebuilt, with a warning, not read
    (entry,) = [p for p in tmp_path.glob("toy_easy_seed3_*.npz") if p.stat().st_mtime_ns ==
                min(q.stat().st_mtime_ns for q in tmp_path.glob("toy_easy_seed3_*.npz"))]
    entry.write_bytes(entry.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        cached_e, e = params(str(tmp_path))
    assert not cached_e and f"toy warm-start cache {entry} does not load" in caplog.text
    for x, y in zip(a, e, strict=True):
        np.testing.assert_array_equal(x, y)
    assert params(str(tmp_path))[0]  # the rebuilt entry loads
