"""``vision_tower.pretrained: synthetic``: a tower pretrained once on the synthetic world's grid tags, then cached."""

import json

import pytest
import torch

from vlm.data.synthetic import COLOUR_NAMES, SHAPES, make_scene
from vlm.encoders import grid_tags
from vlm.encoders.vision import build_vision_tower
from vlm.errors import VLMConfigError

TINY = {"model": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1,
                                                    "num_heads": 2}, "stem": "conv", "frozen": False}


def test_grid_tags_name_each_cells_shape_and_colour():
    for i in range(20):
        objects = make_scene(0, "train", "pairs", i)
        shape, colour = grid_tags.grid_tags(objects)
        cells = {o.cell: o for o in objects}
        for cell in range(9):
            o = cells.get(cell)
            assert shape[cell] == (0 if o is None else 1 + SHAPES.index(o.shape))
            assert colour[cell] == (0 if o is None else 1 + COLOUR_NAMES.index(o.colour))


def test_each_patch_is_tagged_with_the_cell_its_centre_lies_in():
    # the renderer's geometry: cell (r, c) spans [c * S / 3, (c + 1) * S / 3) horizontally, rows alike; a patch of
    # an n x n grid over S pixels has its centre at ((i + 0.5) * S / n)
    for n, size in ((8, 64), (6, 48), (3, 48), (14, 224)):
        got = grid_tags.patch_cells(n * n)
        for i in range(n):
            for j in range(n):
                y, x = (i + 0.5) * size / n, (j + 0.5) * size / n
                assert int(got[i * n + j]) == int(y // (size / 3)) * 3 + int(x // (size / 3)), (n, i, j)
    feats = torch.randn(2, 1 + 36, 5)
    assert torch.equal(grid_tags.patch_features(feats, prefix_tokens=1), feats[:, 1:])
    with pytest.raises(VLMConfigError, match="square patch grid"):
        grid_tags.patch_features(torch.randn(1, 10, 4))
    with pytest.raises(VLMConfigError, match="square patch grid"):
        grid_tags.patch_cells(10)


def test_pretraining_teaches_the_tower_shape():
    # 400 steps of 32 fresh 64 px scenes: held-out per-patch shape above chance (0.2 among five shapes) and
    # colour almost always right
    torch.manual_seed(0)
    tower = build_vision_tower({**TINY, "kwargs": {**TINY["kwargs"], "img_size": 64, "embed_dim": 64}})
    acc = grid_tags.pretrain_on_grid_tags(lambda x: grid_tags.patch_features(tower(x)), list(tower.parameters()),
                                          64, 64, steps=400, held_out=300, log=None)
    assert acc["shape"] > 0.3 and acc["colour"] > 0.9, acc  # 0.38, 0.95 (the recipe: 0.95, 1.00)


def test_synthetic_tower_is_trained_once_cached_and_loaded(tmp_path, monkeypatch):
    monkeypatch.delenv("VLM_TOWER_CACHE_DIR", raising=False)  # the test run's shared tower cache
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(grid_tags.DEFAULTS, "steps", 3)
    calls = []
    real = grid_tags.pretrain_on_grid_tags
    monkeypatch.setattr(grid_tags, "pretrain_on_grid_tags", lambda *a, **k: calls.append(k) or real(*a, **k))
    cfg = {**TINY, "pretrained": "synthetic"}

    torch.manual_seed(5)
    first = build_vision_tower(cfg)
    after_training = torch.rand(3)
    torch.manual_seed(5)
    second = build_vision_tower(cfg)
    after_loading = torch.rand(3)
    assert len(calls) == 1 and calls[0]["steps"] == 3  # the second build read the cache
    torch.testing.assert_close(after_training, after_loading)  # the caller's random state does not see the cache
    (weights,) = tmp_path.glob("towers/grid-tags-*/model.safetensors")
    from safetensors.torch import load_file

    saved = load_file(str(weights))
    for tower in (first, second):
        own = tower.model.state_dict()
        assert saved.keys() == own.keys() and all(torch.equal(saved[k], own[k]) for k in saved)
    meta = json.loads((weights.parent / "metrics.json").read_text())
    assert meta["recipe"]["stem"] == "conv" and set(meta["held_out_accuracy"]) == {"shape", "colour"}
    # another architecture or recipe is another tower, never the cached one
    torch.manual_seed(5)
    other = build_vision_tower({**cfg, "kwargs": {**TINY["kwargs"], "depth": 2}})
    assert len(calls) == 2 and len(other.model.blocks) == 2
    assert len(list(tmp_path.glob("towers/grid-tags-*/model.safetensors"))) == 2


def test_a_half_written_tower_is_never_loaded(tmp_path, monkeypatch):
    monkeypatch.delenv("VLM_TOWER_CACHE_DIR", raising=False)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(grid_tags.DEFAULTS, "steps", 2)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(grid_tags, "pretrain_on_grid_tags", killed)
    with pytest.raises(KeyboardInterrupt):
        build_vision_tower({**TINY, "pretrained": "synthetic"})
    assert not list(tmp_path.glob("towers/grid-tags-*/model.safetensors"))
    monkeypatch.undo()
    monkeypatch.delenv("VLM_TOWER_CACHE_DIR", raising=False)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(grid_tags.DEFAULTS, "steps", 2)
    build_vision_tower({**TINY, "pretrained": "synthetic"})
    assert len(list(tmp_path.glob("towers/grid-tags-*/model.safetensors"))) == 1


def test_builds_that_start_together_train_the_tower_once(tmp_path, monkeypatch):
    # two builders at once (threads holding their own lock handles, as two processes would): one trains, the
    # other waits for it and loads its file
    import threading
    import time

    monkeypatch.setenv("VLM_TOWER_CACHE_DIR", str(tmp_path))
    trained, paths = [], []

    def train(tower):
        trained.append(threading.get_ident())
        time.sleep(0.5)
        return {"shape": 1.0, "colour": 1.0}

    def build():
        paths.append(grid_tags.cached_tower({"kind": "test"}, lambda: torch.nn.Linear(2, 2), train, log=None))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(trained) == 1 and len(paths) == 2 and paths[0] == paths[1] and paths[0].exists()


def test_a_conv_stem_tower_saved_to_a_file_loads_back(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tower = build_vision_tower(TINY)
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(tmp_path / "model.safetensors"))
    torch.manual_seed(1)
    back = build_vision_tower({**TINY, "pretrained": str(tmp_path)})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(back(x), tower(x))


def test_flava_vit_pretrained_on_the_synthetic_world(tmp_path, monkeypatch):
    # vision.pretrained: synthetic for FLAVA's tower: the same weights as pretraining that tower by hand with the
    # recipe (CLS token left out of the grid), cached, and the caller's random state untouched
    from vlm.encoders.vision import VisionConfig, build_vit

    monkeypatch.delenv("VLM_TOWER_CACHE_DIR", raising=False)
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(grid_tags.DEFAULTS, "steps", 3)
    sizes = {"image_size": 32, "patch_size": 8, "hidden": 32, "layers": 1, "heads": 2}
    torch.manual_seed(3)
    enc = build_vit(VisionConfig(**sizes, pretrained="synthetic"))
    after = torch.rand(2)

    torch.manual_seed(0)  # the recipe's own seed
    ref = build_vit(VisionConfig(**sizes))
    grid_tags.pretrain_on_grid_tags(lambda x: grid_tags.patch_features(ref(x), 1), list(ref.vit.parameters()), 32, 32,
                                    log=None, steps=3)
    own, want = enc.vit.state_dict(), ref.vit.state_dict()
    assert own.keys() == want.keys() and all(torch.equal(own[k], want[k]) for k in own)
    torch.manual_seed(3)
    build_vit(VisionConfig(**sizes))
    torch.testing.assert_close(torch.rand(2), after)
