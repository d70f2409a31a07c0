"""Tiny configs of the decoder families the LM factory supports (shared by the LM tests)."""

VOCAB = 96

TINY = {
    "gpt2": dict(model_type="gpt2", n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB,
                 bos_token_id=0, eos_token_id=0),
    "opt": dict(model_type="opt", num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=32, vocab_size=VOCAB, pad_token_id=0,
                bos_token_id=0, eos_token_id=0),
    "llama": dict(model_type="llama", num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, vocab_size=VOCAB,
                  bos_token_id=0, eos_token_id=0),
    "qwen2": dict(model_type="qwen2", num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, vocab_size=VOCAB,
                  bos_token_id=0, eos_token_id=0),
}
LAYERS_ATTR = {"gpt2": "transformer.h", "opt": "model.decoder.layers", "llama": "model.layers", "qwen2": "model.layers"}
T5 = dict(model_type="t5", d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
          vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
