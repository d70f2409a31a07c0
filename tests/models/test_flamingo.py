"""Flamingo on the shared parts: any causal LM, wrapped by composition, identity at initialisation, only the new
parts train, the media rule, cached generation, scoring and few-shot prompts."""

from __future__ import annotations

import copy

import pytest
import torch

from vlm.data.collate import collate
from vlm.data.fewshot import FewShotPrompts, TaskDocuments
from vlm.data.synthetic import SyntheticPairs, SyntheticVQA
from vlm.data.transforms import InterleavedTransform
from vlm.encoders.lm import LMConfig, build_lm, enable_checkpointing
from vlm.errors import VLMConfigError
from vlm.models.flamingo import Flamingo, FlamingoConfig, FlamingoCore, FlamingoLayer

VISION = {"model": "vit_tiny_patch16_224",
          "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}
LMS = {
    "gpt2": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 128},
    "opt": {"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "ffn_dim": 64, "max_position_embeddings": 128, "word_embed_proj_dim": 32},
    "llama": {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 64, "max_position_embeddings": 128},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 64, "max_position_embeddings": 128},
}
CORE = dict(num_latents=4, resampler_depth=1, resampler_heads=2, resampler_dim_head=16, xattn_heads=2,
            xattn_dim_head=16, ff_mult=2)


def make_core(family="gpt2", seed=0, **kw) -> FlamingoCore:
    torch.manual_seed(seed)
    cfg = FlamingoConfig(vision=dict(VISION), lm={"config": dict(LMS[family])}, tokenizer="synthetic",
                         **{**CORE, **kw})
    return FlamingoCore(cfg).eval()


def batch_of(core: FlamingoCore, docs, max_length=40, max_images=2):
    tf = InterleavedTransform(tokenizer="synthetic", max_length=max_length, max_images=max_images, image_size=32)
    assert tf.tokenizer.convert_tokens_to_ids("<image>") == core.image_token_id
    return collate([tf(d) for d in docs])


def docs(n=3):
    from vlm.data.synthetic import SyntheticInterleaved

    ds = SyntheticInterleaved(split="train", num=50, image_size=32)
    return [ds[i] for i in range(n)]


def open_gates(core: FlamingoCore, value=1.0):
    for name, p in core.named_parameters():
        if name.endswith("_gate"):
            p.data.fill_(value)


@pytest.mark.parametrize("family", sorted(LMS))
def test_logits_at_initialisation_equal_the_frozen_lm(family):
    core = make_core(family)
    b = batch_of(core, docs())
    with torch.no_grad():
        with_media = core(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_mask"]).logits
        without = core(b["input_ids"], b["attention_mask"]).logits
    assert torch.equal(with_media, without)
    # and the LM itself is the one transformers builds from the same config and seed, untouched
    ref = core.lm
    text = b["input_ids"].clone()
    text[text >= core.vocab_size - 2] = 5  # plain tokens only: the reference LM has no <image> row of its own
    plain = build_plain_lm(family)
    with torch.no_grad():
        got = ref(input_ids=text, attention_mask=b["attention_mask"]).logits[..., : plain.config.vocab_size]
        want = plain(input_ids=text, attention_mask=b["attention_mask"]).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert isinstance(layer_list(core)[0], FlamingoLayer)


def build_plain_lm(family):
    """The LM transformers builds from the same config and seed, never wrapped."""
    from vlm.data.tokenizers import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer("synthetic")
    ids = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}  # the tokenizer's
    return build_lm(LMConfig(config={**ids, **LMS[family]}), vocab_size=len(tok)).eval()


def layer_list(core):
    from vlm.encoders.lm import decoder_layers

    return decoder_layers(core.lm)


def test_only_resampler_cross_attention_and_new_rows_train():
    core = make_core("gpt2", cross_attn_every=2)
    trainable = {n for n, p in core.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    for n in trainable:
        assert n.startswith("resampler.") or ".xattn." in n or n.endswith(".extra"), n
    assert not any(p.requires_grad for p in core.vision.parameters())
    # every 2nd block gets a gated cross-attention block
    assert core.xattn_layer_ids == [1]
    assert [isinstance(layer, FlamingoLayer) for layer in layer_list(core)] == [False, True]
    extra = [p for n, p in core.named_parameters() if n.endswith(".extra")]
    assert len(extra) == 1 and extra[0].shape[0] == 2  # tied GPT-2 head: one set of rows for <image>, <|endofchunk|>
    # an LM that trains (no pretrained one at hand) trains all of itself, its embedding table included
    joint = make_core("gpt2", freeze_lm=False)
    frozen = {n for n, p in joint.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("vision.") for n in frozen)


def test_media_rule_immediate_and_all_previous():
    for only_immediate in (True, False):
        core = make_core("llama", only_attend_immediate=only_immediate)
        open_gates(core)
        tf = InterleavedTransform(tokenizer="synthetic", max_length=48, max_images=2, image_size=32)
        pairs = SyntheticPairs(split="train", num=4, image_size=32)
        doc = {"segments": [("text", "some words first"), ("image", pairs[0]["image"]), ("text", "a red circle"),
                            ("image", pairs[1]["image"]), ("text", "a blue square")]}
        b = collate([tf(doc)])
        ids = b["input_ids"]
        first, second = (ids[0] == core.image_token_id).nonzero().flatten().tolist()
        changed = b["pixel_values"].clone()
        changed[0, 0] = torch.randn_like(changed[0, 0])  # a different first image
        with torch.no_grad():
            a = core(ids, b["attention_mask"], b["pixel_values"], b["image_mask"]).logits
            c = core(ids, b["attention_mask"], changed, b["image_mask"]).logits
        diff = (a - c).abs().amax(-1)[0]
        assert diff[:first].max() == 0  # text before the first image never sees an image
        assert diff[first:second].min() > 0  # the first image's text depends on it
        if only_immediate:
            # each token attends only to the latest image: the second chunk ignores the first image directly
            # (the LM's self-attention still reads earlier text, so compare the cross-attention inputs instead)
            layer = layer_list(core)[0]
            media = core.encode_media(b["pixel_values"], b["image_mask"])
            media_c = core.encode_media(changed, b["image_mask"])
            h = torch.randn(1, ids.shape[1], core.hidden_size)
            idx = core.conditioning(ids, media).index
            with torch.no_grad():
                x1 = layer.xattn(h, media, idx)
                x2 = layer.xattn(h, media_c, idx)
            assert (x1 - x2).abs().amax(-1)[0, second:].max() == 0
        else:
            assert diff[second:].min() > 0


def greedy_without_cache(core, b, steps):
    ids, mask = b["input_ids"], b["attention_mask"]
    out = []
    for _ in range(steps):
        with torch.no_grad():
            positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: positions count real tokens only
            logits = core(ids, mask, b["pixel_values"], b["image_mask"], use_cache=False,
                          position_ids=positions).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return torch.cat(out, 1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_generation_equals_recomputing_everything(family):
    model = Flamingo(size=None, vision=VISION, lm={"config": dict(LMS[family])}, tokenizer="synthetic",
                     config=dict(CORE), generation={"max_new_tokens": 5})
    model.eval()
    open_gates(model.core, 0.5)
    support = SyntheticVQA(split="train", num=20, image_size=32)
    tf = FewShotPrompts(support, shots=1, task="vqa", tokenizer="synthetic", max_length=64, image_size=32)
    queries = SyntheticVQA(split="val", num=3, image_size=32)
    b = collate([tf(queries[i]) for i in range(3)])
    assert (b["attention_mask"][:, 0] == 0).any(), "prompts of different lengths: left padding is exercised"
    got = model.generate(b["pixel_values"], b["input_ids"], b["attention_mask"], b["image_mask"],
                         eos_token_id=None, min_new_tokens=5)
    want = greedy_without_cache(model.core, b, 5)
    assert torch.equal(got, want)


def test_score_is_the_summed_log_likelihood_of_the_marked_tokens():
    model = Flamingo(size=None, vision=VISION, lm={"config": dict(LMS["opt"])}, tokenizer="synthetic", config=dict(CORE))
    model.eval()
    open_gates(model.core, 0.3)
    b = batch_of(model.core, docs(2))
    target = b["labels"] != -100
    got = model.score(b["pixel_values"], b["input_ids"], b["attention_mask"], target, b["image_mask"])
    with torch.no_grad():
        logits = model.core(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_mask"]).logits.double()
    logp = logits.log_softmax(-1)
    want = torch.zeros(2, dtype=torch.float64)
    for i in range(2):
        for t in range(1, b["input_ids"].shape[1]):
            if target[i, t]:
                want[i] += logp[i, t - 1, b["input_ids"][i, t]]
    assert torch.allclose(got.double(), want, atol=1e-4)


def test_training_step_moves_only_trainable_parts_and_gradient_checkpointing_matches():
    model = Flamingo(size=None, vision=VISION, lm={"config": dict(LMS["qwen2"])}, tokenizer="synthetic",
                     config=dict(CORE))
    open_gates(model.core, 0.5)
    b = batch_of(model.core, docs(2))
    b["stream"] = "interleaved"
    model.train()
    loss, _ = model.compute_losses(b)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(p.requires_grad for n, p in model.named_parameters() if n in grads)
    assert any(".xattn." in n for n in grads) and any(n.startswith("core.resampler.") for n in grads)
    model.zero_grad(set_to_none=True)
    enable_checkpointing(model.core.lm)
    loss2, _ = model.compute_losses(b)
    loss2.backward()
    assert torch.allclose(loss, loss2)
    for n, g in grads.items():
        assert torch.allclose(g, dict(model.named_parameters())[n].grad, atol=1e-6), n


def test_a_tokenizer_that_does_not_match_the_model_is_one_clear_error():
    model = Flamingo(size=None, vision=VISION, lm={"config": dict(LMS["gpt2"])}, tokenizer="synthetic", config=dict(CORE))

    class S:
        transform = InterleavedTransform(tokenizer="minilm", max_length=32, image_size=32)

    with pytest.raises(VLMConfigError, match="tokenizer"):
        model.check_inputs({"streams.interleaved": S()})
    with pytest.raises(VLMConfigError, match="embedding table"):
        FlamingoCore(FlamingoConfig(vision=dict(VISION), lm={"config": {**LMS["gpt2"], "vocab_size": 100}},
                                    tokenizer="synthetic", **CORE))


def test_fewshot_prompts_and_task_documents():
    support = SyntheticVQA(split="train", num=30, image_size=32)
    tf = FewShotPrompts(support, shots=2, task="vqa", tokenizer="synthetic", max_length=96, image_size=32)
    q = SyntheticVQA(split="val", num=2, image_size=32)[0]
    out = tf(q)
    tok = tf.tokenizer
    text = tok.decode(out["input_ids"][out["attention_mask"].bool()])
    assert text.count("<image>") == 3 and text.count("<|endofchunk|>") == 2
    assert text.rstrip().endswith("Short answer:") and q["question"] in text
    assert out["answers"] == [q["answer"]] and out["image_mask"].all() and out["shots"] == 2
    assert tf(q)["input_ids"].tolist() == out["input_ids"].tolist()  # the same query gets the same support
    docs_ = TaskDocuments(support, task="vqa", per_document=3)
    assert len(docs_) == 10
    d = InterleavedTransform(tokenizer="synthetic", max_length=96, max_images=3, image_size=32)(docs_[0])
    assert int(d["image_mask"].sum()) == 3 and (d["labels"] != -100).any()
    with pytest.raises(VLMConfigError):
        FewShotPrompts(support, shots=40, tokenizer="synthetic")


def test_named_sizes_and_unknown_keys():
    cfg = FlamingoConfig.named("tiny", {"num_latents": 3})
    assert cfg.num_latents == 3 and cfg.lm["config"]["model_type"] == "gpt2"
    with pytest.raises(VLMConfigError, match="no_such"):
        FlamingoConfig.named("tiny", {"no_such": 1})
    with pytest.raises(VLMConfigError, match="size"):
        FlamingoConfig.named("huge", {})
    assert copy.deepcopy(cfg) == cfg


def test_open_flamingo_checkpoint_loads_into_the_core(tmp_path):
    """A checkpoint in OpenFlamingo's layout (its own modules' state dicts) gives this core the same outputs."""
    from safetensors.torch import save_file

    of = pytest.importorskip("open_flamingo.src.helpers")
    core = make_core("gpt2")
    dim, vdim = core.hidden_size, core.vision.hidden_size
    torch.manual_seed(1)
    perceiver = of.PerceiverResampler(dim=vdim, depth=1, dim_head=16, heads=2, num_latents=4, ff_mult=2)
    state = {f"perceiver.{k}": v for k, v in perceiver.state_dict().items()}
    for i in range(2):
        block = of.GatedCrossAttentionBlock(dim=dim, dim_visual=vdim, dim_head=16, heads=2, ff_mult=2)
        with torch.no_grad():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(-0.25)
        state.update({f"lang_encoder.gated_cross_attn_layers.{i}.{k}": v for k, v in block.state_dict().items()})
    path = tmp_path / "checkpoint.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    from vlm.convert.open_flamingo import load_flamingo_weights

    report = load_flamingo_weights(core, path)
    assert report["kept"] == ["lm.transformer.wte.extra"]  # the new token rows are this model's own
    x = torch.randn(2, 1, 1, 16, vdim)
    with torch.no_grad():
        assert torch.allclose(core.resampler(x), perceiver(x), atol=1e-5)
    # this model's own trainable checkpoint round-trips through the same loader
    own = {k: v.clone() for k, v in core.trainable_state_dict().items()}
    other = make_core("gpt2", seed=3)
    load_flamingo_weights(other, own)
    assert all(torch.equal(p, own[k]) for k, p in other.trainable_state_dict().items())
    bad = make_core("gpt2", num_latents=5)
    with pytest.raises(VLMConfigError, match="shape"):
        load_flamingo_weights(bad, path)


def test_video_frames_go_through_the_resampler_with_frame_embeddings():
    """[B, M, F, 3, H, W]: each medium's frames are resampled together into one set of latents, and the frame
    embeddings make the order of frames matter."""
    core = make_core("gpt2", max_num_frames=3)
    video = torch.randn(2, 1, 3, 3, 32, 32)
    with torch.no_grad():
        core.resampler.frame_embs.normal_()
        latents = core.encode_media(video, torch.ones(2, 1, dtype=torch.bool))
        swapped = core.encode_media(video[:, :, [2, 1, 0]], torch.ones(2, 1, dtype=torch.bool))
        one_frame = core.encode_media(video[:, :, :1], torch.ones(2, 1, dtype=torch.bool))
    assert latents.shape == (2, 1, core.cfg.num_latents, core.vision.hidden_size)
    assert not torch.allclose(latents, swapped) and not torch.allclose(latents, one_frame)
    with pytest.raises(VLMConfigError):
        core.encode_media(torch.randn(1, 1, 4, 3, 32, 32))  # more frames than the frame table
