"""``make demo-pali``: train tiny PaLI on the synthetic world's task mixture on CPU, then show what it learned on
held-out images: VQA exact match against the majority answer of each question type, detection parses and mAP,
and captioning CIDEr-D.

    python -m vlm.demo_pali [--config conf/pali/tiny.yaml] [--vqa-questions 1000] [--held-out 200] [LightningCLI args]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from vlm.demo import ROOT, fit_demo, print_run_dir


def majority_answers(dataset) -> dict[str, str]:
    """The most frequent answer of each question type (``qa_type``) over ``dataset`` (a ``SyntheticVQA``)."""
    counts: dict[str, Counter] = {}
    for i in range(len(dataset)):
        s = dataset[i]
        counts.setdefault(s["qa_type"], Counter())[s["answer"]] += 1
    return {t: c.most_common(1)[0][0] for t, c in counts.items()}


def detection_map(predictions: list[list[tuple[list[float], str]]], samples: list[dict]) -> float:
    """COCO-style mAP@[.5:.95] (torchmetrics, pycocotools backend) of parsed boxes against the scenes' boxes.

    A predicted label is a class only when it names a (colour, shape) of the world; every box scores 1.
    """
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    from vlm.data.synthetic import COLOUR_NAMES, SHAPES

    classes = {f"{c} {s}": i for i, (c, s) in enumerate((c, s) for c in COLOUR_NAMES for s in SHAPES)}
    preds, targets = [], []
    for dets, sample in zip(predictions, samples):
        kept = [(box, classes[label]) for box, label in dets if label in classes]
        preds.append({"boxes": torch.tensor([b for b, _ in kept], dtype=torch.float).reshape(-1, 4),
                      "scores": torch.ones(len(kept)), "labels": torch.tensor([c for _, c in kept], dtype=torch.long)})
        targets.append({"boxes": torch.tensor(sample["boxes"], dtype=torch.float).reshape(-1, 4),
                        "labels": torch.tensor([classes[lab] for lab in sample["box_labels"]], dtype=torch.long)})
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    metric.update(preds, targets)
    return float(metric.compute()["map"])


def main(argv: list[str] | None = None) -> int:
    """Train with the real ``vlm fit`` path, then evaluate on held-out scenes (the test split)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "conf/pali/tiny.yaml"))
    ap.add_argument("--held-out", type=int, default=200,
                    help="held-out images for detection and captioning (at most 100 are used)")
    ap.add_argument("--vqa-questions", type=int, default=1000,
                    help="held-out VQA questions (1000: a standard error of about 0.015 on the exact match)")
    ap.add_argument("--examples", type=int, default=4)
    args, extra = ap.parse_known_args(argv)
    cli, history, train_s = fit_demo("PaLI", args.config, extra)

    from vlm.data.synthetic import SyntheticPairs, SyntheticVQA
    from vlm.data.transforms import PrefixLMTransform
    from vlm.evaluation import evaluate_prompts
    from vlm.metrics.vqa import vqa_accuracy
    from vlm.models.pali import PaLIPrompts, parse_detections

    model, trainer = cli.model, cli.trainer
    schedule = cli.datamodule.schedule
    weights = getattr(schedule, "weights", None)
    print(f"\ntrained {trainer.global_step} optimizer steps in {train_s / 60:.1f} min "
          f"(schedule {type(schedule).__name__}{f' {dict(weights)}' if weights else ''})")
    print("\ncaptioning LM loss per stream (mean of the first -> last tenth of its batches; batches):")
    losses = {k[len("train/"):-len("/caption/loss")]: v for k, v in history.first_last().items()
              if k.endswith("/caption/loss") and k.count("/") == 3}
    for key, (first, last) in sorted(losses.items()):
        n = len(history.history[f"train/{key}/caption/loss"])
        print(f"  {key:<22} {first:7.3f} -> {last:7.3f}  ({n})")

    model = model.cpu()
    tok, size = model.config.tokenizer, int(model.config.vision.get("kwargs", {}).get("img_size", 64))

    # VQA on held-out scenes, English, exact match after the VQA normalisation
    majority = majority_answers(SyntheticVQA(split="train", num=2000, image_size=size))
    queries = SyntheticVQA(split="test", num=args.vqa_questions, image_size=size)
    vqa, rows = evaluate_prompts(model, queries, PaLIPrompts(tokenizer=tok, task="vqa", lang="en", max_length=24,
                                                             image_size=size), max_new_tokens=8)
    base = sum(vqa_accuracy(majority[queries[i]["qa_type"]], [queries[i]["answer"]])
               for i in range(len(queries))) / len(queries)
    by_type: dict[str, list[float]] = {}
    for i, r in enumerate(rows):
        by_type.setdefault(queries[i]["qa_type"], []).append(vqa_accuracy(r["prediction"], r["references"]))
    print(f"\nheld-out VQA over {len(queries)} questions: exact match {vqa:.3f} "
          f"(majority answer per question type: {base:.3f})")
    print("  by type: " + ", ".join(f"{t} {sum(v) / len(v):.2f} (n={len(v)}, majority {majority[t]!r})"
                                    for t, v in sorted(by_type.items())))
    for r in rows[: args.examples]:
        print(f"  {r['prompt']!r} -> {r['prediction']!r}  ({r['references'][0]!r})")

    # detection: parse "<loc..>x4 label ; ..." into boxes
    pairs = SyntheticPairs(split="test", num=min(100, args.held_out), image_size=size)
    samples = [pairs[i] for i in range(len(pairs))]
    _, det_rows = evaluate_prompts(model, samples, PrefixLMTransform(tokenizer=tok, task="detection", max_length=24,
                                                                     image_size=size), max_new_tokens=32)
    dets = [parse_detections(r["prediction"]) for r in det_rows]
    det_map = detection_map(dets, samples)
    print(f"\ndetection on {len(samples)} held-out images: mAP@[.5:.95] {det_map:.3f}")
    for dets_i, s, r in list(zip(dets, samples, det_rows))[: args.examples]:
        shown = (" ; ".join(f"{lab} [{', '.join(f'{v:.2f}' for v in box)}]" for box, lab in dets_i)
                 or f"(no box in {r['prediction']!r})")
        truth = " ; ".join(f"{lab} [{', '.join(f'{v:.2f}' for v in box)}]"
                           for box, lab in zip(s["boxes"], s["box_labels"]))
        print(f"  {shown}\n    truth: {truth}")

    cider, cap_rows = evaluate_prompts(model, pairs, PaLIPrompts(tokenizer=tok, task="caption", lang="en",
                                                                 max_length=24, image_size=size), max_new_tokens=48)
    print(f"\ncaptioning of {len(pairs)} held-out images: CIDEr-D {cider:.3f}")
    for r in cap_rows[: args.examples]:
        print(f"  {r['prediction']!r}\n    reference: {r['references'][0]!r}")

    print_run_dir(trainer)
    print(f"steps={trainer.global_step} train_min={train_s / 60:.2f} "
          + " ".join(f"{k}={first:.3f}->{last:.3f}" for k, (first, last) in sorted(losses.items())))
    # the last line, machine-readable
    print(f"RESULT pali-tiny vqa_em={vqa:.3f} vqa_majority={base:.3f} det_map={det_map:.3f} caption_cider={cider:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
