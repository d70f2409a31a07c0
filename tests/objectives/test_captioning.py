"""Captioning LM loss vs float64 hand computations; Flamingo label rule; T5 span corruption invariants."""

import math

import pytest
import torch

from vlm.errors import VLMConfigError
from vlm.objectives.base import StepCache
from vlm.objectives.captioning import CaptioningLM, flamingo_labels, shift_for_causal_lm, span_corruption


class LogitsModel(torch.nn.Module):
    def __init__(self, logits, labels):
        super().__init__()
        self.logits, self.labels = logits, labels

    def lm_logits(self, batch, cache):
        return self.logits, self.labels


def reference_ce(logits, labels, smoothing=0.0):
    """Mean over targets of -(1-eps) log p_y - eps * mean_v log p_v, written out in float64 with loops."""
    logp = logits.double().log_softmax(-1)
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            total += -(1 - smoothing) * logp[b, t, y] - smoothing * logp[b, t].mean()
            count += 1
    return total / max(count, 1), count


def make(b=3, t=7, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100
    labels[1, :] = -100  # a row with no targets at all
    labels[2, -2:] = -100
    return logits.requires_grad_(), labels


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_and_gradient_match_float64_reference(smoothing):
    logits, labels = make()
    out = CaptioningLM(label_smoothing=smoothing)(LogitsModel(logits, labels), {}, StepCache())
    out.loss.backward()
    ref_logits = logits.detach().double().requires_grad_()
    ref, _ = reference_ce(ref_logits, labels, smoothing)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-4, atol=1e-6)
    assert torch.all(logits.grad[1] == 0)  # the all-ignored row contributes nothing
    # perplexity is reported without smoothing
    nll, _ = reference_ce(logits.detach(), labels, 0.0)
    assert out.metrics["perplexity"].item() == pytest.approx(math.exp(nll.item()), rel=1e-5)
    keep = labels != -100
    acc = (logits.detach().argmax(-1)[keep] == labels[keep]).double().mean().item()
    assert out.metrics["token_accuracy"].item() == pytest.approx(acc)


def test_bf16_logits_are_computed_in_float32():
    logits, labels = make(seed=1)
    out = CaptioningLM()(LogitsModel(logits.detach().bfloat16(), labels), {}, StepCache())
    ref, _ = reference_ce(logits.detach().bfloat16().double(), labels)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_batch_without_targets_gives_connected_zero():
    logits, labels = make()
    labels = torch.full_like(labels, -100)
    out = CaptioningLM(label_smoothing=0.1)(LogitsModel(logits, labels), {}, StepCache())
    assert out.loss.item() == 0.0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_shape_errors_are_clear():
    logits, labels = make()
    with pytest.raises(VLMConfigError, match="shift_for_causal_lm"):
        CaptioningLM()(LogitsModel(logits, labels[:, 1:]), {}, StepCache())


def test_shift_for_causal_lm():
    logits = torch.arange(2 * 4 * 3).reshape(2, 4, 3)
    labels = torch.arange(8).reshape(2, 4)
    lo, la = shift_for_causal_lm(logits, labels)
    assert torch.equal(lo, logits[:, :3]) and torch.equal(la, labels[:, 1:])


IMG, EOC, PAD = 50, 51, 0


def test_flamingo_labels_on_hand_written_sequences():
    # BOS text <image> caption EOC gap <image> caption EOC pad pad
    seq = [[1, 7, IMG, 10, 11, EOC, 20, 21, IMG, 12, EOC, PAD, PAD],
           # starts with an image; trailing text after the last EOC; two images in a row
           [IMG, 10, EOC, 30, IMG, IMG, 11, 12, EOC, 31, 32, PAD, PAD]]
    X = -100
    want = [[X, X, X, 10, 11, EOC, X, X, X, 12, EOC, X, X],
            [X, 10, EOC, X, X, X, 11, 12, EOC, X, X, X, X]]
    got = flamingo_labels(torch.tensor(seq), image_token_id=IMG, end_of_chunk_token_id=EOC, pad_token_id=PAD)
    assert got.tolist() == want


def test_flamingo_labels_no_image_masks_everything():
    got = flamingo_labels(torch.tensor([[1, 2, EOC, 3]]), image_token_id=IMG, end_of_chunk_token_id=EOC,
                          pad_token_id=PAD)
    assert torch.all(got == -100)


SENTINELS = list(range(1000, 1100))
EOS, SPAD = 1, 0


def reconstruct(inp, tgt):
    """Rebuild the original from T5 inputs and targets by replacing each sentinel with its span."""
    spans, cur = {}, None
    for t in tgt:
        if t == EOS:
            break
        if t in SENTINELS:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    out = []
    for t in inp:
        if t == EOS:
            break
        out.extend(spans.pop(t) if t in SENTINELS else [t])
    assert not spans, "a target span has no sentinel in the inputs"
    return out


def test_span_corruption_invariants():
    g = torch.Generator().manual_seed(0)
    b, length = 48, 120
    ids = torch.randint(2, 999, (b, length), generator=g)
    lengths = torch.randint(20, length, (b,), generator=g)
    ids[torch.arange(length)[None] >= lengths[:, None]] = SPAD
    ids[torch.arange(b), lengths - 1] = EOS  # rows carry their own EOS
    inputs, targets = span_corruption(ids, noise_density=0.15, mean_span_length=3.0, sentinel_ids=SENTINELS,
                                      eos_id=EOS, pad_id=SPAD, generator=g)
    noise_tokens = spans = total = 0
    for r in range(b):
        orig = ids[r, : lengths[r] - 1].tolist()
        inp, tgt = inputs[r].tolist(), targets[r].tolist()
        assert reconstruct(inp, tgt) == orig
        n_in, n_tg = inp.index(EOS), tgt.index(EOS)
        assert all(t == SPAD for t in inp[n_in + 1:]) and all(t == SPAD for t in tgt[n_tg + 1:])
        sent_in = [t for t in inp[:n_in] if t in SENTINELS]
        sent_tg = [t for t in tgt[:n_tg] if t in SENTINELS]
        assert sent_in == sent_tg == SENTINELS[: len(sent_in)]  # sentinels numbered in order
        assert tgt[0] == SENTINELS[0] and inp[0] not in SENTINELS  # the first run is kept text (T5)
        n = len(orig)
        k = n_tg - len(sent_tg)
        assert k == max(1, min(n - 1, round(n * 0.15)))  # exactly round(n * density) noise tokens
        noise_tokens, spans, total = noise_tokens + k, spans + len(sent_tg), total + n
    assert abs(noise_tokens / total - 0.15) < 0.01
    assert abs(noise_tokens / spans - 3.0) < 0.5


def test_span_corruption_determinism_and_errors():
    ids = torch.randint(2, 999, (4, 40))
    kw = dict(sentinel_ids=SENTINELS, eos_id=EOS, pad_id=SPAD)
    a = span_corruption(ids, generator=torch.Generator().manual_seed(1), **kw)
    b = span_corruption(ids, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(VLMConfigError, match="sentinel"):
        span_corruption(ids, noise_density=0.5, mean_span_length=1.0, sentinel_ids=[1000, 1001], eos_id=EOS,
                        pad_id=SPAD)
    bad = ids.clone()
    bad[0, 3] = SPAD
    with pytest.raises(VLMConfigError, match="right"):
        span_corruption(bad, **kw)
