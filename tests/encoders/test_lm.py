import pytest
import torch
from torch import nn

from tests.encoders.lm_configs import LAYERS_ATTR, T5, TINY, VOCAB
from vlm.encoders.lm import LMConfig, base_vocab_size, build_lm, check_tokenizer, decoder_layers, hidden_size
from vlm.errors import OfflineHubError, VLMConfigError


def _attr(model, dotted):
    for part in dotted.split("."):
        model = getattr(model, part)
    return model


@pytest.mark.parametrize("family", sorted(TINY))
def test_builds_offline_and_finds_blocks(family):
    model = build_lm({"config": TINY[family]})
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == 2
    assert layers is _attr(model, LAYERS_ATTR[family])
    assert hidden_size(model) == 32 and base_vocab_size(model) == VOCAB
    assert model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.randint(0, VOCAB, (2, 6))
    assert model(input_ids=ids).logits.shape == (2, 6, VOCAB)


def test_random_init_follows_the_torch_seed():
    torch.manual_seed(3)
    a = build_lm({"config": TINY["llama"]})
    torch.manual_seed(3)
    b = build_lm({"config": TINY["llama"]})
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_save_pretrained_round_trip(family, tmp_path):
    model = build_lm(LMConfig(config=TINY[family])).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    with torch.no_grad():
        loaded = build_lm(LMConfig(pretrained=str(tmp_path))).eval()
        ids = torch.randint(0, VOCAB, (2, 7))
        want = model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert type(loaded) is type(model)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    fresh = build_lm(LMConfig(config=TINY[family])).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(input_ids=ids).logits, want)


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineHubError, match="some-org/tiny-lm-that-is-not-here"):
        build_lm({"pretrained": "some-org/tiny-lm-that-is-not-here"})


def test_t5_builds_as_seq2seq_and_gives_decoder_blocks():
    model = build_lm({"config": T5, "kind": "seq2seq"})
    layers = decoder_layers(model)
    assert layers is model.decoder.block and len(layers) == 3  # not the encoder's 2 blocks
    assert hidden_size(model) == 32
    ids = torch.randint(2, VOCAB, (2, 5))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 5, VOCAB) and torch.isfinite(out.loss)


def test_wrong_kind_says_which_kind_to_set():
    with pytest.raises(VLMConfigError, match="kind: seq2seq"):
        build_lm({"config": T5})


def test_unknown_keys_and_sources():
    with pytest.raises(VLMConfigError, match=r"Unknown key\(s\) \['layers'\].*known keys"):
        LMConfig.from_any({"config": TINY["gpt2"], "layers": 2})
    with pytest.raises(VLMConfigError, match="neither is set"):
        LMConfig.from_any(None)
    with pytest.raises(VLMConfigError, match="both are set"):
        build_lm({"config": TINY["gpt2"], "pretrained": "gpt2"})
    with pytest.raises(VLMConfigError, match="model_type"):
        build_lm({"config": {"n_layer": 2}})
    with pytest.raises(VLMConfigError, match="lm.kind"):
        LMConfig.from_any({"config": TINY["gpt2"], "kind": "mlm"})
    cfg = LMConfig.from_any({"config": TINY["gpt2"], "gradient_checkpointing": "true", "dtype": "bf16"})
    assert cfg.gradient_checkpointing is True and cfg.torch_dtype() is torch.bfloat16


def test_vocab_size_from_tokenizer_when_absent():
    cfg = {k: v for k, v in TINY["llama"].items() if k != "vocab_size"}
    tokenizer = ["tok"] * 77  # anything with len()
    assert base_vocab_size(build_lm({"config": cfg}, tokenizer=tokenizer)) == 77
    assert base_vocab_size(build_lm({"config": cfg}, vocab_size=50)) == 50
    # an explicit config value wins; a larger tokenizer is then the clear error
    with pytest.raises(VLMConfigError, match=f"200 tokens.*{VOCAB} rows"):
        build_lm({"config": TINY["llama"]}, vocab_size=200)


def test_check_tokenizer():
    from vlm.data.tokenizers import FLAMINGO_SPECIAL_TOKENS, load_tokenizer

    tok = load_tokenizer("synthetic", special_tokens=list(FLAMINGO_SPECIAL_TOKENS))
    base = tok.vocab_size
    model = build_lm({"config": {**TINY["gpt2"], "vocab_size": base}})
    with pytest.raises(VLMConfigError) as err:
        check_tokenizer(model, tok)
    msg = str(err.value)
    assert f"{base + 2} tokens" in msg and "2 of them added tokens" in msg and f"{base} rows" in msg
    assert "vocab_size" in msg
    check_tokenizer(model, tok, extra_rows=2)  # the added tokens get rows elsewhere
    no_vocab = {k: v for k, v in TINY["gpt2"].items() if k != "vocab_size"}
    check_tokenizer(build_lm({"config": no_vocab}, tokenizer=tok), tok)


def test_gradient_checkpointing_flag():
    model = build_lm({"config": TINY["opt"], "gradient_checkpointing": True})
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))
    model.train()
    ids = torch.randint(0, VOCAB, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.get_input_embeddings().weight.grad is not None
