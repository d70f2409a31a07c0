"""``make demo``: pretrain tiny FLAVA on the synthetic world on CPU, then show what it learned on held-out data.

    python -m vlm.demo [--config conf/flava/tiny.yaml] [--held-out 100] [extra LightningCLI args ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fit_demo(family: str, config: str, extra: list[str]):
    """The demos' training run: offline defaults, a header line, then the real ``vlm fit`` (LightningCLI) with a
    ``MetricHistory`` callback. Returns ``(cli, history, training seconds)``."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vlm.callbacks.history import MetricHistory
    from vlm.cli import VLMCLI

    history = MetricHistory()
    print(f"== vlm demo: {family} from {os.path.relpath(config)} on the synthetic world (CPU) ==", flush=True)
    t0 = time.time()
    cli = VLMCLI(args=["fit", "--config", config, *extra], trainer_defaults={"callbacks": [history]})
    return cli, history, time.time() - t0


def stream_summary(model) -> str:
    """``stream->objective+objective, ...`` of a model's streams, for the demos' "trained ..." line."""
    return ", ".join(f"{s}->{'+'.join(ws)}" for s, ws in model.stream_weights.items())


def print_run_dir(trainer) -> None:
    """Where the offline wandb run of the demo is, and how to browse or upload it (nothing without wandb)."""
    logger = trainer.logger
    run_dir = getattr(logger, "run_dir", None) if logger is not None else None
    if run_dir:
        rel = os.path.relpath(run_dir)
        print(f"\nwandb run (offline): {rel}\n  browse: .venv/bin/wandb leet {rel}\n  upload: wandb sync {rel}")


def _bar(value: float, width: int = 30) -> str:
    n = int(round(max(0.0, min(1.0, value)) * width))
    return "#" * n + "." * (width - n)


def main(argv: list[str] | None = None) -> int:
    """Train with the real ``vlm fit`` path, then evaluate zero-shot on pairs the model never saw."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "conf/flava/tiny.yaml"))
    ap.add_argument("--held-out", type=int, default=100, help="held-out test pairs for retrieval (chance R@1 = 1/N)")
    ap.add_argument("--zero-shot-images", type=int, default=1000,
                    help="held-out images scanned for single-object ones (zero-shot shape classification)")
    ap.add_argument("--examples", type=int, default=6)
    args, extra = ap.parse_known_args(argv)
    cli, history, train_s = fit_demo("FLAVA", args.config, extra)

    from vlm.data.synthetic import CLASS_NAMES, SyntheticPairs, zero_shot_templates
    from vlm.data.tokenizers import load_tokenizer
    from vlm.data.transforms import ImageTextTransform
    from vlm.evaluation import embed_pairs, retrieval, top_matches, zero_shot

    model, trainer = cli.model, cli.trainer
    streams = stream_summary(model)
    print(f"\ntrained {trainer.global_step} optimizer steps in {train_s / 60:.1f} min "
          f"(streams {streams}; schedule {type(cli.datamodule.schedule).__name__})")

    print("\nloss per stream and objective (mean of the first -> last tenth of training):")
    for key, (first, last) in sorted(history.first_last().items()):
        if key.endswith("/loss") and key.count("/") == 3:
            print(f"  {key[len('train/'):-len('/loss')]:<14} {first:8.3f} -> {last:8.3f}")

    transform = ImageTextTransform(tokenizer="minilm", max_length=32,
                                   image_size=int(model.image_encoder.vit.patch_embed.img_size[0]))
    held_out = SyntheticPairs(split="test", num=args.held_out, image_size=transform.image.image_size)
    emb = embed_pairs(model.cpu(), held_out, transform, keep_samples=True)
    rec = retrieval(emb)
    n = emb.image.shape[0]
    print(f"\nzero-shot retrieval over {n} held-out pairs never seen in training (chance R@1 = {1 / n:.2f}):")
    for direction, name in (("t2i", "text -> image"), ("i2t", "image -> text")):
        r1 = rec[f"{direction}_R@1"]
        print(f"  {name}: R@1 {r1:.2f} [{_bar(r1)}]  R@5 {rec[f'{direction}_R@5']:.2f}  R@10 {rec[f'{direction}_R@10']:.2f}")

    tok = load_tokenizer("minilm")

    def encode_prompts(texts):
        enc = tok(texts, padding=True, return_tensors="pt")
        return model.encode_text(enc["input_ids"], enc["attention_mask"])

    # only single-object images have a class (the shape); the others carry class_index -1
    zs = embed_pairs(model, SyntheticPairs(split="test", num=args.zero_shot_images,
                                           image_size=transform.image.image_size), transform)
    single = int((zs.class_index >= 0).sum())
    acc = float("nan")
    if single >= 5:
        acc = zero_shot(model, zs, CLASS_NAMES, zero_shot_templates(), encode_prompts)
        print(f"  zero-shot shape classification of the {single} single-object images "
              f"({len(CLASS_NAMES)} classes, chance {1 / len(CLASS_NAMES):.2f}): top-1 {acc:.2f}")

    print("\nwhat it retrieves for held-out images (best caption among all held-out captions):")
    for i, j, sim in top_matches(emb, args.examples):
        ok = "ok " if emb.pair_ids[j] == emb.pair_ids[i] else "-- "
        print(f"  {ok}image {i:3d}, true: {emb.captions[i]!r}\n       retrieved ({sim:.2f}): {emb.captions[j]!r}")

    print_run_dir(trainer)
    target = 0.3
    ok = rec["t2i_R@1"] >= target
    print(f"\n{'PASS' if ok else 'BELOW TARGET'}: text->image R@1 {rec['t2i_R@1']:.2f} (target >= {target}, chance {1 / n:.2f})")
    losses = {k[len("train/"):-len("/loss")]: v for k, v in history.first_last().items()
              if k.endswith("/loss") and k.count("/") == 3}
    # one machine-readable line: what the model learned, for scripts comparing seeds and machines
    print(f"RESULT flava-tiny steps={trainer.global_step} t2i_r1={rec['t2i_R@1']:.3f} i2t_r1={rec['i2t_R@1']:.3f} "
          f"zeroshot_top1={acc:.3f} zeroshot_chance={1 / len(CLASS_NAMES):.3f} retrieval_chance={1 / n:.3f} "
          + " ".join(f"{k}={first:.3f}->{last:.3f}" for k, (first, last) in sorted(losses.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
