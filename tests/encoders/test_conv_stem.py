"""``vision.stem: conv``: stride-2 3x3 convolutions in place of the linear patch embedding, same patch grid."""

import pytest
import torch

from vlm.encoders.vision import ConvStem, VisionConfig, build_vit
from vlm.errors import VLMConfigError


@pytest.mark.parametrize("patch,image", [(2, 8), (8, 64), (16, 64)])
def test_conv_stem_gives_the_patch_grid(patch, image):
    stem = ConvStem(3, 32, patch)
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    # log2(patch) stride-2 convolutions and the 1x1 projection: each halves the side, so the grid is image/patch
    assert [c.stride for c in convs] == [(2, 2)] * (patch.bit_length() - 1) + [(1, 1)]
    out = stem(torch.randn(2, 3, image, image))
    assert out.shape == (2, 32, image // patch, image // patch)
    # every output cell depends only on its own neighbourhood: a change far away leaves cell (0, 0) as it was
    x = torch.randn(1, 3, image, image)
    y = x.clone()
    y[..., -patch:, -patch:] += 1.0
    if image // patch > 2:
        torch.testing.assert_close(stem(x)[..., 0, 0], stem(y)[..., 0, 0])


def test_tower_with_conv_stem_runs_masked_and_trains():
    cfg = VisionConfig(image_size=32, patch_size=8, hidden=32, layers=1, heads=2, stem="conv")
    enc = build_vit(cfg)
    assert isinstance(enc.vit.patch_embed.proj, ConvStem) and enc.num_patches == 16
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, :4] = True
    out = enc(torch.randn(2, 3, 32, 32), bool_masked_pos=masked)
    assert out.shape == (2, 17, 32)
    out.sum().backward()
    assert all(p.grad is not None for p in enc.vit.patch_embed.proj.parameters())


def test_conv_stem_config_errors():
    with pytest.raises(VLMConfigError, match="power-of-two"):
        build_vit(VisionConfig(image_size=36, patch_size=12, hidden=32, layers=1, heads=2, stem="conv"))
    with pytest.raises(VLMConfigError, match="stem='conv' builds its own tower"):
        build_vit(VisionConfig(image_size=32, timm_name="vit_tiny_patch16_224", stem="conv"))
    with pytest.raises(VLMConfigError, match="use 'patch'"):
        build_vit(VisionConfig(image_size=32, patch_size=8, hidden=32, layers=1, heads=2, stem="resnet"))


def test_vision_tower_with_conv_stem():
    from vlm.encoders.vision import VisionTowerConfig, build_vision_tower

    kw = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8}
    tower = build_vision_tower({"model": "vit_tiny_patch16_224", "image_size": 32, "kwargs": kw, "stem": "conv",
                                "frozen": False})
    assert isinstance(tower.model.patch_embed.proj, ConvStem)
    assert tower(torch.randn(2, 3, 32, 32)).shape == (2, tower.num_tokens(32), 32) and tower.num_tokens(32) == 16
    for hub_weights in (True, "vit_tiny_patch16_224.augreg_in21k"):  # hub weights have a linear patch embedding
        with pytest.raises(VLMConfigError, match="hub weights have a linear one"):
            VisionTowerConfig.from_any({"model": "vit_tiny_patch16_224", "stem": "conv", "pretrained": hub_weights})
    with pytest.raises(VLMConfigError, match="linear patch embedding"):
        build_vision_tower({"model": "resnet18", "stem": "conv", "image_size": 32})


@pytest.mark.parametrize("patch", [4, 8, 16])
def test_conv_stem_init_preserves_the_signal(patch):
    # He-normal 3x3 convolutions (std sqrt(2 / fan_in)), a 1/sqrt(fan_in) 1x1 projection, zero biases: a unit-variance
    # image comes out with a per-channel spread of the same order (GELU passes about 0.42 of a unit normal's second
    # moment, He's gain 2 restores most of it). PyTorch's default init gives about 0.05 here, below ViT position tables.
    torch.manual_seed(0)
    stem = ConvStem(3, 128, patch)
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        want = (2.0 / fan_in) ** 0.5 if conv is not convs[-1] else fan_in ** -0.5
        assert abs(conv.weight.std().item() / want - 1) < 0.15
        assert conv.bias.abs().max().item() == 0.0
    out = stem(torch.randn(16, 3, 64, 64))
    assert 0.3 < out.std(0).mean().item() < 3.0


def test_sincos_position_table_of_the_vit():
    # MAE's 2-D table as the initial value of timm's learned pos_embed: the class row 0, patch (r, c) of a G x G
    # grid gets sin/cos of r over the first half of the channels and of c over the second (float64 reference).
    g, dim = 4, 32
    enc = build_vit(VisionConfig(image_size=32, patch_size=8, hidden=dim, layers=1, heads=2, pos_embed="sincos"))
    table = enc.vit.pos_embed.detach()[0].double()
    assert enc.vit.pos_embed.requires_grad and table.shape == (1 + g * g, dim)
    assert table[0].abs().max() == 0
    q = dim // 4
    freq = 100.0 ** (-torch.arange(q, dtype=torch.float64) / q)
    for r in range(g):
        for c in range(g):
            want = torch.cat([torch.sin(r * freq), torch.cos(r * freq), torch.sin(c * freq), torch.cos(c * freq)])
            torch.testing.assert_close(table[1 + r * g + c], want, atol=1e-6, rtol=0)
    with pytest.raises(VLMConfigError, match="pos_embed='fixed'"):
        build_vit(VisionConfig(image_size=32, patch_size=8, hidden=dim, layers=1, heads=2, pos_embed="fixed"))
