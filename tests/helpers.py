"""Offline builders shared by the tests: tiny random transformers models, a word-level chat
tokenizer, jsonl files, the recipes of configs/. Everything is made in-process or under tmp_path;
nothing is downloaded. torch, transformers and tokenizers are imported where used, so that
importing this module for TINY_SHAPE costs nothing."""

import functools
import json
import pathlib
import runpy
import types

REPO = pathlib.Path(__file__).resolve().parent.parent

# The shape of the tiny models (2 layers, width 64, GQA 4 query / 2 KV heads of 16 dims); tests
# add the vocabulary and whatever their family varies.
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
HF_CLASSES = {  # family -> (transformers config class, causal-LM class)
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


@functools.cache
def recipes() -> types.SimpleNamespace:
    """configs/recipes.py (toy_config, paper_recipe, ...), run by path as the config files run
    it: configs/ is not a package."""
    return types.SimpleNamespace(**runpy.run_path(str(REPO / "configs" / "recipes.py")))


def load_config(name: str, arg: str | None = None):
    """configs/<name>.py's get_config(arg), loaded by path as ml_collections' config flag does."""
    module = types.SimpleNamespace(**runpy.run_path(str(REPO / "configs" / f"{name}.py")))
    return module.get_config() if arg is None else module.get_config(arg)


def cli_runner(main, program: str):
    """run(*args) -> the message an absl entry point's `main` exits with, its flags parsed in
    this process as app.run parses them (covjax.cli.parse_flags), each call from the defaults."""
    import pytest
    from absl import flags

    from covjax import cli

    def run(*args: str):
        flags.FLAGS.unparse_flags()
        with pytest.raises(SystemExit) as stopped:
            main(cli.parse_flags([program, *args]))
        return stopped.value.code

    return run


def assert_one_fatal_line(message, expected: list[str]) -> None:
    """`message` is one "FATAL Flags parsing error: ..." line holding every text of `expected`."""
    assert isinstance(message, str) and message.startswith("FATAL Flags parsing error: "), message
    assert "\n" not in message
    for text in expected:
        assert text in message, message


def tiny_hf_model(family: str, seed: int, **config):
    """A transformers model of `family` with random weights drawn after torch.manual_seed(seed),
    in eval mode; `config` holds the config keywords."""
    import torch
    import transformers

    config_cls, model_cls = (getattr(transformers, name) for name in HF_CLASSES[family])
    torch.manual_seed(seed)
    return model_cls(config_cls(**config)).eval()


SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(words):
    """A word-level tokenizer built offline over `words`, with a ChatML-like template.

    Returns (transformers tokenizer, the raw `tokenizers.Tokenizer` used as the reference).
    """
    import tokenizers
    import transformers

    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIALS + list(words)))}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens(SPECIALS)
    raw.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=False)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok, raw


def chatml(messages):
    """The template rendered by hand (the reference for apply_chat_template)."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def write_jsonl(path, rows):
    """Writes `rows` as JSON lines to `path` and returns the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ragged_update_batch(model, *, rows: int, prompt_len: int, response_len: int, lengths,
                        seed: int) -> dict:
    """A train-step mini-batch of random sequences with ragged responses of `lengths`:
    the policy's own log-probs plus N(0, 0.3) noise as old_logp (off-policy), per-row N(0, 1.5)
    advantages, in the layout covjax.train_step reads."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    B, P, R = rows, prompt_len, response_len
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, model.config.vocab_size, (B, P + R)).astype(np.int32)
    mask = np.arange(R)[None, :] < np.asarray(lengths)[:, None]
    adv = rng.normal(0, 1.5, B).astype(np.float32)
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tokens[:, :-1])))[:, P - 1 :]
    logp = np.take_along_axis(
        np.asarray(jax.nn.log_softmax(logits, -1)), tokens[:, P:, None], -1
    )[..., 0]
    return {
        "input_ids": tokens[:, :-1],
        "positions": np.broadcast_to(np.arange(P + R - 1, dtype=np.int32), (B, P + R - 1)).copy(),
        "attention_mask": np.ones((B, P + R - 1), bool),
        "targets": tokens[:, P:],
        "mask": mask,
        "advantages": np.where(mask, adv[:, None], 0.0).astype(np.float32),
        "old_logp": (logp + rng.normal(0, 0.3, logp.shape)).astype(np.float32),
    }


def minibatch_selection(params, batch, rng, *, graphdef, rest, cfg):
    """The reference selection pre-pass in one program, every row computed to all R columns
    (covjax.train_step.response_logprobs, no micro-batches): the policy's log-probs [B, R] and
    the tokens select_tokens chooses over the whole mini-batch [B, R]."""
    from covjax import train_step

    logp, _ = train_step.response_logprobs(graphdef, params, rest, batch, cfg)
    return logp, train_step.select_given_logp(logp, batch, rng, cfg)


def fake_object_store(monkeypatch) -> str:
    """gs:// in memory for the test: etils.epath's gs:// backend (fsspec) on an fsspec memory
    file system that, like gcsfs, opens mode "a" as "w" (an object store cannot append). Returns
    the root URL, "gs://bucket". Only etils.epath is faked: orbax's array data goes through
    tensorstore, which would go to the network."""
    from etils.epath import backend
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs",)
        store, pseudo_dirs = {}, [""]  # its own, not MemoryFileSystem's process-wide store

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(str(path).removeprefix("gs://"))

        def _open(self, path, mode="rb", **kwargs):
            return super()._open(path, mode.replace("a", "w"), **kwargs)

    fs = FakeGCS()
    monkeypatch.setattr(type(backend.fsspec_backend), "fs", lambda self, path: fs)
    return "gs://bucket"
