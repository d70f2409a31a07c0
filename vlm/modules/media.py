"""Which image each text token sees: media indices from ``<image>`` tokens and the text-to-latent mask."""

from __future__ import annotations

import torch
from torch import Tensor

from vlm.errors import VLMConfigError


def media_index_from_ids(input_ids: Tensor, image_token_id: int) -> Tensor:
    """0-based index of the last ``<image>`` token at or before each position (-1 before the first one).

    ``input_ids [..., T]`` -> LongTensor of the same shape: the running count of image tokens minus one,
    so the ``<image>`` token itself already belongs to its image.
    """
    return (input_ids == image_token_id).long().cumsum(dim=-1) - 1


def media_attention_mask(media_index: Tensor, num_media: int, latents: int, only_immediate: bool) -> Tensor:
    """Boolean mask ``[B, 1, T, num_media * latents]``, True where a text token may attend to a media latent.

    ``media_index`` is ``[B, T]`` (or ``[B, 1]`` / ``[B]``, one index for every token, giving ``T = 1`` that
    broadcasts). Keys are the media's latents laid out media-major (key ``j`` belongs to media
    ``j // latents``). ``only_immediate``: a token sees only the latents of media ``media_index``; otherwise
    those of every media ``<= media_index``. A token with index -1 sees nothing (an all-False row).
    """
    if media_index.dim() == 1:
        media_index = media_index[:, None]
    if media_index.dim() != 2:
        raise VLMConfigError(f"media_index must be [B, T], [B, 1] or [B], got {tuple(media_index.shape)}.")
    key_media = torch.arange(num_media, device=media_index.device).repeat_interleave(latents)
    idx = media_index.long()[:, None, :, None]
    return key_media == idx if only_immediate else key_media <= idx
