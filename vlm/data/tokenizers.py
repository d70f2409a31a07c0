"""Tokenizers: the real BERT WordPiece vocabulary ('minilm'), a small BPE trained on the synthetic world, a local
directory or a hub name; plus the special tokens Flamingo (``<image>``, ``<|endofchunk|>``) and PaLI
(``<loc0000>`` ... ``<loc1023>``) add.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vlm.errors import VLMConfigError
from vlm.hub import call_hub, is_local, minilm_path

IMAGE_TOKEN = "<image>"
END_OF_CHUNK = "<|endofchunk|>"
NUM_LOC_BINS = 1024
#: in a ``special_tokens`` list (e.g. from YAML) this entry stands for all 1024 location tokens
LOC_TOKENS_ALIAS = "<loc*>"
FLAMINGO_SPECIAL_TOKENS: tuple[str, ...] = (IMAGE_TOKEN, END_OF_CHUNK)
SYNTHETIC_VOCAB_SIZE = 2048
_SYNTH_TOKENIZER_VERSION = 2
_LOC_RE = re.compile(r"<loc(\d{4})>")


def loc_token(index: int) -> str:
    """The PaLI location token for bin ``index`` (0..1023)."""
    if not 0 <= index < NUM_LOC_BINS:
        raise ValueError(f"location bin must be in [0, {NUM_LOC_BINS - 1}], got {index}")
    return f"<loc{index:04d}>"


def loc_tokens() -> list[str]:
    """All 1024 PaLI location tokens ``<loc0000>`` ... ``<loc1023>``."""
    return [f"<loc{i:04d}>" for i in range(NUM_LOC_BINS)]


def coord_to_bin(value: float) -> int:
    """Quantise a normalised coordinate in [0, 1] to one of 1024 bins (1.0 falls in the last bin)."""
    return min(NUM_LOC_BINS - 1, max(0, int(value * NUM_LOC_BINS)))


def box_to_loc_string(box_xyxy) -> str:
    """A normalised ``[x0, y0, x1, y1]`` box as PaLI writes it: ``<loc y0><loc x0><loc y1><loc x1>``."""
    x0, y0, x1, y1 = box_xyxy
    return "".join(loc_token(coord_to_bin(v)) for v in (y0, x0, y1, x1))


def parse_loc_string(text: str) -> list[tuple[list[float], str]]:
    """Read ``'<loc..>x4 label ; ...'`` back into ``(box_xyxy at bin centres, label)`` pairs; ignores malformed parts."""
    out = []
    for part in text.split(";"):
        bins = [int(m) for m in _LOC_RE.findall(part)]
        if len(bins) < 4:
            continue
        y0, x0, y1, x1 = ((b + 0.5) / NUM_LOC_BINS for b in bins[:4])
        out.append(([x0, y0, x1, y1], _LOC_RE.sub("", part).strip()))
    return out


def _expand_special(tokens) -> list[str]:
    out: list[str] = []
    for t in tokens or []:
        out.extend(loc_tokens() if t == LOC_TOKENS_ALIAS else [t])
    return list(dict.fromkeys(out))  # keep order, drop repeats


def add_special_tokens(tokenizer: PreTrainedTokenizerFast, tokens) -> int:
    """Add tokens that must stay whole; location tokens are added as plain tokens so decoding keeps them.

    Returns how many ids were new. Models must size their embeddings to ``len(tokenizer)`` afterwards.
    """
    tokens = _expand_special(tokens)
    locs = set(loc_tokens())
    special = [t for t in tokens if t not in locs]
    plain = [t for t in tokens if t in locs]
    # location tokens are the *output* of detection: skip_special_tokens=True must not erase them
    n = tokenizer.add_tokens(special, special_tokens=True) if special else 0
    n += tokenizer.add_tokens(plain, special_tokens=False) if plain else 0
    return n


def synthetic_corpus(num_scenes: int = 1000, seed: int = 0) -> list[str]:
    """Every kind of text of the synthetic world (captions and VQA in all languages, corpus, documents)."""
    from vlm.data import synthetic as syn

    texts: list[str] = []
    for i in range(num_scenes):
        objs = syn.make_scene(seed, "train", "pairs", i)
        ann = syn.annotate(objs, [[0.0, 0.0, 1.0, 1.0]] * len(objs), syn._rng(seed, "train", "tok", i))
        texts += list(ann["captions"].values())
        texts += [q["question"] + " " + q["answer"] for q in ann["vqa"] + ann["object_qa"]]
        texts.append(ann["ocr_text"] + " " + " ".join(ann["box_labels"]))
        texts.append(syn.make_text(i, "train", seed, lang="all")["text"])
    texts += list(syn._FACTS) + syn.class_prompts("en")
    # the prompt words of the PaLI task templates, so prompts tokenize compactly
    texts += ["Generate the alt_text in EN FR DE ES", "Answer in EN:", "Generate a question in EN for",
              "Generate the OCR text", "detect " + " ; ".join(syn.CLASS_NAMES)]  # fmt: skip
    # the world repeats itself (same questions, same facts): unique lines train as well, in a fraction of the time
    return list(dict.fromkeys(texts))


def _train_synthetic(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # byte-level keeps every accent (é, ü, ñ, ¿) representable, so nothing maps to <unk>
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(), trainer=trainer)
    # "<s> text </s>": a first token a text encoder can pool, an end a decoder learns to emit
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=512,
    )  # fmt: skip
    from vlm.data.synthetic import publish_dir

    def write(tmp: Path) -> None:
        fast.save_pretrained(str(tmp))
        (tmp / "vlm_synthetic.json").write_text(json.dumps({"version": _SYNTH_TOKENIZER_VERSION}))

    publish_dir(out, write)


def synthetic_tokenizer_dir(vocab_size: int = SYNTHETIC_VOCAB_SIZE) -> Path:
    """Directory of the BPE tokenizer trained on the synthetic world; trained once (about a second), then cached."""
    from vlm.data.synthetic import VERSION, cache_dir

    out = cache_dir() / "tokenizers" / f"synthetic-v{_SYNTH_TOKENIZER_VERSION}-world{VERSION}-bpe{vocab_size}"
    if not (out / "vlm_synthetic.json").exists():
        _train_synthetic(out, vocab_size)
    return out


def load_tokenizer(
    source: str, *, special_tokens: list[str] | None = None, max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from 'minilm', 'synthetic', a local directory or a hub name; add ``special_tokens``.

    ``special_tokens`` may contain ``LOC_TOKENS_ALIAS`` ('<loc*>') for the 1024 location tokens.
    """
    if not isinstance(source, str) or not source:
        raise VLMConfigError(
            f"tokenizer source must be a non-empty string ('minilm', 'synthetic', a local dir or a hub name), got {source!r}"
        )
    if source == "minilm":
        tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    elif source == "synthetic":
        tok = AutoTokenizer.from_pretrained(str(synthetic_tokenizer_dir()))
    elif is_local(source):
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(source), trust_remote_code=False)
    else:
        tok = call_hub(AutoTokenizer.from_pretrained, source, "tokenizer", trust_remote_code=False)
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise VLMConfigError(
            f"tokenizer {source!r} loaded as {type(tok).__name__}, which is not a fast tokenizer; "
            "give a directory with a tokenizer.json (or convert it with `save_pretrained` from a fast tokenizer)."
        )
    if tok.pad_token is None:
        # causal LMs (GPT-2 style) ship without a pad token; padding is masked anyway, so reuse the end token
        if tok.eos_token is None:
            raise VLMConfigError(
                f"tokenizer {source!r} has neither a pad nor an eos token; add a pad token to it."
            )
        tok.pad_token = tok.eos_token
    if special_tokens:
        add_special_tokens(tok, special_tokens)
    if max_length is not None:
        tok.model_max_length = int(max_length)
    return tok
