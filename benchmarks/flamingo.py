"""One Flamingo training step: vlm's Flamingo vs open_flamingo's ``Flamingo``, same sizes, same process.

Both models are built with random weights from the same shapes: a timm ViT (frozen), a Perceiver Resampler
(depth 6, 64 latents, 8 heads of 64), a gated cross-attention block before every LM block (8 heads of 64,
ff x4, each text token attends to its latest image only) and a frozen OPT language model. ``--size base``:
``vit_large_patch14_clip_224`` + OPT-1.3B's shape (vlm.models.flamingo.SIZES['base']); ``--size tiny``:
SIZES['tiny']'s ViT + a 2-layer OPT, small batches, < 1 minute on a CPU. One step = forward, the LM loss,
backward, one AdamW step of the trainable parameters; bf16 autocast on CUDA, fp32 on CPU.

Shapes: ``pairs`` (one image per sample, 64 tokens, batch 32) and ``interleaved`` (five images, 256 tokens,
batch 16); tiny: batch 4 / 2 and 32 / 64 tokens. Reported per shape: samples/s (median of per-step times
after warm-up), peak memory (``torch.cuda.max_memory_allocated``, reset before each model x shape run; it
includes the weights, gradients and optimizer state) and vlm / open_flamingo ratios, checked against the
targets (>= 1.5x samples/s, <= 0.7x peak memory). On CUDA one model is built, timed and freed before the
other; on CPU both are kept and ``--repeats`` timed blocks alternate between them (one torch thread by
default), so that the load of a shared machine falls on both alike.

Frozen weights: vlm's model stores its frozen ViT and LM weights in bf16 under ``--precision bf16``, as ``vlm fit``
does with ``bf16-mixed`` (``Flamingo(frozen_dtype='auto')``); ``--frozen-dtype float32`` keeps them fp32;
open_flamingo keeps fp32 weights under autocast, as its training script does with ``amp_bf16``.

What trains: the resampler and the cross-attention blocks in both. open_flamingo's factory also trains the
whole input embedding (tied to the output head in OPT: 50k x 2048 at base), vlm only the rows of
``<image>`` / ``<|endofchunk|>``; the report lists both trainable counts. ``--of-freeze-embeddings`` is
factory's ``freeze_lm_embeddings=True`` (then open_flamingo's new token rows stay random and frozen).
Optimizers as each project ships them: vlm ``configure_optimizers`` (fused AdamW), open_flamingo torch's
default AdamW (``--of-fused-adamw`` to give it the fused kernel as well).

open_flamingo is built without downloads and without ``create_model_and_transforms`` (open_clip weights,
hub tokenizer): its ``vision_encoder.visual`` is a timm ViT of the same config wrapped to return
``(pooled, patch tokens)`` as open_clip's ``output_tokens=True``; its LM is transformers' OPT from the same
config, extended with ``FlamingoLMMixin`` and ``init_flamingo`` as factory.py does. Runtime patch (this
process only): open_flamingo's ``FlamingoLayer.forward(lang_x, attention_mask=None, **kw)`` is replaced by
one that also passes positional arguments through, in case the decoder calls its blocks positionally
(transformers 5's GPT-2 does; OPT passes keywords, so at these sizes the patch changes nothing). Its modules
are imported without the package ``__init__``, which would import open_clip for the factory (not needed
here). If open_flamingo cannot be built or run, its error is reported and vlm is still timed.

Both models see the same token ids, images and labels (vlm's Flamingo label rule), from a word-level
tokenizer written to a temporary directory with OPT's 50265 words (tiny: 4096), so the vocabularies (and
logits) match.

    python benchmarks/flamingo.py --device cuda --size base --json flamingo.json
    python benchmarks/flamingo.py --device cpu --size tiny           # < 1 minute
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
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

TARGET_SPEEDUP = 1.5
TARGET_MEMORY = 0.7

#: the Flamingo parts, identical for both implementations (open_flamingo's defaults)
FLAMINGO_SHAPE = {"num_latents": 64, "resampler_depth": 6, "resampler_heads": 8, "resampler_dim_head": 64,
                  "cross_attn_every": 1, "xattn_heads": 8, "xattn_dim_head": 64, "ff_mult": 4,
                  "only_attend_immediate": True, "max_num_media": None, "max_num_frames": None,
                  "freeze_lm": True}

#: shape -> (batch, images per sample, tokens)
SHAPES = {
    "base": {"pairs": (32, 1, 64), "interleaved": (16, 5, 256)},
    "tiny": {"pairs": (4, 1, 32), "interleaved": (2, 5, 64)},
}

TINY_LM = {"model_type": "opt", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "ffn_dim": 512, "max_position_embeddings": 256, "word_embed_proj_dim": 128, "dropout": 0.0,
           "attention_dropout": 0.0}
BASE_WORDS = {"base": 50265, "tiny": 4096}  # OPT's tokenizer has 50265 entries (its table is padded to 50272)


def vision_config(size: str) -> dict:
    from vlm.models.flamingo import SIZES

    return dict(SIZES[size]["vision"])


def lm_config(size: str) -> dict:
    from vlm.models.flamingo import SIZES

    cfg = dict(SIZES["base"]["lm"]["config"]) if size == "base" else dict(TINY_LM)
    cfg["vocab_size"] = BASE_WORDS[size]
    return cfg


def write_tokenizer(words: int, path: Path) -> Path:
    """A word-level fast tokenizer with ``words`` entries (ids are all the benchmark needs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), words)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.save_pretrained(str(path))
    return path


def make_batch(shape: tuple[int, int, int], image_size: int, words: int, image_id: int, eoc_id: int,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Documents of ``images`` chunks: ``<image>`` words ... ``<|endofchunk|>`` (pairs: one chunk)."""
    batch, images, length = shape
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, words, (batch, length), generator=g)
    chunk = length // images
    for i in range(images):
        ids[:, i * chunk] = image_id
        ids[:, (i + 1) * chunk - 1] = eoc_id
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "pixel_values": torch.randn(batch, images, 3, image_size, image_size, generator=g),
        "image_mask": torch.ones(batch, images, dtype=torch.bool),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(args):
    return torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def count(params) -> int:
    return sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------- vlm
def build_vlm(args, tok_dir: Path):
    """(model, {shape: step}, facts) for vlm's Flamingo LightningModule."""
    from vlm.models.flamingo import Flamingo

    with torch.device(args.device):
        model = Flamingo(size=args.size, vision=vision_config(args.size), lm={"config": lm_config(args.size)},
                         tokenizer=str(tok_dir), config=dict(FLAMINGO_SHAPE), lr=1e-4, weight_decay=0.1,
                         frozen_dtype=args.frozen_dtype, compile=args.compile)
    model = model.to(args.device).train()
    # what `vlm fit` does under bf16-mixed (Flamingo.setup, frozen_dtype: auto): frozen weights stored in bf16
    precision = "bf16-mixed" if args.precision == "bf16" else "32-true"
    frozen_saved = model.core.cast_frozen_(model.frozen_storage_dtype(precision))
    opt = model.configure_optimizers()["optimizer"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    emb = model.core.lm.get_input_embeddings()
    facts = {
        "params_m": count(model.parameters()) / 1e6,
        "trainable_m": count(trainable) / 1e6,
        "trainable_embedding_rows": int(emb.extra.shape[0]) if hasattr(emb, "extra") else None,
        "optimizer": f"AdamW(fused={opt.defaults.get('fused')})",
        "vocab_size": int(model.core.vocab_size),
        "frozen_weights_saved_gib": frozen_saved / 2**30,
    }

    def make_step(batch: dict, stream: str):
        b = dict(batch, stream=stream)

        def step():
            with autocast(args):
                loss, _ = model.compute_losses(b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    return model, make_step, facts


# ---------------------------------------------------------------------------------------------- open_flamingo
class TimmVisual(nn.Module):
    """open_clip's ``visual`` with ``output_tokens=True`` for a timm ViT: ``(pooled, patch tokens)``."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.prefix = int(getattr(vit, "num_prefix_tokens", 1))

    def forward(self, x: torch.Tensor):
        feats = self.vit.forward_features(x)
        return feats[:, 0], feats[:, self.prefix:]


class VisionEncoder(nn.Module):
    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual


def import_open_flamingo():
    """open_flamingo's ``src.flamingo``, ``src.flamingo_lm`` and ``src.utils`` without running its package
    ``__init__`` (which imports the factory and with it open_clip, which the model itself does not need)."""
    import importlib
    import importlib.util
    import types

    if "open_flamingo" not in sys.modules:
        spec = importlib.util.find_spec("open_flamingo")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("open_flamingo is not installed (make install adds it with --no-deps)")
        root = Path(next(iter(spec.submodule_search_locations)))
        for name, path in (("open_flamingo", root), ("open_flamingo.src", root / "src")):
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            sys.modules[name] = module
    return tuple(importlib.import_module(f"open_flamingo.src.{m}") for m in ("flamingo", "flamingo_lm", "utils"))


def patch_open_flamingo_layer(flamingo_lm) -> None:
    """Let open_flamingo's layer wrapper pass positional decoder arguments through (see the docstring)."""
    layer = flamingo_lm.FlamingoLayer
    if getattr(layer, "_vlm_bench_patched", False):
        return

    def forward(self, lang_x, *args, attention_mask=None, **kwargs):
        if self.gated_cross_attn_layer is not None:
            if self.vis_x is None or self.media_locations is None:
                raise ValueError("vis_x and media_locations must be conditioned before the forward pass")
            lang_x = self.gated_cross_attn_layer(lang_x, self.vis_x, media_locations=self.media_locations,
                                                 use_cached_media=self.use_cached_media)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return self.decoder_layer(lang_x, *args, **kwargs)

    layer.forward = forward
    layer._vlm_bench_patched = True


def build_open_flamingo(args, vocab: int, image_id: int, eoc_id: int):
    """(model, {shape: step}, facts) for open_flamingo's ``Flamingo`` at the same sizes."""
    import timm
    from transformers import AutoConfig, AutoModelForCausalLM

    of_flamingo, of_lm, of_utils = import_open_flamingo()
    patch_open_flamingo_layer(of_lm)
    vcfg = vision_config(args.size)
    lcfg = lm_config(args.size)
    with torch.device(args.device):
        vit = timm.create_model(vcfg["model"], pretrained=False, num_classes=0, **vcfg.get("kwargs", {}))
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**lcfg))
        lm = lm.to(torch.float32)
        of_utils.extend_instance(lm, of_lm.FlamingoLMMixin)
        lm.set_decoder_layers_attr_name("model.decoder.layers")
        lm.resize_token_embeddings(vocab, mean_resizing=False)
        model = of_flamingo.Flamingo(VisionEncoder(TimmVisual(vit)), lm, eoc_id, image_id,
                                     vis_dim=int(vit.num_features),
                                     cross_attn_every_n_layers=FLAMINGO_SHAPE["cross_attn_every"])
    model = model.to(args.device)
    model.requires_grad_(False)  # as factory.py
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    if not args.of_freeze_embeddings:
        model.lang_encoder.get_input_embeddings().requires_grad_(True)
    model.train()
    model.vision_encoder.eval()  # frozen towers keep eval behaviour, as vlm's
    model.lang_encoder.eval()
    model.perceiver.train()
    model.lang_encoder.gated_cross_attn_layers.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1, fused=True if args.of_fused_adamw else None)
    head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    tied = head is not None and head.weight is emb.weight
    facts = {
        "params_m": count(model.parameters()) / 1e6,
        "trainable_m": count(trainable) / 1e6,
        "trainable_embedding_rows": 0 if args.of_freeze_embeddings else int(emb.weight.shape[0]),
        "embedding_tied_to_head": bool(tied),
        "optimizer": f"AdamW(fused={bool(args.of_fused_adamw)})",
        "vocab_size": int(emb.weight.shape[0]),
        "patched": "FlamingoLayer.forward passes positional decoder arguments",
    }

    def make_step(batch: dict, stream: str):
        vision_x = batch["pixel_values"][:, :, None]  # [B, M, F=1, 3, H, W]

        def step():
            with autocast(args):
                out = model(vision_x=vision_x, lang_x=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"])
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.loss.detach()

        return step

    return model, make_step, facts


# ---------------------------------------------------------------------------------------------- timing
def error_of(err: Exception) -> dict:
    return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=4)}


def step_times(step, n: int, device: str) -> tuple[list[float], float]:
    """``n`` steps timed one by one (seconds each) and the last loss."""
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


def run_one_at_a_time(builders: dict, batches, args) -> dict:
    """Build one implementation, time every shape, free it, then the next (each peak is its own model's)."""
    results: dict = {}
    for name, build in builders.items():
        res: dict = {}
        try:
            model, make_step, facts = build()
            res["facts"] = facts
        except Exception as err:
            results[name] = error_of(err)
            free(args.device)
            continue
        for shape, batch in batches().items():
            try:
                step = make_step(batch, shape)
                if args.device == "cuda":
                    sync(args.device)
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(args.warmup):
                    step()
                times, loss = step_times(step, args.steps, args.device)
                res[shape] = summary(times, batch["input_ids"].shape[0], loss)
                if args.device == "cuda":
                    res[shape]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            except Exception as err:
                res[shape] = error_of(err)
            step = None
            free(args.device)
        results[name] = res
        del model, make_step
        free(args.device)
    return results


def run_alternating(builders: dict, batches, args) -> dict:
    """Keep every model; per shape, alternate timed blocks of ``args.steps`` (order swapped each round) and
    pool the step times, so that the load of a shared machine falls on both sides alike. No peak memory."""
    results: dict = {}
    steps: dict = {}
    keep = []
    for name, build in builders.items():
        try:
            model, make_step, facts = build()
            keep.append(model)
            results[name] = {"facts": facts}
            for shape, batch in batches().items():
                steps[name, shape] = make_step(batch, shape)
        except Exception as err:
            results[name] = error_of(err)
    times: dict = {key: [] for key in steps}
    losses: dict = {}
    names = [n for n in builders if "error" not in results[n]]
    for r in range(args.repeats):
        for shape in batches():
            for name in names if r % 2 == 0 else list(reversed(names)):
                if (name, shape) not in times:
                    continue
                try:
                    if r == 0:
                        for _ in range(args.warmup):
                            steps[name, shape]()
                    t, losses[name, shape] = step_times(steps[name, shape], args.steps, args.device)
                    times[name, shape] += t
                except Exception as err:
                    results[name][shape] = error_of(err)
                    times.pop((name, shape))
    for (name, shape), t in times.items():
        results[name][shape] = {**summary(t, batches()[shape]["input_ids"].shape[0], losses[name, shape]),
                                "blocks": args.repeats}
    return results


def compare(result: dict) -> None:
    ours, theirs = result["vlm"], result["open_flamingo"]
    comparison = {}
    for shape in result["shapes"]:
        a, b = ours.get(shape, {}), theirs.get(shape, {})
        row = {}
        if "samples_per_s" in a and "samples_per_s" in b:
            row["speedup"] = a["samples_per_s"] / b["samples_per_s"]
        if "peak_memory_gib" in a and "peak_memory_gib" in b:
            row["memory_ratio"] = a["peak_memory_gib"] / b["peak_memory_gib"]
        comparison[shape] = row
    result["comparison"] = comparison
    rows = list(comparison.values())
    speed_ok = bool(rows) and all(r.get("speedup", 0) >= TARGET_SPEEDUP for r in rows)
    has_mem = bool(rows) and all("memory_ratio" in r for r in rows)
    mem_ok = has_mem and all(r["memory_ratio"] <= TARGET_MEMORY for r in rows)
    if "error" in theirs or not all("speedup" in r for r in rows):
        verdict = "no verdict: open_flamingo did not run every shape (" + theirs.get("error", "see above") + ")"
    elif not has_mem:
        verdict = (f"speed target (>= {TARGET_SPEEDUP}x) {'MET' if speed_ok else 'NOT met'}; memory target "
                   f"(<= {TARGET_MEMORY}x) not measurable on {result['args']['device']}")
    else:
        verdict = (f"targets {'MET' if speed_ok and mem_ok else 'NOT met'}: speed >= {TARGET_SPEEDUP}x "
                   f"{'yes' if speed_ok else 'no'}, memory <= {TARGET_MEMORY}x {'yes' if mem_ok else 'no'}")
    result["targets"] = {"speedup": TARGET_SPEEDUP, "memory_ratio": TARGET_MEMORY}
    result["verdict"] = verdict


def print_report(r: dict) -> None:
    a = r["args"]
    print(f"Flamingo {a['size']} training step | {r['hardware']} | {a['precision']} | torch {r['versions']['torch']} "
          f"| transformers {r['versions']['transformers']} | {a['threads']} threads | warm-up {a['warmup']}, "
          f"timed {a['steps']} x {a['repeats']} block(s), median step")
    for name in ("vlm", "open_flamingo"):
        f = r[name].get("facts")
        if f:
            print(f"  {name:13s} params {f['params_m']:.1f}M, trainable {f['trainable_m']:.2f}M "
                  f"(embedding rows trained: {f['trainable_embedding_rows']}), {f['optimizer']}")
        if "error" in r[name]:
            print(f"  {name:13s} ERROR {r[name]['error']}")
    print(f"  note: {r['note']}")
    print(f"  {'shape':12s} {'batch x img x tok':18s} {'vlm/s':>9s} {'of/s':>9s} {'speed':>7s} "
          f"{'vlm peak':>10s} {'of peak':>10s} {'memory':>7s}")
    for shape, (b, m, t) in r["shapes"].items():
        ours, theirs = r["vlm"].get(shape, {}), r["open_flamingo"].get(shape, {})
        comp = r["comparison"].get(shape, {})

        def sps(x):
            return f"{x['samples_per_s']:9.1f}" if "samples_per_s" in x else f"{'error':>9s}"

        def mem(x):
            return f"{x['peak_memory_gib']:7.2f} GiB" if "peak_memory_gib" in x else f"{'n/a':>10s}"

        speed = f"{comp['speedup']:6.2f}x" if "speedup" in comp else f"{'-':>7s}"
        ratio = f"{comp['memory_ratio']:6.2f}x" if "memory_ratio" in comp else f"{'-':>7s}"
        print(f"  {shape:12s} {f'{b} x {m} x {t}':18s} {sps(ours)} {sps(theirs)} {speed} {mem(ours)} {mem(theirs)} "
              f"{ratio}")
        for name, x in (("vlm", ours), ("open_flamingo", theirs)):
            if "error" in x:
                print(f"    {name} {shape}: {x['error']}")
    print(f"  verdict: {r['verdict']}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--size", default=None, choices=["base", "tiny"], help="default: base on cuda, tiny on cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per block (default 10 cuda / 3 cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per shape (default 3 cuda / 2 cpu)")
    parser.add_argument("--shapes", nargs="+", default=["pairs", "interleaved"], choices=["pairs", "interleaved"])
    parser.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="default: bf16 on cuda")
    parser.add_argument("--compile", default="none", choices=["none", "step"],
                        help="vlm's compile setting (step: the loss computation as one graph); open_flamingo stays eager")
    parser.add_argument("--frozen-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="vlm's Flamingo(frozen_dtype=...): auto stores the frozen weights in bf16 under bf16, as "
                             "`vlm fit` with bf16-mixed does; float32 keeps them fp32 (the figures before it existed)")
    parser.add_argument("--of-freeze-embeddings", action="store_true",
                        help="open_flamingo: freeze the input embedding (factory's freeze_lm_embeddings=True)")
    parser.add_argument("--of-fused-adamw", action="store_true", help="open_flamingo: fused AdamW as vlm's")
    parser.add_argument("--skip-open-flamingo", action="store_true")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed blocks per model and shape, alternating between the models, median of all "
                             "steps (default 1 on cuda: one model at a time, so each peak is its own; 3 on cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default 1 on cpu: steady timings on a shared machine; 0: torch's "
                             "default)")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON here")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    args.size = args.size or ("base" if cuda else "tiny")
    args.steps = args.steps or (10 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.repeats = max(1, args.repeats or (1 if cuda else 3))
    if args.threads is None:
        args.threads = 0 if cuda else 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    torch.manual_seed(0)

    import transformers

    shapes = {k: SHAPES[args.size][k] for k in args.shapes}
    result: dict = {
        "benchmark": "flamingo_train_step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores) "
                                                              f"{platform.processor() or platform.machine()}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "args": vars(args),
        "shapes": shapes,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = write_tokenizer(BASE_WORDS[args.size], Path(tmp) / "tokenizer")
        holder: dict = {}

        def ours():
            model, make_step, facts = build_vlm(args, tok_dir)
            holder.update(vocab=model.core.vocab_size, image_id=model.core.image_token_id,
                          eoc_id=model.core.end_of_chunk_token_id,
                          image_size=int(vision_config(args.size).get("kwargs", {}).get("img_size", 224)))
            for shape, dims in shapes.items():
                batch = make_batch(dims, holder["image_size"], BASE_WORDS[args.size], holder["image_id"],
                                   holder["eoc_id"])
                batch["labels"] = model.labels_of(batch)
                holder.setdefault("batches", {})[shape] = {k: v.to(args.device) for k, v in batch.items()}
            return model, make_step, facts

        def theirs():
            if "batches" not in holder:
                raise RuntimeError("not run: vlm's model (which fixes the token ids and batches) failed to build")
            return build_open_flamingo(args, holder["vocab"], holder["image_id"], holder["eoc_id"])

        builders = {"vlm": ours} if args.skip_open_flamingo else {"vlm": ours, "open_flamingo": theirs}
        run = run_one_at_a_time if args.repeats == 1 else run_alternating
        result.update(run(builders, lambda: holder.get("batches", {}), args))
        if args.skip_open_flamingo:
            result["open_flamingo"] = {"error": "skipped (--skip-open-flamingo)"}
    of_facts = result["open_flamingo"].get("facts") or {}
    emb_rows = of_facts.get("trainable_embedding_rows")
    tied = ", tied to the LM head" if of_facts.get("embedding_tied_to_head") else ""
    theirs = (f"open_flamingo also trains its whole input embedding ({emb_rows} rows{tied})" if emb_rows
              else "open_flamingo trains no embedding rows")
    result["note"] = (f"both train the resampler and the cross-attention blocks; {theirs}, vlm only the 2 rows "
                      "of <image>/<|endofchunk|>")
    compare(result)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
