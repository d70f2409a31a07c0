"""`vlm export`: a checkpoint of `vlm fit` becomes model.safetensors + config.yaml that load without Lightning,
with the checkpoint's exact weights; checkpoints load with torch.load(weights_only=True), resume included."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from torch import nn

from tests.test_configs import SMALL_SYNTHETIC
from vlm.cli import main
from vlm.errors import VLMConfigError
from vlm.export import CONFIG_NAME, WEIGHTS_NAME, export, load_exported

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
# the CSV overlay: LearningRateMonitor in tiny.yaml needs a logger, and CSV keeps wandb out of the way
CONFIG = ["--config", str(ROOT / "conf/flava/tiny.yaml"), "--config", str(ROOT / "conf/logger/csv.yaml"),
          *SMALL_SYNTHETIC, *QUIET]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny FLAVA after 2 steps of `vlm fit`: (run directory, checkpoint path). tiny.yaml's ModelCheckpoint
    writes runs/checkpoints/flava-tiny/ under the working directory."""
    run = tmp_path_factory.mktemp("fit")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run)
        mp.setenv("VLM_CACHE_DIR", str(run / "cache"))
        assert main(["fit", *CONFIG, "--trainer.max_steps=2", "--trainer.limit_val_batches=0"]) == 0
    ckpt = run / "runs/checkpoints/flava-tiny/last.ckpt"
    assert ckpt.is_file()
    return run, ckpt


def test_checkpoint_loads_weights_only_and_names_its_objectives(trained):
    _, ckpt = trained
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    hparams = state["hyper_parameters"]
    assert hparams["_class_path"] == "vlm.models.flava.FLAVA"
    # the configured objectives travel with the checkpoint, so their heads can be rebuilt
    tiny = yaml.safe_load((ROOT / "conf/flava/tiny.yaml").read_text())["model"]["init_args"]
    assert {k: v["class_path"] for k, v in hparams["objectives"].items()} == {
        k: v["class_path"] for k, v in tiny["objectives"].items()}
    assert hparams["objectives"]["itm"]["init_args"]["negatives"] == "shuffle"


def test_export_then_load_gives_the_checkpoints_model(trained, tmp_path):
    from vlm.models.flava import FLAVA

    _, ckpt = trained
    out = tmp_path / "export"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    assert (out / WEIGHTS_NAME).is_file() and (out / CONFIG_NAME).is_file()
    config = yaml.safe_load((out / CONFIG_NAME).read_text())
    assert config["class_path"] == "vlm.models.flava.FLAVA" and config["init_args"]["projection_dim"] == 128

    model = load_exported(out)
    assert type(model) is FLAVA and not model.training
    # every tensor is the checkpoint's, read independently of Lightning and of vlm.export
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    exported = model.state_dict()
    assert sorted(exported) == sorted(saved)
    assert all(torch.equal(exported[k], saved[k]) for k in saved)

    reference = FLAVA.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 64, 64, generator=g)
    ids = torch.randint(1000, 5000, (3, 12), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    assert torch.equal(model.encode_image(pixels), reference.encode_image(pixels))
    assert torch.equal(model.encode_text(ids, mask), reference.encode_text(ids, mask))


def test_validate_and_resume_read_the_checkpoint_weights_only(trained, tmp_path, monkeypatch):
    """`vlm validate --ckpt_path` and `vlm fit --ckpt_path` (resume) load it with weights_only=True."""
    run, ckpt = trained
    monkeypatch.chdir(tmp_path)  # the resumed run writes its checkpoints here, not over the shared one
    monkeypatch.setenv("VLM_CACHE_DIR", str(run / "cache"))
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    assert main(["validate", *CONFIG, "--ckpt_path", str(ckpt), "--trainer.limit_val_batches=1"]) == 0
    assert len(calls) >= 2 and all(w is True for w in calls), calls  # CLI hparams + Trainer restore
    calls.clear()
    assert main(["fit", *CONFIG, "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
                 "--ckpt_path", str(ckpt)]) == 0
    assert len(calls) >= 2 and all(w is True for w in calls), calls


class Tied(nn.Module):
    """Output projection sharing the embedding's weight (weight tying)."""

    def __init__(self, vocab: int = 7, hidden: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.out = nn.Linear(hidden, vocab, bias=False)
        self.out.weight = self.embed.weight


def test_tied_weights_survive_export(tmp_path):
    model = Tied()
    with torch.no_grad():
        model.embed.weight.normal_()
    ckpt = tmp_path / "tied.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {"vocab": 7, "hidden": 3}}, ckpt)
    with pytest.raises(VLMConfigError, match="--class-path"):  # a checkpoint that does not name its class
        export(ckpt, tmp_path / "out")
    export(ckpt, tmp_path / "out", class_path=f"{__name__}.Tied")
    with safe_open(str(tmp_path / "out" / WEIGHTS_NAME), "pt") as f:
        assert len(list(f.keys())) == 1  # one tensor, stored once
    loaded = load_exported(tmp_path / "out")
    assert loaded.out.weight is loaded.embed.weight  # still tied
    assert torch.equal(loaded.embed.weight, model.embed.weight)


def test_load_errors_say_what_to_change(trained, tmp_path):
    _, ckpt = trained
    with pytest.raises(VLMConfigError, match="config.yaml.*missing.*vlm export"):
        load_exported(tmp_path / "nowhere")
    with pytest.raises(VLMConfigError, match="does not exist"):
        export(tmp_path / "missing.ckpt", tmp_path / "x")
    assert main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")]) == 2

    out = export(ckpt, tmp_path / "export")
    config = yaml.safe_load((out / CONFIG_NAME).read_text())
    # a config without the MLM objective builds a model lacking the weights of its head
    config["init_args"]["objectives"].pop("mlm")
    config["init_args"]["streams"].pop("text")
    (out / CONFIG_NAME).write_text(yaml.safe_dump(config))
    with pytest.raises(VLMConfigError, match=r"not in the model: objectives\.mlm\.head.*Change init_args"):
        load_exported(out)
    # other sizes than the weights were trained with
    with pytest.raises(VLMConfigError, match="size mismatch.*Change init_args"):
        load_exported(out, overrides={"projection_dim": 64, "objectives": None, "streams": None})
    (out / WEIGHTS_NAME).unlink()
    with pytest.raises(VLMConfigError, match="model.safetensors.*missing"):
        load_exported(out)


def test_exported_config_builds_only_modules(tmp_path):
    (tmp_path / WEIGHTS_NAME).write_bytes(b"")
    (tmp_path / CONFIG_NAME).write_text(yaml.safe_dump({"class_path": "os.system", "init_args": {}}))
    with pytest.raises(VLMConfigError, match="not a subclass of torch.nn"):
        load_exported(tmp_path)


def test_hyperparameters_of_a_model_built_in_python_stay_loadable(tmp_path):
    """Objects given to FLAVA in Python (objective modules, a config dataclass) would be pickled into the
    checkpoint's hyper_parameters, which torch.load(weights_only=True) rejects: they are kept plain instead."""
    from vlm.encoders.vision import VisionConfig
    from vlm.models.flava import FLAVA
    from vlm.objectives.contrastive import GlobalContrastive

    vision = VisionConfig(image_size=32, patch_size=8, hidden=32, layers=1, heads=2)
    model = FLAVA(vision=vision, text=dict(kind="flava", vocab_size=200, hidden=32, layers=1, heads=2,
                                           max_positions=16),
                  multimodal=dict(hidden=32, layers=1, heads=2), projection_dim=16,
                  objectives={"gc": GlobalContrastive()}, streams={"pairs": {"gc": 1.0}})
    assert "objectives" not in model.hparams  # an object: not rebuildable from a checkpoint, so left out
    assert model.hparams["vision"]["hidden"] == 32 and model.hparams_initial["vision"]["patch_size"] == 8
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, tmp_path / "m.ckpt")
    loaded = torch.load(tmp_path / "m.ckpt", weights_only=True)
    rebuilt = FLAVA(**loaded["hyper_parameters"], objectives={"gc": GlobalContrastive()})
    rebuilt.load_state_dict(loaded["state_dict"])  # strict: the plain hyperparameters describe the same model
