"""FLAVA model: real training steps per stream, shared encoder passes, pretrained towers, clear errors."""

import importlib
from pathlib import Path

import pytest
import timm
import torch
import transformers
import yaml

from vlm.encoders.text import build_text_encoder
from vlm.encoders.vision import build_vit
from vlm.errors import MissingBatchField, OfflineHubError, VLMConfigError
from vlm.models.flava import FLAVA
from vlm.objectives.base import StepCache

ROOT = Path(__file__).resolve().parents[2]
B, L = 4, 16


def _instantiate(spec):
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))
    return spec


def tiny_kwargs(**overrides):
    """init_args of the model in conf/flava/tiny.yaml, objectives instantiated as LightningCLI would."""
    cfg = yaml.safe_load((ROOT / "conf/flava/tiny.yaml").read_text())["model"]
    assert cfg["class_path"] == "vlm.models.flava.FLAVA"
    kwargs = dict(cfg["init_args"])
    kwargs["objectives"] = {k: _instantiate(v) for k, v in kwargs["objectives"].items()}
    kwargs.update(overrides)
    return kwargs


def make_batch(stream, seed=0, itm=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (B, L), generator=g)
    ids[:, 0] = 101
    attention = torch.ones(B, L, dtype=torch.long)
    attention[1, 10:] = 0
    ids[1, 10:] = 0
    batch = {"stream": stream}
    if stream in ("pairs", "images"):
        batch["pixel_values"] = torch.randn(B, 3, 64, 64, generator=g)
    if stream in ("pairs", "text"):
        batch.update(input_ids=ids, attention_mask=attention)
    if itm:
        batch["itm_labels"] = torch.tensor([1, 0, 1, 1])
    return batch


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return FLAVA(**tiny_kwargs())


def test_training_step_per_stream_decreases_loss():
    torch.manual_seed(0)
    model = FLAVA(**tiny_kwargs(warmup_steps=0, lr_schedule="constant", lr=1e-3))
    opt = model.configure_optimizers()["optimizer"]
    model.train()
    for stream in ("pairs", "images", "text"):
        batch = make_batch(stream)
        losses = []
        for _ in range(5):
            # fixed masks/negatives per step: the same batch index reseeds the step generator
            loss = model.training_step(dict(batch, batch_index=0))
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], (stream, losses)


def _count_calls(model):
    counts = {"image": 0, "text": 0, "multimodal": 0}
    hooks = [
        model.image_encoder.register_forward_hook(lambda *a: counts.__setitem__("image", counts["image"] + 1)),
        model.text_encoder.register_forward_hook(lambda *a: counts.__setitem__("text", counts["text"] + 1)),
        model.multimodal_encoder.register_forward_hook(
            lambda *a: counts.__setitem__("multimodal", counts["multimodal"] + 1)),
    ]
    return counts, hooks


@pytest.mark.parametrize("from_masked, expected", [(False, 2), (True, 1)])
def test_one_encoder_pass_per_variant(from_masked, expected):
    from vlm.objectives.itm import ImageTextMatching

    kwargs = tiny_kwargs(contrastive_from_masked=from_masked)
    kwargs["objectives"]["itm"] = ImageTextMatching(negatives="batch")
    model = FLAVA(**kwargs)
    counts, hooks = _count_calls(model)
    loss, logs = model.compute_losses(make_batch("pairs", itm=True))
    loss.backward()
    for h in hooks:
        h.remove()
    assert {"pairs/gc/loss", "pairs/itm/loss", "pairs/mmm/loss"} <= set(logs)
    # unmasked (GC) + masked (ITM, MMM) pass per tower, or the masked one only; one fusion pass
    assert counts == {"image": expected, "text": expected, "multimodal": 1}


def test_in_batch_negatives_reuse_the_tower_passes(tiny):
    counts, hooks = _count_calls(tiny)
    tiny.compute_losses(make_batch("pairs"))
    for h in hooks:
        h.remove()
    # ITM's shuffled pairs are fused from the cached tower outputs: only the fusion encoder runs again
    assert counts == {"image": 2, "text": 2, "multimodal": 2}


def test_fused_negatives_equal_fusing_the_pairs_directly(tiny):
    """fuse() of (image perm[i], text i) = the multimodal pass of a batch that holds those pairs."""
    tiny.eval()
    batch = make_batch("pairs")
    perm = torch.tensor([2, 0, 3, 1])
    swapped = dict(batch, pixel_values=batch["pixel_values"][perm])
    with torch.no_grad():
        fused = tiny.fuse(batch, StepCache(), perm, torch.arange(4), masked=False)
        direct = tiny.multimodal_hidden(swapped, StepCache(), masked=False)
    torch.testing.assert_close(fused, direct, rtol=1e-5, atol=1e-5)


def test_zero_weight_objective_never_runs():
    model = FLAVA(**tiny_kwargs(streams={"pairs": {"gc": 1.0, "itm": 0.0, "mmm": 1.0}}))
    ran = []
    model.objectives["itm"].head.register_forward_hook(lambda *a: ran.append(1))
    loss, logs = model.compute_losses(make_batch("pairs"))
    loss.backward()
    assert not ran and "pairs/itm/loss" not in logs
    assert all(p.grad is None for p in model.objectives["itm"].parameters())
    assert model.image_projection.weight.grad is not None


def test_missing_batch_field_is_one_clear_error(tiny):
    batch = make_batch("pairs")
    del batch["input_ids"]
    with pytest.raises(MissingBatchField, match="input_ids"):
        tiny.compute_losses(batch)


def test_text_tower_from_minilm_matches_transformers():
    from vlm.hub import minilm_path

    path = minilm_path()
    model = FLAVA(**tiny_kwargs(pretrained_text=str(path))).eval()
    ref = transformers.AutoModel.from_pretrained(str(path)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    enc = tok(["a red square left of a blue circle", "two green triangles"], padding=True, return_tensors="pt")
    batch = {"stream": "text", "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        ours = model.text_hidden(batch, StepCache(), masked=False)
        expected = ref(**enc).last_hidden_state
    keep = enc["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], expected[keep], rtol=1e-4, atol=1e-5)
    assert model.dims["text_hidden"] == ref.config.hidden_size
    assert model.dims["vocab_size"] == len(tok)


def test_hub_names_offline_raise_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineHubError):
        FLAVA(**tiny_kwargs(pretrained_text="some-org/some-text-model"))
    with pytest.raises(OfflineHubError):
        FLAVA(**tiny_kwargs(pretrained_image="vit_tiny_patch16_224.augreg_in21k"))
    with pytest.raises(OfflineHubError):
        FLAVA(**tiny_kwargs(image_codebook="facebook/flava-image-codebook"))
    from vlm.convert.hf_flava import flava_from_hf

    with pytest.raises(OfflineHubError):
        flava_from_hf("facebook/flava-full")


def test_vocab_mismatch_names_the_fix():
    with pytest.raises(VLMConfigError, match="text.vocab_size: 120"):
        build_text_encoder({"vocab_size": 100, "hidden": 32, "layers": 1, "heads": 2}, vocab_size=120)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_vit_from_local_timm_checkpoint_matches_timm(tmp_path, fmt):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0).eval()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file(ref.state_dict(), str(path))
        source = str(tmp_path)  # a directory holding model.safetensors
    else:
        path = tmp_path / "vit.pth"
        torch.save(ref.state_dict(), path)
        source = str(path)
    enc = build_vit({"timm_name": "vit_tiny_patch16_224", "image_size": 32, "pretrained": source}).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)
        # other image sizes interpolate the position embeddings (as timm's dynamic-size ViT does)
        dyn = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0,
                                dynamic_img_size=True).eval()
        dyn.load_state_dict(ref.state_dict())
        big = torch.randn(2, 3, 48, 48)
        out = enc(big)
        assert out.shape == (2, 1 + 9, 192)
        torch.testing.assert_close(out, dyn.forward_features(big), rtol=1e-5, atol=1e-5)


def test_masked_patches_ignore_their_pixels():
    enc = build_vit({"image_size": 32, "patch_size": 8, "hidden": 32, "layers": 1, "heads": 2}).eval()
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, :5] = True
    a = torch.randn(1, 3, 32, 32)
    b = a.clone()
    b[..., :8, :8] += 5.0  # patch 0 only: masked, so the output must not change
    with torch.no_grad():
        torch.testing.assert_close(enc(a, mask), enc(b, mask))
        assert not torch.allclose(enc(a), enc(b))


def test_validation_logs_zero_shot_retrieval_and_classification():
    import lightning as L

    from vlm.hub import minilm_path
    from vlm.metrics.retrieval import RetrievalRecall

    model = FLAVA(**tiny_kwargs(tokenizer=str(minilm_path()), zeroshot_class_names=["circle", "square"],
                                zeroshot_templates=["a photo of a {}.", "a {}."]))
    pairs = dict(make_batch("pairs"), pair_id=torch.tensor([0, 1, 2, 2]))
    images = dict(make_batch("images", seed=1), class_index=torch.tensor([0, 1, 1, 0]))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False)
    loaders = [torch.utils.data.DataLoader([b], batch_size=None, collate_fn=lambda x: x) for b in (pairs, images)]
    logged = trainer.validate(model, loaders, verbose=False)
    metrics = {k: v for d in logged for k, v in d.items()}
    # reference: the same metric on embeddings computed directly from the towers
    ref = RetrievalRecall()
    ref.update(model.encode_image(pairs["pixel_values"]),
               model.encode_text(pairs["input_ids"], pairs["attention_mask"]), pairs["pair_id"])
    for k, v in ref.compute().items():
        assert metrics[f"val/retrieval/{k}"] == pytest.approx(float(v))
    assert 0.0 <= metrics["val/zeroshot/top1"] <= 1.0
    assert any(k.startswith("val/pairs/") for k in metrics)


def test_tokenizer_that_does_not_match_the_text_tower_fails_at_construction(tmp_path, monkeypatch):
    """The synthetic BPE vocabulary is much smaller than BERT's 30522 rows: one error naming text.vocab_size."""
    from vlm.data.tokenizers import load_tokenizer

    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path))
    size = len(load_tokenizer("synthetic"))
    with pytest.raises(VLMConfigError, match=f"text.vocab_size: {size}"):
        FLAVA(**tiny_kwargs(tokenizer="synthetic"))
    FLAVA(**tiny_kwargs(tokenizer="minilm"))  # the matching vocabulary builds
