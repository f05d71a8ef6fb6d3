"""Model shapes shared by the benchmarks (covjax.model.ModelConfig keywords)."""

# Qwen2.5-0.5B (its Hugging Face config.json): the shape the GPU benchmarks and their peers use.
QWEN2_5_0_5B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    head_dim=64,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
)
