"""A tiny deterministic stand-in for a vision-language model: every objective capability, no real FLAVA.

Each "encoder" is one or two linear maps plus a mean-pooled mixing term (so tokens depend on each other, as
with attention). Every capability memoises its result in the step cache and counts how often it computed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

MASK_ID = 1  # id written over masked text tokens
CLS_ID = 2


class FakeVLM(nn.Module):
    """Capabilities of ``vlm.objectives.base.CAPABILITIES`` on tiny linear towers.

    Args:
        codebook_size: size of the fake image tokenizer (argmax of a fixed projection of each patch), or None.
        drop: capability names to hide (the attribute becomes None, as for a model without it).
    """

    def __init__(
        self,
        codebook_size: int | None = 7,
        vocab_size: int = 13,
        text_hidden: int = 8,
        image_hidden: int = 6,
        multimodal_hidden: int = 10,
        embed_dim: int = 5,
        patch: int = 2,
        image_size: int = 4,
        channels: int = 3,
        max_len: int = 16,
        mask_prob: float = 0.4,
        seed: int = 0,
        drop: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.patch, self.channels = patch, channels
        self.num_patches = (image_size // patch) ** 2
        patch_dim = patch * patch * channels
        self.mask_prob = mask_prob
        self.dims = {
            "text_hidden": text_hidden,
            "image_hidden": image_hidden,
            "multimodal_hidden": multimodal_hidden,
            "vocab_size": vocab_size,
            "codebook_size": codebook_size,
            "patch_dim": patch_dim,
            "layer_norm_eps": 1e-12,
            "hidden_act": "gelu",
        }
        self.token_embed = nn.Embedding(vocab_size, text_hidden)
        self.text_pos = nn.Parameter(torch.zeros(max_len, text_hidden))
        self.text_mix = nn.Linear(text_hidden, text_hidden)
        self.patch_embed = nn.Linear(patch_dim, image_hidden)
        self.image_cls = nn.Parameter(torch.zeros(1, 1, image_hidden))
        self.image_mask_token = nn.Parameter(torch.zeros(image_hidden))
        self.image_mix = nn.Linear(image_hidden, image_hidden)
        self.image_to_mm = nn.Linear(image_hidden, multimodal_hidden)
        self.text_to_mm = nn.Linear(text_hidden, multimodal_hidden)
        self.mm_cls = nn.Parameter(torch.zeros(1, 1, multimodal_hidden))
        self.mm_mix = nn.Linear(multimodal_hidden, multimodal_hidden)
        self.image_proj = nn.Linear(image_hidden, embed_dim)
        self.text_proj = nn.Linear(text_hidden, embed_dim)
        g = torch.Generator().manual_seed(seed)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.register_buffer("codebook", torch.randn(patch_dim, codebook_size or 1, generator=g))
        self.calls: Counter[str] = Counter()
        for name in drop:
            object.__setattr__(self, name, None)

    # ------------------------------------------------------------------ helpers
    def _memo(self, cache, key, compute):
        def counted():
            self.calls[key if isinstance(key, str) else key[0]] += 1
            return compute()

        return cache.get_or(key, counted)

    # ------------------------------------------------------------------ masking
    def text_masking(self, batch: Mapping[str, Any], cache) -> tuple[Tensor, Tensor]:
        """Precomputed ``input_ids_masked``/``mlm_labels`` if the batch has them, else random masking."""

        def compute():
            if "input_ids_masked" in batch and "mlm_labels" in batch:
                return batch["input_ids_masked"], batch["mlm_labels"]
            ids = batch["input_ids"]
            real = batch.get("attention_mask", torch.ones_like(ids)).bool() & ids.ne(CLS_ID)
            draw = torch.rand(ids.shape, generator=getattr(cache, "generator", None)) < self.mask_prob
            mask = draw & real
            return ids.masked_fill(mask, MASK_ID), ids.masked_fill(~mask, -100)

        return self._memo(cache, ("text_masking",), compute)

    def image_masking(self, batch: Mapping[str, Any], cache) -> Tensor:
        """Precomputed ``bool_masked_pos`` if given, else random."""

        def compute():
            if "bool_masked_pos" in batch:
                return batch["bool_masked_pos"].bool()
            b = batch["pixel_values"].shape[0]
            return torch.rand(b, self.num_patches, generator=getattr(cache, "generator", None)) < self.mask_prob

        return self._memo(cache, ("image_masking",), compute)

    # ------------------------------------------------------------------ encoders
    def patch_pixels(self, batch: Mapping[str, Any], cache) -> Tensor:
        """``[B,N,P*P*C]`` patches in (row, col, channel) order."""

        def compute():
            x = batch["pixel_values"]
            b, c, h, w = x.shape
            p = self.patch
            x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
            return x.reshape(b, (h // p) * (w // p), p * p * c)

        return self._memo(cache, ("patch_pixels",), compute)

    def image_targets(self, batch: Mapping[str, Any], cache) -> Tensor | None:
        """Fake tokenizer ids (argmax of a fixed projection of each patch), or None without a codebook."""
        if self.dims["codebook_size"] is None:
            return None

        def compute():
            with torch.no_grad():
                return (self.patch_pixels(batch, cache) @ self.codebook).argmax(-1)

        return self._memo(cache, ("image_targets",), compute)

    def text_hidden(self, batch: Mapping[str, Any], cache, masked: bool) -> Tensor:
        """``[B,L,Dt]``."""

        def compute():
            ids = self.text_masking(batch, cache)[0] if masked else batch["input_ids"]
            x = self.token_embed(ids) + self.text_pos[: ids.shape[1]]
            x = self.text_mix(x)
            return torch.tanh(x + x.mean(1, keepdim=True))

        return self._memo(cache, ("text_hidden", masked), compute)

    def image_hidden(self, batch: Mapping[str, Any], cache, masked: bool) -> Tensor:
        """``[B,1+N,Di]``, CLS first; masked patches are replaced by a learned token before mixing."""

        def compute():
            x = self.patch_embed(self.patch_pixels(batch, cache))
            if masked:
                x = torch.where(self.image_masking(batch, cache)[..., None], self.image_mask_token, x)
            x = torch.cat([self.image_cls.expand(x.shape[0], -1, -1), x], 1)
            x = self.image_mix(x)
            return torch.tanh(x + x.mean(1, keepdim=True))

        return self._memo(cache, ("image_hidden", masked), compute)

    # ------------------------------------------------------------------ fusion
    def fuse(self, batch: Mapping[str, Any], cache, image_index: Tensor, text_index: Tensor, masked: bool) -> Tensor:
        """Pairings (image row i, text row j) of this batch, fused from the cached encoder outputs."""
        ids = batch["input_ids"]
        attn = batch.get("attention_mask", torch.ones_like(ids))
        return self._fuse(self.image_hidden(batch, cache, masked)[image_index],
                          self.text_hidden(batch, cache, masked)[text_index], attn[text_index])

    def _fuse(self, image_hidden: Tensor, text_hidden: Tensor, text_attention_mask: Tensor) -> Tensor:
        """``[B, 1 + (1+N) + L, Dm]``: multimodal CLS, image part (CLS + patches), text part."""
        self.calls["fuse"] += 1
        img = self.image_to_mm(image_hidden)
        txt = self.text_to_mm(text_hidden)
        m = text_attention_mask.to(txt.dtype)[..., None]
        pooled = img.mean(1) + (txt * m).sum(1) / m.sum(1).clamp(min=1)
        x = torch.cat([self.mm_cls.expand(img.shape[0], -1, -1), img, txt], 1)
        return torch.tanh(self.mm_mix(x) + pooled[:, None])

    def multimodal_hidden(self, batch: Mapping[str, Any], cache, masked: bool) -> Tensor:
        """Fused output of the (masked or unmasked) encoders of each row's own pair."""

        def compute():
            ids = batch["input_ids"]
            attn = batch.get("attention_mask", torch.ones_like(ids))
            return self._fuse(self.image_hidden(batch, cache, masked), self.text_hidden(batch, cache, masked), attn)

        return self._memo(cache, ("multimodal_hidden", masked), compute)

    def split_multimodal(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Image part (image CLS + N patches) and text part of a fused sequence."""
        n = 1 + self.num_patches
        return hidden[:, 1 : 1 + n], hidden[:, 1 + n :]

    def positive_rows(self, batch: Mapping[str, Any], cache) -> Tensor:
        """``itm_labels != 0`` (all rows without labels); no "none positive" fallback: objectives own that."""
        labels = batch.get("itm_labels")
        if labels is None:
            return torch.ones(batch["input_ids"].shape[0], dtype=torch.bool)
        return labels.reshape(-1).ne(0)

    def contrastive_embeddings(self, batch: Mapping[str, Any], cache) -> tuple[Tensor, Tensor]:
        """L2-normalised projections of the unmasked CLS states."""

        def compute():
            img = F.normalize(self.image_proj(self.image_hidden(batch, cache, False)[:, 0]), dim=-1)
            txt = F.normalize(self.text_proj(self.text_hidden(batch, cache, False)[:, 0]), dim=-1)
            return img, txt

        return self._memo(cache, ("contrastive_embeddings",), compute)


def make_batch(
    batch_size: int = 4,
    length: int = 6,
    model: FakeVLM | None = None,
    seed: int = 0,
    itm_labels: list[int] | None = None,
    precomputed: bool = True,
    image_size: int = 4,
) -> dict[str, Any]:
    """A random pair batch; ``precomputed`` adds fixed text/image masks (every row has masked tokens/patches)."""
    model = model or FakeVLM()
    g = torch.Generator().manual_seed(seed)
    vocab = model.dims["vocab_size"]
    ids = torch.randint(3, vocab, (batch_size, length), generator=g)
    ids[:, 0] = CLS_ID
    attn = torch.ones(batch_size, length, dtype=torch.long)
    attn[-1, -2:] = 0  # one padded row, so attention masks matter
    batch: dict[str, Any] = {
        "stream": "pairs",
        "pixel_values": torch.randn(batch_size, model.channels, image_size, image_size, generator=g),
        "input_ids": ids,
        "attention_mask": attn,
    }
    if itm_labels is not None:
        batch["itm_labels"] = torch.tensor(itm_labels, dtype=torch.long)
    if precomputed:
        text_mask = (torch.rand(batch_size, length, generator=g) < 0.4) & attn.bool()
        text_mask[:, 0] = False
        text_mask[:, 1] = True
        batch["input_ids_masked"] = ids.masked_fill(text_mask, MASK_ID)
        batch["mlm_labels"] = ids.masked_fill(~text_mask, -100)
        patch_mask = torch.rand(batch_size, model.num_patches, generator=g) < 0.5
        patch_mask[:, 0] = True
        patch_mask[:, -1] = False
        batch["bool_masked_pos"] = patch_mask
    return batch
