"""``compile="step"``: a training step's whole loss computation as one ``torch.compile`` graph, equal to eager.

``fullgraph=True`` makes any graph break an error, so these tests also pin down that FLAVA's default
objectives (GC, ITM with shuffled in-batch negatives, MMM, MIM, MLM) are free of host syncs and
data-dependent shapes once ``Objective.prepare`` has drawn the masks and negatives. ``aot_eager`` runs
Dynamo and AOTAutograd (the forward and backward graphs) without code generation, so the tests stay fast.
"""

import copy

import lightning as L
import pytest
import torch

from tests.models.test_flava import make_batch, tiny_kwargs
from vlm.errors import VLMConfigError
from vlm.models.flava import FLAVA
from vlm.objectives.itm import ImageTextMatching

FULLGRAPH = {"backend": "aot_eager", "fullgraph": True}


def eager_and_compiled(options=FULLGRAPH, **overrides):
    torch.manual_seed(0)
    eager = FLAVA(**tiny_kwargs(**overrides))
    compiled = FLAVA(**tiny_kwargs(compile="step", compile_options=options, **overrides))
    compiled.load_state_dict(eager.state_dict())
    return eager.train(), compiled.train()


def assert_same_step(eager, compiled, batch):
    le, logs_e = eager.compute_losses(batch)
    lc, logs_c = compiled.compute_losses(batch)
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    assert logs_c.keys() == logs_e.keys()
    for k in logs_e:
        torch.testing.assert_close(logs_c[k], logs_e[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    le.backward()
    lc.backward()
    for (name, pe), (_, pc) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert (pe.grad is None) == (pc.grad is None), name
        if pe.grad is not None:
            # float32 sums in another order (the compiled heads run dense): tolerance on the tensor's scale
            scale = float(pe.grad.abs().max()) + 1e-12
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-3 * scale, msg=lambda m, name=name: f"{name}: {m}")
    eager.zero_grad(set_to_none=True)
    compiled.zero_grad(set_to_none=True)


@pytest.mark.parametrize("stream", ["pairs", "images", "text"])
def test_compiled_step_is_one_graph_equal_to_eager(stream):
    torch._dynamo.reset()
    eager, compiled = eager_and_compiled()
    for step in range(3):
        # new data, masks and negatives every step; after the first, the same graph must serve (no recompile)
        batch = dict(make_batch(stream, seed=step), batch_index=step)
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            assert_same_step(eager, compiled, batch)


def test_hf_style_batch_with_itm_labels_compiles_whole():
    torch._dynamo.reset()
    from vlm.objectives.contrastive import GlobalContrastive
    from vlm.objectives.mmm import MaskedMultimodalModeling

    objectives = {"gc": GlobalContrastive(), "itm": ImageTextMatching(negatives="batch"),
                  "mmm": MaskedMultimodalModeling()}
    eager, compiled = eager_and_compiled(objectives=objectives, streams={"pairs": {"gc": 1, "itm": 1, "mmm": 1}})
    compiled.objectives.load_state_dict(eager.objectives.state_dict())
    assert_same_step(eager, compiled, dict(make_batch("pairs", itm=True), batch_index=0))


def test_hard_negatives_run_eagerly_inside_a_compiled_step():
    torch._dynamo.reset()
    kwargs = tiny_kwargs()
    objectives = dict(kwargs["objectives"], itm=ImageTextMatching(negatives="hard"))
    torch.manual_seed(0)
    eager = FLAVA(**dict(kwargs, objectives=objectives)).train()
    objectives = dict(kwargs["objectives"], itm=ImageTextMatching(negatives="hard"))
    compiled = FLAVA(**dict(kwargs, objectives=objectives, compile="step",
                            compile_options={"backend": "aot_eager"})).train()
    compiled.load_state_dict(eager.state_dict())
    # the step's generator reaches the eager sampling: same negatives, same loss and gradients
    assert_same_step(eager, compiled, dict(make_batch("pairs"), batch_index=5))


def test_compiled_step_trains_under_lightning_and_stays_copyable():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = FLAVA(**tiny_kwargs(compile="step", compile_options=FULLGRAPH, warmup_steps=0,
                                lr_schedule="constant", lr=1e-3))
    batches = [dict(make_batch(s, seed=i), batch_index=i) for i, s in enumerate(["pairs", "images", "text"] * 2)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, loader)
    logged = trainer.callback_metrics
    assert {"train/pairs/gc/loss", "train/images/mim/loss", "train/text/mlm/loss"} <= set(logged)
    assert all(torch.isfinite(v) for v in logged.values())
    clone = copy.deepcopy(model)  # the compiled function is not part of the model's state
    assert clone._compiled_step is None
    torch.testing.assert_close(clone.state_dict()["core.text_projection.weight"], model.text_projection.weight)


def test_bad_compile_settings_name_the_fix():
    with pytest.raises(VLMConfigError, match="'step'"):
        FLAVA(**tiny_kwargs(compile="everything"))
    with pytest.raises(VLMConfigError, match="compile_options"):
        FLAVA(**tiny_kwargs(compile="step", compile_options={"modes": "max-autotune"}))


@pytest.mark.slow
def test_inductor_compiled_step_equals_eager():
    """The real backend (C++ code on CPU): a stream whose loss is one objective at weight 1 returns a loss with
    its autograd history (returning detached aliases of it once made inductor drop that history)."""
    torch._dynamo.reset()
    eager, compiled = eager_and_compiled(options={"fullgraph": True})
    assert_same_step(eager, compiled, dict(make_batch("images"), batch_index=0))
