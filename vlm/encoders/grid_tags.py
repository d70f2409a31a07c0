"""A small image tower pretrained with labels on the synthetic world: ``vision_tower.pretrained: synthetic``.

PaLI freezes a ViT that was pretrained with labels (JFT) and LiT locks one (ImageNet-21k); the language side then
only learns to read it. No tiny pretrained tower exists offline, so ``pretrained: synthetic`` trains one, once, on
the synthetic world's *grid tags*: for each cell of the world's 3x3 grid, which shape (or none) and which colour
(or none) is drawn there, predicted by two linear heads from the tower's patch features average-pooled to the 3x3
grid. The heads are thrown away; the tower's weights are cached (:func:`tower_cache_dir`) keyed by the
architecture and these settings, with the held-out accuracies beside them (``metrics.json``), and every later
build loads the file. Training draws fresh scenes of the training split (never the validation or test scenes the
demos score) and runs under its own seed, so the caller's random state is the same whether the cache existed.

Why the demos need it: trained from scratch through a captioning or contrastive loss for a few thousand CPU steps,
the tiny towers learn colour and position but barely shape (a linear probe of per-cell shape reads 0.49 from a
trained PaLI-tiny tower against 0.43 from a random one); with grid tags the same tower reaches about 0.95 in a
minute and a half.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.errors import VLMConfigError

#: the ``pretrained`` value that asks for a tower pretrained on the synthetic world's grid tags
SYNTHETIC = "synthetic"
GRID = 3  #: the synthetic world's grid is GRID x GRID cells
VERSION = 1  #: bump when the recipe changes, so stale cached towers are not reused

#: the recipe: fresh scenes of the training split, AdamW with a linear warm-up, gradient clipping at 1
DEFAULTS = {"steps": 1500, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 50, "seed": 0}


def recipe_arguments() -> dict[str, Any]:
    """The recipe's arguments of :func:`pretrain_on_grid_tags`: ``DEFAULTS`` but the seed (``cached_tower`` seeds)."""
    return {k: v for k, v in DEFAULTS.items() if k != "seed"}


def grid_tags(objects) -> tuple[Tensor, Tensor]:
    """``(shape, colour)`` ``long[GRID*GRID]`` of one scene: 1 + the index in ``SHAPES`` / ``COLOUR_NAMES`` of
    the object in each cell (reading order), 0 for an empty cell."""
    from vlm.data.synthetic import COLOUR_NAMES, SHAPES

    shape, colour = torch.zeros(GRID * GRID, dtype=torch.long), torch.zeros(GRID * GRID, dtype=torch.long)
    for o in objects:
        shape[o.cell], colour[o.cell] = 1 + SHAPES.index(o.shape), 1 + COLOUR_NAMES.index(o.colour)
    return shape, colour


def pool_to_grid(features: Tensor, prefix_tokens: int = 0) -> Tensor:
    """Patch features ``[B,P,D]`` (after ``prefix_tokens`` class/register tokens) -> ``[B,GRID*GRID,D]``, each
    row the mean over one cell of the square patch grid."""
    feats = features[:, prefix_tokens:]
    b, p, d = feats.shape
    side = int(round(p ** 0.5))
    if side * side != p:
        raise VLMConfigError(f"Grid-tag pretraining needs a square patch grid; the tower gives {p} patch features.")
    return F.adaptive_avg_pool2d(feats.transpose(1, 2).reshape(b, d, side, side), GRID).flatten(2).transpose(1, 2)


def _batch(indices: range, split: str, image_size: int) -> tuple[Tensor, Tensor, Tensor]:
    from vlm.data.synthetic import make_scene, render_scene
    from vlm.data.transforms import ImageTransform

    to_tensor = ImageTransform(image_size)
    images, shapes, colours = [], [], []
    for i in indices:
        objects = make_scene(0, split, "pairs", i)
        images.append(to_tensor(render_scene(objects, image_size)[0]))
        s, c = grid_tags(objects)
        shapes.append(s)
        colours.append(c)
    return torch.stack(images), torch.stack(shapes), torch.stack(colours)


def _accuracy(logits: Tensor, target: Tensor) -> float:
    occupied = target > 0
    return float((logits.argmax(-1)[occupied] == target[occupied]).float().mean())


def pretrain_on_grid_tags(
    features: Callable[[Tensor], Tensor],
    params: list[nn.Parameter],
    width: int,
    image_size: int,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    warmup_steps: int = DEFAULTS["warmup_steps"],
    held_out: int = 500,
    log: Callable[[str], None] | None = print,
) -> dict[str, float]:
    """Train ``params`` (a tower's) so that ``features(pixel_values) -> [B,GRID*GRID,width]`` tells every cell's
    shape and colour apart (two linear heads, cross-entropy, AdamW). Returns the held-out accuracies over occupied
    cells of the synthetic world's test split: ``{"shape": ..., "colour": ...}``."""
    from vlm.data.synthetic import COLOUR_NAMES, SHAPES

    if steps < 1 or batch_size < 1:
        raise VLMConfigError(f"Grid-tag pretraining needs steps >= 1 and batch_size >= 1, got {steps}, {batch_size}.")
    head_shape, head_colour = nn.Linear(width, 1 + len(SHAPES)), nn.Linear(width, 1 + len(COLOUR_NAMES))
    trained = [*params, *head_shape.parameters(), *head_colour.parameters()]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay)

    def loss_and_logits(images: Tensor, shapes: Tensor, colours: Tensor):
        cells = features(images)
        s, c = head_shape(cells), head_colour(cells)
        loss = F.cross_entropy(s.flatten(0, 1), shapes.flatten()) + F.cross_entropy(c.flatten(0, 1), colours.flatten())
        return loss, s, c

    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup_steps))
        loss, _, _ = loss_and_logits(*_batch(range(step * batch_size, (step + 1) * batch_size), "train", image_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        if log is not None and (step + 1) % max(1, steps // 5) == 0:
            log(f"  grid tags: step {step + 1}/{steps}, loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    images, shapes, colours = _batch(range(held_out), "test", image_size)
    with torch.no_grad():
        _, s, c = loss_and_logits(images, shapes, colours)
    return {"shape": _accuracy(s, shapes), "colour": _accuracy(c, colours)}


def tower_cache_dir() -> Path:
    """Where pretrained towers are cached: ``$VLM_TOWER_CACHE_DIR``, else ``cache_dir()/towers``. A tower takes a
    minute or two to train, so runs that keep separate data caches can still share one tower cache."""
    from vlm.data.synthetic import cache_dir

    return Path(os.environ.get("VLM_TOWER_CACHE_DIR") or cache_dir() / "towers")


def cached_tower(key: dict[str, Any], build: Callable[[], nn.Module], train: Callable[[nn.Module], dict[str, float]],
                 log: Callable[[str], None] | None = print) -> Path:
    """The weights file of a tower pretrained by ``train`` (after ``build``), trained once and cached by ``key``.

    Written beside the target and renamed (``publish_dir``), so an interrupted or concurrent writer never leaves
    half a tower.
    """
    from safetensors.torch import save_file

    from vlm.data.synthetic import publish_dir

    key = {"version": VERSION, **key}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    final = tower_cache_dir() / f"grid-tags-{digest}"
    weights = final / "model.safetensors"
    if weights.exists():
        return weights
    if log is not None:
        log(f"vlm: pretraining the image tower on the synthetic world's grid tags (once; cached in {final})")
    with torch.random.fork_rng(devices=[]):  # the caller's random state does not depend on the cache
        torch.manual_seed(int(key.get("seed", 0)))
        tower = build()
        metrics = train(tower)

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in tower.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "metrics.json").write_text(json.dumps({"held_out_accuracy": metrics, "recipe": key}, indent=1) + "\n")

    publish_dir(final, write)
    if log is not None:
        log(f"vlm: image tower pretrained, held-out per-cell accuracy: shape {metrics['shape']:.2f}, "
            f"colour {metrics['colour']:.2f}")
    return weights


__all__ = ["SYNTHETIC", "GRID", "DEFAULTS", "recipe_arguments", "grid_tags", "pool_to_grid", "pretrain_on_grid_tags", "tower_cache_dir", "cached_tower"]
