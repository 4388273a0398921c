"""torchrun training on CPU (gloo): 2 processes compute the gradients of 1 process on the same global batch, and
`torchrun -m harness train` shards the sample stream with only rank 0 writing files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from harness.data.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = "panoptic_segformer_tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gradients(rank: int, data: str, indices: list[int], world: int, port: int, out: str) -> None:
    """One step of `train_step` on this rank's share (images ``indices[rank::world]`` of the global batch); the
    averaged gradients are saved by rank 0."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:  # what torchrun sets (spawned processes only; the single-process call stays untouched)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
    from harness.data.coco_panoptic import PanopticDataset
    from harness.engine.data import AugmentConfig, augment, collate_for, item_from_sample
    from harness.engine.distributed import init_distributed
    from harness.engine.train import default_train_config
    from harness.engine.train_setup import build_criterion
    from harness.engine.train_step import amp_settings, train_step
    from models.zoo import build_model, get_config

    info = init_distributed("cpu")
    ds = PanopticDataset(data, "train2017")
    cats = ds.categories
    cfg = get_config(TINY, num_things=cats.num_things, num_stuff=cats.num_stuff, test_scale=(64, 64))
    torch.manual_seed(0)
    model = build_model(cfg)
    criterion = build_criterion(cfg, cats.num_things, cats.num_stuff, default_train_config(TINY))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # leaves the averaged gradients in .grad
    spec = model.test_transform()
    per = len(indices) // world
    mine = indices[rank * per:(rank + 1) * per]
    items = [augment(item_from_sample(ds[i], ds), AugmentConfig(enabled=False), (64, 64), None) for i in mine]
    batch = collate_for(items, cats.num_things, spec)
    result = train_step(model, criterion, opt, batch, 0, info, amp_settings(None, "cpu"), grad_clip=0.0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save({"grads": grads, "loss": result.logs["loss"]}, out)
    if info.distributed:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def same_size_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """A data set and 4 image indices whose images have one size (a padded batch would change the inputs)."""
    from harness.data.coco_panoptic import PanopticDataset

    root = generate_dataset(tmp_path_factory.mktemp("dist") / "data", 12, 2, seed=5, size=64, workers=1,
                            preview=False)
    ds = PanopticDataset(root, "train2017")
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i in range(len(ds)):
        by_shape.setdefault(ds[i].image.shape[:2], []).append(i)
    group = max(by_shape.values(), key=len)
    assert len(group) >= 2
    return root, group[:2]


def test_two_gloo_processes_compute_the_single_process_gradients(same_size_pair, tmp_path: Path) -> None:
    root, indices = same_size_pair
    one = tmp_path / "one.pt"
    _gradients(0, str(root), indices, 1, 0, str(one))
    two = tmp_path / "two.pt"
    mp.spawn(_gradients, args=(str(root), indices, 2, _free_port(), str(two)), nprocs=2, join=True)
    a, b = torch.load(one), torch.load(two)
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 100
    for name, g in a["grads"].items():
        torch.testing.assert_close(b["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    # Losses are per process (each its share, normalised by the averaged GT counts): they are not compared.


@pytest.mark.slow
def test_torchrun_train_shards_and_only_rank0_writes(same_size_pair, tmp_path: Path) -> None:
    root, _ = same_size_pair
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "harness", "train", "-q", "--config", TINY, "--data", str(root), "--out",
           str(out), "--iters", "2", "--batch-size", "1", "--lr-scaling", "linear", "--no-augment",
           "--checkpoint-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, timeout=600, capture_output=True)
    run = json.loads((out / "train_run.json").read_text())
    assert run["world_size"] == 2 and run["global_batch"] == 2 and run["backend"] == "gloo"
    assert run["effective_lr"] == pytest.approx(1e-3)  # tiny reference batch 2: linear scaling x1
    assert (out / "model.safetensors").is_file() and (out / "checkpoint_last.pt").is_file()
    assert len((out / "train_log.csv").read_text().splitlines()) == 3
    marker = json.loads((out / ".psf-harness.json").read_text())  # claimed by rank 0 alone
    assert marker["command"] == "train" and marker["status"] == "complete" and marker["settings"]["batch_size"] == 1
