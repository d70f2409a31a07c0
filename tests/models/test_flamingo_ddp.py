"""Tiny Flamingo under DDP on 2 CPU ranks (gloo), from conf/flamingo/tiny.yaml + conf/trainer/ddp.yaml.

The ddp preset's own settings (static reducer, bf16-mixed, gradient clipping with the fused AdamW) run with only
the accelerator swapped. Training uses the config's accumulate schedule (one batch of each of three streams per
optimizer step) with the LM frozen, as the paper trains: afterwards every parameter is bitwise identical on both
ranks, the resampler, cross-attention and new token rows trained, and the frozen LM and vision tower did not
move. Few-shot validation with uneven shards (one rank holds more prompts than the other) gives the single
process's VQA accuracy.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import run_ranks

REPO = Path(__file__).resolve().parents[2]
TINY, DDP = str(REPO / "conf/flamingo/tiny.yaml"), str(REPO / "conf/trainer/ddp.yaml")
SMALL = [
    "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.callbacks=[]",
    "--data.init_args.batch_size=4", "--data.init_args.num_workers=0", "--data.init_args.pin_memory=false",
    "--model.init_args.config.freeze_lm=true",
    "--data.init_args.streams.interleaved.init_args.dataset.init_args.num=64",
    "--data.init_args.streams.pairs.init_args.dataset.init_args.dataset.init_args.num=64",
    "--data.init_args.streams.vqa.init_args.dataset.init_args.dataset.init_args.num=192",
    # evaluation: 10 VQA prompts with 2 shots and 10 documents, in batches of 4 -> 3 batches each, dealt 2:1
    "--data.init_args.val_streams={vqa_2shot: {class_path: vlm.data.stream.Stream, init_args: {"
    "dataset: {class_path: vlm.data.synthetic.SyntheticVQA, init_args: {split: val, num: 10, image_size: 64}}, "
    "transform: {class_path: vlm.data.fewshot.FewShotPrompts, init_args: {support: {class_path: "
    "vlm.data.synthetic.SyntheticVQA, init_args: {split: train, num: 50, image_size: 64, seed: 1}}, shots: 2, "
    "max_length: 96}}, batch_size: 4}}, interleaved: {class_path: vlm.data.stream.Stream, init_args: {dataset: "
    "{class_path: vlm.data.synthetic.SyntheticInterleaved, init_args: {split: val, num: 10, image_size: 64}}, "
    "transform: {class_path: vlm.data.transforms.InterleavedTransform, init_args: {tokenizer: synthetic, "
    "max_length: 96, max_images: 3, image_size: 64}}, batch_size: 4}}}",
    "--model.init_args.generation={max_new_tokens: 3}",
]


def build(args: list[str]):
    from vlm.cli import VLMCLI

    return VLMCLI(args=["--config", TINY, "--config", DDP, *SMALL, *args], run=False)


def run_rank(out: Path) -> None:
    rank = int(os.environ["RANK"])
    cli = build(["--trainer.devices=2", "--trainer.max_steps=3", "--trainer.limit_val_batches=0"])
    initial = {k: v.detach().clone() for k, v in cli.model.state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    final = {k: v.detach().cpu() for k, v in cli.model.state_dict().items()}
    torch.save(final, out / f"rank{rank}.pt")
    # bf16-mixed stores the frozen weight matrices in bf16 (frozen_dtype: auto): a weight moved if it changed
    # beyond that rounding
    changed = sorted(k for k in final if not torch.equal(final[k], initial[k].to(final[k].dtype)))
    frozen_bf16 = sorted(k for k, p in cli.model.named_parameters() if not p.requires_grad and p.dtype == torch.bfloat16)
    cli2 = build(["--trainer.devices=2", "--trainer.limit_val_batches=1.0"])
    cli2.model.load_state_dict(final)
    metrics = cli2.trainer.validate(cli2.model, datamodule=cli2.datamodule, verbose=False)[0]
    (out / f"report{rank}.json").write_text(json.dumps({
        "changed": changed, "global_step": cli.trainer.global_step, "frozen_bf16": frozen_bf16,
        "validate": {k: float(v) for k, v in metrics.items()}}))


@pytest.mark.ddp
@pytest.mark.slow
def test_tiny_flamingo_under_ddp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("VLM_CACHE_DIR", str(cache))
    run_ranks(__file__, tmp_path, cwd=tmp_path, env={"VLM_CACHE_DIR": str(cache)})
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(2)]
    changed = reports[0]["changed"]
    assert reports[0]["global_step"] == 3
    assert any(k.startswith("core.resampler.") for k in changed)
    assert any(".xattn." in k and k.endswith("_gate") for k in changed)
    assert any(k.endswith(".extra") for k in changed)
    moved_frozen = [k for k in changed if k.startswith("core.vision.") or (
        k.startswith("core.lm.") and ".xattn." not in k and not k.endswith(".extra"))]
    assert moved_frozen == []
    assert reports[0]["frozen_bf16"] and all(k.startswith(("core.vision.", "core.lm.")) for k in reports[0]["frozen_bf16"])

    # the single process on the same weights and prompts
    cli = build(["--trainer.devices=1", "--trainer.strategy=auto", "--trainer.limit_val_batches=1.0"])
    cli.model.load_state_dict(a)
    single = {k: float(v) for k, v in cli.trainer.validate(cli.model, datamodule=cli.datamodule,
                                                           verbose=False)[0].items()}
    assert {"val/vqa_2shot/vqa_accuracy", "val/interleaved/caption/loss"} <= set(single)
    for rep in reports:
        assert rep["validate"].keys() == single.keys()
        for k, v in single.items():
            assert rep["validate"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]))
