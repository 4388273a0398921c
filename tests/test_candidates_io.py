"""Saved candidates round-trip losslessly (a sweep at the default setting must equal the direct evaluation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness.engine.candidates_io import load_candidates, read_meta, save_candidates, write_meta
from harness.errors import UserError
from models.postprocess import Candidates


def test_round_trip_is_bitwise(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    first = Candidates(torch.rand(7, generator=g), torch.arange(7), torch.rand(7, 5, 9, generator=g) * 3,
                       query_index=torch.tensor([3, 3, 1, 0, 2, 10, 11]))
    last = Candidates(torch.rand(7, generator=g), torch.arange(7), torch.rand(7, 5, 9, generator=g))
    path = save_candidates(tmp_path / "a" / "000000000139.npz", 139, (40, 72), {"1": first, "last": last})
    image_id, size, layers = load_candidates(path)
    assert image_id == 139 and size == (40, 72) and sorted(layers) == ["1", "last"]
    for name, ref in (("1", first), ("last", last)):
        got = layers[name]
        assert torch.equal(got.scores, ref.scores) and torch.equal(got.masks, ref.masks)
        assert torch.equal(got.labels, ref.labels)
    assert torch.equal(layers["1"].query_index, first.query_index) and layers["last"].query_index is None
    assert load_candidates(save_candidates(tmp_path / "s.npz", "ade_0001", (2, 3), {"last": last}))[0] == "ade_0001"


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(UserError, match="bad.npz"):
        load_candidates(bad)
    np.savez(tmp_path / "partial.npz", scores_last=np.zeros(1, np.float32))
    with pytest.raises(UserError, match="partial.npz.*image_id"):
        load_candidates(tmp_path / "partial.npz")
    with pytest.raises(UserError, match="save-candidates"):
        read_meta(tmp_path)
    write_meta(tmp_path, {"model": "m", "layers": ["last"]})
    assert read_meta(tmp_path)["layers"] == ["last"]
