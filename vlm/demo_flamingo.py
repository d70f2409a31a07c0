"""``make demo-flamingo``: train tiny Flamingo on the synthetic world's interleaved documents on CPU, then show
what it learned: held-out VQA with 0 and 4 in-context examples, and zero-shot captioning.

    python -m vlm.demo_flamingo [--config conf/flamingo/tiny.yaml] [--held-out 200] [extra LightningCLI args ...]
"""

from __future__ import annotations

import argparse
import sys

from vlm.demo import ROOT, fit_demo, print_run_dir, stream_summary


def main(argv: list[str] | None = None) -> int:
    """Train with the real ``vlm fit`` path, then evaluate few-shot on queries and support the model never saw."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "conf/flamingo/tiny.yaml"))
    ap.add_argument("--held-out", type=int, default=200, help="held-out VQA questions and captioning images")
    ap.add_argument("--shots", type=int, default=4, help="in-context examples of the few-shot evaluation")
    ap.add_argument("--examples", type=int, default=4)
    args, extra = ap.parse_known_args(argv)
    cli, history, train_s = fit_demo("Flamingo", args.config, extra)

    from vlm.callbacks.gates import GateMonitor
    from vlm.data.fewshot import FewShotPrompts
    from vlm.data.synthetic import SyntheticPairs, SyntheticVQA
    from vlm.evaluation import evaluate_fewshot

    model, trainer = cli.model, cli.trainer
    streams = stream_summary(model)
    print(f"\ntrained {trainer.global_step} optimizer steps in {train_s / 60:.1f} min "
          f"(streams {streams}; schedule {type(cli.datamodule.schedule).__name__})")
    print("\ncaptioning LM loss per stream (mean of the first -> last tenth of training):")
    losses = {k[len("train/"):-len("/loss")]: v for k, v in history.first_last().items()
              if k.endswith("/loss") and k.count("/") == 3}
    for key, (first, last) in sorted(losses.items()):
        print(f"  {key:<18} {first:8.3f} -> {last:8.3f}")
    gates = GateMonitor(pattern="*_gate").gate_values(model)
    if gates:
        import re

        named = {}
        for k, v in gates.items():
            m = re.search(r"\.(\d+)\.xattn\.(\w+?)_gate", k)
            named[f"block{m.group(1)}.{m.group(2)}" if m else k] = v
        print("gates tanh(alpha): " + ", ".join(f"{k}={v:.2f}" for k, v in sorted(named.items())))

    model = model.cpu()
    size = int(model.config.vision.get("kwargs", {}).get("img_size", 64))
    queries = SyntheticVQA(split="test", num=args.held_out, image_size=size)
    support = SyntheticVQA(split="val", num=1000, image_size=size)
    scores, rows = {}, {}
    for shots in (0, args.shots):
        tf = FewShotPrompts(support, shots=shots, task="vqa", tokenizer=model.config.tokenizer, max_length=160,
                            image_size=size)
        scores[shots], rows[shots] = evaluate_fewshot(model, queries, tf)
    print(f"\nheld-out VQA over {len(queries)} questions never seen in training (support from another split):")
    for shots in scores:
        print(f"  {shots} shots: accuracy {scores[shots]:.2f}")
    print("\nwhat it answers (question -> 0-shot | 4-shot, reference):")
    for i in range(min(args.examples, len(queries))):
        q = queries[i]
        print(f"  {q['question']!r} -> {rows[0][i]['prediction']!r} | {rows[args.shots][i]['prediction']!r}"
              f"  ({q['answer']!r})")

    pairs = SyntheticPairs(split="test", num=min(100, args.held_out), image_size=size)
    cap_tf = FewShotPrompts(SyntheticPairs(split="val", num=1000, image_size=size), shots=0, task="captioning",
                            tokenizer=model.config.tokenizer, max_length=64, image_size=size)
    cider, cap_rows = evaluate_fewshot(model, pairs, cap_tf)
    print(f"\nzero-shot captioning of {len(pairs)} held-out images: CIDEr-D {cider:.2f}")
    for r in cap_rows[: args.examples]:
        print(f"  {r['prediction']!r}\n    reference: {r['references'][0]!r}")

    print_run_dir(trainer)
    # one machine-readable line: what the model learned, for scripts comparing seeds and machines
    print(f"RESULT flamingo-tiny vqa_0shot={scores[0]:.3f} vqa_{args.shots}shot={scores[args.shots]:.3f} "
          f"cider_0shot={cider:.3f} steps={trainer.global_step} "
          + " ".join(f"{k}={first:.3f}->{last:.3f}" for k, (first, last) in sorted(losses.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
