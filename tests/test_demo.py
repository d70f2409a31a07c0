"""`make demo`'s entry point end to end, shortened: trains through the CLI, then shows that the model learned."""

import re

import pytest

from vlm.demo import main


@pytest.mark.slow
def test_demo_trains_and_the_model_learns(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    # mostly pairs (8:1:1), so that retrieval is learned in a test-sized run
    rc = main(["--held-out", "20", "--examples", "2", "--zero-shot-images", "60", "--trainer.max_steps=150",
               "--trainer.val_check_interval=150", "--trainer.limit_val_batches=0", "--trainer.logger=false",
               "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false", "--model.init_args.warmup_steps=10",
               "--data.init_args.schedule={class_path: vlm.data.schedule.Weighted, init_args: {weights: "
               "{pairs: 8.0, images: 1.0, text: 1.0}}}",
               "--data.init_args.streams.pairs.init_args.dataset.init_args.num=2560"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "trained 150 optimizer steps" in out
    result = next(line for line in out.splitlines() if line.startswith("RESULT flava-tiny"))
    fields = dict(kv.split("=", 1) for kv in result.split()[2:])
    # every objective's loss is lower in the last tenth of training than in the first (ITM, a binary loss
    # that starts at ln 2, leaves chance only after a few hundred steps: here it must not rise)
    for objective in ("pairs/gc", "pairs/itm", "pairs/mmm", "images/mim", "text/mlm"):
        first, last = map(float, re.fullmatch(r"(.+)->(.+)", fields[objective]).groups())
        assert last <= first if objective == "pairs/itm" else last < first, (objective, result)
    # held-out retrieval above chance (1/20)
    chance = float(fields["retrieval_chance"])
    assert float(fields["t2i_r1"]) > 2 * chance and float(fields["i2t_r1"]) > 2 * chance, result
