"""One FLAVA training step on a multimodal batch (GC + ITM + MMM): vlm vs transformers' FlavaForPreTraining.

Same config (HF ``FlavaConfig``; ``--size base`` is the paper's size), same random batch (pixel_values,
input_ids, input_ids_masked, bool_masked_pos, mlm_labels, mim_labels, itm_labels with negatives), same
precision (bf16 autocast on GPU), in one process. Reports samples/s, peak memory and MFU from an analytic
FLOP count (``vlm.models.flava.flava_flops_per_sample``; the same count for both, since both do the same
work: unmasked + masked image and text passes and one masked multimodal pass).

    python benchmarks/flava.py --device cuda --size base --batch 64 --steps 20 --compile --out results.json
    python benchmarks/flava.py --device cuda --size base --batch 128 --compile step --compile-mode max-autotune-no-cudagraphs
    python benchmarks/flava.py --device cpu --size tiny        # < 1 minute, shows both numbers
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

#: dense bf16 peak of the GPU (H100 SXM and H200 share it); MFU is reported against this.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def hf_config(size: str):
    from transformers import FlavaConfig

    if size == "base":  # the paper's FLAVA: ViT-B/16 towers, 6-layer multimodal encoder, 30522 vocab, 8192 codes
        return FlavaConfig(init_codebook=False)
    sizes = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
    return FlavaConfig(
        image_config=dict(sizes, image_size=64, patch_size=8, vocab_size=1024),
        text_config=dict(sizes, vocab_size=30522, max_position_embeddings=64),
        multimodal_config=dict(sizes), hidden_size=128, projection_dim=128, init_codebook=False,
    )


def make_batch(config, batch: int, text_len: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ic, tc = config.image_config, config.text_config
    n = (ic.image_size // ic.patch_size) ** 2
    ids = torch.randint(1000, tc.vocab_size, (batch, text_len), generator=g)
    ids[:, 0] = 101
    attention = torch.ones(batch, text_len, dtype=torch.long)
    lengths = torch.randint(text_len // 2, text_len + 1, (batch,), generator=g)
    attention[torch.arange(text_len)[None, :] >= lengths[:, None]] = 0
    ids = ids.masked_fill(attention == 0, 0)
    pick = (torch.rand(batch, text_len, generator=g) < 0.15) & attention.bool()
    pick[:, 1] = True
    itm = (torch.rand(batch, generator=g) > 0.1).long()  # ~10% mismatched pairs, as FLAVA's data
    itm[0] = 1
    out = {
        "pixel_values": torch.randn(batch, 3, ic.image_size, ic.image_size, generator=g),
        "input_ids": ids,
        "attention_mask": attention,
        "input_ids_masked": ids.masked_fill(pick, 103),
        "mlm_labels": ids.masked_fill(~pick, -100),
        "bool_masked_pos": torch.rand(batch, n, generator=g) < 0.4,
        "mim_labels": torch.randint(0, ic.vocab_size, (batch, n), generator=g),
        "itm_labels": itm,
    }
    return {k: v.to(device) for k, v in out.items()}


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_steps(step, args, warmup: int | None = None) -> dict[str, float]:
    """Run warm-up then timed steps; samples/s, step time and peak memory (GPU).

    The peak is taken over warm-up and timed steps: CUDA-graph replays (``reduce-overhead``) allocate nothing,
    their memory is the private pool reserved while capturing in warm-up, so a peak reset after warm-up
    would report only the eager leftovers. ``peak_reserved_gib`` also counts the allocator's cached blocks.
    """
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup if warmup is None else warmup):
        step()
    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(args.device)
    elapsed = time.perf_counter() - t0
    out = {"samples_per_s": args.batch * args.steps / elapsed, "step_ms": 1000 * elapsed / args.steps,
           "final_loss": float(loss)}
    if args.device == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def count_syncs(step) -> int:
    """Device->host synchronisations in one step (CUDA's sync debug mode warns at each)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def profile(step, args) -> None:
    """Print the kernels that take the GPU's time over two steps (where to look next)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(2):
            step()
        sync(args.device)
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.profile, max_name_column_width=70))


def autocast(args):
    enabled = args.precision == "bf16"
    return torch.autocast(args.device, dtype=torch.bfloat16, enabled=enabled)


def build_vlm(config, batch, args):
    """(step function, facts) for this model: the benchmark's objectives, fused AdamW, the chosen compile."""
    from vlm.convert.hf_flava import flava_kwargs_from_hf_config
    from vlm.models.flava import FLAVA

    kwargs = flava_kwargs_from_hf_config(config)
    kwargs["objectives"] = {k: kwargs["objectives"][k] for k in ("gc", "itm", "mmm")}
    kwargs["streams"] = {"pairs": {"gc": 1.0, "itm": 1.0, "mmm": 1.0}}
    options = {"mode": args.compile_mode} if args.compile_mode else None
    model = FLAVA(**kwargs, compile=args.compile, compile_options=options,
                  contrastive_from_masked=args.contrastive_from_masked,
                  activation_checkpointing=args.activation_checkpointing).to(args.device)
    model.train()
    opt = model.configure_optimizers()["optimizer"]
    b = dict(batch, stream="pairs")

    def step():
        with autocast(args):
            loss, _ = model.compute_losses(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    info = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "optimizer": f"AdamW(fused={opt.defaults.get('fused')})"}
    if args.compile != "none":  # compilation happens in the first step: what a run waits before training
        t0 = time.perf_counter()
        step()
        sync(args.device)
        info["time_to_first_step_s"] = time.perf_counter() - t0
    if args.contrastive_from_masked:
        info["passes"] = {"image": 1, "text": 1, "multimodal": 1}
    return step, info


def build_hf(config, batch, args):
    """(step function, facts) for transformers' FlavaForPreTraining with torch's default AdamW."""
    from transformers import FlavaForPreTraining

    model = FlavaForPreTraining(config).to(args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step():
        with autocast(args):
            out = model(**{k: v.clone() if k == "mim_labels" else v for k, v in batch.items()}, return_loss=True)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step, {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                  "optimizer": "AdamW(torch default)"}


def measure(builders: dict, config, batch, args) -> dict:
    """Time each side. One repeat: build, time and free one model after the other (GPU memory). More: keep
    both, alternate timed blocks (order swapped every round) and report the median, so that the load of a
    shared machine falls on both sides alike."""
    results: dict[str, dict] = {}

    def failed(name, err):
        # one side failing (e.g. OOM) must not lose the other's numbers
        results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=3)}

    if args.repeats == 1:
        for name, build in builders.items():
            try:
                step, info = build(config, batch, args)
                res = {**timed_steps(step, args), **info}
                if name == "vlm" and args.device == "cuda":
                    res["host_syncs_per_step"] = count_syncs(step)
                if name == "vlm" and args.profile:
                    profile(step, args)
                results[name] = res
            except Exception as err:
                failed(name, err)
            step = None
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
        return results

    steps, infos, runs = {}, {}, {}
    for name, build in builders.items():
        try:
            steps[name], infos[name] = build(config, batch, args)
            runs[name] = []
        except Exception as err:
            failed(name, err)
    for r in range(args.repeats):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            try:
                runs[name].append(timed_steps(steps[name], args, warmup=args.warmup if r < 2 else 0))
            except Exception as err:
                failed(name, err)
                steps.pop(name)
                runs.pop(name)
    for name, rs in runs.items():
        rs = sorted(rs, key=lambda x: x["samples_per_s"])
        results[name] = {**rs[len(rs) // 2], **infos[name], "samples_per_s_runs": [x["samples_per_s"] for x in rs]}
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--size", default=None, choices=["base", "tiny"], help="default: base on cuda, tiny on cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 (base) / 8 (tiny)")
    parser.add_argument("--text-len", type=int, default=None, help="default: 64 (base) / 16 (tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on cuda, 5 on cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 on cuda, 2 on cpu)")
    parser.add_argument("--compile", nargs="?", const="towers", default="none", choices=["none", "towers", "step"],
                        help="torch.compile vlm's towers (--compile / --compile towers) or its whole loss computation "
                             "(--compile step)")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode, e.g. max-autotune-no-cudagraphs or reduce-overhead (CUDA graphs)")
    parser.add_argument("--contrastive-from-masked", action="store_true",
                        help="vlm: GC from the masked passes (skips the unmasked tower passes; not HF's recipe)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="default: bf16 on cuda")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--repeats", type=int, default=None,
                        help="alternating timed blocks per model, median reported (default 1 on cuda, 5 on cpu)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="after timing, profile two vlm steps and print the top ROWS kernels")
    parser.add_argument("--out", default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    args.size = args.size or ("base" if cuda else "tiny")
    args.batch = args.batch or (64 if args.size == "base" else 8)
    args.text_len = args.text_len or (64 if args.size == "base" else 16)
    args.steps = args.steps or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.repeats = max(1, args.repeats or (1 if cuda else 5))
    torch.manual_seed(0)

    from vlm.convert.hf_flava import flava_kwargs_from_hf_config
    from vlm.models.flava import FLAVA, flava_flops_per_sample

    config = hf_config(args.size)
    batch = make_batch(config, args.batch, args.text_len, args.device)
    with torch.device("meta"):  # sizes only, for the FLOP count
        probe = FLAVA(**flava_kwargs_from_hf_config(config))
    flops = flava_flops_per_sample(probe, args.text_len)
    flops_masked_only = flava_flops_per_sample(probe, args.text_len, passes={"image": 1, "text": 1, "multimodal": 1})
    del probe
    peak = peak_flops(args.device)

    import transformers

    result = {
        "benchmark": "flava_pairs_step(gc+itm+mmm)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "args": vars(args),
        "train_flops_per_sample": flops,
        "peak_flops": peak,
    }
    builders = {"vlm": build_vlm} if args.skip_hf else {"vlm": build_vlm, "hf": build_hf}
    for name, res in measure(builders, config, batch, args).items():
        if peak and "samples_per_s" in res:
            # MFU counts the work actually done (fewer passes with --contrastive-from-masked)
            f = flops_masked_only if res.get("passes") else flops
            res["mfu"] = res["samples_per_s"] * f / peak
        result[name] = res
    if "samples_per_s" in result.get("vlm", {}) and "samples_per_s" in result.get("hf", {}):
        result["speedup"] = result["vlm"]["samples_per_s"] / result["hf"]["samples_per_s"]
        if cuda:
            result["memory_ratio"] = result["vlm"]["peak_memory_gib"] / result["hf"]["peak_memory_gib"]
    print_report(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def print_report(r: dict) -> None:
    a = r["args"]
    print(f"FLAVA {a['size']} pairs step (GC+ITM+MMM) | {r['hardware']} | batch {a['batch']} text {a['text_len']} "
          f"| {a['precision']} | compile={a['compile']}{'/' + a['compile_mode'] if a['compile_mode'] else ''} "
          f"| torch {r['versions']['torch']}")
    print(f"analytic train FLOPs/sample: {r['train_flops_per_sample'] / 1e9:.2f} GFLOP")
    for name in ("vlm", "hf"):
        res = r.get(name)
        if res is None:
            continue
        if "error" in res:
            print(f"  {name:4s} ERROR {res['error']}")
            continue
        mem = f"{res['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in res else "n/a (cpu)"
        mfu = f"{100 * res['mfu']:.1f}%" if "mfu" in res else "n/a"
        spread = ""
        if len(res.get("samples_per_s_runs", [])) > 1:
            spread = f" (median of {len(res['samples_per_s_runs'])}: {min(res['samples_per_s_runs']):.1f}-" \
                     f"{max(res['samples_per_s_runs']):.1f})"
        print(f"  {name:4s} {res['samples_per_s']:9.1f} samples/s{spread}  step {res['step_ms']:8.1f} ms  peak {mem}  "
              f"MFU {mfu}  loss {res['final_loss']:.3f}  ({res['optimizer']})"
              + (f"  syncs/step {res['host_syncs_per_step']}" if "host_syncs_per_step" in res else "")
              + (f"  time_to_first_step_s {res['time_to_first_step_s']:.1f}" if "time_to_first_step_s" in res else ""))
    if "speedup" in r:
        extra = f", memory vlm/hf {r['memory_ratio']:.2f}" if "memory_ratio" in r else ""
        print(f"  speedup vlm/hf: {r['speedup']:.2f}x{extra}")


if __name__ == "__main__":
    main()
