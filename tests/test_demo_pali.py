"""`make demo-pali`'s entry point end to end, shortened: trains the whole task mixture through the CLI, every
stream's loss falls, greedy answers to held-out questions are answers (not empty), captions score."""

import os
import re

import pytest

from vlm.demo_pali import main

STREAMS = ("alt_text", "captions_multilingual", "ocr", "vqa", "vqg", "object_qa", "detection", "text_span")
STEPS = int(os.environ.get("VLM_PALI_DEMO_TEST_STEPS", "600"))
SEED = int(os.environ.get("VLM_PALI_DEMO_TEST_SEED", "0"))


@pytest.mark.slow
def test_pali_demo_trains_every_stream_and_answers_held_out_questions(tmp_path, monkeypatch, capsys):
    seed = SEED
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    rc = main(["--held-out", "100", "--vqa-questions", "100", "--examples", "1", f"--trainer.max_steps={STEPS}",
               f"--seed_everything={seed}",
               "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.callbacks=[]",
               "--trainer.enable_checkpointing=false"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"trained {STEPS} optimizer steps" in out
    lines = out.splitlines()
    assert lines[-1].startswith("RESULT pali-tiny ")
    result = dict(kv.split("=", 1) for kv in lines[-1].split()[2:])
    losses = dict(kv.split("=", 1) for kv in lines[-2].split() if "->" in kv)
    for stream in STREAMS:
        first, last = map(float, re.fullmatch(r"(.+)->(.+)", losses[stream]).groups())
        assert last < 0.8 * first, (stream, lines[-2])
    # 600 steps gave 0.29 (seed 0) against 0.28 for the majority answer of each question type: the tiny model
    # does not beat that baseline clearly yet, so this guards the format (all answers were empty before the
    # decoder had enough VQA batches), not the grounding
    assert float(result["vqa_em"]) > 0.15, lines[-1]
    assert float(result["vqa_majority"]) > 0.15, lines[-1]
    assert float(result["caption_cider"]) > 0.5, lines[-1]
    assert 0.0 <= float(result["det_map"]) <= 1.0
