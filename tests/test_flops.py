"""The analytic FLOP counts behind MFU (``flops_per_sample``) against torch's FlopCounterMode on a real step.

FlopCounterMode counts the matrix products that actually run in a training step's forward and backward (frozen
parts without autograd count their forward only; frozen parts gradients pass through count no weight
gradients), so it is an independent measurement of what the analytic formulas model. Attention runs on the
math backend here, as plain matrix products the counter sees.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.models.test_flamingo import CORE, LMS, VISION
from vlm.models.flamingo import Flamingo
from vlm.models.pali import PaLI


def measured(model, batch) -> float:
    model.train()
    # the math backend: attention as plain matrix products, which the counter sees (fused CPU kernels it does not)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        loss, _ = model.compute_losses(batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def pali_batch(model, b=3, prompt=12, target=7, image=True):
    g = torch.Generator().manual_seed(0)
    vocab = int(model.core.vocab_size)
    batch = {"stream": "vqa" if image else "text",
             "input_ids": torch.randint(3, vocab, (b, prompt), generator=g),
             "attention_mask": torch.ones(b, prompt, dtype=torch.long),
             "labels": torch.randint(3, vocab, (b, target), generator=g)}
    if image:
        batch["pixel_values"] = torch.randn(b, 3, 64, 64, generator=g)
    return batch


@pytest.mark.parametrize("freeze_vision", [True, False])
def test_pali_flops_match_the_counted_step(freeze_vision):
    torch.manual_seed(0)
    model = PaLI(size="tiny", freeze_vision=freeze_vision)
    batch = pali_batch(model)
    ours = model.flops_per_sample(batch) * 3
    assert ours == pytest.approx(measured(model, batch), rel=0.01)


def test_pali_text_only_flops_match_the_counted_step():
    torch.manual_seed(0)
    model = PaLI(size="tiny")
    batch = pali_batch(model, image=False)
    batch["stream"] = "text_span"
    assert model.flops_per_sample(batch) * 3 == pytest.approx(measured(model, batch), rel=0.01)


@pytest.mark.parametrize("family,freeze_lm", [("opt", True), ("gpt2", True), ("opt", False)])
def test_flamingo_flops_match_the_counted_step(family, freeze_lm):
    torch.manual_seed(0)
    model = Flamingo(size=None, vision=VISION, lm={"config": dict(LMS[family])}, tokenizer="synthetic",
                     config={**CORE, "freeze_lm": freeze_lm})
    b, t, m = 2, 24, 3
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 60, (b, t), generator=g)
    ids[:, [0, 8, 16]] = model.core.image_token_id
    batch = {"stream": "interleaved", "input_ids": ids, "attention_mask": torch.ones_like(ids),
             "pixel_values": torch.randn(b, m, 3, 32, 32, generator=g),
             "image_mask": torch.ones(b, m, dtype=torch.bool)}
    assert model.flops_per_sample(batch) * b == pytest.approx(measured(model, batch), rel=0.01)
