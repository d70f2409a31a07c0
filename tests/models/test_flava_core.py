"""FLAVA's core and config: named sizes, the same weights as the loose-argument model, old checkpoints load."""

import dataclasses

import pytest
import torch

from tests.models.test_flava import make_batch, tiny_kwargs
from vlm.errors import VLMConfigError
from vlm.models.flava import FLAVA, SIZES, FLAVAConfig, FLAVACore


def block_params(d: int, m: int) -> int:
    """Pre-norm transformer block: two LayerNorms, fused qkv and output projection, MLP d -> m -> d (biases)."""
    return 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)


def flava_params(vision: dict, text: dict, mm: dict, proj: int) -> int:
    """FLAVA's parameter count from its sizes, written out from the paper's architecture (no code under test)."""
    dv, pv, nv = vision["hidden"], vision["patch_size"], (vision["image_size"] // vision["patch_size"]) ** 2
    image = (3 * pv * pv * dv + dv) + dv + (1 + nv) * dv + vision["layers"] * block_params(dv, 4 * dv) + 2 * dv
    image += dv  # FLAVA's mask token for masked patches
    dt = text["hidden"]
    text_tower = (text["vocab_size"] + text["max_positions"] + 2) * dt + 2 * dt \
        + text["layers"] * block_params(dt, 4 * dt) + 2 * dt
    dm = mm["hidden"]
    fusion = dm + mm["layers"] * block_params(dm, 4 * dm) + 2 * dm
    projections = (dv * dm + dm) + (dt * dm + dm) + (dv * proj + proj) + (dt * proj + proj)
    return image + text_tower + fusion + projections


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_named_sizes_have_the_parameters_of_their_sizes(size):
    sizes = SIZES[size]
    with torch.device("meta"):  # base: sizes only, no memory
        core = FLAVACore(FLAVAConfig.named(size))
    expected = flava_params(sizes["vision"], sizes["text"], sizes["multimodal"], sizes["projection_dim"])
    assert sum(p.numel() for p in core.parameters()) == expected
    if size == "base":  # the paper's: ViT-B/16 towers, a 6-layer fusion encoder; also what no size gives
        assert (core.image_encoder.patch_size, core.image_encoder.hidden_size, len(core.image_encoder.vit.blocks),
                len(core.multimodal_encoder.encoder.blocks), core.text_encoder.vocab_size) == (16, 768, 12, 6, 30522)
        with torch.device("meta"):
            default = FLAVACore(FLAVAConfig())
        assert sum(p.numel() for p in default.parameters()) == expected


def test_tiny_core_is_the_tiny_config_model_at_one_seed():
    """FLAVACore(FLAVAConfig.named('tiny')) = the core of FLAVA built from conf/flava/tiny.yaml's loose tower
    arguments: the same weights at one seed (the towers are built in the order the model always used), so the
    same embeddings and fused output. The config's image tower starts pretrained (``pretrained: synthetic``);
    the architecture is compared from random weights."""
    torch.manual_seed(0)
    core = FLAVACore(FLAVAConfig.named("tiny")).eval()
    torch.manual_seed(0)
    kwargs = tiny_kwargs()
    assert kwargs["vision"].pop("pretrained") == "synthetic"
    model = FLAVA(**kwargs).eval()
    assert model.config == FLAVAConfig.named("tiny")
    mine, theirs = core.state_dict(), model.core.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    batch = make_batch("pairs")
    with torch.no_grad():
        out = core(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(out["image_embedding"], model.encode_image(batch["pixel_values"]), rtol=0, atol=0)
        torch.testing.assert_close(out["text_embedding"],
                                   model.encode_text(batch["input_ids"], batch["attention_mask"]), rtol=0, atol=0)


def test_config_overrides_merge_key_by_key_and_bad_names_are_one_error():
    cfg = FLAVAConfig.named("tiny", {"vision": {"layers": 3}, "projection_dim": 64})
    assert cfg.vision == {**SIZES["tiny"]["vision"], "layers": 3} and cfg.projection_dim == 64
    assert cfg.text == SIZES["tiny"]["text"]
    # loose constructor arguments are overrides of the size; pretrained_image lands in vision
    with torch.device("meta"):
        model = FLAVA(size="tiny", vision={"layers": 1}, config={"fusion_input": "final"},
                      pretrained_image=None, objectives={}, streams={})
    assert model.config.vision["layers"] == 1 and model.config.vision["hidden"] == 128
    assert model.fusion_input == "final" and len(model.image_encoder.vit.blocks) == 1
    with pytest.raises(VLMConfigError, match=r"Unknown FLAVA size 'huge'.*\['base', 'tiny'\]"):
        FLAVAConfig.named("huge")
    with pytest.raises(VLMConfigError, match=r"Unknown FLAVA config key\(s\) \['vison'\]"):
        FLAVAConfig.named("tiny", {"vison": {}})
    with pytest.raises(VLMConfigError, match="fusion_input='middle'"):
        FLAVAConfig.named("tiny", {"fusion_input": "middle"})
    with pytest.raises(VLMConfigError, match=r"Unknown key\(s\) \['width'\] in the multimodal config"):
        FLAVACore(dataclasses.replace(FLAVAConfig.named("tiny"), multimodal={"width": 3}))


def test_checkpoint_from_before_the_core_loads():
    """A state dict written when the towers sat at the model's top level (``image_encoder.*``) loads strictly."""
    torch.manual_seed(0)
    source = FLAVA(**tiny_kwargs())
    old = {k.removeprefix("core."): v.clone() for k, v in source.state_dict().items()}
    assert "image_encoder.mask_token" in old and "objectives.gc.logit_scale" in old
    torch.manual_seed(1)
    model = FLAVA(**tiny_kwargs())
    model.load_state_dict(old)  # strict
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
