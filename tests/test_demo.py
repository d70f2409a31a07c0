"""`make demo`'s entry point end to end, shortened: trains through the CLI, then prints held-out results."""

import pytest

from vlm.demo import main


@pytest.mark.slow
def test_demo_runs_and_reports_held_out_retrieval(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    rc = main(["--held-out", "20", "--examples", "2", "--trainer.max_steps=6", "--trainer.val_check_interval=6",
               "--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
               "--data.init_args.streams.pairs.init_args.dataset.init_args.num=128"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "trained 6 optimizer steps" in out
    assert "zero-shot retrieval over 20 held-out pairs" in out and "R@1" in out
    for objective in ("pairs/gc", "pairs/itm", "pairs/mmm", "images/mim", "text/mlm"):
        assert objective in out
