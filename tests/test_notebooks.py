"""The notebooks run top to bottom on a results folder (HARNESS_RESULTS) and are committed without outputs.

CI points HARNESS_RESULTS at the quick demo's output; here a fixture folder is built: synthetic results tables that
follow the schema (`analysis.testing.write_fake_demo`) plus one run with saved candidates on the synthetic data set.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["robustness", "postprocessing", "thing_preference", "per_layer"]


def test_notebooks_are_stripped() -> None:
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{name}.ipynb has outputs"
        assert "HARNESS_RESULTS" in nb.cells[1].source


@pytest.fixture(scope="module")
def results_folder(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from analysis.testing import write_fake_demo
    from harness.data.coco_panoptic import PanopticDataset
    from harness.engine.candidates_io import save_candidates, write_meta
    from models.postprocess import Candidates

    root = write_fake_demo(tmp_path_factory.mktemp("nb") / "demo")
    ds = PanopticDataset(synth_root, split="val2017", validate=False)
    sample = ds[0]
    masks = torch.stack([torch.from_numpy((sample.id_map == s.id).astype(np.float32)) for s in sample.segments])
    cands = Candidates(torch.linspace(0.95, 0.6, len(masks)), torch.tensor([s.label for s in sample.segments]),
                       masks * 0.9)
    model_dir = root / "eval_qd" / "candidates" / "panoptic_segformer_tiny"
    write_meta(model_dir, {"model": "panoptic_segformer_tiny", "num_things": ds.categories.num_things,
                           "num_stuff": ds.categories.num_stuff, "categories": list(ds.categories.categories),
                           "layers": ["last"], "post_process_options": {"m": {}}, "data": str(synth_root),
                           "split": "val2017"})
    stem = Path(ds.image_info(sample.image_id)["file_name"]).stem
    save_candidates(model_dir / "none_0" / f"{stem}.npz", sample.image_id, sample.id_map.shape, {"last": cands})
    return root


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name: str, results_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    monkeypatch.setenv("HARNESS_RESULTS", str(results_folder))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert str(results_folder) in text
    assert images >= {"robustness": 3, "postprocessing": 3, "thing_preference": 2, "per_layer": 1}[name]
    assert "(demo version)" in text or name == "per_layer" and "Table 10 (demo version)" in text
    assert os.environ.get("HARNESS_RESULTS") == str(results_folder)
