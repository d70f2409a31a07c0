"""FLAVA's hard-negative captions (NegCLIP-style GC): the capability, the loss it feeds, the compiled step."""

import torch

from tests.models.test_compiled_step import assert_same_step, eager_and_compiled
from tests.models.test_flava import make_batch, tiny_kwargs
from vlm.models.flava import FLAVA
from vlm.objectives.base import CAPABILITIES, StepCache


def with_negatives(batch, k=1, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    b, length = batch["input_ids"].shape
    ids = torch.randint(1000, 5000, (b, k, length), generator=g)
    ids[..., 0] = 101
    attention = torch.ones(b, k, length, dtype=torch.long)
    attention[0, :, 8:] = 0
    ids[0, :, 8:] = 0
    valid = torch.ones(b, k, dtype=torch.bool)
    valid[-1] = False  # a row without negatives (a real-data sample)
    return {**batch, "negative_input_ids": ids, "negative_attention_mask": attention, "negative_mask": valid}


def test_negative_embeddings_are_the_text_tower_on_the_negative_captions():
    assert "negative_text_embeddings" in CAPABILITIES
    torch.manual_seed(0)
    model = FLAVA(**tiny_kwargs()).eval()
    batch = with_negatives(make_batch("pairs"), k=2)
    emb = model.negative_text_embeddings(batch, StepCache())
    b, k, length = batch["negative_input_ids"].shape
    ref = model.encode_text(batch["negative_input_ids"].reshape(b * k, length),
                            batch["negative_attention_mask"].reshape(b * k, length)).reshape(b, k, -1)
    torch.testing.assert_close(emb, ref)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(b, k))


def test_gc_uses_negatives_and_they_get_gradients():
    torch.manual_seed(0)
    model = FLAVA(**tiny_kwargs()).train()
    plain = make_batch("pairs")
    gc = model.objectives["gc"]
    out_plain = gc(model, plain, StepCache())
    out_neg = gc(model, with_negatives(plain), StepCache())
    assert "hard_negative_accuracy" in out_neg.metrics and "hard_negative_accuracy" not in out_plain.metrics
    assert out_neg.loss > out_plain.loss
    out_neg.loss.backward()
    assert model.text_projection.weight.grad is not None


def test_compiled_step_with_hard_negatives_equals_eager():
    torch._dynamo.reset()
    eager, compiled = eager_and_compiled()
    for step in range(2):
        batch = dict(with_negatives(make_batch("pairs", seed=step), seed=step), batch_index=step)
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            assert_same_step(eager, compiled, batch)
