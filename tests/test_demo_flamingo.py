"""`make demo-flamingo`'s entry point end to end, shortened: trains through the CLI, then shows that the model
learned to use its in-context examples."""

import re

import pytest

from vlm.demo_flamingo import main


@pytest.mark.slow
def test_flamingo_demo_trains_and_few_shot_beats_zero_shot(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    rc = main(["--held-out", "100", "--examples", "2", "--trainer.max_steps=200", "--trainer.limit_val_batches=0",
               "--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "trained 200 optimizer steps" in out
    result = next(line for line in out.splitlines() if line.startswith("RESULT flamingo-tiny"))
    fields = dict(kv.split("=", 1) for kv in result.split()[2:])
    for stream in ("interleaved/caption", "pairs/caption", "vqa/caption"):
        first, last = map(float, re.fullmatch(r"(.+)->(.+)", fields[stream]).groups())
        assert last < 0.5 * first, (stream, result)
    # half the training documents answer in a sentence: without examples the format is a guess, with four
    # short-answer examples the model answers short (and right)
    assert float(fields["vqa_4shot"]) >= float(fields["vqa_0shot"]) + 0.1, result
    assert float(fields["cider_0shot"]) > 0.1, result
