"""One PaLI training step: vlm's ``PaLI`` vs the step a user would write by hand, same sizes, same process.

vlm: ``vlm.models.pali.PaLI`` (frozen timm ViT -> linear projection -> image tokens in front of the prompt of
a T5-shaped encoder-decoder), its ``compute_losses`` (the captioning LM loss on the decoder targets) and the
optimizer of its ``configure_optimizers`` (fused AdamW where torch has the kernel). Naive: the same timm ViT
under ``torch.no_grad`` -> ``nn.Linear`` -> ``inputs_embeds`` of transformers' ``T5ForConditionalGeneration``
(its own loss from ``labels``), plain ``torch.optim.AdamW``. The naive model is loaded with vlm's initial
weights, so on CPU (fp32) both first losses agree; both see the same batch: ``--batch`` images, 16 prompt and
16 target tokens. ``--size base``: ViT-B/16 at 224 px (196 patches) + a T5-base-shaped LM (12 + 12 layers,
d_model 768, d_ff 3072, 32128 rows), random weights (vlm.models.pali.SIZES['base']); ``--size tiny``:
SIZES['tiny'] (64 px, 8 px patches, 2 + 2 layers of 128), < 1 minute on a CPU. bf16 autocast on CUDA, fp32
on CPU.

Reported: samples/s (median step after warm-up), peak memory on CUDA (``max_memory_allocated``; weights,
gradients and optimizer state included; one model at a time, so each peak is its own) and MFU against the
card's dense bf16 peak, from the analytic FLOP count of :func:`flops_per_sample` (the same count for both):

    3 x forward(projection + T5 encoder + T5 decoder + LM head)  (trained: forward + backward)
  + 1 x forward(ViT)                                             (frozen: forward only)

with 2 FLOPs per multiply-add of every matmul, attention scores and weighted sums included (full, unmasked
squares), and embeddings, norms, softmax, biases and the relative position bias left out. Targets (the
issue's): >= 35% MFU and >= 2.4x the naive samples/s on a GPU; on CPU at the tiny size, no slower than naive.
On CPU both models are kept and ``--repeats`` timed blocks alternate between them (one torch thread by
default), so that the load of a shared machine falls on both alike.

    python benchmarks/pali.py --device cuda --size base --json pali.json
    python benchmarks/pali.py --device cuda --size base --compile step
    python benchmarks/pali.py --device cpu --size tiny           # < 1 minute
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

TARGET_MFU = 0.35
TARGET_SPEEDUP = 2.4
PROMPT_LEN = 16
TARGET_LEN = 16
DEFAULT_BATCH = {"base": 64, "tiny": 8}

#: dense bf16 peak of the GPU (H100 SXM and H200 share it); MFU is reported against this.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(args):
    return torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def count(params) -> int:
    return sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------- FLOPs
from vlm.flops import t5_forward_flops, vit_forward_flops  # noqa: E402  (the counts vlm's Throughput uses)


def flops_per_sample(model, image_size: int, prompt_len: int = PROMPT_LEN, target_len: int = TARGET_LEN) -> dict:
    """Analytic FLOPs of one PaLI training sample: trained part forward + backward (3x), frozen ViT forward (1x)."""
    core = model.core
    vit = core.vision.model
    patches = core.vision.num_tokens(image_size)
    proj = 2.0 * patches * core.proj.in_features * core.proj.out_features
    lm = t5_forward_flops(core.lm.config, patches + prompt_len, target_len, int(core.vocab_size))
    vision = vit_forward_flops(vit, image_size)
    trained = 3.0 * (proj + lm)
    return {"total": trained + vision, "trained_fwd_bwd": trained, "frozen_vit_fwd": vision,
            "encoder_tokens": patches + prompt_len, "decoder_tokens": target_len}


# ---------------------------------------------------------------------------------------------- models
def build_vlm(args):
    """(model, step factory, facts) for vlm's PaLI."""
    from vlm.models.pali import PaLI

    torch.manual_seed(0)
    model = PaLI(size=args.size, lr=1e-4, weight_decay=0.1, compile=args.compile)
    model = model.to(args.device).train()
    opt = model.configure_optimizers()["optimizer"]
    facts = {
        "params_m": count(model.parameters()) / 1e6,
        "trainable_m": count(p for p in model.parameters() if p.requires_grad) / 1e6,
        "optimizer": f"AdamW(fused={opt.defaults.get('fused')})",
        "vocab_size": int(model.core.vocab_size),
    }

    def make_step(batch: dict):
        b = dict(batch, stream="vqa")

        def step():
            with autocast(args):
                loss, _ = model.compute_losses(b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    return model, make_step, facts


class NaivePaLI(nn.Module):
    """timm ViT (frozen, no_grad) -> nn.Linear -> ``inputs_embeds`` of ``T5ForConditionalGeneration``."""

    def __init__(self, vit: nn.Module, t5: nn.Module) -> None:
        super().__init__()
        self.vit, self.t5 = vit, t5
        self.proj = nn.Linear(vit.num_features, t5.config.d_model)
        self.prefix = int(getattr(vit, "num_prefix_tokens", 1))
        self.vit.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vit.eval()
        return self

    def forward(self, pixel_values, input_ids, attention_mask, labels, decoder_attention_mask):
        with torch.no_grad():
            feats = self.vit.forward_features(pixel_values)[:, self.prefix:]
        images = self.proj(feats)
        text = self.t5.get_input_embeddings()(input_ids)
        embeds = torch.cat([images.to(text.dtype), text], 1)
        mask = torch.cat([attention_mask.new_ones(images.shape[:2]), attention_mask], 1)
        return self.t5(inputs_embeds=embeds, attention_mask=mask, labels=labels,
                       decoder_attention_mask=decoder_attention_mask).loss


def build_naive(args, weights: dict, lm_config: dict, vision_cfg: dict):
    """(model, step factory, facts) for the hand-written step, loaded with vlm's initial ``weights``."""
    import timm
    from transformers import T5Config, T5ForConditionalGeneration

    vit = timm.create_model(vision_cfg["model"], pretrained=False, num_classes=0, **vision_cfg.get("kwargs", {}))
    t5 = T5ForConditionalGeneration(T5Config(**lm_config))
    model = NaivePaLI(vit, t5)
    model.vit.load_state_dict(weights["vision"])
    model.t5.load_state_dict(weights["lm"])
    model.proj.load_state_dict(weights["proj"])
    model = model.to(args.device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1)
    facts = {
        "params_m": count(model.parameters()) / 1e6,
        "trainable_m": count(trainable) / 1e6,
        "optimizer": "AdamW(torch defaults)",
        "vocab_size": int(t5.config.vocab_size),
    }

    def make_step(batch: dict):
        def step():
            with autocast(args):
                loss = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                             batch["decoder_attention_mask"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    return model, make_step, facts


def make_batch(batch: int, image_size: int, vocab: int, eos_id: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` images, 16-token prompts and 16-token targets (the last an end token), nothing padded."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(4, vocab, (batch, TARGET_LEN), generator=g)
    labels[:, -1] = eos_id
    return {
        "pixel_values": torch.randn(batch, 3, image_size, image_size, generator=g),
        "input_ids": torch.randint(4, vocab, (batch, PROMPT_LEN), generator=g),
        "attention_mask": torch.ones(batch, PROMPT_LEN, dtype=torch.long),
        "labels": labels,
        "decoder_attention_mask": torch.ones(batch, TARGET_LEN, dtype=torch.long),
    }


# ---------------------------------------------------------------------------------------------- timing
def error_of(err: Exception) -> dict:
    return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=4)}


def step_times(step, n: int, device: str) -> tuple[list[float], float]:
    times, loss = [], None
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, float(loss)


def summary(times: list[float], batch_size: int, loss: float) -> dict:
    med = statistics.median(times)
    return {"samples_per_s": batch_size / med, "step_ms": 1000 * med,
            "step_ms_all": [round(1000 * t, 2) for t in times], "final_loss": loss}


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def first_loss(step) -> float:
    return float(step())


def run_one_at_a_time(builders: dict, batch_of, args) -> dict:
    """Build one, time it, free it, then the other (each peak memory is its own model's)."""
    results: dict = {}
    for name, build in builders.items():
        model = make_step = step = None
        try:
            model, make_step, facts = build()
            batch = batch_of()
            step = make_step(batch)
            if args.device == "cuda":
                sync(args.device)
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            facts["first_loss"] = first_loss(step)
            facts["first_step_s"] = time.perf_counter() - t0
            for _ in range(max(0, args.warmup - 1)):
                step()
            times, loss = step_times(step, args.steps, args.device)
            res = {"facts": facts, **summary(times, len(batch["labels"]), loss)}
            if args.device == "cuda":
                res["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            results[name] = res
        except Exception as err:
            results[name] = error_of(err)
        del model, make_step, step
        free(args.device)
    return results


def run_alternating(builders: dict, batch_of, args) -> dict:
    """Keep both models; alternate ``args.repeats`` timed blocks (order swapped each round), pool the times."""
    results: dict = {}
    steps: dict = {}
    keep = []
    for name, build in builders.items():
        try:
            model, make_step, facts = build()
            keep.append(model)
            steps[name] = make_step(batch_of())
            t0 = time.perf_counter()
            facts["first_loss"] = first_loss(steps[name])
            facts["first_step_s"] = time.perf_counter() - t0
            for _ in range(max(0, args.warmup - 1)):
                steps[name]()
            results[name] = {"facts": facts}
        except Exception as err:
            results[name] = error_of(err)
            steps.pop(name, None)
    batch = batch_of() if steps else {"labels": []}
    times: dict = {name: [] for name in steps}
    blocks: dict = {name: [] for name in steps}
    losses: dict = {}
    names = list(steps)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else list(reversed(names)):
            if name not in times:
                continue
            try:
                t, losses[name] = step_times(steps[name], args.steps, args.device)
                times[name] += t
                blocks[name].append(len(batch["labels"]) / statistics.median(t))
            except Exception as err:
                results[name] = {**results[name], **error_of(err)}
                times.pop(name)
    for name, t in times.items():
        results[name].update(summary(t, len(batch["labels"]), losses[name]), blocks=args.repeats,
                             block_samples_per_s=[round(x, 1) for x in blocks[name]])
    return results


def verdict(result: dict) -> str:
    ours, naive = result["vlm"], result["naive"]
    if "samples_per_s" not in ours or "samples_per_s" not in naive:
        return "no verdict: " + (ours.get("error") or naive.get("error") or "a model did not run")
    speedup = result["speedup"]
    if result["args"]["device"] == "cuda":
        mfu = ours.get("mfu")
        mfu_ok = mfu is not None and mfu >= TARGET_MFU
        speed_ok = speedup >= TARGET_SPEEDUP
        mfu_txt = f"{100 * mfu:.1f}%" if mfu is not None else "n/a (unknown card peak)"
        return (f"GPU targets {'MET' if mfu_ok and speed_ok else 'NOT met'}: MFU {mfu_txt} (>= {100 * TARGET_MFU:.0f}%: "
                f"{'yes' if mfu_ok else 'no'}), {speedup:.2f}x naive (>= {TARGET_SPEEDUP}x: {'yes' if speed_ok else 'no'})")
    ok = speedup >= 1.0
    where = "tiny" if result["args"]["size"] == "tiny" else result["args"]["size"]
    return (f"CPU target ({where}: no slower than naive) {'MET' if ok else 'NOT met'}: {speedup:.2f}x naive; "
            f"the GPU targets (>= {100 * TARGET_MFU:.0f}% MFU, >= {TARGET_SPEEDUP}x) need --device cuda --size base")


def print_report(r: dict) -> None:
    a = r["args"]
    f = r["flops"]
    print(f"PaLI {a['size']} training step | {r['hardware']} | {a['precision']} | compile={a['compile']} | torch "
          f"{r['versions']['torch']} | transformers {r['versions']['transformers']} | timm {r['versions']['timm']} | "
          f"{a['threads']} threads | batch {a['batch']}, {f['encoder_tokens']} encoder tokens "
          f"({f['encoder_tokens'] - PROMPT_LEN} image + {PROMPT_LEN} prompt), {TARGET_LEN} target | warm-up "
          f"{a['warmup']}, timed {a['steps']} x {a['repeats']} block(s), median step")
    print(f"  analytic FLOPs/sample: {f['total'] / 1e9:.3f} GFLOP = trained fwd+bwd {f['trained_fwd_bwd'] / 1e9:.3f}"
          f" + frozen ViT fwd {f['frozen_vit_fwd'] / 1e9:.3f}")
    for name in ("vlm", "naive"):
        x = r.get(name, {})
        facts = x.get("facts") or {}
        if facts:
            print(f"  {name:6s} params {facts['params_m']:.1f}M, trainable {facts['trainable_m']:.2f}M, "
                  f"{facts['optimizer']}, first loss {facts['first_loss']:.4f} (first step {facts['first_step_s']:.2f}s)")
        if "error" in x:
            print(f"  {name:6s} ERROR {x['error']}")
            continue
        mem = f"{x['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in x else "n/a"
        mfu = f"{100 * x['mfu']:.1f}%" if "mfu" in x else "n/a"
        spread = f" (blocks {x['block_samples_per_s']})" if "block_samples_per_s" in x else ""
        print(f"  {name:6s} {x['samples_per_s']:9.1f} samples/s{spread}  step {x['step_ms']:.1f} ms  peak {mem}  "
              f"MFU {mfu}  loss {x['final_loss']:.3f}")
    if "speedup" in r:
        print(f"  vlm / naive: {r['speedup']:.2f}x samples/s"
              + (f", {r['memory_ratio']:.2f}x peak memory" if "memory_ratio" in r else ""))
    print(f"  verdict: {r['verdict']}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--size", default=None, choices=["base", "tiny"], help="default: base on cuda, tiny on cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 base, 8 tiny")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per block (default 10 cuda / 3 cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps, the first included (default 3 / 2)")
    parser.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="default: bf16 on cuda")
    parser.add_argument("--compile", default="none", choices=["none", "step"],
                        help="vlm's compile setting (step: the loss computation as one graph); naive stays eager")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed blocks per model alternating between them (default 1 on cuda: one model at a "
                             "time, so each peak is its own; 3 on cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default 1 on cpu; 0: torch's default)")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON here")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    args.size = args.size or ("base" if cuda else "tiny")
    args.batch = args.batch or DEFAULT_BATCH[args.size]
    args.steps = args.steps or (10 if cuda else 3)
    args.warmup = max(1, args.warmup if args.warmup is not None else (3 if cuda else 2))
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.repeats = max(1, args.repeats or (1 if cuda else 3))
    if args.threads is None:
        args.threads = 0 if cuda else 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()

    import timm
    import transformers

    from vlm.models.pali import SIZES

    result: dict = {
        "benchmark": "pali_train_step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores) "
                                                              f"{platform.processor() or platform.machine()}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "timm": timm.__version__, "python": platform.python_version()},
        "args": vars(args),
    }
    holder: dict = {}

    def ours():
        model, make_step, facts = build_vlm(args)
        core = model.core
        image_size = core.image_size or core.vision.image_size
        holder["flops"] = flops_per_sample(model, image_size)
        holder["lm_config"] = {k: v for k, v in core.lm.config.to_dict().items()
                               if k not in ("architectures", "transformers_version", "dtype", "torch_dtype")}
        holder["weights"] = {name: {k: v.detach().to("cpu", copy=True) for k, v in part.state_dict().items()}
                             for name, part in (("vision", core.vision.model), ("lm", core.lm), ("proj", core.proj))}
        tok = core.tokenizer
        batch = make_batch(args.batch, image_size, min(len(tok), core.vocab_size), tok.eos_token_id)
        holder["batch"] = {k: v.to(args.device) for k, v in batch.items()}
        return model, make_step, facts

    def naive():
        if "weights" not in holder:
            raise RuntimeError("not run: vlm's model (which fixes the weights and the batch) failed to build")
        weights = holder.pop("weights")
        return build_naive(args, weights, holder["lm_config"], dict(SIZES[args.size]["vision"]))

    builders = {"vlm": ours} if args.skip_naive else {"vlm": ours, "naive": naive}

    run = run_one_at_a_time if args.repeats == 1 else run_alternating
    result.update(run(builders, lambda: holder["batch"], args))  # the batch exists once vlm's model is built
    if args.skip_naive:
        result["naive"] = {"error": "skipped (--skip-naive)"}
    result["flops"] = holder.get("flops", {"total": float("nan"), "trained_fwd_bwd": float("nan"),
                                           "frozen_vit_fwd": float("nan"), "encoder_tokens": 0, "decoder_tokens": 0})
    result["peak_flops"] = peak = peak_flops(args.device)
    for name in ("vlm", "naive"):
        res = result[name]
        if peak and "samples_per_s" in res:
            res["mfu"] = res["samples_per_s"] * result["flops"]["total"] / peak
    ours_r, naive_r = result["vlm"], result["naive"]
    if "samples_per_s" in ours_r and "samples_per_s" in naive_r:
        result["speedup"] = ours_r["samples_per_s"] / naive_r["samples_per_s"]
    if "peak_memory_gib" in ours_r and "peak_memory_gib" in naive_r:
        result["memory_ratio"] = ours_r["peak_memory_gib"] / naive_r["peak_memory_gib"]
    result["targets"] = {"mfu": TARGET_MFU, "speedup_gpu": TARGET_SPEEDUP, "speedup_cpu_tiny": 1.0}
    result["verdict"] = verdict(result)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
