"""Extra keyword arguments of the top-level LM call reach each decoder block (Flamingo's gated layers rely on it).

Pinned for GPT-2, OPT, Llama and Qwen2 tiny models: plain forward, forward with ``labels``, and training with
gradient checkpointing pass ``model(..., my_cond=obj)`` down to every block call. ``generate`` refuses keywords the
model does not declare, so generation conditions the blocks with :func:`vlm.encoders.lm.layer_kwargs` (forward
pre-hooks), which reaches the prefill and every decode step.
"""

import pytest
import torch
from torch import nn

from tests.encoders.lm_configs import TINY, VOCAB
from vlm.encoders.lm import build_lm, decoder_layers, enable_checkpointing, layer_kwargs

FAMILIES = sorted(TINY)
NEW_TOKENS = 3


class Recorder(nn.Module):
    """Wraps a decoder block; records the ``my_cond`` each call gets; a tensor ``my_cond`` is added to the input."""

    def __init__(self, block: nn.Module, calls: list) -> None:
        super().__init__()
        self.block = block
        self.calls = calls

    def forward(self, hidden_states, *args, my_cond=None, **kwargs):
        self.calls.append((my_cond, hidden_states.shape[1]))
        if isinstance(my_cond, torch.Tensor):
            hidden_states = hidden_states + my_cond
        return self.block(hidden_states, *args, **kwargs)


def _wrapped(family):
    model = build_lm({"config": TINY[family]})
    layers = decoder_layers(model)
    calls: list = []
    for i in range(len(layers)):
        layers[i] = Recorder(layers[i], calls)
    ids = torch.randint(1, VOCAB, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, 0] = 0  # some padding, so the mask path is the real one
    return model, calls, ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_labels_pass_kwargs_to_every_block(family):
    model, calls, ids, mask = _wrapped(family)
    model.eval()
    cond = object()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, my_cond=cond)
        assert calls == [(cond, 5)] * 2
        calls.clear()
        out = model(input_ids=ids, attention_mask=mask, labels=ids, my_cond=cond)
    assert torch.isfinite(out.loss)
    assert calls == [(cond, 5)] * 2


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_rejects_unknown_kwargs(family):
    """If this starts passing, transformers forwards generate's extra kwargs itself and layer_kwargs is optional."""
    model, calls, ids, mask = _wrapped(family)
    with pytest.raises(ValueError, match="my_cond"):
        model.eval().generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, my_cond=object(), do_sample=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_layer_kwargs_reaches_every_step(family):
    model, calls, ids, mask = _wrapped(family)
    model.eval()
    cond = object()
    with layer_kwargs(model, my_cond=cond):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                             min_new_tokens=NEW_TOKENS, pad_token_id=0)
    assert out.shape == (2, 5 + NEW_TOKENS)
    # prefill over the prompt, then one token per step through the cache; both blocks every time
    assert calls == [(cond, 5)] * 2 + [(cond, 1)] * 2 * (NEW_TOKENS - 1)
    calls.clear()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # the hooks are gone after the block
    assert calls == [(None, 5)] * 2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("route", ["call", "layer_kwargs"])
def test_gradient_checkpointing_training_passes_kwargs_and_grads(family, route):
    model, calls, ids, mask = _wrapped(family)
    enable_checkpointing(model)
    model.train()
    cond = torch.zeros(32, requires_grad=True)
    if route == "call":
        loss = model(input_ids=ids, attention_mask=mask, labels=ids, my_cond=cond).loss
    else:
        with layer_kwargs(model, my_cond=cond):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert [c is cond for c, _ in calls] == [True, True]
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    blocks = [layer.block for layer in decoder_layers(model)]
    assert all(b.gradient_checkpointing for b in blocks)
    assert all(p.grad is not None for b in blocks for p in b.parameters() if p.requires_grad)
