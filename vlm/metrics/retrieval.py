"""Image-text retrieval recall and zero-shot classification from embeddings."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from vlm.errors import VLMConfigError


class RetrievalRecall(Metric):
    """Recall@k for text->image and image->text retrieval over everything seen (all batches, all ranks).

    ``update(image_emb, text_emb, pair_ids)`` takes one row per (image, caption) pair; rows with equal
    ``pair_ids`` show the same image, which is kept once. Similarity is cosine. A text is retrieved when its
    image ranks in the top k; an image when any of its captions does. Ties count against the query, so a
    collapsed model (all embeddings equal) scores 0, never 1.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024, **kwargs) -> None:
        super().__init__(**kwargs)
        if not ks or any(int(k) < 1 for k in ks):
            raise VLMConfigError(f"RetrievalRecall: ks must be positive integers, got {list(ks)}.")
        self.ks = tuple(int(k) for k in ks)
        self.chunk_size = chunk_size
        self.add_state("image_emb", default=[], dist_reduce_fx="cat")
        self.add_state("text_emb", default=[], dist_reduce_fx="cat")
        self.add_state("pair_ids", default=[], dist_reduce_fx="cat")

    def update(self, image_emb: Tensor, text_emb: Tensor, pair_ids: Tensor) -> None:
        """Add a batch of aligned rows: image ``[B, E]``, text ``[B, E]``, pair ids ``[B]``."""
        if image_emb.dim() != 2 or image_emb.shape != text_emb.shape or pair_ids.shape != image_emb.shape[:1]:
            raise VLMConfigError(
                f"RetrievalRecall.update needs image_emb [B, E], text_emb [B, E] and pair_ids [B], got "
                f"{tuple(image_emb.shape)}, {tuple(text_emb.shape)}, {tuple(pair_ids.shape)}."
            )
        self.image_emb.append(image_emb.detach().float())
        self.text_emb.append(text_emb.detach().float())
        self.pair_ids.append(pair_ids.detach().long())

    def compute(self) -> dict[str, Tensor]:
        """``{"t2i_R@k": ..., "i2t_R@k": ...}`` for every k, as fractions in [0, 1]."""
        if isinstance(self.text_emb, list) and not self.text_emb:
            raise VLMConfigError("RetrievalRecall.compute called before any update: nothing to rank.")
        images, texts = dim_zero_cat(self.image_emb), dim_zero_cat(self.text_emb)
        ids = dim_zero_cat(self.pair_ids)
        images, texts = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
        unique_ids, text_to_image = torch.unique(ids, return_inverse=True)
        # One row per image: the first occurrence of each id.
        order = torch.arange(ids.shape[0], device=ids.device)
        first = torch.full((unique_ids.shape[0],), ids.shape[0], device=ids.device).scatter_reduce(
            0, text_to_image, order, reduce="amin"
        )
        images = images[first]
        n_img, n_txt = images.shape[0], texts.shape[0]

        # t2i: rank of the true image = number of other images scoring at least as high (ties count against).
        t2i_rank = torch.empty(n_txt, dtype=torch.long, device=texts.device)
        for s in range(0, n_txt, self.chunk_size):
            sim = texts[s: s + self.chunk_size] @ images.T
            true = sim.gather(1, text_to_image[s: s + self.chunk_size, None])
            t2i_rank[s: s + self.chunk_size] = (sim >= true).sum(1) - 1
        # i2t: rank of the best-scoring true caption = number of other images' texts scoring at least as high.
        i2t_rank = torch.empty(n_img, dtype=torch.long, device=texts.device)
        for s in range(0, n_img, self.chunk_size):
            sim = images[s: s + self.chunk_size] @ texts.T
            mine = text_to_image[None, :] == torch.arange(s, s + sim.shape[0], device=sim.device)[:, None]
            best_true = sim.masked_fill(~mine, float("-inf")).amax(1, keepdim=True)
            i2t_rank[s: s + self.chunk_size] = ((sim >= best_true) & ~mine).sum(1)
        out = {}
        for k in self.ks:
            out[f"t2i_R@{k}"] = (t2i_rank < k).float().mean()
        for k in self.ks:
            out[f"i2t_R@{k}"] = (i2t_rank < k).float().mean()
        return out


def zero_shot_classifier(
    encode_text: Callable[[list[str]], Tensor], class_names: list[str], templates: list[str | Callable[[str], str]]
) -> Tensor:
    """Class embeddings [C, E]: per class, the mean of its L2-normalised prompt embeddings, re-normalised.

    ``templates`` are format strings with one ``{}`` for the class name (``"a photo of a {}."``) or callables.
    """
    if not class_names or not templates:
        raise VLMConfigError("zero_shot_classifier needs at least one class name and one template.")
    rows = []
    for name in class_names:
        prompts = [t(name) if callable(t) else t.format(name) for t in templates]
        with torch.no_grad():
            emb = F.normalize(encode_text(prompts).float(), dim=-1)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows, 0)


def zero_shot_accuracy(
    image_emb: Tensor, classifier: Tensor, targets: Tensor, ks: Sequence[int] = (1,)
) -> dict[str, Tensor]:
    """Top-k accuracy of cosine-similarity classification: ``{"top1": ..., "top5": ...}``."""
    if image_emb.shape[-1] != classifier.shape[-1]:
        raise VLMConfigError(
            f"zero_shot_accuracy: image embeddings have size {image_emb.shape[-1]}, class embeddings "
            f"{classifier.shape[-1]}; both must come from the same contrastive model."
        )
    logits = F.normalize(image_emb.float(), dim=-1) @ classifier.float().T
    true = logits.gather(1, targets.long().to(logits.device)[:, None])
    rank = (logits >= true).sum(1) - 1  # ties count against the prediction
    return {f"top{k}": (rank < k).float().mean() for k in ks}
