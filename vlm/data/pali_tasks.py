"""PaLI's image-less task: T5 span corruption on unpaired text (the paper's text-only mixture component).

:class:`SpanCorruptionTransform` turns a text sample (e.g. :class:`~vlm.data.synthetic.SyntheticText`) into
encoder ``input_ids`` with each dropped span replaced by a sentinel ``<extra_id_k>`` and decoder ``labels``
``<extra_id_0> span_0 <extra_id_1> span_1 ... </s>`` (:func:`vlm.objectives.captioning.span_corruption`). The
batch has no ``pixel_values``: PaLI encodes the corrupted text alone, without image tokens.

The tokenizer gets the 1024 location tokens first and the 100 sentinels after them, as :class:`~vlm.models.pali.PaLICore`
adds them, so the ids agree with the model and with :class:`~vlm.data.transforms.PrefixLMTransform` streams.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch

from vlm.data.tokenizers import LOC_TOKENS_ALIAS, add_special_tokens, load_tokenizer
from vlm.data.transforms import _field_text, _ids_fields, _Tokenized, skips_bad_samples
from vlm.errors import VLMConfigError
from vlm.objectives.captioning import span_corruption

NUM_SENTINELS = 100
#: T5's sentinel tokens, in order: span k of a corrupted text is replaced by ``SENTINEL_TOKENS[k]``
SENTINEL_TOKENS: tuple[str, ...] = tuple(f"<extra_id_{i}>" for i in range(NUM_SENTINELS))


class SpanCorruptionTransform(_Tokenized):
    """Text sample -> ``input_ids``/``attention_mask`` (corrupted text) and ``labels``/``decoder_attention_mask``
    (the dropped spans after their sentinels), padded to ``max_length`` / ``target_max_length``; no image.

    Args:
        noise_density, mean_span_length: T5's defaults (15% of the tokens, spans of 3 on average).
        train: draw the spans at random (seeded per worker by the DataLoader); otherwise the spans of a sample
            are fixed by its key, so evaluation is deterministic.
    """

    extra_special_tokens = (LOC_TOKENS_ALIAS,)

    def __init__(
        self,
        tokenizer: str = "synthetic",
        max_length: int = 32,
        target_max_length: int = 16,
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
        text_field: str = "text",
        lang: str = "en",
        train: bool = False,
        special_tokens: Sequence[str] | None = None,
    ) -> None:
        super().__init__(tokenizer, special_tokens)
        if not 0.0 < noise_density < 1.0 or mean_span_length < 1.0 or max_length < 4 or target_max_length < 3:
            raise VLMConfigError(
                f"SpanCorruptionTransform needs 0 < noise_density < 1, mean_span_length >= 1, max_length >= 4 and "
                f"target_max_length >= 3; got {noise_density}, {mean_span_length}, {max_length}, {target_max_length}."
            )
        self.max_length, self.target_max_length = int(max_length), int(target_max_length)
        self.noise_density, self.mean_span_length = float(noise_density), float(mean_span_length)
        self.text_field, self.lang, self.train = text_field, lang, bool(train)

    @property
    def tokenizer(self):
        """The loaded tokenizer: the location tokens, then the sentinels (so both number as in the model)."""
        if self._tok is None:
            tok = load_tokenizer(self.tokenizer_source, special_tokens=self.special_tokens or None)
            add_special_tokens(tok, list(SENTINEL_TOKENS))
            self._tok = tok
        return self._tok

    def _generator(self, sample: dict[str, Any], text: str) -> torch.Generator:
        g = torch.Generator()
        if self.train:
            g.manual_seed(int(torch.randint(2**62, ())))
        else:
            g.manual_seed(zlib.crc32(str(sample.get("key", text)).encode()))
        return g

    @skips_bad_samples
    def __call__(self, sample: dict[str, Any] | None) -> dict[str, Any] | None:
        if sample is None:
            return None
        text = _field_text(sample, self.lang, self.text_field)
        tok = self.tokenizer
        pad_id, eos_id = tok.pad_token_id, tok.eos_token_id
        ids = tok(text, add_special_tokens=False)["input_ids"][: self.max_length - 1]
        if len(ids) < 2:
            ids = ids * 2 if ids else [tok.unk_token_id, tok.unk_token_id]
        sentinel_ids = tok.convert_tokens_to_ids(list(SENTINEL_TOKENS))
        inputs, targets = span_corruption(
            torch.tensor([ids + [eos_id]]), noise_density=self.noise_density, mean_span_length=self.mean_span_length,
            sentinel_ids=sentinel_ids, eos_id=eos_id, pad_id=pad_id, generator=self._generator(sample, text))
        enc = inputs[0][inputs[0] != pad_id].tolist()[: self.max_length]
        dec = targets[0][targets[0] != pad_id].tolist()
        if len(dec) > self.target_max_length:  # keep whole spans up to the limit, then the end token
            dec = dec[: self.target_max_length - 1] + [eos_id]
        pe, pd = self.max_length - len(enc), self.target_max_length - len(dec)
        out: dict[str, Any] = {
            "input_ids": torch.tensor(enc + [pad_id] * pe, dtype=torch.long),
            "attention_mask": torch.tensor([1] * len(enc) + [0] * pe, dtype=torch.long),
            "labels": torch.tensor(dec + [-100] * pd, dtype=torch.long),
            "decoder_attention_mask": torch.tensor([1] * len(dec) + [0] * pd, dtype=torch.long),
            "text": tok.decode(enc, skip_special_tokens=False),
            "target_text": tok.decode(dec, skip_special_tokens=False),
        }
        _ids_fields(sample, out)
        return self._finish(sample, out)


__all__ = ["NUM_SENTINELS", "SENTINEL_TOKENS", "SpanCorruptionTransform"]
