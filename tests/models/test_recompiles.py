"""Compiling must not recompile: a real fit counts every graph ``torch.compile`` hands to its backend.

An H200 run with ``compile: true`` once compiled FLAVA's towers 8 times before its first optimizer step
(~2.5 minutes): the sanity validation compiled them under ``no_grad`` with validation shapes, then training
recompiled them for grad mode, for ``bool_masked_pos`` None vs a tensor, for ``return_pre_norm`` and for the
zero-shot prompts' shapes. Here a counting backend (it runs each graph as the traced ``GraphModule``, eagerly,
so the fit stays fast on CPU) sees every compilation of a tiny fit of ``conf/flava/tiny.yaml``: 9 training
steps (3 per stream), a sanity check and two validations with loss, retrieval, zero-shot prompts and a
partial last validation batch (20 + 20 + 10 pairs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.models.test_flava import make_batch, tiny_kwargs
from vlm.models.flava import FLAVA

ROOT = Path(__file__).resolve().parents[2]
BACKEND = "vlm_test_counting"
GRAPHS: list[str] = []  # one entry per compiled graph: its input shapes (what a failure message shows)


def counting(gm: torch.fx.GraphModule, example_inputs):
    GRAPHS.append(" ".join(str(tuple(getattr(x, "shape", ()))) for x in example_inputs if isinstance(x, torch.Tensor)))
    return gm.forward


if BACKEND not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(counting, name=BACKEND)


def fit_and_count(tmp_path, monkeypatch, scope: str) -> list[str]:
    from vlm.cli import VLMCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    torch._dynamo.reset()
    GRAPHS.clear()
    data = "--data.init_args"
    cli = VLMCLI(args=[
        "--config", str(ROOT / "conf/flava/tiny.yaml"),
        f"--model.init_args.compile={scope}", f"--model.init_args.compile_options={{backend: {BACKEND}}}",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.max_steps=9", "--trainer.val_check_interval=4",  # validation after steps 4 and 8 (+ sanity)
        f"{data}.batch_size=8",
        f"{data}.streams.pairs.init_args.dataset.init_args.num=128",
        f"{data}.val_streams.pairs.init_args.dataset.init_args.num=50",
        f"{data}.val_streams.pairs.init_args.batch_size=20",  # 20, 20, then a partial 10
    ], run=False)
    model = cli.model
    cli.trainer.fit(model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 9
    logged = cli.trainer.callback_metrics
    # validation ran with every metric (losses, retrieval over all 50 pairs, zero-shot prompts)
    assert {"val/pairs/loss", "val/zeroshot/top1"} <= set(logged), sorted(logged)
    assert any(k.startswith("val/retrieval/") for k in logged), sorted(logged)
    assert {"train/pairs/loss", "train/images/loss", "train/text/loss"} <= set(logged), sorted(logged)
    return list(GRAPHS)


def test_compiled_towers_compile_once_each(tmp_path, monkeypatch):
    graphs = fit_and_count(tmp_path, monkeypatch, "towers")
    # One graph per tower: training calls each compiled tower with one signature (grad mode, train mode, a
    # mask tensor, return_pre_norm=True; pairs and images batches share the image shape, pairs and text the
    # text shape, and ITM's shuffled negatives fuse as many rows as the positives), while validation,
    # encode_image/encode_text and the zero-shot prompts run the towers eagerly.
    assert len(graphs) == 3, graphs


def test_compiled_step_compiles_once_per_stream(tmp_path, monkeypatch):
    graphs = fit_and_count(tmp_path, monkeypatch, "step")
    # One graph per stream (the stream name is a constant of the graph: pairs, images, text); validation
    # and inference run eagerly.
    assert len(graphs) == 3, graphs


@pytest.mark.parametrize("stream", ["pairs", "images"])
def test_all_false_mask_is_exactly_no_mask(stream):
    """The compiled towers get an all-False ``bool_masked_pos`` on unmasked passes (one signature): in eager
    it must give bit-identical outputs to ``None``."""
    torch.manual_seed(0)
    model = FLAVA(**tiny_kwargs()).train()
    pixels = make_batch(stream)["pixel_values"]
    mask = torch.zeros(pixels.shape[0], model.image_encoder.num_patches, dtype=torch.bool)
    with torch.no_grad():
        out_none, pre_none = model.image_encoder(pixels, None, return_pre_norm=True)
        out_mask, pre_mask = model.image_encoder(pixels, mask, return_pre_norm=True)
    assert torch.equal(out_none, out_mask) and torch.equal(pre_none, pre_mask)


@pytest.mark.parametrize("stream", ["pairs", "images", "text"])
def test_compiled_towers_give_eager_losses_and_evaluate_eagerly(stream):
    torch._dynamo.reset()
    GRAPHS.clear()
    torch.manual_seed(0)
    eager = FLAVA(**tiny_kwargs()).train()
    compiled = FLAVA(**tiny_kwargs(compile=True, compile_options={"backend": BACKEND})).train()
    compiled.load_state_dict(eager.state_dict())
    batch = dict(make_batch(stream), batch_index=0)
    le, logs_e = eager.compute_losses(batch)
    lc, logs_c = compiled.compute_losses(batch)
    assert GRAPHS, "the training step used the compiled towers"
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    for k in logs_e:
        torch.testing.assert_close(logs_c[k], logs_e[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    n = len(GRAPHS)
    with torch.no_grad():  # evaluation and inference: eager, the same results, nothing compiled
        torch.testing.assert_close(compiled.compute_losses(batch)[0], eager.compute_losses(batch)[0])
        if "pixel_values" in batch:
            torch.testing.assert_close(compiled.encode_image(batch["pixel_values"]),
                                       eager.encode_image(batch["pixel_values"]))
    if "input_ids" in batch:
        torch.testing.assert_close(compiled.encode_text(batch["input_ids"][:3, :5]),
                                   eager.encode_text(batch["input_ids"][:3, :5]))
    compiled.eval()
    compiled.compute_losses(batch)
    assert len(GRAPHS) == n


@pytest.mark.parametrize("scope", ["towers", "step"])
def test_a_short_training_batch_runs_eagerly_instead_of_recompiling(scope):
    """A batch that lost samples (corrupt ones are skipped by collate) would add a graph, and dynamo's automatic
    dynamic shapes would then leave every later batch on dynamic-shape code: it runs eagerly instead."""
    torch._dynamo.reset()
    GRAPHS.clear()
    torch.manual_seed(0)
    eager = FLAVA(**tiny_kwargs()).train()
    compiled = FLAVA(**tiny_kwargs(compile=scope, compile_options={"backend": BACKEND})).train()
    compiled.load_state_dict(eager.state_dict())
    for step, size in enumerate([4, 3, 4, 1]):
        batch = {k: v[:size] if isinstance(v, torch.Tensor) else v for k, v in make_batch("pairs", seed=step).items()}
        batch["batch_index"] = step
        torch.testing.assert_close(compiled.compute_losses(batch)[0], eager.compute_losses(batch)[0],
                                   rtol=1e-5, atol=1e-6)
        if step == 0:
            n = len(GRAPHS)
            assert n > 0
    assert len(GRAPHS) == n, GRAPHS[n:]
