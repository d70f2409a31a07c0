"""`vlm validate` / `vlm test` as an evaluation command: the results table and JSON of vlm.callbacks.EvalReport,
through the real CLI, on checkpoints of freshly built tiny models (no training: the numbers only have to be the
ones the model logs) and on evaluation sets written in their published formats (tests/data/test_eval_formats)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import lightning
import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.data.test_eval_formats import (
    CLASS_IMAGES,
    KARPATHY_IMAGES,
    write_class_folders,
    write_karpathy,
    write_vqav2,
)
from vlm.cli import VLMCLI, main

ROOT = Path(__file__).resolve().parents[1]
FLAVA, FLAVA_COCO = str(ROOT / "conf/flava/tiny.yaml"), str(ROOT / "conf/flava/eval_coco.yaml")
FLAMINGO, FLAMINGO_EVAL = str(ROOT / "conf/flamingo/tiny.yaml"), str(ROOT / "conf/flamingo/eval.yaml")
VAL = "--data.init_args.val_streams"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
# the FLAVA run reads no training data; the synthetic training stream stays small all the same
FLAVA_SMALL = ["--data.init_args.streams.pairs.init_args.dataset.init_args.num=128", *QUIET]


def save_fresh_checkpoint(args: list[str], path: Path) -> VLMCLI:
    """A Lightning checkpoint of the model the config builds (random init), as `vlm fit` would save one."""
    cli = VLMCLI(args=args, run=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": cli.model.state_dict(), "pytorch-lightning_version": lightning.__version__,
                "epoch": 0, "global_step": 0}, path)
    return cli


def validate_in_process(args: list[str], ckpt: Path | None, command: str = "validate") -> dict[str, float]:
    """What `trainer.validate` (or `test`) returns for the same config and checkpoint, merged over the loaders."""
    cli = VLMCLI(args=[*args, "--trainer.logger=false"], run=False)
    results = getattr(cli.trainer, command)(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, verbose=False,
                                            weights_only=True)
    merged: dict[str, float] = {}
    for per_loader in results:
        merged.update(per_loader)
    return merged


def flava_coco_args(data: Path) -> list[str]:
    return ["--config", FLAVA, "--config", FLAVA_COCO, *FLAVA_SMALL,
            f"{VAL}.coco.init_args.dataset.init_args.path={data / 'dataset_coco.json'}",
            f"{VAL}.coco.init_args.dataset.init_args.image_root={data}",
            f"{VAL}.coco.init_args.batch_size=4",
            f"{VAL}.classes.init_args.dataset.init_args.root={data / 'classes'}"]


@pytest.fixture(scope="module")
def flava_run(tmp_path_factory):
    """`vlm validate` of a fresh tiny FLAVA on the Karpathy and class-folder fixtures, run once for this module's
    FLAVA tests: (run dir, the JSON report, what it printed, trainer.validate's results in process, the model)."""
    run_dir = tmp_path_factory.mktemp("flava-eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run_dir)
        mp.setenv("VLM_CACHE_DIR", str(run_dir / "cache"))
        mp.setenv("WANDB_MODE", "offline")
        write_karpathy(run_dir / "data")
        write_class_folders(run_dir / "data" / "classes")
        args = flava_coco_args(run_dir / "data")
        ckpt = run_dir / "ckpt" / "flava.ckpt"
        cli = save_fresh_checkpoint([*args, "--trainer.logger=false"], ckpt)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["validate", *args, "--trainer.logger=false", "--ckpt_path", str(ckpt)]) == 0
        report = json.loads((run_dir / "ckpt" / "flava.validate.json").read_text())
        single = validate_in_process(args, ckpt)
    return run_dir, report, printed.getvalue(), single, cli.model.eval()


def test_flava_validate_on_karpathy_and_class_folders_writes_json_beside_the_checkpoint(flava_run):
    run_dir, report, out, single, model = flava_run
    data = run_dir / "data"
    assert report["command"] == "validate" and report["checkpoint"] == str(run_dir / "ckpt" / "flava.ckpt")
    # the fixture's test split: 5 captions of 2 readable images; 2 + 1 captions of a missing and a corrupt image
    assert report["streams"] == {"coco": {"samples": 5, "skipped": 3}, "classes": {"samples": 9, "skipped": 1}}
    metrics = report["metrics"]
    assert {f"val/retrieval/{d}_R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)} | {"val/zeroshot/top1"} == set(
        metrics)
    assert metrics == single
    assert "val/zeroshot/top1" in out and str(run_dir / "ckpt" / "flava.validate.json") in out

    # independent of the model's validation code: text -> image recall@1 by brute force, in float64
    sents = [(s, i) for i, im in enumerate(KARPATHY_IMAGES[:2]) for s in im["sentences"]]
    from vlm.data.readers import decode_image
    from vlm.data.transforms import ImageTextTransform

    tf = ImageTextTransform(tokenizer="minilm", max_length=32, image_size=64)
    images = torch.stack([tf({"image": decode_image(data / im["filepath"] / im["filename"]), "caption": "x"})[
        "pixel_values"] for im in KARPATHY_IMAGES[:2]])
    enc = [tf({"image": decode_image(data / "val2014/a.png"), "caption": s}) for s, _ in sents]
    with torch.no_grad():
        img = F.normalize(model.encode_image(images).double(), dim=-1)
        txt = F.normalize(model.encode_text(torch.stack([e["input_ids"] for e in enc]),
                                            torch.stack([e["attention_mask"] for e in enc])).double(), dim=-1)
    sims = txt @ img.T
    hits = [float(sims[t, i] > sims[t, 1 - i]) for t, (_, i) in enumerate(sents)]
    assert metrics["val/retrieval/t2i_R@1"] == pytest.approx(sum(hits) / len(hits), abs=1e-6)


def test_class_folder_in_another_order_than_the_model_is_one_clear_error(flava_run, capsys, monkeypatch):
    run_dir = flava_run[0]
    monkeypatch.chdir(run_dir)
    monkeypatch.setenv("VLM_CACHE_DIR", str(run_dir / "cache"))
    order = sorted(CLASS_IMAGES)  # the folders' sorted order; the model's names are in another
    rc = main(["validate", *flava_coco_args(run_dir / "data"), "--trainer.logger=false",
               f"{VAL}.classes.init_args.dataset.init_args.classes={json.dumps(order)}"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vlm: error: data.init_args.val_streams.classes reads the classes")
    assert "zeroshot_class_names" in err


PALI, PALI_COCO = str(ROOT / "conf/pali/tiny.yaml"), str(ROOT / "conf/pali/eval_coco.yaml")
FLAMINGO_COCO = str(ROOT / "conf/flamingo/eval_coco.yaml")


def vqav2_args(group: str, data: Path, questions: Path, annotations: Path) -> list[str]:
    where = f"{group}.init_args"
    return [f"{where}.questions={questions}", f"{where}.annotations={annotations}", f"{where}.image_root={data / 'val2014'}",
            f"{where}.image_pattern=COCO_val2014_{{image_id:012d}}.png"]


def karpathy_args(group: str, data: Path) -> list[str]:
    return [f"{group}.init_args.path={data / 'dataset_coco.json'}", f"{group}.init_args.image_root={data}"]


def test_pali_test_without_checkpoint_writes_per_task_metrics_into_the_run_dir(run_dir):
    data = run_dir / "data"
    write_karpathy(data)
    questions, annotations = write_vqav2(data)
    pali = yaml.safe_load(Path(PALI).read_text())["data"]["init_args"]
    args = ["--config", PALI, "--config", PALI_COCO, *QUIET,
            *(f"--data.init_args.streams.{s}.init_args.dataset.init_args.num=16" for s in pali["streams"]),
            *(f"{VAL}.{s}.init_args.dataset.init_args.num=3" for s in pali["val_streams"]),
            "--model.init_args.generation={max_new_tokens: 4}",
            *vqav2_args(f"{VAL}.vqav2.init_args.dataset", data, questions, annotations),
            *karpathy_args(f"{VAL}.coco.init_args.dataset", data)]
    logger = {"trainer": {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": "logs", "name": "eval"}}}}
    assert main(["test", *args, "--config", yaml.safe_dump(logger)]) == 0
    report = json.loads((run_dir / "logs/eval/version_0/test.json").read_text())
    assert report["command"] == "test" and report["checkpoint"] is None
    # one metric set per task of the mixture, the published-format streams among them
    assert {"test/alt_text/caption/loss", "test/vqa_answers/vqa_accuracy", "test/captions/cider",
            "test/vqav2/vqa_accuracy", "test/coco/cider"} <= set(report["metrics"])
    # the fixtures: 3 of 4 questions have an image; 2 of the test split's 4 images are readable
    assert report["streams"]["vqav2"] == {"samples": 3, "skipped": 1}
    assert report["streams"]["coco"] == {"samples": 2, "skipped": 2}
    # an untrained model's metrics, recomputed in process (same seed, same weights)
    assert report["metrics"] == validate_in_process(args, None, command="test")


def test_flamingo_fewshot_sweep_on_synthetic_vqav2_and_coco_captions(run_dir, capsys):
    """conf/flamingo/eval.yaml (synthetic VQA at 1/2/8 shots, captions at 4) with eval_coco.yaml (VQAv2 and COCO
    captions at 0 and 4 shots, here 2: the fixtures hold 3 readable images, 4 questions)."""
    data, support_data = run_dir / "data", run_dir / "support"
    write_karpathy(data)
    questions, annotations = write_vqav2(data)
    support_questions, support_annotations = write_vqav2(support_data, with_missing=False)
    synthetic = yaml.safe_load(Path(FLAMINGO_EVAL).read_text())["data"]["init_args"]["val_streams"]
    args = ["--config", FLAMINGO, "--config", FLAMINGO_EVAL, "--config", FLAMINGO_COCO, *QUIET,
            "--model.init_args.generation={max_new_tokens: 4}",
            "--data.init_args.streams.interleaved.init_args.dataset.init_args.num=16"]
    for name in synthetic:
        args += [f"{VAL}.{name}.init_args.dataset.init_args.num=2",
                 f"{VAL}.{name}.init_args.transform.init_args.support.init_args.num=12"]
    real = {"vqav2_0shot": 0, "vqav2_4shot": 2, "coco_0shot": 0, "coco_4shot": 2}
    for name, n in real.items():
        ds, tf = f"{VAL}.{name}.init_args.dataset", f"{VAL}.{name}.init_args.transform.init_args"
        args.append(f"{tf}.shots={n}")
        if name.startswith("vqav2"):
            args += [*vqav2_args(ds, data, questions, annotations),
                     *vqav2_args(f"{tf}.support", support_data, support_questions, support_annotations)]
        else:
            args += [*karpathy_args(ds, data), *karpathy_args(f"{tf}.support", data),
                     f"{tf}.support.init_args.split=[train, restval, val]"]
    ckpt = run_dir / "ckpt" / "last.ckpt"
    save_fresh_checkpoint([*args, "--trainer.logger=false"], ckpt)
    assert main(["validate", *args, "--trainer.logger=false", "--ckpt_path", str(ckpt)]) == 0
    out = capsys.readouterr().out
    report = json.loads((run_dir / "ckpt" / "last.validate.json").read_text())
    # the fixtures: 3 of 4 questions have an image, 2 of the Karpathy test split's 4 images are readable
    assert {name: (s["samples"], s["skipped"], s["task"], s["shots"]) for name, s in report["streams"].items()} == {
        "vqa_1shot": (2, 0, "vqa", 1), "vqa_2shot": (2, 0, "vqa", 2), "vqa_8shot": (2, 0, "vqa", 8),
        "caption_4shot": (2, 0, "captioning", 4), "vqav2_0shot": (3, 1, "vqa", 0), "vqav2_4shot": (3, 1, "vqa", 2),
        "coco_0shot": (2, 2, "captioning", 0), "coco_4shot": (2, 2, "captioning", 2)}
    metrics = report["metrics"]  # equal to what trainer.validate returns: the FLAVA and PaLI tests check that
    val = lambda name, metric: metrics[f"val/{name}/{metric}"]  # noqa: E731
    assert report["fewshot"] == {
        "vqa_accuracy": {"vqa": {"1": val("vqa_1shot", "vqa_accuracy"), "2": val("vqa_2shot", "vqa_accuracy"),
                                 "8": val("vqa_8shot", "vqa_accuracy")},
                         "vqav2": {"0": val("vqav2_0shot", "vqa_accuracy"), "2": val("vqav2_4shot", "vqa_accuracy")}},
        "cider": {"caption": {"4": val("caption_4shot", "cider")},
                  "coco": {"0": val("coco_0shot", "cider"), "2": val("coco_4shot", "cider")}}}
    assert "vqa_accuracy by shots" in out and "8-shot" in out

