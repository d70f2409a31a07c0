"""Parity with OpenFlamingo's PerceiverResampler and GatedCrossAttentionBlock, weights copied by our converters.

OpenFlamingo's ``helpers.py`` is loaded by file path: it needs only torch and einops, while the package's
``__init__`` also imports open_clip, transformers and FSDP, which this test does not use.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from vlm.convert.open_flamingo import (
    convert_open_flamingo_state,
    perceiver_from_open_flamingo,
    xattn_from_open_flamingo,
)
from vlm.errors import VLMConfigError
from vlm.modules import GatedCrossAttentionBlock, PerceiverResampler, media_index_from_ids

pytest.importorskip("einops_exts")


def _load_helpers():
    spec = importlib.util.find_spec("open_flamingo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-flamingo is not installed (make install adds it with --no-deps)")
    path = Path(next(iter(spec.submodule_search_locations))) / "src" / "helpers.py"
    module_spec = importlib.util.spec_from_file_location("_open_flamingo_helpers", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


of = _load_helpers()

DIM, VDIM, HEADS, DH, LATENTS = 32, 24, 4, 8, 6
IMG = 5


def randomise(module):
    """Move every tensor off its initial value (zero gates, unit LayerNorms) so a wrong mapping shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module


def of_resampler(**kw):
    return randomise(of.PerceiverResampler(dim=VDIM, depth=2, dim_head=DH, heads=HEADS, num_latents=LATENTS, **kw))


def ours_resampler_from(ref, **kw):
    ours = PerceiverResampler(VDIM, depth=2, heads=HEADS, dim_head=DH, num_latents=LATENTS, **kw)
    ours.load_state_dict(perceiver_from_open_flamingo(ref.state_dict()))
    return ours


def of_block(only_immediate):
    return randomise(of.GatedCrossAttentionBlock(
        dim=DIM, dim_visual=VDIM, dim_head=DH, heads=HEADS, ff_mult=2, only_attend_immediate_media=only_immediate
    ))


def ours_block_from(ref, only_immediate):
    ours = GatedCrossAttentionBlock(DIM, VDIM, heads=HEADS, dim_head=DH, ff_mult=2, only_immediate=only_immediate)
    ours.load_state_dict(xattn_from_open_flamingo(ref.state_dict()))
    return ours


@pytest.mark.parametrize("embeddings", [True, False])
def test_perceiver_matches_open_flamingo(embeddings):
    kw = dict(max_num_media=4, max_num_frames=3) if embeddings else {}
    ref = of_resampler(**kw)
    ours = ours_resampler_from(ref, **kw)
    x = torch.randn(2, 3, 2, 7, VDIM)  # B, M media, F frames, P tokens
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        assert ours(x).shape == (2, 3, LATENTS, VDIM)
        one_frame = x[:, :, 0]
        torch.testing.assert_close(ours(one_frame), ref(one_frame.unsqueeze(2)), atol=1e-5, rtol=1e-5)


def text_with_images():
    torch.manual_seed(2)
    ids = torch.randint(10, 100, (4, 12))
    ids[0, [0, 4, 8]] = IMG  # three images, the first at position 0
    ids[1, [3, 9]] = IMG  # tokens before the first image
    ids[2, [6]] = IMG
    # row 3: no image
    return ids


@pytest.mark.parametrize("only_immediate", [True, False])
def test_gated_xattn_matches_open_flamingo(only_immediate):
    ref = of_block(only_immediate)
    ours = ours_block_from(ref, only_immediate)
    ids = text_with_images()
    x, media = torch.randn(4, 12, DIM), torch.randn(4, 3, LATENTS, VDIM)
    index = media_index_from_ids(ids, IMG)
    with torch.no_grad():
        expected = ref(x, media, media_locations=ids == IMG)
        out = ours(x, media, index)
        seen = index >= 0
        torch.testing.assert_close(out[seen], expected[seen], atol=1e-5, rtol=1e-5)
        # Before the first image there is nothing to attend to: OpenFlamingo zeroes that attention when
        # attending to the immediate image only (and spreads it uniformly over all images otherwise); here
        # those tokens get the feed-forward part alone in both modes.
        ff_only = x + ref.ff(x) * ref.ff_gate.tanh()
        torch.testing.assert_close(out[~seen], ff_only[~seen], atol=1e-5, rtol=1e-5)
        if only_immediate:
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("only_immediate", [True, False])
def test_cached_generation_matches_open_flamingo(only_immediate):
    """New tokens after a prompt: OpenFlamingo's ``use_cached_media`` = our one index per row ([B, 1])."""
    ref = of_block(only_immediate)
    ours = ours_block_from(ref, only_immediate)
    prompt = text_with_images()[:3]  # rows with at least one image
    x, media = torch.randn(3, 2, DIM), torch.randn(3, 3, LATENTS, VDIM)
    last = media_index_from_ids(prompt, IMG)[:, -1:]
    with torch.no_grad():
        expected = ref(x, media, media_locations=prompt == IMG, use_cached_media=True)
        torch.testing.assert_close(ours(x, media, last), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x, media, last[:, 0]), expected, atol=1e-5, rtol=1e-5)


def test_converters_reject_unknown_keys():
    with pytest.raises(VLMConfigError, match="unexpected"):
        perceiver_from_open_flamingo({"layers.0.2.foo.weight": torch.zeros(1)})
    with pytest.raises(VLMConfigError, match="unexpected"):
        xattn_from_open_flamingo({"ff.2.weight": torch.zeros(1)})


class _Wrapped(nn.Module):
    """Stands for open_flamingo's FlamingoLayer: the same block also reachable from a decoder layer."""

    def __init__(self, block):
        super().__init__()
        self.gated_cross_attn_layer = block
        self.decoder_layer = nn.Linear(DIM, DIM)


def fake_released_model():
    blocks = [None, of_block(True), None, of_block(True)]
    model = nn.Module()
    model.vision_encoder = nn.Linear(3, VDIM)
    model.perceiver = of_resampler(max_num_media=2, max_num_frames=1)
    model.lang_encoder = nn.Module()
    model.lang_encoder.gated_cross_attn_layers = nn.ModuleList(blocks)
    model.lang_encoder.transformer = nn.Module()
    model.lang_encoder.transformer.blocks = nn.ModuleList(
        _Wrapped(b) if b is not None else nn.Linear(DIM, DIM) for b in blocks
    )
    model.lang_encoder.wte = nn.Embedding(10, DIM)
    return model, blocks


def check_converted(converted, model, blocks):
    assert {k.split(".")[0] for k in converted} == {"resampler", "xattn"}
    assert {k.split(".")[1] for k in converted if k.startswith("xattn.")} == {"1", "3"}
    resampler = PerceiverResampler(VDIM, depth=2, heads=HEADS, dim_head=DH, num_latents=LATENTS,
                                   max_num_media=2, max_num_frames=1)
    resampler.load_state_dict({k[len("resampler."):]: v for k, v in converted.items() if k.startswith("resampler.")})
    x = torch.randn(1, 2, 1, 5, VDIM)
    with torch.no_grad():
        torch.testing.assert_close(resampler(x), model.perceiver(x), atol=1e-5, rtol=1e-5)
    for i in (1, 3):
        block = GatedCrossAttentionBlock(DIM, VDIM, heads=HEADS, dim_head=DH, ff_mult=2)
        prefix = f"xattn.{i}."
        block.load_state_dict({k[len(prefix):]: v for k, v in converted.items() if k.startswith(prefix)})
        assert torch.equal(block.attn.to_q.weight, blocks[i].attn.to_q.weight)


def test_full_checkpoint_conversion(tmp_path):
    model, blocks = fake_released_model()
    state = model.state_dict()
    assert any(".transformer.blocks.1.gated_cross_attn_layer." in k for k in state)
    check_converted(convert_open_flamingo_state(state), model, blocks)
    # a training checkpoint (model_state_dict, DDP prefix) saved with torch.save
    path = tmp_path / "checkpoint.pt"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    check_converted(convert_open_flamingo_state(path), model, blocks)
    # only the list form, as safetensors (which stores no shared tensors)
    from safetensors.torch import save_file

    single = {k: v.clone() for k, v in state.items() if ".transformer.blocks." not in k}
    save_file(single, tmp_path / "model.safetensors")
    check_converted(convert_open_flamingo_state(tmp_path / "model.safetensors"), model, blocks)


def test_full_checkpoint_conflicting_copies_are_an_error():
    model, _ = fake_released_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lang_encoder.transformer.blocks.1.gated_cross_attn_layer.attn_gate"] += 1.0
    with pytest.raises(VLMConfigError, match="two different values"):
        convert_open_flamingo_state(state)
