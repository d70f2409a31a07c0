"""HF FLAVA import: with identical weights and inputs, vlm FLAVA reproduces transformers' outputs and losses."""

import pytest
import torch
import transformers

from vlm.convert.hf_flava import flava_from_hf, map_hf_state
from vlm.errors import VLMConfigError
from vlm.objectives.base import StepCache

B, L, IMG, PATCH = 6, 12, 32, 8
N = (IMG // PATCH) ** 2
VOCAB, CODES = 200, 64


def tiny_hf_config():
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return transformers.FlavaConfig(
        image_config=dict(sizes, image_size=IMG, patch_size=PATCH, vocab_size=CODES),
        text_config=dict(sizes, vocab_size=VOCAB, max_position_embeddings=40),
        multimodal_config=dict(sizes),
        image_codebook_config=dict(hidden_size=8, vocab_size=CODES, num_blocks_per_group=1),
        hidden_size=32, projection_dim=24,
    )


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf = transformers.FlavaForPreTraining(tiny_hf_config()).eval()
    with torch.no_grad():  # move every tensor off its init value (zeros/ones/tied) so a wrong mapping shows
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for p in hf.image_codebook.parameters():  # a random codebook needs spread-out logits to use many codes
            p.normal_(0.0, 0.3)
    ours = flava_from_hf(hf).eval()
    return hf, ours


def make_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(110, VOCAB, (B, L), generator=g)
    ids[:, 0] = 101
    attention = torch.ones(B, L, dtype=torch.long)
    for row, n in enumerate([12, 9, 12, 7, 10, 12]):
        attention[row, n:] = 0
        ids[row, n:] = 0
        ids[row, n - 1] = 102
    pick = (torch.rand(B, L, generator=g) < 0.3) & attention.bool() & (ids > 103)
    pick[:, 2] = True
    masked = torch.where(pick, torch.full_like(ids, 103), ids)
    mlm_labels = torch.where(pick, ids, torch.full_like(ids, -100))
    bool_masked_pos = torch.rand(B, N, generator=g) < 0.4
    bool_masked_pos[:, 0] = True
    return {
        "pixel_values": torch.randn(B, 3, IMG, IMG, generator=g),
        "input_ids": ids, "attention_mask": attention, "input_ids_masked": masked, "mlm_labels": mlm_labels,
        "bool_masked_pos": bool_masked_pos, "mim_labels": torch.randint(0, CODES, (B, N), generator=g),
        "itm_labels": torch.tensor([1, 0, 1, 1, 0, 1]),
    }


def hf_run(hf, batch, **extra):
    keys = ["pixel_values", "input_ids", "attention_mask", "input_ids_masked", "mlm_labels", "bool_masked_pos",
            "mim_labels", "itm_labels"]
    args = {k: batch[k].clone() for k in keys if k in batch}  # HF edits mim_labels in place
    with torch.no_grad():
        return hf(**args, **extra, return_loss=True)


def close(ours, ref, rtol=1e-4):
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape
    err = ((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()
    assert err <= rtol, f"relative error {err:.2e}"


def test_pair_batch_matches_transformers(pair):
    hf, ours = pair
    batch = make_batch()
    ref = hf_run(hf, batch)
    b = dict(batch, stream="pairs")
    cache = StepCache()
    with torch.no_grad():
        close(ours.image_hidden(b, cache, masked=False), ref.image_embeddings)
        close(ours.text_hidden(b, cache, masked=False), ref.text_embeddings)
        close(ours.image_hidden(b, cache, masked=True), ref.image_masked_embeddings)
        close(ours.text_hidden(b, cache, masked=True), ref.text_masked_embeddings)
        close(ours.multimodal_hidden(b, cache, masked=True), ref.multimodal_masked_output.last_hidden_state)
        image_emb, text_emb = ours.contrastive_embeddings(b, cache)
        pos = ours.positive_rows(b, cache)
        scale = ours.objectives["gc"].logit_scale.exp()
        close((scale * image_emb @ text_emb.T)[pos], ref.contrastive_logits_per_image)
        close((scale * text_emb @ image_emb.T)[pos], ref.contrastive_logits_per_text)
        losses = {k: ours.objectives[k](ours, b, cache) for k in ("itm", "mmm")}
        # HF's GC convention: rows = matched pairs only, columns = every text/image of the batch.
        labels = torch.arange(B)[pos]
        logits = scale * image_emb @ text_emb.T
        hf_style_gc = (torch.nn.functional.cross_entropy(logits[pos], labels)
                       + torch.nn.functional.cross_entropy(logits.T[pos], labels)) / 2
    info = ref.loss_info
    close(losses["itm"].loss, info.itm)
    close(losses["mmm"].metrics["text_loss"], info.mmm_text)
    close(losses["mmm"].metrics["image_loss"], info.mmm_image)
    close(losses["mmm"].loss, info.mmm_text + info.mmm_image)
    close(hf_style_gc, info.global_contrastive)


def test_gc_loss_matches_transformers_on_matched_batch(pair):
    hf, ours = pair
    batch = make_batch(seed=5)
    batch["itm_labels"] = torch.ones(B, dtype=torch.long)
    ref = hf_run(hf, batch)
    with torch.no_grad():
        gc = ours.objectives["gc"](ours, dict(batch, stream="pairs"), StepCache())
    close(gc.loss, ref.loss_info.global_contrastive)


def test_gc_loss_matches_transformers_with_itm_negatives(pair):
    hf, ours = pair
    batch = make_batch()
    ref = hf_run(hf, batch)
    with torch.no_grad():
        gc = ours.objectives["gc"](ours, dict(batch, stream="pairs"), StepCache())
    close(gc.loss, ref.loss_info.global_contrastive)


def test_unimodal_batches_match_transformers(pair):
    hf, ours = pair
    batch = make_batch(seed=2)
    images = {k: batch[k] for k in ("pixel_values", "bool_masked_pos", "mim_labels")}
    texts = {k: batch[k] for k in ("input_ids", "attention_mask", "input_ids_masked", "mlm_labels")}
    ref_i, ref_t = hf_run(hf, images), hf_run(hf, texts)
    with torch.no_grad():
        mim = ours.objectives["mim"](ours, dict(images, stream="images"), StepCache())
        mlm = ours.objectives["mlm"](ours, dict(texts, stream="text"), StepCache())
    close(mim.loss, ref_i.loss_info.mim)
    close(mlm.loss, ref_t.loss_info.mlm)


def test_codebook_targets_match_transformers(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(3)
    codebook_pixels = torch.rand(B, 3, IMG, IMG, generator=g)  # grid 4x4 of codes from 32x32 pixels
    with torch.no_grad():
        expected = hf.image_codebook.get_codebook_indices(codebook_pixels).flatten(1)
        got = ours.image_codebook.encode_codebook_pixels(codebook_pixels)
    assert expected.unique().numel() > 1
    assert torch.equal(got, expected)
    # MMM with codebook targets computed by the models themselves (no mim_labels in the batch)
    batch = make_batch(seed=4)
    batch.pop("mim_labels")
    ref = hf_run(hf, batch, codebook_pixel_values=codebook_pixels)
    b = dict(batch, stream="pairs", codebook_pixel_values=codebook_pixels)
    cache = StepCache()
    with torch.no_grad():
        assert torch.equal(ours.image_targets(b, cache), expected)
        mmm = ours.objectives["mmm"](ours, b, cache)
    close(mmm.metrics["image_loss"], ref.loss_info.mmm_image)


def test_unmapped_tensor_fails_loudly(pair):
    hf, ours = pair
    state = dict(hf.state_dict())
    state["flava.some_new_layer.weight"] = torch.zeros(3)
    with pytest.raises(VLMConfigError, match="some_new_layer"):
        map_hf_state(state, ours)


def test_core_from_flava_model_matches_transformers():
    """flava_core_from_hf builds only the core, from a bare FlavaModel: its unmasked passes and fused output equal
    transformers' FlavaModel on the same inputs (image, text and multimodal hidden states)."""
    from vlm.convert.hf_flava import flava_core_from_hf
    from vlm.models.flava import FLAVACore

    torch.manual_seed(1)
    hf = transformers.FlavaModel(tiny_hf_config()).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    core = flava_core_from_hf(hf).eval()
    assert isinstance(core, FLAVACore) and core.image_codebook is None
    assert core.cfg.text["vocab_size"] == VOCAB and core.cfg.vision["patch_size"] == PATCH
    batch = make_batch(seed=6)
    with torch.no_grad():
        ref = hf(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                 attention_mask=batch["attention_mask"])
        ours = core(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    close(ours["image_hidden"], ref.image_embeddings)
    close(ours["text_hidden"], ref.text_embeddings)
    close(ours["multimodal_hidden"], ref.multimodal_embeddings)
    expected_image = torch.nn.functional.normalize(hf.image_projection(ref.image_embeddings[:, 0]), dim=-1)
    close(ours["image_embedding"], expected_image)


def test_core_from_pretraining_model_drops_the_heads_and_keeps_the_codebook(pair):
    """The core of a FlavaForPreTraining is the FLAVA model's core: the same tensors, and the HF image codebook."""
    from vlm.convert.hf_flava import flava_core_from_hf

    hf, ours = pair
    core = flava_core_from_hf(hf)
    mine, theirs = core.state_dict(), ours.core.state_dict()
    assert mine.keys() == theirs.keys() and any(k.startswith("image_codebook.") for k in mine)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
