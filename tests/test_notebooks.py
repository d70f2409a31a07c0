"""The notebooks run top to bottom (outputs are not committed)."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_notebook_executes(name, tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_NOTEBOOK_STEPS", "30")
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "expected the loss plot and the retrieval figure"
    # the model learned: the printed first -> last tenth losses of the masked objectives fall
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")
    losses = {m.group(1): (float(m.group(2)), float(m.group(3)))
              for m in re.finditer(r"^train/(\S+)/loss\s+([-\d.]+) -> +([-\d.]+)$", text, re.M)}
    if name == "flava_quickstart.ipynb":
        for key in ("images/mim", "pairs/mmm", "text/mlm"):
            first, last = losses[key]
            assert last < first, (key, losses)
    if name == "flamingo_quickstart.ipynb":
        for key in ("interleaved/caption", "pairs/caption", "vqa/caption"):
            first, last = losses[key]
            assert last < first, (key, losses)
    if name == "pali_quickstart.ipynb":
        for key in ("alt_text/caption", "vqa/caption", "ocr/caption", "detection/caption"):
            first, last = losses[key]
            assert last < first, (key, losses)
