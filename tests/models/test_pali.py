"""PaLI on the shared parts, against independent references: image tokens prepended to the prompt of a plain
T5, a frozen ViT, cached greedy/beam generation, the captioning loss on decoder targets, the detection parser and
clear errors for a vocabulary or image size that does not fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlm.data.collate import collate
from vlm.data.pali_tasks import SENTINEL_TOKENS, SpanCorruptionTransform
from vlm.data.synthetic import SHAPES, SyntheticPairs, SyntheticText, SyntheticVQA
from vlm.data.tokenizers import box_to_loc_string, load_tokenizer
from vlm.data.transforms import PrefixLMTransform
from vlm.errors import VLMConfigError
from vlm.models.pali import PaLI, PaLIConfig, PaLICore, PaLIPrompts, parse_detections
from vlm.objectives.base import StepCache

VISION = {"model": "vit_tiny_patch16_224",
          "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}
T5 = {"model_type": "t5", "d_model": 32, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 2,
      "d_kv": 16, "dropout_rate": 0.0}
NUM_PATCHES = (32 // 8) ** 2


def make_model(seed=0, **kw) -> PaLI:
    torch.manual_seed(seed)
    return PaLI(size=None, vision=dict(VISION), lm={"kind": "seq2seq", "config": dict(T5)}, tokenizer="synthetic",
                generation={"max_new_tokens": 6}, **kw)


def batch_of(task="vqa", n=3, stream="vqa", **kw):
    tf = PrefixLMTransform(tokenizer="synthetic", task=task, image_size=32, max_length=24, target_max_length=32, **kw)
    ds = SyntheticPairs(split="train", num=20, image_size=32)
    b = collate([tf(ds[i]) for i in range(n)])
    b["stream"] = stream
    return b


def plain_t5(core: PaLICore):
    """A T5ForConditionalGeneration built by hand from the same shape, carrying the core's LM weights."""
    from transformers import T5Config, T5ForConditionalGeneration

    tok = core.tokenizer
    cfg = T5Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id,
                   **{k: v for k, v in T5.items() if k != "model_type"})
    ref = T5ForConditionalGeneration(cfg)
    ref.load_state_dict(core.lm.state_dict())
    return ref.eval()


def hand_encoder_input(core: PaLICore, b):
    """cat([proj(ViT patch features), embed(ids)]) and its mask, from the timm model and raw weights."""
    vit = core.vision.model
    with torch.no_grad():
        patches = vit.forward_features(b["pixel_values"])[:, vit.num_prefix_tokens:]
    images = patches @ core.proj.weight.T + core.proj.bias
    text = core.lm.shared.weight[b["input_ids"]]
    mask = torch.cat([torch.ones(b["input_ids"].shape[0], patches.shape[1], dtype=torch.long), b["attention_mask"]], 1)
    return torch.cat([images, text], 1), mask


def test_image_tokens_are_prepended_to_the_prompt_of_a_plain_t5():
    model = make_model().eval()
    core = model.core
    b = batch_of()
    embeds, mask = core.encode(b["pixel_values"], b["input_ids"], b["attention_mask"])
    want_embeds, want_mask = hand_encoder_input(core, b)
    assert embeds.shape == (3, NUM_PATCHES + b["input_ids"].shape[1], 32)
    assert torch.allclose(embeds, want_embeds, atol=1e-6) and torch.equal(mask, want_mask)

    ref = plain_t5(core)
    with torch.no_grad():
        got = core(b["pixel_values"], b["input_ids"], b["attention_mask"], labels=b["labels"]).logits
        want = ref(inputs_embeds=want_embeds, attention_mask=want_mask, labels=b["labels"]).logits
        # the image matters: another image gives other logits
        other = core(b["pixel_values"].flip(0), b["input_ids"], b["attention_mask"], labels=b["labels"]).logits
    assert got.shape == (3, b["labels"].shape[1], len(core.tokenizer))
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, other, atol=1e-4)


def test_frozen_vit_gets_no_gradient_and_stays_in_eval_mode_while_projection_and_lm_train():
    model = make_model()
    model.train()
    core = model.core
    assert not core.vision.training and not any(m.training for m in core.vision.modules())
    assert core.proj.training and core.lm.training
    assert not any(p.requires_grad for p in core.vision.parameters())
    seen = {}
    hook = core.vision.model.norm.register_forward_hook(
        lambda m, args, out: seen.update(grad_enabled=torch.is_grad_enabled(), requires_grad=out.requires_grad))
    b = batch_of()
    loss, _ = model.compute_losses(b)
    loss.backward()
    hook.remove()
    assert seen == {"grad_enabled": False, "requires_grad": False}  # no autograd graph through the tower
    assert all(p.grad is None for p in core.vision.parameters())
    assert core.proj.weight.grad is not None and core.proj.weight.grad.abs().sum() > 0
    lm_grads = [p.grad for p in core.lm.parameters()]
    assert all(g is not None for g in lm_grads) and core.lm.shared.weight.grad.abs().sum() > 0
    optimised = {id(p) for g in model.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in core.vision.parameters()}
    assert {id(p) for p in core.proj.parameters()} <= optimised and {id(p) for p in core.lm.parameters()} <= optimised


def greedy_without_cache(core: PaLICore, b, steps: int) -> torch.Tensor:
    embeds, mask = hand_encoder_input(core, b)
    ref = plain_t5(core)
    dec = torch.full((embeds.shape[0], 1), core.tokenizer.pad_token_id, dtype=torch.long)
    with torch.no_grad():
        for _ in range(steps):
            logits = ref(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
            dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return dec[:, 1:]


def varied(model: PaLI) -> PaLI:
    """Larger random weights than T5's init, so greedy decoding does not repeat one token."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.core.lm.named_parameters():
            if "layer_norm" not in name:
                p.normal_(0.0, 0.5)
    return model


def test_cached_generation_equals_a_greedy_loop_without_cache_and_batching_changes_nothing():
    model = varied(make_model()).eval()
    torch.manual_seed(0)
    b = batch_of(task="caption,vqa,vqg,ocr", lang="all", train=True, n=4)
    lengths = b["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1, "prompts of different lengths: padding is exercised"
    got = model.generate(b["pixel_values"], b["input_ids"], b["attention_mask"], eos_token_id=None, max_new_tokens=6)
    want = greedy_without_cache(model.core, b, 6)
    assert torch.equal(got, want)
    assert len(set(got.flatten().tolist())) > 2, "decoding exercised more than a repeated token"

    for kwargs in ({"num_beams": 1}, {"num_beams": 3}):
        batched = model.generate(b["pixel_values"], b["input_ids"], b["attention_mask"], eos_token_id=None,
                                 max_new_tokens=6, **kwargs)
        for i in range(4):
            n = int(lengths[i])
            single = model.generate(b["pixel_values"][i:i + 1], b["input_ids"][i:i + 1, :n],
                                    b["attention_mask"][i:i + 1, :n], eos_token_id=None, max_new_tokens=6, **kwargs)
            assert torch.equal(batched[i:i + 1], single), (kwargs, i)
    beams = model.generate(b["pixel_values"], b["input_ids"], b["attention_mask"], eos_token_id=None,
                           max_new_tokens=6, num_beams=3)
    beams_uncached = model.generate(b["pixel_values"], b["input_ids"], b["attention_mask"], eos_token_id=None,
                                    max_new_tokens=6, num_beams=3, use_cache=False)
    assert beams.shape == (4, 6) and torch.equal(beams, beams_uncached)
    # beam search finds a sequence at least as likely as greedy's
    assert (sequence_logp(model, b, beams) >= sequence_logp(model, b, got) - 1e-4).all()


def sequence_logp(model: PaLI, b, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model.core(b["pixel_values"], b["input_ids"], b["attention_mask"], labels=tokens).logits
    return logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1).sum(1)


def test_generation_stops_at_eos_and_decode_cuts_there():
    model = varied(make_model()).eval()
    b = batch_of(n=3)
    eos = model.tokenizer.eos_token_id
    free = model.generate(b["pixel_values"], b["input_ids"], b["attention_mask"], eos_token_id=None,
                          max_new_tokens=6)
    stop = int(free[0, 1])  # make row 0's second token the end token
    out = model.generate(b["pixel_values"], b["input_ids"], b["attention_mask"], eos_token_id=stop, max_new_tokens=6)
    assert int(out[0, 1]) == stop and (out[0, 2:] == model.tokenizer.pad_token_id).all()
    assert eos in model.stop_token_ids() and model.tokenizer.pad_token_id in model.stop_token_ids()
    text = model.decode(torch.tensor([[free[0, 0].item(), eos, free[0, 2].item()]]))[0]
    assert text == model.tokenizer.decode([int(free[0, 0])], skip_special_tokens=True).strip()


def test_loss_equals_cross_entropy_over_the_target_tokens_by_hand():
    model = make_model().eval()
    b = batch_of(task="caption", stream="alt_text")
    loss, logs = model.compute_losses(b)
    labels = b["labels"]
    embeds, mask = hand_encoder_input(model.core, b)
    start = torch.full((labels.shape[0], 1), model.tokenizer.pad_token_id, dtype=torch.long)
    decoder_in = torch.cat([start, labels[:, :-1]], 1)
    decoder_in = decoder_in.masked_fill(decoder_in == -100, model.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = plain_t5(model.core)(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_in).logits
    keep = labels != -100
    want = F.cross_entropy(logits[keep], labels[keep])
    assert keep.sum() > 10 and torch.allclose(loss, want, atol=1e-5)
    assert torch.allclose(logs["alt_text/caption/loss"], want, atol=1e-5)
    got_logits, got_labels = model.lm_logits(b, StepCache())
    assert got_labels is b["labels"] and got_logits.shape[:2] == labels.shape  # no causal shift


def test_detection_round_trip_and_garbage_parses_to_nothing():
    gen = torch.Generator().manual_seed(0)
    truth = []
    for i in range(5):
        x = torch.rand(2, generator=gen).sort().values.tolist()
        y = torch.rand(2, generator=gen).sort().values.tolist()
        truth.append(([x[0], y[0], x[1], y[1]], f"label {i}"))
    truth.append(([0.0, 0.0, 1.0, 1.0], "whole image"))
    text = " ; ".join(f"{box_to_loc_string(box)} {label}" for box, label in truth)
    parsed = parse_detections(text)
    assert [label for _, label in parsed] == [label for _, label in truth]
    for (box, _), (want, _) in zip(parsed, truth):
        assert all(abs(a - w) <= 1 / 1024 for a, w in zip(box, want)), (box, want)
    # the synthetic world's detection targets parse back to its boxes
    sample = SyntheticPairs(split="train", num=3, image_size=32)[2]
    boxes = [box for box, _ in parse_detections(sample["detection_target"])]
    assert len(boxes) == len(sample["boxes"])
    for box, want in zip(boxes, sample["boxes"]):
        assert all(abs(a - w) <= 1 / 1024 for a, w in zip(box, want))
    for garbage in ("", "a red circle", "<loc0001><loc0002> circle", "<loc12345><loc1><loc2><loc3> x", ";;;",
                    None, 42, b"<loc0001>", ["<loc0001>"]):
        assert parse_detections(garbage) == [], garbage


def test_a_tokenizer_or_image_size_that_does_not_fit_is_one_clear_error():
    model = make_model()

    class S:
        def __init__(self, **kw):
            self.transform = PrefixLMTransform(**{"tokenizer": "synthetic", "image_size": 32, **kw})

    model.check_inputs({"streams.vqa": S()})  # the model's own tokenizer and image size pass
    with pytest.raises(VLMConfigError, match="tokenizer='minilm'.*model's tokenizer"):
        model.check_inputs({"streams.vqa": S(tokenizer="minilm")})
    with pytest.raises(VLMConfigError, match="image_size=64.*32px"):
        model.check_inputs({"streams.vqa": S(image_size=64)})
    with pytest.raises(VLMConfigError, match="embedding table"):
        PaLICore(PaLIConfig(vision=dict(VISION), lm={"kind": "seq2seq", "config": {**T5, "vocab_size": 100}}))
    with pytest.raises(VLMConfigError, match="seq2seq"):
        PaLIConfig.named("tiny", {"lm": {"kind": "causal"}})
    with pytest.raises(VLMConfigError, match="Unknown PaLI"):
        PaLIConfig.named("huge")


def test_lm_table_is_resized_to_the_tokenizer_with_location_tokens():
    base = len(load_tokenizer("synthetic"))
    torch.manual_seed(0)
    core = PaLICore(PaLIConfig(vision=dict(VISION), lm={"kind": "seq2seq", "config": {**T5, "vocab_size": base}}))
    assert len(core.tokenizer) == base + 1024 + 100 == core.vocab_size
    assert core.lm.get_output_embeddings().weight.shape[0] == base + 1124
    assert core.tokenizer.convert_tokens_to_ids("<loc0000>") == base
    assert core.tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [base + 1024, base + 1123]
    tiny = PaLIConfig.named("tiny")
    assert tiny.lm["kind"] == "seq2seq" and tiny.freeze_vision and tiny.lm["config"]["d_model"] == 128
    assert PaLIConfig.named("base").lm["config"]["vocab_size"] == 32128


def test_prompt_streams_score_vqa_and_predict_through_the_base():
    model = make_model().eval()
    tf = PaLIPrompts(tokenizer="synthetic", task="vqa", image_size=32, max_length=24)
    ds = SyntheticVQA(split="val", num=4, image_size=32)
    b = collate([tf(ds[i]) for i in range(4)])
    b["stream"] = "vqa_answers"
    assert b["task"] == ["vqa"] * 4 and b["answers"][0] == ds[0]["answers"]
    model._eval_sums = {}
    model.validation_step(b)
    total, count = model._eval_sums["val/vqa_answers/vqa_accuracy"]
    assert count == 4 and 0 <= float(total) <= 4
    rows = model.predict_step(b)
    assert [r["key"] for r in rows] == b["key"] and all(isinstance(r["prediction"], str) for r in rows)


def span_batch(n=4, train=False):
    tf = SpanCorruptionTransform(tokenizer="synthetic", max_length=48, target_max_length=24, train=train)
    ds = SyntheticText(split="train", num=20, lang="all")
    b = collate([tf(ds[i]) for i in range(n)])
    b["stream"] = "text_span"
    return b, tf, ds


def test_span_corruption_stream_has_no_image_and_inputs_plus_targets_rebuild_the_text():
    b, tf, ds = span_batch()
    assert "pixel_values" not in b
    tok = tf.tokenizer
    model = make_model()
    model.check_inputs({"streams.text_span": type("S", (), {"transform": tf})()})  # sentinel ids agree
    sentinels = set(tok.convert_tokens_to_ids(list(SENTINEL_TOKENS)))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    for i in range(b["input_ids"].shape[0]):
        enc = [t for t in b["input_ids"][i].tolist() if t != pad]
        dec = [t for t in b["labels"][i].tolist() if t != -100]
        assert enc[-1] == eos and dec[-1] == eos and dec[0] in sentinels
        spans, cur = {}, None
        for t in dec[:-1]:
            if t in sentinels:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        rebuilt = [x for t in enc[:-1] for x in (spans[t] if t in sentinels else [t])]
        assert rebuilt == tok(ds[i]["text"], add_special_tokens=False)["input_ids"]
        assert 0 < sum(map(len, spans.values())) < len(rebuilt)
    again, _, _ = span_batch()
    assert torch.equal(again["input_ids"], b["input_ids"])  # evaluation spans are fixed by the sample


def test_text_only_batch_is_the_prompt_alone_through_a_plain_t5_and_trains_the_lm_only():
    model = make_model()
    b, _, _ = span_batch()
    core = model.core
    embeds, mask = core.encode(None, b["input_ids"], b["attention_mask"])
    assert torch.equal(embeds, core.lm.shared.weight[b["input_ids"]]) and torch.equal(mask, b["attention_mask"])
    with torch.no_grad():
        got = core(None, b["input_ids"], b["attention_mask"], labels=b["labels"]).logits
        want = plain_t5(core)(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    model.train()
    loss, logs = model.compute_losses(b)
    assert torch.isfinite(loss) and "text_span/caption/loss" in logs
    loss.backward()
    assert core.proj.weight.grad is None and core.lm.shared.weight.grad.abs().sum() > 0
    out = model.generate(None, b["input_ids"], b["attention_mask"], max_new_tokens=3)
    assert out.shape[0] == b["input_ids"].shape[0] and out.shape[1] <= 3


def test_object_aware_vqa_asks_about_each_shape_and_answers_from_the_scene():
    tf = PrefixLMTransform(tokenizer="synthetic", task="object_qa", lang="en", image_size=32, train=True)
    ds = SyntheticPairs(split="train", num=30, image_size=32)
    torch.manual_seed(0)
    asked = set()
    for i in range(30):
        s = ds[i]
        prompt, answer = tf.prompt_and_target(s)
        shape = next(sh for sh in SHAPES if f"is there a {sh} in the image?" in prompt)
        assert prompt.startswith("Answer in EN: ")
        assert answer == ("yes" if shape in {o["shape"] for o in s["objects"]} else "no")
        asked.add(shape)
    assert asked == set(SHAPES)
    assert "pixel_values" in tf(ds[0]) and tf(ds[0])["labels"][0] != -100


def test_image_pos_embed_adds_a_fixed_sincos_grid_to_the_image_tokens():
    from vlm.modules.embedding import sincos_2d

    table = sincos_2d(16, 32)
    assert table.shape == (16, 32) and float(table.abs().max()) <= 1.0
    assert torch.cdist(table, table).add(torch.eye(16) * 10).min() > 0.1  # every patch gets its own row
    assert torch.allclose(table[1, :8], table[0, :8]) and not torch.allclose(table[4, :8], table[0, :8])  # y: rows
    b = batch_of()
    plain, placed = make_model(), make_model(image_pos_embed=True)
    assert placed.config.image_pos_embed and not plain.config.image_pos_embed
    with torch.no_grad():
        got = placed.core.image_tokens(b["pixel_values"]) - plain.core.image_tokens(b["pixel_values"])
    assert torch.allclose(got, table.expand(3, -1, -1), atol=1e-5)


def test_image_pos_table_is_built_once_moves_with_the_module_and_is_not_saved():
    from vlm.modules.embedding import sincos_2d

    model = make_model(image_pos_embed=True)
    buf = model.core.image_pos_table
    assert torch.equal(buf, sincos_2d(16, 32))
    assert not any(k.endswith("image_pos_table") for k in model.state_dict())  # checkpoints stay as they were
    b = batch_of()
    with torch.inference_mode():  # first use under inference mode, then a training step: the buffer predates both
        model.core.image_tokens(b["pixel_values"])
    tokens = model.core.image_tokens(b["pixel_values"])
    tokens.sum().backward()
    assert model.core.image_pos_table is buf and model.core.proj.weight.grad is not None
    model.to(torch.float64)
    assert model.core.image_pos_table.dtype == torch.float64
    with torch.no_grad():
        feats = model.core.vision(b["pixel_values"].double())
        want = model.core.proj(feats) + sincos_2d(16, 32).double()
        assert torch.allclose(model.core.image_tokens(b["pixel_values"].double()), want)


def test_padding_columns_are_trimmed_before_the_forward_and_the_loss_and_gradients_stay_those_of_the_full_batch():
    model = make_model()
    b = batch_of(task="vqa", n=4)
    trimmed = model.prepare_batch(b)
    # the widths are what the masks say: the longest prompt, the longest answer
    assert trimmed["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max()) < b["input_ids"].shape[1]
    assert trimmed["labels"].shape[1] == int((b["labels"] != -100).sum(1).max()) < b["labels"].shape[1]
    assert trimmed["decoder_attention_mask"].shape == trimmed["labels"].shape

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model.compute_losses(batch)[0]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, g_full = loss_and_grads(b)
    short, g_short = loss_and_grads(trimmed)
    # the full batch through a plain T5 built by hand: the reference
    labels = b["labels"]
    embeds, mask = hand_encoder_input(model.core, b)
    start = torch.full((labels.shape[0], 1), model.tokenizer.pad_token_id, dtype=torch.long)
    decoder_in = torch.cat([start, labels[:, :-1]], 1).masked_fill(torch.cat([start, labels[:, :-1]], 1) == -100,
                                                                   model.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = plain_t5(model.core)(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_in).logits
    want = F.cross_entropy(logits[labels != -100], labels[labels != -100])
    assert torch.allclose(full, want, atol=1e-5) and torch.allclose(short, want, atol=1e-5)
    assert g_full.keys() == g_short.keys()
    for name in g_full:
        assert torch.allclose(g_full[name], g_short[name], atol=1e-6, rtol=1e-4), name


def test_padding_is_kept_when_asked_when_the_step_is_compiled_and_in_front_of_left_padded_prompts():
    b = batch_of(task="vqa", n=2)
    # left-padded prompts (each moved to the end of its row): the gap between image and prompt counts under T5's
    # relative positions, so nothing before the prompt is cut; the targets still are
    ids, att = b["input_ids"].clone(), b["attention_mask"].clone()
    for i in range(len(ids)):
        shift = ids.shape[1] - int(att[i].sum())
        ids[i], att[i] = ids[i].roll(shift), att[i].roll(shift)
    left = make_model().prepare_batch({**b, "input_ids": ids, "attention_mask": att})
    assert left["input_ids"] is ids and left["labels"].shape[1] < b["labels"].shape[1]
    for model in (make_model(trim_padding=False), make_model(compile="step")):
        assert model.trim_padding is False and model.prepare_batch(b) is b
    assert make_model(compile="step", trim_padding=True).trim_padding is True


def test_training_steps_see_the_trimmed_batches_of_the_multi_stream_datamodule():
    import lightning as L

    from vlm.data.module import MultiStreamDataModule
    from vlm.data.stream import Stream

    tf = PrefixLMTransform(tokenizer="synthetic", task="vqa", image_size=32, max_length=24, target_max_length=32,
                           train=True)
    dm = MultiStreamDataModule({"vqa": Stream(SyntheticPairs(split="train", num=16, image_size=32), transform=tf)},
                               batch_size=4)
    seen = []

    class Widths(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((batch["input_ids"].shape[1], batch["labels"].shape[1],
                         int(batch["attention_mask"].sum(1).max()), int((batch["labels"] != -100).sum(1).max())))

    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Widths()])
    trainer.fit(make_model(streams={"vqa": {"caption": 1.0}}), dm)
    # each step's widths are its longest prompt and its longest answer, not the transform's 24 and 32
    assert len(seen) == 2 and all(iw == p and lw == t < 32 for iw, lw, p, t in seen), seen
