"""MLM, MIM and MMM against independent float64 computations on a tiny fake model."""

from __future__ import annotations

import math

import pytest
import torch

from tests.objectives.fake_model import FakeVLM, make_batch
from vlm.errors import MissingBatchField, MissingCapability, VLMConfigError
from vlm.objectives.base import StepCache
from vlm.objectives.heads import PredictionHead
from vlm.objectives.mim import MaskedImageModeling
from vlm.objectives.mlm import MaskedLanguageModeling
from vlm.objectives.mmm import MaskedMultimodalModeling


# ---------------------------------------------------------------- float64 references
def head64(head: PredictionHead, x: torch.Tensor) -> torch.Tensor:
    """dense -> exact GELU -> LayerNorm -> decoder, in float64."""
    d = lambda t: t.detach().double()  # noqa: E731
    x = d(x) @ d(head.dense.weight).T + d(head.dense.bias)
    x = 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    x = (x - mu) / torch.sqrt(var + head.norm.eps) * d(head.norm.weight) + d(head.norm.bias)
    return x @ d(head.decoder.weight).T + d(head.decoder.bias)


def gather(hidden: torch.Tensor, positions: list[tuple[int, int]]) -> torch.Tensor:
    return torch.stack([hidden[b, t] for b, t in positions])


def ce64(logits: torch.Tensor, labels: list[int]) -> tuple[float, float]:
    """Mean cross-entropy and accuracy."""
    logp = torch.log_softmax(logits, -1)
    target = torch.tensor(labels)
    loss = -logp[torch.arange(len(labels)), target].mean()
    acc = (logits.argmax(-1) == target).double().mean()
    return float(loss), float(acc)


def positions_where(cond: torch.Tensor, rows: list[int] | None = None) -> list[tuple[int, int]]:
    rows = list(range(cond.shape[0])) if rows is None else rows
    return [(b, t) for b in rows for t in range(cond.shape[1]) if bool(cond[b, t])]


def norm_pix64(p: torch.Tensor) -> torch.Tensor:
    p = p.double()
    mean = p.mean(-1, keepdim=True)
    var = ((p - mean) ** 2).sum(-1, keepdim=True) / (p.shape[-1] - 1)
    return (p - mean) / torch.sqrt(var + 1e-6)


def built(obj, model):
    obj.build(model)
    return obj


def grads(module: torch.nn.Module) -> dict[str, bool]:
    """Which parameters got a non-zero gradient."""
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in module.named_parameters()}


@pytest.fixture(params=["sparse", "dense"])
def heads(request, monkeypatch):
    """Both exact ways of running masked heads: on kept positions only (eager) and on every position with a
    weighted loss (what ``torch.compile`` traces). Every reference test must hold for both."""
    import vlm.objectives.mim as mim
    import vlm.objectives.mlm as mlm

    dense = request.param == "dense"
    monkeypatch.setattr(mlm, "static_shapes", lambda flag: dense if flag is None else bool(flag))
    monkeypatch.setattr(mim, "static_shapes", lambda flag: dense if flag is None else bool(flag))
    return request.param


TEXT_PARAMS = ("token_embed.weight", "text_mix.weight")
IMAGE_PARAMS = ("patch_embed.weight", "image_mix.weight")
MM_PARAMS = ("mm_mix.weight", "image_to_mm.weight", "text_to_mm.weight")


# ---------------------------------------------------------------- heads
def test_prediction_head_matches_hf_flava_head():
    from transformers.models.flava.configuration_flava import FlavaTextConfig
    from transformers.models.flava.modeling_flava import FlavaMaskedPredictionHead

    cfg = FlavaTextConfig(hidden_size=8, vocab_size=11, layer_norm_eps=1e-12, hidden_act="gelu")
    hf = FlavaMaskedPredictionHead(cfg)
    for p in hf.parameters():
        torch.nn.init.normal_(p)
    ours = PredictionHead(8, 11, eps=1e-12, act="gelu")
    mapping = {"transform.dense": "dense", "transform.LayerNorm": "norm", "decoder": "decoder"}
    sd = {}
    for k, v in hf.state_dict().items():
        if k == "bias":  # HF ties the head's top-level ``bias`` to ``decoder.bias``; forward uses the latter
            continue
        prefix, leaf = k.rsplit(".", 1)
        sd[f"{mapping[prefix]}.{leaf}"] = v
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(ours(x), hf(x))
    torch.testing.assert_close(ours(x).double(), head64(ours, x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- MLM
@pytest.mark.usefixtures("heads")
def test_mlm_loss_and_accuracy_match_float64_reference():
    model = FakeVLM()
    obj = built(MaskedLanguageModeling(), model)
    batch = make_batch(model=model)
    cache = StepCache()
    out = obj(model, batch, cache)
    labels = batch["mlm_labels"]
    pos = positions_where(labels.ne(-100))
    hidden = model.text_hidden(batch, cache, masked=True)
    loss, acc = ce64(head64(obj.head, gather(hidden, pos)), [int(labels[b, t]) for b, t in pos])
    assert out.loss.item() == pytest.approx(loss, rel=1e-5)
    assert out.metrics["accuracy"].item() == pytest.approx(acc)
    assert obj.head.decoder.out_features == model.dims["vocab_size"]
    assert obj.head.dense.in_features == model.dims["text_hidden"]


def test_mlm_projects_vocab_only_at_masked_positions():
    model = FakeVLM()
    obj = built(MaskedLanguageModeling(), model)
    batch = make_batch(model=model)
    seen = []
    obj.head.decoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    obj(model, batch, StepCache())
    assert seen == [torch.Size([int(batch["mlm_labels"].ne(-100).sum()), model.dims["text_hidden"]])]


@pytest.mark.usefixtures("heads")
def test_mlm_dense_heads_project_every_position():
    from vlm.objectives.mlm import classify_masked

    model = FakeVLM()
    obj = built(MaskedLanguageModeling(), model)
    batch, cache = make_batch(model=model), StepCache()
    hidden = model.text_hidden(batch, cache, masked=True)
    labels = batch["mlm_labels"]
    seen = []
    obj.head.decoder.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    dense = classify_masked(obj.head, hidden, labels, labels.ne(-100), dense=True)
    sparse = classify_masked(obj.head, hidden, labels, labels.ne(-100), dense=False)
    assert seen[0] == hidden.shape and seen[1][0] == int(labels.ne(-100).sum())
    torch.testing.assert_close(dense, sparse)


def test_mlm_gradients_reach_text_side_only():
    model = FakeVLM()
    obj = built(MaskedLanguageModeling(), model)
    obj(model, make_batch(model=model), StepCache()).loss.backward()
    g = grads(model)
    assert all(g[n] for n in TEXT_PARAMS)
    assert not any(g[n] for n in IMAGE_PARAMS + MM_PARAMS)
    assert all(p.grad is not None for p in obj.head.parameters())


def test_mlm_random_masking_uses_cache_generator():
    model = FakeVLM()
    obj = built(MaskedLanguageModeling(), model)
    batch = make_batch(model=model, precomputed=False, length=12)
    runs = []
    for seed in (3, 3, 4):
        cache = StepCache()
        cache.generator = torch.Generator().manual_seed(seed)
        runs.append(obj(model, batch, cache).loss.item())
    assert runs[0] == runs[1] != runs[2]


@pytest.mark.usefixtures("heads")
def test_mlm_without_masked_tokens_is_finite_zero_with_graph():
    model = FakeVLM()
    obj = built(MaskedLanguageModeling(), model)
    batch = make_batch(model=model)
    batch["mlm_labels"] = torch.full_like(batch["mlm_labels"], -100)
    out = obj(model, batch, StepCache())
    assert torch.isfinite(out.loss) and out.loss.item() == 0.0
    out.loss.backward()
    assert all(p.grad is not None for p in obj.head.parameters())


# ---------------------------------------------------------------- MIM
@pytest.mark.usefixtures("heads")
def test_mim_codebook_matches_reference_and_follows_hf_label_rules():
    model = FakeVLM(codebook_size=7)
    obj = built(MaskedImageModeling(), model)
    assert obj.resolved_target == "codebook" and obj.head.decoder.out_features == 7
    assert "image_targets" in obj.requires_capabilities
    batch = make_batch(model=model)
    cache = StepCache()
    out = obj(model, batch, cache)
    mask = batch["bool_masked_pos"]
    ids = model.image_targets(batch, cache)
    hidden = model.image_hidden(batch, cache, masked=True)[:, 1:]  # drop CLS
    pos = positions_where(mask)
    loss, acc = ce64(head64(obj.head, gather(hidden, pos)), [int(ids[b, t]) for b, t in pos])
    assert out.loss.item() == pytest.approx(loss, rel=1e-5)
    assert out.metrics["accuracy"].item() == pytest.approx(acc)

    # batch mim_labels win over the tokenizer; labels at unmasked patches and -100 at masked ones are ignored
    labels = torch.randint(0, 7, mask.shape, generator=torch.Generator().manual_seed(1))
    labels[0, 0] = -100  # patch 0 is masked in every row
    batch["mim_labels"] = labels
    out = obj(model, batch, StepCache())
    pos = positions_where(mask & labels.ne(-100))
    loss, _ = ce64(head64(obj.head, gather(hidden, pos)), [int(labels[b, t]) for b, t in pos])
    assert out.loss.item() == pytest.approx(loss, rel=1e-5)


@pytest.mark.usefixtures("heads")
@pytest.mark.parametrize("norm_pix", [True, False])
def test_mim_pixels_matches_reference(norm_pix):
    model = FakeVLM(codebook_size=None)
    obj = built(MaskedImageModeling(norm_pix=norm_pix), model)
    assert obj.resolved_target == "pixels" and obj.head.decoder.out_features == model.dims["patch_dim"]
    assert "patch_pixels" in obj.requires_capabilities
    batch = make_batch(model=model)
    cache = StepCache()
    out = obj(model, batch, cache)
    pos = positions_where(batch["bool_masked_pos"])
    hidden = model.image_hidden(batch, cache, masked=True)[:, 1:]
    # patches cut by hand from the image, independent of the model's patchify
    x, p = batch["pixel_values"], model.patch
    side = x.shape[-1] // p
    patches = [
        x[b, :, (t // side) * p : (t // side + 1) * p, (t % side) * p : (t % side + 1) * p].permute(1, 2, 0).reshape(-1)
        for b, t in pos
    ]
    target = torch.stack(patches).double()
    target = norm_pix64(target) if norm_pix else target
    mse = float(((head64(obj.head, gather(hidden, pos)) - target) ** 2).mean())
    assert out.loss.item() == pytest.approx(mse, rel=1e-5)
    assert out.metrics["mse"].item() == pytest.approx(mse, rel=1e-5)


def test_mim_explicit_pixels_on_codebook_model_and_bad_targets():
    assert built(MaskedImageModeling(target="pixels"), FakeVLM(codebook_size=7)).head.decoder.out_features == 12
    with pytest.raises(VLMConfigError, match="codebook_size"):
        MaskedImageModeling(target="codebook").build(FakeVLM(codebook_size=None))
    with pytest.raises(VLMConfigError, match="target"):
        MaskedImageModeling(target="tokens")


@pytest.mark.usefixtures("heads")
def test_mim_gradients_reach_image_side_only():
    model = FakeVLM()
    obj = built(MaskedImageModeling(), model)
    obj(model, make_batch(model=model), StepCache()).loss.backward()
    g = grads(model)
    assert all(g[n] for n in IMAGE_PARAMS) and g["image_mask_token"]
    assert not any(g[n] for n in TEXT_PARAMS + MM_PARAMS)


@pytest.mark.usefixtures("heads")
@pytest.mark.parametrize("codebook", [7, None])
def test_mim_without_masked_patches_is_finite(codebook):
    model = FakeVLM(codebook_size=codebook)
    obj = built(MaskedImageModeling(), model)
    batch = make_batch(model=model)
    batch["bool_masked_pos"] = torch.zeros_like(batch["bool_masked_pos"])
    out = obj(model, batch, StepCache())
    assert torch.isfinite(out.loss) and out.loss.item() == 0.0
    out.loss.backward()


# ---------------------------------------------------------------- MMM
def mmm_reference(obj, model, batch, cache, rows):
    """HF FLAVA indexing straight on the fused sequence: patches at [2, 2+N), text the last L positions."""
    h = model.multimodal_hidden(batch, cache, masked=True)
    n, length = model.num_patches, batch["input_ids"].shape[1]
    patches, tokens = h[:, 2 : 2 + n], h[:, -length:]
    mask, labels = batch["bool_masked_pos"], batch["mlm_labels"]
    pos_t = positions_where(labels.ne(-100), rows)
    text_loss, text_acc = ce64(head64(obj.text_head, gather(tokens, pos_t)), [int(labels[b, t]) for b, t in pos_t])
    ids = model.image_targets(batch, cache)
    pos_i = positions_where(mask, rows)
    image_loss, image_acc = ce64(head64(obj.image_head, gather(patches, pos_i)), [int(ids[b, t]) for b, t in pos_i])
    return text_loss, text_acc, image_loss, image_acc


@pytest.mark.usefixtures("heads")
def test_mmm_matches_reference_on_positive_rows_only():
    model = FakeVLM()
    obj = built(MaskedMultimodalModeling(text_weight=0.7, image_weight=1.3), model)
    assert obj.image_head.dense.in_features == model.dims["multimodal_hidden"]
    assert obj.image_head.decoder.out_features == 7 and obj.text_head.decoder.out_features == 13
    batch = make_batch(model=model, itm_labels=[1, 0, 1, 0])
    cache = StepCache()
    out = obj(model, batch, cache)
    tl, ta, il, ia = mmm_reference(obj, model, batch, cache, rows=[0, 2])
    assert out.metrics["text_loss"].item() == pytest.approx(tl, rel=1e-5)
    assert out.metrics["image_loss"].item() == pytest.approx(il, rel=1e-5)
    assert out.metrics["text_accuracy"].item() == pytest.approx(ta)
    assert out.metrics["image_accuracy"].item() == pytest.approx(ia)
    assert out.loss.item() == pytest.approx(0.7 * tl + 1.3 * il, rel=1e-5)


@pytest.mark.usefixtures("heads")
def test_mmm_negative_rows_get_no_gradient():
    model = FakeVLM()
    obj = built(MaskedMultimodalModeling(), model)
    batch = make_batch(model=model, itm_labels=[1, 0, 1, 0])
    batch["pixel_values"].requires_grad_(True)
    obj(model, batch, StepCache()).loss.backward()
    per_row = batch["pixel_values"].grad.abs().flatten(1).sum(1)
    assert per_row[1] == 0 and per_row[3] == 0 and per_row[0] > 0 and per_row[2] > 0
    g = grads(model)
    assert all(g[n] for n in TEXT_PARAMS + IMAGE_PARAMS + MM_PARAMS)


@pytest.mark.usefixtures("heads")
def test_mmm_all_negative_batch_uses_every_row_like_hf():
    model = FakeVLM()
    obj = built(MaskedMultimodalModeling(), model)
    batch = make_batch(model=model, itm_labels=[0, 0, 0, 0])
    cache = StepCache()
    out = obj(model, batch, cache)
    tl, _, il, _ = mmm_reference(obj, model, batch, cache, rows=[0, 1, 2, 3])
    assert out.loss.item() == pytest.approx(tl + il, rel=1e-5)


def test_mmm_without_positive_rows_capability_falls_back_to_itm_labels():
    model = FakeVLM(drop=("positive_rows",))
    obj = built(MaskedMultimodalModeling(), model)
    obj.check_model(model, "pairs")  # positive_rows is optional
    batch = make_batch(model=model, itm_labels=[0, 1, 1, 1])
    cache = StepCache()
    tl, _, il, _ = mmm_reference(obj, model, batch, cache, rows=[1, 2, 3])
    assert obj(model, batch, cache).loss.item() == pytest.approx(tl + il, rel=1e-5)


@pytest.mark.usefixtures("heads")
def test_mmm_pixel_targets_and_empty_masks():
    model = FakeVLM(codebook_size=None)
    obj = built(MaskedMultimodalModeling(), model)
    assert obj.image_head.decoder.out_features == model.dims["patch_dim"]
    batch = make_batch(model=model)
    out = obj(model, batch, StepCache())
    assert {"image_mse", "text_accuracy", "text_loss", "image_loss"} <= set(out.metrics)
    batch["bool_masked_pos"] = torch.zeros_like(batch["bool_masked_pos"])
    batch["mlm_labels"] = torch.full_like(batch["mlm_labels"], -100)
    out = obj(model, batch, StepCache())
    assert torch.isfinite(out.loss) and out.loss.item() == 0.0
    out.loss.backward()


def test_objectives_share_one_masked_pass():
    model = FakeVLM()
    batch, cache = make_batch(model=model, itm_labels=[1, 1, 0, 1]), StepCache()
    for obj in (MaskedLanguageModeling(), MaskedImageModeling(), MaskedMultimodalModeling()):
        obj.build(model)
        obj(model, batch, cache)
    assert model.calls["text_hidden"] == 1 and model.calls["image_hidden"] == 1
    assert model.calls["multimodal_hidden"] == 1


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "obj, hidden_cap",
    [(MaskedLanguageModeling(), "text_hidden"), (MaskedImageModeling(), "image_hidden"),
     (MaskedMultimodalModeling(), "split_multimodal")],
)
def test_missing_capability_names_objective_and_stream(obj, hidden_cap):
    model = FakeVLM(drop=(hidden_cap,))
    obj.build(model)
    with pytest.raises(MissingCapability, match=rf"'{obj.name}'.*stream 'unpaired'.*{hidden_cap}"):
        obj.check_model(model, "unpaired")


def test_pixel_target_needs_patch_pixels_capability():
    model = FakeVLM(codebook_size=None, drop=("patch_pixels",))
    obj = built(MaskedImageModeling(), model)
    with pytest.raises(MissingCapability, match="patch_pixels"):
        obj.check_model(model, "images")


@pytest.mark.parametrize(
    "obj, field",
    [(MaskedLanguageModeling(), "input_ids"), (MaskedImageModeling(), "pixel_values"),
     (MaskedMultimodalModeling(), "pixel_values")],
)
def test_missing_batch_field_is_named(obj, field):
    batch = make_batch()
    del batch[field]
    with pytest.raises(MissingBatchField, match=rf"'{obj.name}'.*stream 'pairs'.*{field}"):
        obj.check_batch(batch, "pairs")
