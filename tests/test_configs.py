"""Every runnable config under conf/ parses and runs one training + validation batch through `vlm fit`."""

from pathlib import Path

import pytest
import yaml

from vlm.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p for p in (ROOT / "conf").rglob("*.yaml") if {"model", "data", "trainer"} <= set(yaml.safe_load(p.read_text()))
)
# what a CPU test must change for each config: no hub downloads, a batch that fits a CPU step
SMALL_SYNTHETIC = ["--data.init_args.streams.pairs.init_args.dataset.init_args.num=128"]
OVERRIDES = {
    "conf/flava/tiny.yaml": SMALL_SYNTHETIC,
    # with the one-GPU preset it is documented with (bf16-mixed, clipping with the fused AdamW); compiling the
    # base towers on CPU would take minutes, so compile is tested on the tiny model (tests/models/test_recompiles.py)
    "conf/flava/base.yaml": ["--config", str(ROOT / "conf/trainer/gpu.yaml"), "--model.init_args.image_codebook=null",
                             "--model.init_args.compile=false", "--data.init_args.batch_size=2",
                             "--data.init_args.num_workers=0", "--data.init_args.pin_memory=false", *SMALL_SYNTHETIC,
                             "--data.init_args.val_streams.pairs.init_args.batch_size=2"],
}


def test_configs_found():
    assert {"conf/flava/tiny.yaml", "conf/flava/base.yaml"} <= {str(p.relative_to(ROOT)) for p in CONFIGS}


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_fast_dev_run(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    rel = str(config.relative_to(ROOT))
    rc = main(["fit", "--config", str(config), *OVERRIDES.get(rel, []), "--trainer.fast_dev_run=true",
               "--trainer.accelerator=cpu"])
    assert rc == 0


def test_hub_codebook_while_offline_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    rc = main(["fit", "--config", str(ROOT / "conf/flava/base.yaml"), "--trainer.fast_dev_run=true",
               *SMALL_SYNTHETIC])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    # one message that names the setting and the fix, not a validation dump
    assert err[-1].startswith("vlm: error: Image codebook 'facebook/flava-image-codebook'") and "local" in err[-1]
    assert "Union" not in "\n".join(err)


def test_unknown_config_key_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "conf/flava/tiny.yaml"), "--model.init_args.no_such_key=1"])
    assert "no_such_key" in capsys.readouterr().err


def test_vlm_data_synth_writes_shards_the_reader_reads_back(tmp_path):
    from vlm.data.readers import WebDatasetSource

    assert main(["data", "synth", "--out", str(tmp_path), "--num", "12", "--samples-per-shard", "5"]) == 0
    shards = sorted(tmp_path.glob("*.tar"))
    assert len(shards) == 3  # ceil(12 / 5)
    samples = list(WebDatasetSource([str(s) for s in shards], shuffle_shards=False))
    assert len(samples) == 12 and all(s["image"].size == (64, 64) and s["caption"] for s in samples)


def test_staged_overlay_runs_unimodal_first_then_joint(tmp_path, monkeypatch):
    """conf/flava/staged.yaml: pairs skipped and fusion frozen before the switch step, everything on after it."""
    from vlm.callbacks import FreezeSchedule, ObjectiveWeightSchedule
    from vlm.cli import VLMCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    cli = VLMCLI(args=["--config", str(ROOT / "conf/flava/tiny.yaml"), "--config", str(ROOT / "conf/flava/staged.yaml"),
                       "--trainer.logger=false", *SMALL_SYNTHETIC],
                 run=False)
    kinds = {type(c) for c in cli.trainer.callbacks}
    assert {ObjectiveWeightSchedule, FreezeSchedule} <= kinds
    weights = next(c for c in cli.trainer.callbacks if isinstance(c, ObjectiveWeightSchedule))
    freeze = next(c for c in cli.trainer.callbacks if isinstance(c, FreezeSchedule))
    # drive the two stages directly: before step 300 the pairs stream is off and fusion frozen, then both on
    model = cli.model
    weights._apply_upto(model, weights._index(0))
    freeze.apply(cli.trainer, model, freeze._stage_index(0))
    assert model.active_objectives("pairs") == [] and model.active_objectives("text")
    assert not any(p.requires_grad for p in model.multimodal_encoder.parameters())
    weights._apply_upto(model, weights._index(300))
    freeze.apply(cli.trainer, model, freeze._stage_index(300))
    assert [k for k, _, _ in model.active_objectives("pairs")] == ["gc", "itm", "mmm"]
    assert all(p.requires_grad for p in model.multimodal_encoder.parameters())


def test_compile_step_is_settable_from_the_command_line(tmp_path, monkeypatch):
    """`compile: step` and `compile_options` parse through LightningCLI (a bool | str union and a mapping)."""
    from vlm.cli import VLMCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    cli = VLMCLI(args=["--config", str(ROOT / "conf/flava/tiny.yaml"), "--trainer.logger=false", *SMALL_SYNTHETIC,
                       "--model.init_args.compile=step",
                       "--model.init_args.compile_options={backend: aot_eager, fullgraph: true}"],
                 run=False)
    assert cli.model.compile_scope == "step"
    assert cli.model.compile_options == {"backend": "aot_eager", "fullgraph": True}
    cli = VLMCLI(args=["--config", str(ROOT / "conf/flava/tiny.yaml"), "--trainer.logger=false", *SMALL_SYNTHETIC,
                       "--model.init_args.compile=true"], run=False)
    assert cli.model.compile_scope == "towers"
