"""covjax.model against transformers' PyTorch models: logits, HF I/O, cache, layouts, dtypes.

Every reference is an independent implementation: transformers' float32 eager PyTorch model built
offline with random weights (2 layers, hidden 64, vocabulary 256) and saved to tmp_path.
"""

import json
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import torch
import transformers
from etils import epath
from flax import nnx
from helpers import fake_object_store, tiny_hf_model

from covjax.model import (
    ModelConfig,
    Transformer,
    check_pretrained,
    from_pretrained,
    hf_state_dict,
    init_cache,
    load_tokenizer,
    save_pretrained,
)
from covjax.model.transformer import rope_inv_freq
from covjax.sharding import data_sharding, make_mesh

VOCAB, B, T = 256, 3, 12
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    max_position_embeddings=512,
)
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
FAMILIES = {
    # name: (family of helpers.HF_CLASSES, config kwargs)
    "qwen2_tied": (
        "qwen2",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "qwen2_untied": (
        "qwen2",
        dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False),
    ),
    "llama3_gqa4": (
        "llama",
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling=LLAMA3_SCALING,
        ),
    ),
    "mistral_gqa2": (
        "mistral",
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
    ),
    # Qwen3's head_dim is its own, not hidden_size / heads = 16
    "qwen3_tied": (
        "qwen3",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
    ),
    "qwen3_untied": (
        "qwen3",
        dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24, rope_theta=1e6,
             attention_bias=True, tie_word_embeddings=False),  # the bias comes before the norm
    ),
    "mistral_window4": (  # every layer slides over 4 of the 12 tokens
        "mistral",
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=4),
    ),
    "qwen2_window4": (  # layer 0 attends to every key, layer 1 slides over 4
        "qwen2",
        dict(num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
             sliding_window=4, max_window_layers=1),
    ),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> folder with a tiny random transformers model saved by save_pretrained."""
    dirs = {}
    for i, (name, (family, kwargs)) in enumerate(FAMILIES.items()):
        model = tiny_hf_model(family, seed=i, **SMALL, **kwargs)
        with torch.no_grad():  # non-trivial norms and biases, not HF's ones/zeros init
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


def _batch(seed=0, batch=B, length=T):
    """Random ids with left padding (row 0: 5 pads, row 1: 1 pad), HF-style positions."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (batch, length))
    mask = np.ones((batch, length), bool)
    mask[0, :5] = False
    mask[1, :1] = False
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, positions


def _torch_logits(path, ids, mask, positions):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask.astype(np.int64)),
            position_ids=torch.as_tensor(positions),
        )
    return out.logits.numpy()


@nnx.jit
def _forward(model, ids, positions, mask):
    return model(ids, positions, attention_mask=mask)


def _covjax_logits(model, ids, mask, positions):
    return np.asarray(
        _forward(
            model, jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32), jnp.asarray(mask)
        )
    )


def _rel_err(a, b, mask):
    return np.abs(a - b)[mask].max() / np.abs(b[mask]).max()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(hf_dirs, name):
    ids, mask, positions = _batch()
    ref = _torch_logits(hf_dirs[name], ids, mask, positions)
    model = from_pretrained(hf_dirs[name])
    out = _covjax_logits(model, ids, mask, positions)
    assert out.dtype == np.float32 and out.shape == (B, T, VOCAB)
    assert _rel_err(out, ref, mask) < 1e-5


def test_llama3_rope_frequencies_match_transformers():
    config = transformers.LlamaConfig(
        **SMALL, num_attention_heads=4, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING
    )
    init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"]
    ref, _ = init(config, "cpu")
    scaling = tuple(sorted(LLAMA3_SCALING.items()))
    ours = rope_inv_freq(16, 500000.0, scaling)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
    assert not np.allclose(ours, rope_inv_freq(16, 500000.0, None))


def _byte_tokenizer():
    """A byte-level BPE tokenizer without merges (one id per byte), built offline."""
    import tokenizers

    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    model = tokenizers.models.BPE({ch: i for i, ch in enumerate(alphabet)}, [])
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def test_tokenizer_is_saved_and_loaded(hf_dirs, tmp_path):
    tokenizer = _byte_tokenizer()
    save_pretrained(from_pretrained(hf_dirs["qwen2_tied"]), tmp_path, tokenizer=tokenizer)
    text = "x = 12 + 30"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)
    loaded = load_tokenizer(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids) == text
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as error:  # the model's folder, without a tokenizer
        load_tokenizer(hf_dirs["qwen2_tied"])
    assert str(error.value) == (
        f"tokenizer folder {hf_dirs['qwen2_tied']} holds no tokenizer files (none of "
        "tokenizer.json, tokenizer.model, vocab.json, vocab.txt)"
    )


def _assert_sharded_like_transformers(folder, max_bytes):
    """Several files of at most `max_bytes` of tensors (or one tensor), listed by the index."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files == [
        f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
    ]
    total = 0
    for name in files:
        with safetensors.safe_open(folder / name, framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
            dtype = f.get_tensor(next(iter(f.keys()))).dtype
        nbytes = [int(np.prod(shape)) * dtype.itemsize for shape in sizes]
        assert sum(nbytes) <= max_bytes or len(nbytes) == 1, (name, nbytes)
        total += sum(nbytes)
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize("name", ["qwen2_untied", "llama3_gqa4", "qwen3_tied", "qwen3_untied"])
def test_save_pretrained_round_trip(hf_dirs, name, tmp_path):
    model = from_pretrained(hf_dirs[name])
    save_pretrained(model, tmp_path, max_shard_size="40KB")
    _assert_sharded_like_transformers(tmp_path, 40_000)
    ids, mask, positions = _batch(seed=1)
    ref = _covjax_logits(model, ids, mask, positions)
    assert _rel_err(_torch_logits(str(tmp_path), ids, mask, positions), ref, mask) < 1e-5
    reloaded = hf_state_dict(from_pretrained(tmp_path))
    original = hf_state_dict(model)
    assert reloaded.keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(reloaded[key], value, err_msg=key)


def test_save_pretrained_writes_bf16_shards_to_an_object_store(hf_dirs, tmp_path, monkeypatch):
    store = epath.Path(fake_object_store(monkeypatch)) / "export"
    model = from_pretrained(hf_dirs["qwen2_untied"], scan_layers=True)  # one layer per tensor
    save_pretrained(model, store, tokenizer=_byte_tokenizer(), dtype=jnp.bfloat16,
                    max_shard_size="20KB")
    local = tmp_path / "export"  # transformers reads local folders: the objects, downloaded
    local.mkdir()
    for obj in store.iterdir():
        (local / obj.name).write_bytes(obj.read_bytes())
    _assert_sharded_like_transformers(local, 20_000)
    assert load_tokenizer(local)("x = 1")["input_ids"] == _byte_tokenizer()("x = 1")["input_ids"]
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(local)
    assert torch_model.dtype == torch.bfloat16
    reference = hf_state_dict(model)  # float32
    assert torch_model.state_dict().keys() == reference.keys()
    for key, value in reference.items():  # each weight rounded to its nearest bfloat16
        np.testing.assert_array_equal(
            torch_model.state_dict()[key].float().numpy(),
            torch.tensor(value).bfloat16().float().numpy(), err_msg=key,
        )
    ids, mask, positions = _batch(seed=3)
    ref = _covjax_logits(model, ids, mask, positions)
    assert _rel_err(_torch_logits(str(local), ids, mask, positions), ref, mask) < 2e-2


@pytest.mark.parametrize("where", ["local", "object store"])
def test_a_failed_write_still_gathers_every_tensor_and_keeps_the_old_export(
    hf_dirs, tmp_path, monkeypatch, where
):
    from covjax.evaluation import resolve_checkpoint
    from covjax.model import hf

    root = tmp_path if where == "local" else epath.Path(fake_object_store(monkeypatch))
    old, new = from_pretrained(hf_dirs["qwen2_tied"]), from_pretrained(hf_dirs["qwen2_untied"])
    save_pretrained(old, root / "hf_final", max_shard_size="40KB")
    before = {p.name: p.read_bytes() for p in (root / "hf_final").iterdir()}
    sizes = sorted(a.size for a in hf_state_dict(new).values())
    gathers, agreed, written = [], [], []
    gather, write, any_process = hf._gather_to_host, hf._write_safetensors, hf.multihost.any_process

    def counting_gather(x):
        gathers.append(x.size)
        return gather(x)

    def full_disk_on_the_second_file(path, structs, arrays):
        written.append(path)
        if len(written) < 2:
            return write(path, structs, arrays)
        next(arrays)  # one tensor gathered, then the disk is full
        raise OSError(28, "No space left on device")

    def agree(flag):
        agreed.append(flag)
        return any_process(flag)

    monkeypatch.setattr(hf, "_gather_to_host", counting_gather)
    monkeypatch.setattr(hf, "_write_safetensors", full_disk_on_the_second_file)
    monkeypatch.setattr(hf.multihost, "any_process", agree)
    with pytest.raises(OSError) as error:
        save_pretrained(new, root / "hf_final", max_shard_size="40KB")
    assert str(error.value) == (
        f"{written[1]}: writing the export failed: OSError: [Errno 28] No space left on device"
    )
    assert sorted(gathers) == sizes  # every tensor, once, though the write stopped
    assert agreed == [True]  # at the end, after every gather: the processes raise together
    if where == "local":  # the new files went to hf_final.partial: the old export is whole
        assert written[1].parent == tmp_path / "hf_final.partial"
        assert {p.name: p.read_bytes() for p in (tmp_path / "hf_final").iterdir()} == before
        assert resolve_checkpoint(str(tmp_path)) == str(tmp_path / "hf_final")
    else:  # written in place: without its config.json, which resolve_checkpoint requires
        assert written[1].parent == root / "hf_final"
        assert "config.json" in before and not (root / "hf_final" / "config.json").exists()

    gathers.clear()
    monkeypatch.setattr(jax, "process_index", lambda: 1)  # another process, told of the failure
    monkeypatch.setattr(hf.multihost, "any_process", lambda flag: True)
    with pytest.raises(OSError) as error:
        save_pretrained(new, root / "elsewhere", max_shard_size="40KB")
    assert str(error.value) == f"{root / 'elsewhere'}: process 0 failed to write the export"
    assert sorted(gathers) == sizes and not (root / "elsewhere").exists()

    monkeypatch.undo()
    if where == "local":  # a complete save replaces the old export; nothing is left beside it
        save_pretrained(new, tmp_path / "hf_final", max_shard_size="40KB")
        assert sorted(p.name for p in tmp_path.glob("hf_final*")) == ["hf_final"]
        np.testing.assert_array_equal(
            hf_state_dict(from_pretrained(tmp_path / "hf_final"))["lm_head.weight"],
            hf_state_dict(new)["lm_head.weight"],
        )


def test_save_pretrained_keeps_special_ids_and_generation_config(tmp_path):
    from covjax.model import stop_ids

    source, saved = tmp_path / "source", tmp_path / "saved"
    model = tiny_hf_model("llama", seed=0, num_attention_heads=4, num_key_value_heads=2,
                          bos_token_id=5, eos_token_id=[6, 7], pad_token_id=0, **SMALL)
    model.save_pretrained(source)
    generation = {"bos_token_id": 5, "eos_token_id": [6, 7, 8], "temperature": 0.6}
    (source / "generation_config.json").write_text(json.dumps(generation))
    save_pretrained(from_pretrained(source), saved, source_dir=source)
    hf = transformers.AutoConfig.from_pretrained(saved)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (5, [6, 7], 0)
    assert json.loads((saved / "generation_config.json").read_text()) == generation
    tokenizer = types.SimpleNamespace(eos_token_id=3)
    assert stop_ids(str(saved), tokenizer) == stop_ids(str(source), tokenizer) == [3, 6, 7, 8]


def test_special_ids_that_are_not_token_ids_are_dropped():
    hf = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, **SMALL}
    old_llama = ModelConfig.from_hf_config(dict(hf, pad_token_id=-1, eos_token_id=[2, -1]))
    assert (old_llama.pad_token_id, old_llama.eos_token_id) == (None, (2,))
    written = old_llama.to_hf_config()
    assert "pad_token_id" not in written and "bos_token_id" not in written  # family defaults
    assert written["eos_token_id"] == [2]


def _hf_windows(config: ModelConfig, tmp_path) -> list[int | None]:
    """The window per layer (None: full attention) transformers reads from config.json."""
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_config()))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    windows = [hf.sliding_window] * hf.num_hidden_layers
    if hf.model_type == "qwen2":
        windows = [hf.sliding_window if t == "sliding_attention" else None
                   for t in hf.layer_types]
    return windows


def test_sliding_windows_follow_transformers(tmp_path):
    """Which layers slide, read as transformers reads config.json (Qwen2Config: only with
    use_sliding_window, the layers >= max_window_layers or named by layer_types), and written
    back so that transformers reads the same windows."""
    hf = {"architectures": ["MistralForCausalLM"], "num_attention_heads": 4, **SMALL}
    mistral = ModelConfig.from_hf_config(hf)
    assert (mistral.sliding_window, mistral.sliding_layers) == (4096, (True, True))
    assert ModelConfig.from_hf_config(dict(hf, sliding_window=None)).sliding_window is None
    assert _hf_windows(mistral.replace(sliding_window=8), tmp_path) == [8, 8]
    qwen2 = dict(hf, architectures=["Qwen2ForCausalLM"], num_hidden_layers=3, sliding_window=8)
    cases = [  # extra config.json keys -> windows per layer
        (dict(), [None] * 3),  # use_sliding_window defaults to False
        (dict(use_sliding_window=True), [None] * 3),  # layers < 28 never slide
        (dict(use_sliding_window=True, max_window_layers=1), [None, 8, 8]),
        (dict(use_sliding_window=True, max_window_layers=0), [8, 8, 8]),
        (dict(use_sliding_window=True, max_window_layers=0, sliding_window=None), [None] * 3),
        (dict(use_sliding_window=True, layer_types=["sliding_attention", "full_attention",
                                                    "sliding_attention"]), [8, None, 8]),
    ]
    for extra, windows in cases:
        config = ModelConfig.from_hf_config(dict(qwen2, **extra))
        ours = [config.sliding_window if s else None for s in config.sliding_layers]
        assert ours == windows, extra
        assert _hf_windows(config, tmp_path) == windows, extra
        assert ModelConfig.from_hf_config(config.to_hf_config()) == config, extra
    bad_types = dict(qwen2, use_sliding_window=True, layer_types=["sliding_attention"])
    with pytest.raises(ValueError, match=r"layer_types=\['sliding_attention'\] must list one"):
        ModelConfig.from_hf_config(bad_types)
    qwen2_config = ModelConfig.from_hf_config(qwen2)
    for fields, match in [
        (dict(full_attention_layers=(0,)), "full_attention_layers is set without a sliding"),
        (dict(sliding_window=8, full_attention_layers=(1, 0)), "must be a sorted tuple"),
        (dict(sliding_window=8, full_attention_layers=(3,)), "below num_hidden_layers=3"),
        (dict(sliding_window=8, full_attention_layers=(0, 1, 2)), "use sliding_window=None"),
    ]:
        with pytest.raises(ValueError, match=match):
            qwen2_config.replace(**fields)
    with pytest.raises(ValueError, match="a mistral config slides every layer"):
        mistral.replace(full_attention_layers=(0,))
    with pytest.raises(ValueError, match="a llama config has no sliding_window"):
        ModelConfig.from_hf_config(dict(hf, architectures=["LlamaForCausalLM"])).replace(
            sliding_window=8)


def test_qwen3_config_follows_transformers(hf_dirs):
    saved = json.loads(open(os.path.join(hf_dirs["qwen3_untied"], "config.json")).read())
    config = ModelConfig.from_hf_config(saved)
    assert (config.architecture, config.qk_norm, config.head_dim, config.rope_theta) == (
        "qwen3", True, 24, 1e6)
    assert config.attention_bias and config.attention_out_bias  # Qwen3's one flag for q/k/v/o
    assert ModelConfig.from_hf_config(config.to_hf_config()) == config
    hf = transformers.Qwen3Config(**config.to_hf_config())
    assert (hf.head_dim, hf.attention_bias, hf.layer_types) == (24, True, ["full_attention"] * 2)
    no_head_dim = {k: v for k, v in saved.items() if k != "head_dim"}
    assert ModelConfig.from_hf_config(no_head_dim).head_dim == transformers.Qwen3Config().head_dim
    with pytest.raises(ValueError, match="a qwen3 config must have qk_norm=True"):
        config.replace(qk_norm=False)
    with pytest.raises(ValueError, match="a llama config must have qk_norm=False"):
        ModelConfig(architecture="llama", num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, qk_norm=True, **SMALL)


def test_sharded_checkpoint_with_index(hf_dirs, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["mistral_gqa2"])
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids, mask, positions = _batch(seed=2)
    a = _covjax_logits(from_pretrained(tmp_path), ids, mask, positions)
    b = _covjax_logits(from_pretrained(hf_dirs["mistral_gqa2"]), ids, mask, positions)
    np.testing.assert_array_equal(a, b)
    assert _rel_err(a, _torch_logits(str(tmp_path), ids, mask, positions), mask) < 1e-5


@pytest.mark.parametrize("scan_layers", [True, False])
def test_incremental_decoding_matches_full_forward(hf_dirs, scan_layers):
    model = from_pretrained(hf_dirs["qwen2_tied"], scan_layers=scan_layers)
    ids, mask, positions = _batch(seed=3)
    full = _covjax_logits(model, ids, mask, positions)
    step = nnx.jit(lambda m, i, p, a, c: m(i, p, attention_mask=a, cache=c))
    cache = init_cache(model.config, B, T + 3)
    prefill = 7
    logits, cache = step(model, ids[:, :prefill], positions[:, :prefill], mask[:, :prefill], cache)
    pieces = [np.asarray(logits)]
    for t in range(prefill, T):
        sl = slice(t, t + 1)
        logits, cache = step(model, ids[:, sl], positions[:, sl], mask[:, sl], cache)
        pieces.append(np.asarray(logits))
    assert int(cache.index) == T
    np.testing.assert_array_equal(np.asarray(cache.key_mask)[:, :T], mask)
    assert not np.asarray(cache.key_mask)[:, T:].any()
    inc = np.concatenate(pieces, axis=1)
    assert _rel_err(inc, full, mask) < 1e-5


def test_fully_padded_rows_are_finite(hf_dirs):
    model = from_pretrained(hf_dirs["llama3_gqa4"])
    ids, mask, positions = _batch(seed=4)
    mask[2] = False
    assert np.isfinite(_covjax_logits(model, ids, mask, positions)).all()
    cache = init_cache(model.config, B, T)
    step = nnx.jit(lambda m, i, p, a, c: m(i, p, attention_mask=a, cache=c))
    logits, _ = step(model, *map(jnp.asarray, (ids, positions, mask)), cache)
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_decode_loop_updates_cache_in_place(scan_layers):
    """A compiled while-loop of one-token cached forwards (as the sampler's decode) writes the
    new slot in place: no copy, broadcast or concatenate produces a whole [L, B, S, Hkv, Dh]
    cache (the old scan-xs/ys and jnp.stack caches produced one of those every token)."""
    config = ModelConfig(
        architecture="qwen2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        attention_bias=True,
        tie_word_embeddings=True,
        scan_layers=scan_layers,
    )
    graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    cache = init_cache(config, batch_size=2, max_len=24)

    def decode(state, cache, ids):
        model = nnx.merge(graphdef, state)

        def body(_, carry):
            ids, cache = carry
            logits, cache = model(ids, attention_mask=jnp.ones(ids.shape, bool), cache=cache)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, 4, body, (ids, cache))

    ids = jnp.zeros((2, 1), jnp.int32)
    hlo = jax.jit(decode, donate_argnums=1).lower(state, cache, ids).compile().as_text()
    cache_shape = re.escape(f"f32[{','.join(map(str, cache.k.shape))}]")
    ops = re.findall(rf"= {cache_shape}\{{[\d,]*\}} ([\w-]+)\(", hlo)
    assert "parameter" in ops, "the pattern must match the cache's own HLO shape"
    copies = [op for op in ops if op in ("copy", "broadcast", "concatenate")]
    assert not copies, f"whole-cache {copies} in the compiled decode loop"


@nnx.jit
@nnx.value_and_grad
def _weighted_logit_sum(model, ids, positions, mask, weights):
    logits = model(ids, positions, attention_mask=mask)
    return jnp.sum(logits * weights * mask[..., None])


def _loss_and_grads(model):
    """A weighted sum of logits (fixed random weights) and its gradients in HF layout."""
    ids, mask, positions = _batch(seed=6)
    weights = np.random.default_rng(5).normal(size=(B, T, VOCAB)).astype(np.float32)
    loss, grads = _weighted_logit_sum(model, *map(jnp.asarray, (ids, positions, mask, weights)))
    return float(loss), hf_state_dict(nnx.merge(nnx.graphdef(model), grads))


@pytest.fixture(scope="module")
def base_grads(hf_dirs):
    return _loss_and_grads(from_pretrained(hf_dirs["qwen2_untied"]))


@pytest.mark.parametrize(
    "variant",
    [dict(scan_layers=False), dict(remat="layer"), dict(scan_layers=False, remat="dots")],
    ids=["loop", "remat_layer", "loop_remat_dots"],
)
def test_layer_stacking_and_remat_change_nothing(hf_dirs, base_grads, variant):
    base_loss, base_grads = base_grads
    loss, grads = _loss_and_grads(from_pretrained(hf_dirs["qwen2_untied"], **variant))
    np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
    assert grads.keys() == base_grads.keys()
    for key in grads:
        scale = np.abs(base_grads[key]).max() + 1e-12
        np.testing.assert_allclose(
            grads[key] / scale, base_grads[key] / scale, atol=1e-5, err_msg=key
        )


def test_bf16_compute_is_close(hf_dirs, tmp_path):
    ids, mask, positions = _batch(seed=7)
    ref = _covjax_logits(from_pretrained(hf_dirs["llama3_gqa4"]), ids, mask, positions)
    model = from_pretrained(hf_dirs["llama3_gqa4"], compute_dtype=jnp.bfloat16)
    assert model.embed[...].dtype == jnp.float32  # master weights stay float32
    out = _covjax_logits(model, ids, mask, positions)
    hidden = model.hidden_states(
        jnp.asarray(ids), jnp.asarray(positions), attention_mask=jnp.asarray(mask)
    )
    assert out.dtype == np.float32 and hidden.dtype == jnp.bfloat16
    assert model.unembed_kernel().dtype == jnp.bfloat16
    assert _rel_err(out, ref, mask) < 5e-2
    bf16_params = from_pretrained(hf_dirs["llama3_gqa4"], dtype=jnp.bfloat16)
    assert bf16_params.embed[...].dtype == jnp.bfloat16
    assert _rel_err(_covjax_logits(bf16_params, ids, mask, positions), ref, mask) < 5e-2
    # bfloat16 checkpoints (the dtype of released models) round-trip bit for bit
    save_pretrained(bf16_params, tmp_path)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch_model.dtype == torch.bfloat16
    reloaded = hf_state_dict(from_pretrained(tmp_path, dtype=jnp.bfloat16))
    for key, value in hf_state_dict(bf16_params).items():
        np.testing.assert_array_equal(reloaded[key], value, err_msg=key)
        np.testing.assert_array_equal(
            torch_model.state_dict()[key].float().numpy(), value.astype(np.float32), err_msg=key
        )


def test_hidden_states_times_unembed_is_logits(hf_dirs):
    model = from_pretrained(hf_dirs["qwen2_tied"])
    ids, mask, positions = _batch(seed=8)
    hidden = model.hidden_states(
        jnp.asarray(ids), jnp.asarray(positions), attention_mask=jnp.asarray(mask)
    )
    np.testing.assert_allclose(
        np.asarray(hidden @ model.unembed_kernel()),
        _covjax_logits(model, ids, mask, positions),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        np.asarray(model.unembed_kernel()), np.asarray(model.embed[...]).T
    )


@pytest.mark.parametrize(
    "name, shape",
    [("llama3_gqa4", dict(fsdp=8)), ("llama3_gqa4", dict(fsdp=4, tensor=2)),
     ("qwen3_tied", dict(fsdp=4, tensor=2)), ("qwen2_window4", dict(fsdp=4, tensor=2))],
    ids=["llama3_fsdp8", "llama3_fsdp4_tp2", "qwen3_fsdp4_tp2", "window4_fsdp4_tp2"],
)
def test_sharded_forward_matches_transformers(hf_dirs, name, shape):
    ids, mask, positions = _batch(seed=9, batch=8)
    ref = _torch_logits(hf_dirs[name], ids, mask, positions)
    mesh = make_mesh(**shape)
    model = from_pretrained(hf_dirs[name], mesh=mesh)
    assert len(model.layers.q_proj[...].sharding.device_set) == 8
    forward = nnx.jit(lambda m, i, p, a: m(i, p, attention_mask=a))
    batch = [jax.device_put(jnp.asarray(x), data_sharding(mesh)) for x in (ids, positions, mask)]
    with jax.set_mesh(mesh):
        out = np.asarray(forward(model, *batch))
    assert _rel_err(out, ref, mask) < 1e-5


def test_random_init_runs_and_config_round_trips(tmp_path):
    config = ModelConfig(
        architecture="llama",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_scaling=LLAMA3_SCALING,
        attention_bias=True,
        attention_out_bias=True,
        **SMALL,
    )
    assert ModelConfig.from_hf_config(config.to_hf_config()) == config
    model = Transformer(config, rngs=nnx.Rngs(0))
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.zeros((2, 5), jnp.int32))
    assert logits.shape == (2, 5, VOCAB) and np.isfinite(np.asarray(logits)).all()
    # transformers reads the same config back
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_config()))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(hf, transformers.LlamaConfig)
    assert (hf.num_key_value_heads, hf.head_dim, hf.attention_bias) == (2, 16, True)


def test_bad_inputs_are_named(hf_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)
    src = hf_dirs["qwen2_tied"]
    config = json.loads(open(os.path.join(src, "config.json")).read())

    def folder(name, cfg, tensors=True):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(cfg))
        if tensors:
            os.symlink(os.path.join(src, "model.safetensors"), path / "model.safetensors")
        return path

    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(folder("no_weights", config, tensors=False))
    bad_arch = dict(config, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2.*LlamaForCausalLM.*MistralForCausalLM.*Qwen3For"):
        from_pretrained(folder("bad_arch", bad_arch))
    with pytest.raises(ValueError, match="model.embed_tokens.weight.*shape"):
        from_pretrained(folder("bad_vocab", dict(config, vocab_size=VOCAB + 1)))
    with pytest.raises(ValueError, match="lm_head.weight.*missing"):
        from_pretrained(folder("untied", dict(config, tie_word_embeddings=False)))
    with pytest.raises(ValueError, match="model.layers.1"):
        from_pretrained(folder("one_layer", dict(config, num_hidden_layers=1)))
    with pytest.raises(ValueError, match=r"odd_head_dim.config\.json: ModelConfig.head_dim=15"):
        from_pretrained(folder("odd_head_dim", dict(config, head_dim=15)))
    no_factor = {k: v for k, v in LLAMA3_SCALING.items() if k != "factor"}
    with pytest.raises(ValueError, match=r"llama3.*lacks \['factor'\]"):
        from_pretrained(folder("bad_rope", dict(config, rope_scaling=no_factor)))
    broken = folder("broken_json", config)
    (broken / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"],')
    with pytest.raises(ValueError, match=r"broken_json.config\.json is not valid JSON"):
        from_pretrained(broken)
    not_st = folder("not_safetensors", config, tensors=False)
    (not_st / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"not_safetensors.model\.safetensors is not a"):
        from_pretrained(not_st)
    (not_st / "model.safetensors").write_bytes(b"not a safetensors file")  # 8 bytes: a length
    with pytest.raises(ValueError, match=r"is not a safetensors file: its header length \d+ exc"):
        from_pretrained(not_st)
    weights = open(os.path.join(src, "model.safetensors"), "rb").read()
    header_len = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + header_len])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    cut = folder("truncated", config, tensors=False)  # a copy cut short in the last tensor
    (cut / "model.safetensors").write_bytes(weights[: len(weights) - 4])
    with pytest.raises(ValueError) as error:
        check_pretrained(cut)  # before any tensor is read
    data_size = len(weights) - 4 - 8 - header_len
    assert str(error.value) == (
        f"{cut / 'model.safetensors'} is truncated: tensor {last!r} ends at byte "
        f"{header[last]['data_offsets'][1]} of the data, which holds {data_size} bytes"
    )
    no_map = folder("no_weight_map", config, tensors=False)
    (no_map / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="index.json has no 'weight_map'"):
        from_pretrained(no_map)
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        ModelConfig(
            architecture="qwen2", num_attention_heads=4, num_key_value_heads=3, head_dim=16, **SMALL
        )
    with pytest.raises(ValueError, match="a qwen2 config must have attention_bias=True"):
        ModelConfig(architecture="qwen2", num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, **SMALL)
    with pytest.raises(ValueError, match="llama has one attention_bias flag"):
        ModelConfig(architecture="llama", num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, attention_bias=True, **SMALL)
    with pytest.raises(ValueError, match="eos_token_id must be None or a token id"):
        ModelConfig(architecture="llama", num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, eos_token_id=(2, -1), **SMALL)
    with pytest.raises(ValueError, match="remat='block'"):
        ModelConfig(
            architecture="qwen2",
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            remat="block",
            **SMALL,
        )
    model = from_pretrained(src)
    with pytest.raises(ValueError, match="input_ids must be integer"):
        model(jnp.zeros((1, 4), jnp.float32))


def test_even_padding_of_causal_attention_changes_nothing():
    """The cuDNN path's extra position (odd lengths) gives the unpadded attention's values and
    gradients; checked with XLA's implementation on the CPU, a padding key and a padded row in."""
    from covjax.model.transformer import causal_attention_even

    rng = np.random.default_rng(0)
    b, t, h, d = 2, 7, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for _ in range(3))
    keys_valid = np.ones((b, t), bool)
    keys_valid[1, :2] = False  # left padding of row 1
    mask = jnp.asarray(keys_valid[:, None, None, :] & np.tril(np.ones((t, t), bool)))

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                            implementation="xla")

    def padded(q, k, v):
        return causal_attention_even(q, k, v, mask, implementation="xla")

    out_ref, out = reference(q, k, v), padded(q, k, v)
    rows = jnp.asarray(np.tril(np.ones((t, t), bool)) & keys_valid[:, :, None]).any(-1)
    np.testing.assert_allclose(np.where(rows[..., None, None], out, 0),
                               np.where(rows[..., None, None], out_ref, 0), rtol=1e-6, atol=1e-6)

    def loss(fn):
        return lambda *a: jnp.sum(jnp.where(rows[..., None, None], fn(*a), 0) ** 2)

    g_ref = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(loss(padded), argnums=(0, 1, 2))(q, k, v)
    for a, r in zip(g, g_ref, strict=True):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
