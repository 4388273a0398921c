"""Shared pytest fixtures.

`synth_root` is one small synthetic COCO panoptic dataset (6 train + 6 val images, long side
128) generated once per test session; every test module may read it but must not modify it
(copy it first when a test needs to corrupt files).
"""

from __future__ import annotations

from pathlib import Path

import pytest

SYNTH_SEED = 1234
SYNTH_TRAIN = 6
SYNTH_VAL = 6
SYNTH_SIZE = 128


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a small synthetic dataset in COCO panoptic layout (train2017/val2017, annotations/)."""
    from harness.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synth") / "coco"
    return generate_dataset(root, SYNTH_TRAIN, SYNTH_VAL, seed=SYNTH_SEED, size=SYNTH_SIZE, workers=1, preview=False)
