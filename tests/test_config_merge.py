"""Overrides and overlay configs merge (vlm.cli.merge_config_args), and bad settings are one clear error."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from tests.test_configs import SMALL_SYNTHETIC
from vlm.cli import main, merge_into

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "conf/flava/tiny.yaml")
TINY_CFG = yaml.safe_load(Path(TINY).read_text())


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))


def printed(capsys, *args) -> dict:
    """The config `vlm fit ... --print_config` prints, as a dict."""
    with pytest.raises(SystemExit) as done:
        main(["fit", *args, "--print_config"])
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


# ------------------------------------------------------------------------------------------------ merging
def test_one_objective_weight_override_keeps_the_streams_other_objectives(capsys):
    cfg = printed(capsys, "--config", TINY, "--model.init_args.streams.pairs.gc=0.5")
    streams = cfg["model"]["init_args"]["streams"]
    expected = TINY_CFG["model"]["init_args"]["streams"]
    assert streams == {**expected, "pairs": {**expected["pairs"], "gc": 0.5}}


def test_overlay_setting_one_stream_keeps_the_others_and_a_new_class_starts_from_its_defaults(capsys, tmp_path):
    from vlm.data.readers import WebDatasetSource

    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "model": {"init_args": {"streams": {"text": {"mlm": 2.0}}}},
        "data": {"init_args": {"streams": {"pairs": {"init_args": {"dataset": {
            "class_path": "vlm.data.readers.WebDatasetSource", "init_args": {"urls": "/shards/{0..1}.tar"}}}}}}},
    }))
    cfg = printed(capsys, "--config", TINY, "--config", str(overlay))
    streams = cfg["data"]["init_args"]["streams"]
    assert list(streams) == list(TINY_CFG["data"]["init_args"]["streams"])  # images and text kept
    dataset = streams["pairs"]["init_args"]["dataset"]
    assert dataset["class_path"] == "vlm.data.readers.WebDatasetSource"
    # tiny.yaml's SyntheticShards had shuffle_buffer 1000; the new class gets its own default, not that
    assert dataset["init_args"]["shuffle_buffer"] == defaults(WebDatasetSource)["shuffle_buffer"] != 1000
    assert dataset["init_args"]["urls"] == "/shards/{0..1}.tar"
    tiny_pairs = TINY_CFG["data"]["init_args"]["streams"]["pairs"]["init_args"]
    assert streams["pairs"]["init_args"]["transform"]["init_args"]["max_length"] == \
        tiny_pairs["transform"]["init_args"]["max_length"]  # the stream's other keys kept
    assert cfg["model"]["init_args"]["streams"]["text"] == {"mlm": 2.0}
    assert cfg["model"]["init_args"]["streams"]["pairs"] == TINY_CFG["model"]["init_args"]["streams"]["pairs"]


def test_class_path_override_on_the_command_line_starts_from_that_class_defaults(capsys):
    from vlm.data.synthetic import SyntheticPairs

    cfg = printed(capsys, "--config", TINY,
                  "--data.init_args.streams.pairs.init_args.dataset.class_path=vlm.data.synthetic.SyntheticPairs",
                  "--data.init_args.streams.pairs.init_args.dataset.init_args.image_size=32")
    args = cfg["data"]["init_args"]["streams"]["pairs"]["init_args"]["dataset"]["init_args"]
    assert args == {**defaults(SyntheticPairs), "image_size": 32}  # not tiny.yaml's num: 20000


def test_lists_replace_null_removes_a_stream_and_later_values_win(capsys):
    staged = ROOT / "conf/flava/staged.yaml"
    cfg = printed(capsys, "--config", TINY, "--config", str(staged), "--data.init_args.streams.images=null",
                  "--trainer.max_steps", "7", "--trainer.max_steps=9")
    callbacks = [c["class_path"] for c in cfg["trainer"]["callbacks"]]
    assert callbacks == [c["class_path"] for c in yaml.safe_load(staged.read_text())["trainer"]["callbacks"]]
    assert list(cfg["data"]["init_args"]["streams"]) == ["pairs", "text"]
    assert cfg["trainer"]["max_steps"] == 9


def test_interpolation_resolves_over_the_merged_config(capsys):
    cfg = printed(capsys, "--config", str(ROOT / "conf/flava/base.yaml"), "--model.init_args.vision.image_size=96")
    transform = cfg["data"]["init_args"]["streams"]["pairs"]["init_args"]["transform"]["init_args"]
    # `vision` is an untyped dict: the value stays the command line's string until VisionConfig converts it
    assert int(cfg["model"]["init_args"]["vision"]["image_size"]) == 96 and transform["image_size"] == 96


def test_tower_configs_convert_number_strings_and_reject_other_values():
    from vlm.encoders.text import TextConfig
    from vlm.encoders.vision import VisionConfig
    from vlm.errors import VLMConfigError

    cfg = VisionConfig.from_any({"image_size": "96", "mlp_ratio": "2", "qkv_bias": "false"})
    assert (cfg.image_size, cfg.mlp_ratio, cfg.qkv_bias) == (96, 2.0, False)
    assert type(cfg.image_size) is int and type(cfg.mlp_ratio) is float
    with pytest.raises(VLMConfigError, match=r"text.max_positions='many': expected an integer"):
        TextConfig.from_any({"max_positions": "many"})
    with pytest.raises(VLMConfigError, match=r"vision.patch_size=8.5: expected an integer"):
        VisionConfig.from_any({"patch_size": 8.5})


def test_merge_rules():
    base = {"a": {"x": 1, "y": [1, 2]}, "spec": {"class_path": "A", "init_args": {"p": 1}}, "m": {"k": 1}}
    assert merge_into(base, {"a": {"y": [3]}}) == {**base, "a": {"x": 1, "y": [3]}}
    assert merge_into(base, {"spec": {"init_args": {"q": 2}}})["spec"] == {"class_path": "A",
                                                                         "init_args": {"p": 1, "q": 2}}
    assert merge_into(base, {"spec": {"q": 2}})["spec"]["init_args"] == {"p": 1, "q": 2}  # implicit init_args
    assert merge_into(base, {"spec": {"class_path": "B"}})["spec"] == {"class_path": "B"}
    assert merge_into(base, {"m": {}})["m"] == {}
    assert "m" not in merge_into(base, {"m": None})
    assert merge_into({"v": 1}, {"v": None}) == {"v": None}  # null over a value is a value


# ------------------------------------------------------------------------------------------------ errors
def run_error(capsys, *args) -> str:
    rc = main(["fit", "--config", TINY, *SMALL_SYNTHETIC, "--trainer.fast_dev_run=true", "--trainer.logger=false",
               *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err[-5:]
    assert "Union" not in "\n".join(err) and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("value", ["-1.0", ".inf"])
def test_negative_or_infinite_objective_weight_is_one_error_naming_the_key(capsys, value):
    err = run_error(capsys, f"--model.init_args.streams.pairs.gc={value}")
    assert err.startswith("vlm: error: streams.pairs.gc=") and "finite and >= 0" in err


def test_unknown_objective_in_a_stream_names_the_key(capsys):
    err = run_error(capsys, "--model.init_args.streams.pairs.gcc=1.0")
    assert err.startswith("vlm: error: Stream 'pairs' names objective 'gcc' (streams.pairs.gcc)")


def test_image_size_not_a_multiple_of_the_patch_size_fails_at_fit_start(capsys):
    err = run_error(capsys, "--data.init_args.streams.images.init_args.transform.init_args.image_size=60")
    assert err.startswith("vlm: error: data.init_args.streams.images.init_args.transform.init_args.image_size=60 "
                          "is not a multiple of the image tower's patch size 8")


def test_text_longer_than_the_position_table_fails_at_fit_start(capsys):
    err = run_error(capsys, "--data.init_args.streams.text.init_args.transform.init_args.max_length=80")
    assert err.startswith("vlm: error: data.init_args.streams.text.init_args.transform.init_args.max_length=80 "
                          "is longer than the text tower's 64 positions")


def test_data_tokenizer_larger_than_the_embedding_table_fails_at_fit_start(capsys):
    err = run_error(capsys, "--data.init_args.streams.text.init_args.transform.init_args.special_tokens=[<a>, <b>]")
    vocab = TINY_CFG["model"]["init_args"]["text"]["vocab_size"]
    assert err.startswith("vlm: error: data.init_args.streams.text.init_args.transform.init_args.tokenizer='minilm' "
                          f"has {vocab + 2} tokens") and f"embedding table has {vocab} rows" in err


def test_model_stream_without_data_is_a_warning_at_fit_start():
    """A model stream that no data stream feeds (training or evaluation) warns: its objectives never run."""
    import lightning as L
    import torch

    from tests.toy import SquaredError, ToyModel
    from vlm.data.module import MultiStreamDataModule
    from vlm.data.stream import Stream

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"x": torch.ones(4), "y": torch.tensor(1.0)}

    model = ToyModel({"se": SquaredError()}, {"a": {"se": 1.0}, "b": {"se": 1.0}, "off": {"se": 0.0}})
    data = MultiStreamDataModule({"a": Stream(Rows())}, batch_size=2)
    with pytest.warns(UserWarning) as record:
        L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(model, data)
    msgs = [str(w.message) for w in record if "has no data stream" in str(w.message)]
    assert len(msgs) == 1 and "stream 'b'" in msgs[0] and "streams.b=null" in msgs[0]  # 'off' trains nothing


def test_list_append_and_its_item_keys_are_left_to_jsonargparse(capsys):
    cfg = printed(capsys, "--config", TINY, "--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
                  "--trainer.callbacks.monitor=val/loss", "--trainer.max_steps=3")
    callbacks = cfg["trainer"]["callbacks"]
    assert len(callbacks) == len(TINY_CFG["trainer"]["callbacks"]) + 1
    assert callbacks[-1]["class_path"].endswith("EarlyStopping") and callbacks[-1]["init_args"]["monitor"] == "val/loss"
    assert cfg["trainer"]["max_steps"] == 3
