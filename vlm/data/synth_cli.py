"""``vlm data synth``: write synthetic-world WebDataset shards to a directory."""

from __future__ import annotations

import argparse
import sys
import time

from vlm.data.synthetic import SPLITS, write_shards
from vlm.errors import VLMConfigError


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``vlm data synth`` (arguments after ``data synth``)."""
    p = argparse.ArgumentParser(
        prog="vlm data synth", description="Write synthetic image-text WebDataset shards."
    )
    p.add_argument("--out", required=True, help="directory to write the .tar shards into")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--split", default="train", choices=[*SPLITS, "validation"], help="which disjoint split")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per .tar shard")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``vlm data synth``; return the process exit code."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        paths = write_shards(
            args.out, args.num, args.split, args.image_size, args.seed, args.samples_per_shard
        )
    except VLMConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.num} {args.split} samples in {len(paths)} shard(s) to {args.out} "
          f"({time.perf_counter() - start:.1f}s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
