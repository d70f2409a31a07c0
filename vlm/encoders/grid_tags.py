"""A small image tower pretrained with labels on the synthetic world: ``vision_tower.pretrained: synthetic``.

PaLI freezes a ViT that was pretrained with labels (JFT) and LiT locks one (ImageNet-21k); the language side then
only learns to read it. No tiny pretrained tower exists offline, so ``pretrained: synthetic`` trains one, once, on
the synthetic world's *grid tags*: for each cell of the world's 3x3 grid, which shape (or none) and which colour
(or none) is drawn there, predicted by two linear heads from *every patch* of that cell (the patch whose centre
lies in it), so that each patch feature names what is drawn in its cell. The heads are thrown away; the tower's
weights are cached (:func:`tower_cache_dir`) keyed by the architecture and these settings, with the held-out
accuracies beside them (``metrics.json``), and every later build loads the file. Training draws fresh scenes of
the training split (never the validation or test scenes the demos score) and runs under its own seed, so the
caller's random state is the same whether the cache existed.

Why the demos need it: trained from scratch through a captioning or contrastive loss for a few thousand CPU steps,
the tiny towers learn colour and position but barely shape (a linear probe of per-cell shape reads 0.49 from a
trained PaLI-tiny tower against 0.43 from a random one); with grid tags the same tower reaches about 0.95 per
patch in one to two minutes. Why per patch: an earlier recipe supervised each cell's *average* patch feature; the
average then read 0.97 but a single patch only 0.47, and a model that reads the tower through attention (PaLI's
encoder, FLAVA's class token) looks at single patches.
"""

from __future__ import annotations

import contextlib
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
VERSION = 2  #: bump when the recipe changes, so stale cached towers are not reused (2: per-patch targets)

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


def patch_features(features: Tensor, prefix_tokens: int = 0) -> Tensor:
    """A tower's token features ``[B,T,D]`` without its ``prefix_tokens`` class/register tokens: ``[B,P,D]`` over
    a square patch grid (reading order)."""
    feats = features[:, prefix_tokens:]
    side = int(round(feats.shape[1] ** 0.5))
    if side * side != feats.shape[1]:
        raise VLMConfigError(
            f"Grid-tag pretraining needs a square patch grid; the tower gives {feats.shape[1]} patch features."
        )
    return feats


def patch_cells(num_patches: int) -> Tensor:
    """``long[num_patches]``: the grid cell (reading order) that holds each patch's centre, for a square grid."""
    side = int(round(num_patches**0.5))
    if side * side != num_patches:
        raise VLMConfigError(f"Grid-tag pretraining needs a square patch grid, got {num_patches} patches.")
    rc = ((torch.arange(side) + 0.5) * GRID / side).long()  # the row (column) of cells each patch row (column) is in
    return (rc[:, None] * GRID + rc[None, :]).flatten()


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
    """Train ``params`` (a tower's) so that every patch of ``features(pixel_values) -> [B,P,width]`` (a square
    grid, :func:`patch_features`) tells the shape and colour in its cell (:func:`patch_cells`) apart: two linear
    heads, cross-entropy, AdamW. Returns the held-out per-patch accuracies over the patches of occupied cells of
    the synthetic world's test split: ``{"shape": ..., "colour": ...}``."""
    from vlm.data.synthetic import COLOUR_NAMES, SHAPES

    if steps < 1 or batch_size < 1:
        raise VLMConfigError(f"Grid-tag pretraining needs steps >= 1 and batch_size >= 1, got {steps}, {batch_size}.")
    head_shape, head_colour = nn.Linear(width, 1 + len(SHAPES)), nn.Linear(width, 1 + len(COLOUR_NAMES))
    trained = [*params, *head_shape.parameters(), *head_colour.parameters()]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay)

    def loss_and_logits(images: Tensor, shapes: Tensor, colours: Tensor):
        patches = features(images)
        cells = patch_cells(patches.shape[1])
        shapes, colours = shapes[:, cells], colours[:, cells]  # each patch's target: its cell's tags
        s, c = head_shape(patches), head_colour(patches)
        loss = F.cross_entropy(s.flatten(0, 1), shapes.flatten()) + F.cross_entropy(c.flatten(0, 1), colours.flatten())
        return loss, (s, shapes), (c, colours)

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
    with torch.no_grad():
        _, s, c = loss_and_logits(*_batch(range(held_out), "test", image_size))
    return {"shape": _accuracy(*s), "colour": _accuracy(*c)}


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
    with _exclusive(final.parent / f"{final.name}.lock"):  # processes that start together train it once
        if weights.exists():
            return weights
        if log is not None:
            log(f"vlm: pretraining the image tower on the synthetic world's grid tags (once; cached in {final})")
        with torch.random.fork_rng(devices=[]):  # the caller's random state does not depend on the cache
            torch.manual_seed(int(key.get("seed", 0)))
            tower = build()
            metrics = train(tower)

        def write(tmp: Path) -> None:
            state = {k: v.detach().contiguous() for k, v in tower.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"))
            (tmp / "metrics.json").write_text(json.dumps({"held_out_accuracy": metrics, "recipe": key}, indent=1) + "\n")

        publish_dir(final, write)
    if log is not None:
        log("vlm: image tower pretrained, held-out per-patch accuracy: "
            + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    return weights


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the block; no lock where the platform
    has no ``fcntl`` (the write-then-rename still keeps the cache whole, the work is merely done twice)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


__all__ = ["SYNTHETIC", "GRID", "DEFAULTS", "recipe_arguments", "grid_tags", "patch_features", "patch_cells",
           "pretrain_on_grid_tags", "tower_cache_dir", "cached_tower"]
