import pytest
import torch

from vlm.encoders.vision import VisionTower, VisionTowerConfig, build_vision_tower
from vlm.errors import OfflineHubError, VLMConfigError

TINY_VIT = dict(depth=1, embed_dim=32, num_heads=2)
TOWERS = {
    # name: (config, image side, expected P, expected D)
    "vit_cls": (dict(model="vit_tiny_patch16_224", image_size=64, kwargs=TINY_VIT), 64, 16, 32),
    "vit_reg4": (dict(model="vit_little_patch16_reg4_gap_256", image_size=64, kwargs=TINY_VIT), 64, 16, 32),
    "vit_reg_no_cls": (dict(model="vit_tiny_patch16_224", image_size=48,
                            kwargs={**TINY_VIT, "reg_tokens": 2, "class_token": False, "global_pool": "avg"}), 48, 9, 32),
    "convnext": (dict(model="test_convnext"), 64, 4, 64),  # stride 32: 2x2 cells
    "resnet": (dict(model="resnet18", kwargs={"layers": [1, 1, 1, 1]}), 96, 9, 512),  # stride 32: 3x3 cells
}


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_patch_features_shape(name):
    cfg, side, patches, width = TOWERS[name]
    tower = build_vision_tower(cfg)
    x = torch.randn(2, 3, side, side)
    out = tower(x)
    assert out.shape == (2, patches, width)
    assert tower.hidden_size == width and tower.num_tokens(side) == patches
    assert not out.requires_grad  # frozen: no autograd graph


def test_prefix_tokens_are_dropped():
    tower = build_vision_tower(TOWERS["vit_reg4"][0])
    assert tower.num_prefix_tokens == 4
    x = torch.randn(1, 3, 64, 64)
    full = tower.model.forward_features(x)
    torch.testing.assert_close(tower(x), full[:, 4:])
    tokens = build_vision_tower({**TOWERS["vit_reg4"][0], "feature": "tokens"})
    tokens.load_state_dict(tower.state_dict())
    assert tokens(x).shape == (1, 20, 32) and tokens.num_tokens(64) == 20


def test_frozen_tower_has_no_trainable_parameters_and_stays_in_eval():
    tower = build_vision_tower(TOWERS["resnet"][0])
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not any(m.training for m in tower.modules())
    before = tower.model.bn1.running_mean.clone()
    tower(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, tower.model.bn1.running_mean)  # BatchNorm statistics untouched


def test_trainable_tower_trains_and_gets_gradients():
    tower = build_vision_tower({**TOWERS["vit_cls"][0], "frozen": False})
    tower.train()
    assert tower.model.training and all(p.requires_grad for p in tower.parameters())
    tower(torch.randn(2, 3, 64, 64)).sum().backward()
    assert tower.model.patch_embed.proj.weight.grad is not None
    # a frozen tower with a block unfrozen by hand runs with autograd
    frozen = build_vision_tower(TOWERS["vit_cls"][0])
    frozen.model.blocks[-1].requires_grad_(True)
    assert frozen(torch.randn(1, 3, 64, 64)).requires_grad


@pytest.mark.parametrize("name", ["vit_reg4", "convnext"])
@pytest.mark.parametrize("prefixed", [False, True])
def test_local_safetensors_weights(name, prefixed, tmp_path):
    from safetensors.torch import save_file

    cfg, side, _, _ = TOWERS[name]
    torch.manual_seed(1)
    src = build_vision_tower(cfg)
    state = src.state_dict() if prefixed else src.model.state_dict()
    path = tmp_path / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    torch.manual_seed(2)
    loaded = build_vision_tower({**cfg, "pretrained": str(path)})
    fresh = build_vision_tower(cfg)
    x = torch.randn(2, 3, side, side)
    torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)
    assert not torch.allclose(fresh(x), src(x))
    # a directory holding model.safetensors works too
    (tmp_path / "model.safetensors").write_bytes(path.read_bytes())
    torch.testing.assert_close(build_vision_tower({**cfg, "pretrained": str(tmp_path)})(x), src(x), rtol=0, atol=0)


def test_weights_of_another_architecture_are_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file(build_vision_tower(TOWERS["convnext"][0]).model.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(VLMConfigError, match="do not fit"):
        build_vision_tower({**TOWERS["vit_cls"][0], "pretrained": str(tmp_path / "w.safetensors")})


def test_hub_names_offline_are_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineHubError, match="vit_tiny_patch16_224.augreg_in21k"):
        build_vision_tower({"pretrained": "vit_tiny_patch16_224.augreg_in21k"})
    with pytest.raises(OfflineHubError, match="'resnet18'"):
        build_vision_tower({"model": "resnet18", "pretrained": True})


def test_config_errors():
    with pytest.raises(VLMConfigError, match=r"Unknown key\(s\) \['depth'\]"):
        VisionTowerConfig.from_any({"depth": 2})
    with pytest.raises(VLMConfigError, match="feature"):
        VisionTowerConfig.from_any({"feature": "pooled"})
    with pytest.raises(VLMConfigError, match="not a timm model"):
        build_vision_tower({"model": "no_such_net"})
    cfg = VisionTowerConfig.from_any({"image_size": "64", "frozen": "false", "pretrained": "false"})
    assert cfg.image_size == 64 and cfg.frozen is False and cfg.pretrained is False
    assert isinstance(build_vision_tower(TOWERS["vit_cls"][0]), VisionTower)
