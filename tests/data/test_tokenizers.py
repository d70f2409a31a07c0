"""Tokenizers: the real BERT vocabulary, the synthetic BPE, special tokens, local dirs and offline hub names."""

import json

import pytest

from tests.data.conftest import minilm_vocab
from vlm.data.tokenizers import (
    END_OF_CHUNK,
    IMAGE_TOKEN,
    LOC_TOKENS_ALIAS,
    box_to_loc_string,
    load_tokenizer,
    loc_tokens,
    parse_loc_string,
    synthetic_tokenizer_dir,
)
from vlm.errors import OfflineHubError, VLMConfigError


def test_minilm_gives_the_real_bert_ids():
    vocab = minilm_vocab()
    tok = load_tokenizer("minilm")
    assert len(tok) == len(vocab) == 30522
    expected = [vocab["[CLS]"], vocab["a"], vocab["red"], vocab["circle"], vocab["[SEP]"]]
    assert tok("a red circle")["input_ids"] == expected
    assert tok("A RED Circle")["input_ids"] == expected  # uncased
    assert tok.pad_token_id == vocab["[PAD]"]


@pytest.mark.parametrize("source", ["minilm", "synthetic"])
def test_special_tokens_are_single_ids_and_round_trip(source):
    base = len(load_tokenizer(source))
    tok = load_tokenizer(source, special_tokens=[IMAGE_TOKEN, END_OF_CHUNK, LOC_TOKENS_ALIAS], max_length=77)
    assert len(tok) == base + 2 + 1024 and tok.model_max_length == 77
    ids = set()
    for t in [IMAGE_TOKEN, END_OF_CHUNK, "<loc0000>", "<loc0513>", "<loc1023>"]:
        enc = tok(t, add_special_tokens=False)["input_ids"]
        assert len(enc) == 1 and enc[0] >= base
        assert tok.decode(enc) == t
        ids.add(enc[0])
    assert len(ids) == 5
    text = f"{IMAGE_TOKEN}a red circle<loc0010><loc0020><loc0030><loc0040> circle{END_OF_CHUNK}"
    dec = tok.decode(tok(text, add_special_tokens=False)["input_ids"])
    assert dec.replace(" ", "") == text.replace(" ", "")
    # location tokens survive skip_special_tokens (they are detection output), <image> does not
    kept = tok.decode(tok(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
    assert "<loc0010>" in kept and IMAGE_TOKEN not in kept


def test_synthetic_tokenizer_covers_all_languages_and_is_deterministic(tmp_path, monkeypatch):
    from vlm.data.synthetic import make_pair

    tok = load_tokenizer("synthetic")
    assert {tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token} == {"<pad>", "<s>", "</s>", "<unk>"}
    for i in range(5):
        for cap in make_pair(i, "val")["captions"].values():
            ids = tok(cap)["input_ids"]
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
            assert tok.unk_token_id not in ids
            assert tok.decode(ids, skip_special_tokens=True).strip() == cap
    first = json.loads((synthetic_tokenizer_dir() / "tokenizer.json").read_text())["model"]["vocab"]
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path))  # a fresh training elsewhere gives the same vocabulary
    again = json.loads((synthetic_tokenizer_dir() / "tokenizer.json").read_text())["model"]["vocab"]
    assert first == again


def test_local_directory(tmp_path):
    load_tokenizer("minilm", special_tokens=[IMAGE_TOKEN]).save_pretrained(str(tmp_path / "tok"))
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok(IMAGE_TOKEN, add_special_tokens=False)["input_ids"] == [30522]


def test_hub_name_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineHubError, match="local"):
        load_tokenizer("google/mt5-small")
    with pytest.raises(VLMConfigError, match="tokenizer source"):
        load_tokenizer("")


def test_loc_strings():
    assert len(loc_tokens()) == 1024 and loc_tokens()[7] == "<loc0007>"
    box = [0.1, 0.25, 0.5, 1.0]  # x0, y0, x1, y1
    assert box_to_loc_string(box) == "<loc0256><loc0102><loc1023><loc0512>"  # y0 x0 y1 x1, floor(v * 1024)
    ((parsed, label),) = parse_loc_string(box_to_loc_string(box) + " red circle")
    assert label == "red circle"
    assert all(abs(a - b) <= 1 / 1024 for a, b in zip(parsed, box))
