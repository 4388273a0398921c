"""`harness corrupt` on disk: outputs, manifest, subset, shards, resume after a kill, bad input, preview."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from harness.cli import main
from harness.corruptions import corrupt, corruption_seed
from harness.corruptions.dataset import CorruptedDataset, ImageFolderDataset
from harness.corruptions.runner import read_image, select_subset

REPO = Path(__file__).resolve().parents[1]


def _photos() -> list[np.ndarray]:
    return [
        np.ascontiguousarray(skimage.data.astronaut()[::6, ::6][:72, :80]),
        np.ascontiguousarray(skimage.data.coffee()[::5, ::5][:64, :100]),
        np.ascontiguousarray(skimage.data.chelsea()[::4, ::4][:75, :90]),
        np.ascontiguousarray(np.stack([skimage.data.camera()[::8, ::8]] * 3, -1)),
    ]


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    """Four small photos: three JPEGs and one PNG, COCO-like names, plus a panoptic JSON."""
    folder = tmp_path / "val"
    folder.mkdir()
    images, annotations = [], []
    for k, photo in enumerate(_photos()):
        image_id = 100 + 7 * k
        ext = "png" if k == 3 else "jpg"
        name = f"{image_id:012d}.{ext}"
        cv2.imwrite(str(folder / name), photo[..., ::-1])
        images.append({"id": image_id, "file_name": name, "height": photo.shape[0], "width": photo.shape[1]})
        annotations.append({"image_id": image_id, "file_name": f"{image_id:012d}.png", "segments_info": []})
    ann = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a", "isthing": 1}]}
    (tmp_path / "panoptic_val.json").write_text(json.dumps(ann))
    return folder


def _outputs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*/*.*"))}


def _manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_outputs_manifest_and_on_the_fly_identity(image_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["corrupt", "--images", str(image_dir), "--out", str(out), "--corruptions", "glass_blur,fog,frost",
                 "--severities", "2,5", "-q"]) == 0
    files = _outputs(out)
    assert len(files) == 4 * 3 * 2
    rows = _manifest(out / "manifest.csv")
    assert len(rows) == 24
    header = json.loads((out / "manifest.json").read_text())
    assert header["channel_order"] == "rgb" and header["seed_rule"] == "psf-harness/coco-c/v1"
    for row in rows:
        data = files[row["file"]]
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert int(row["seed"]) == corruption_seed(row["image"], row["corruption"], int(row["severity"]))
    # Every PNG is exactly corrupt(clean image) and what the on-the-fly wrapper yields.
    base = ImageFolderDataset(image_dir)
    for corruption in ("glass_blur", "fog", "frost"):
        wrapped = CorruptedDataset(base, corruption, 5)
        for k in range(len(base)):
            sample = base[k]
            disk = cv2.imread(str(out / corruption / "5" / (Path(sample.file_name).stem + ".png")))[..., ::-1]
            fly = wrapped[k].image
            assert np.array_equal(disk, fly)
            seed = corruption_seed(sample.file_name, corruption, 5)
            assert np.array_equal(fly, corrupt(sample.image, corruption, 5, seed))


def test_dataset_wrapper_on_dicts_and_clean_severity():
    image = _photos()[0]
    base = [{"file_name": "x.jpg", "image": image, "image_id": 3}]
    sample = CorruptedDataset(base, "snow", 3)[0]
    assert sample["image_id"] == 3 and base[0]["image"] is image
    assert np.array_equal(sample["image"], corrupt(image, "snow", 3, corruption_seed("x.jpg", "snow", 3)))
    assert CorruptedDataset(base, "snow", 0)[0]["image"] is image


def test_shard_union_equals_full_run(image_dir, tmp_path):
    args = ["--images", str(image_dir), "--corruptions", "motion_blur,shot_noise", "--severities", "1,4", "-q"]
    assert main(["corrupt", *args, "--out", str(tmp_path / "full")]) == 0
    full = _outputs(tmp_path / "full")
    union: dict[str, bytes] = {}
    for i in range(3):
        assert main(["corrupt", *args, "--out", str(tmp_path / "sharded"), "--shard", f"{i}/3"]) == 0
        rows = _manifest(tmp_path / "sharded" / f"manifest.shard-{i}-of-3.csv")
        mine = {r["file"] for r in rows}
        assert not mine & set(union)  # no overlap
        union.update({f: (tmp_path / "sharded" / f).read_bytes() for f in mine})
    assert union == full and _outputs(tmp_path / "sharded") == full


def test_workers_give_same_bytes(image_dir, tmp_path):
    args = ["--images", str(image_dir), "--corruptions", "noise", "--severities", "3", "-q"]
    assert main(["corrupt", *args, "--out", str(tmp_path / "one")]) == 0
    assert main(["corrupt", *args, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert _outputs(tmp_path / "one") == _outputs(tmp_path / "two")


def test_resume_after_kill_is_byte_identical(image_dir, tmp_path):
    args = ["corrupt", "--images", str(image_dir), "--corruptions", "all", "--severities", "1-3", "-q"]
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "harness", *args, "--out", str(out)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and len(list(out.glob("*/*/*.png"))) < 10:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(out.glob("*/*/*.png")))
    assert 0 < done_at_kill < 4 * 16 * 3, "the kill must land mid-run"
    # A killed run can also leave a temporary file; the resume removes it.
    (out / "fog" / "1").mkdir(parents=True, exist_ok=True)
    (out / "fog" / "1" / ".000000000100.abc123.tmp.png").write_bytes(b"partial")
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    assert _outputs(out) == _outputs(tmp_path / "clean")
    assert not list(out.glob("*/*/.*tmp*"))
    rows = _manifest(out / "manifest.csv")
    assert len(rows) == 4 * 16 * 3
    assert all(hashlib.sha256((out / r["file"]).read_bytes()).hexdigest() == r["sha256"] for r in rows)


def test_subset_rule_and_filtered_json(image_dir, tmp_path):
    out = tmp_path / "sub"
    ann = tmp_path / "panoptic_val.json"
    assert main(["corrupt", "--images", str(image_dir), "--ann", str(ann), "--subset", "2", "--subset-seed", "5",
                 "--out", str(out), "--corruptions", "contrast", "--severities", "1", "-q"]) == 0
    ids = [100, 107, 114, 121]
    perm = np.random.default_rng(5).permutation(4)
    expected = sorted(ids[j] for j in perm[:2])
    assert select_subset([121, 100, 114, 107], 2, 5) == expected
    subset = json.loads((out / "subset_2_5.json").read_text())
    assert subset["image_ids"] == expected
    filtered = json.loads((out / "panoptic_subset_2_5.json").read_text())
    assert sorted(i["id"] for i in filtered["images"]) == expected
    assert sorted(a["image_id"] for a in filtered["annotations"]) == expected
    assert filtered["categories"] == json.loads(ann.read_text())["categories"]
    assert sorted(p.stem for p in (out / "contrast" / "1").glob("*.png")) == [f"{i:012d}" for i in expected]


def test_truncated_image_error_and_keep_going(image_dir, tmp_path, capsys):
    bad = image_dir / "000000000999.jpg"
    bad.write_bytes((image_dir / "000000000100.jpg").read_bytes()[:600])
    args = ["corrupt", "--images", str(image_dir), "--corruptions", "contrast", "--severities", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "000000000999.jpg" in err and "truncated" in err.lower() and "Traceback" not in err
    assert main([*args, "--out", str(tmp_path / "b"), "--keep-going"]) == 1
    err = capsys.readouterr().err
    assert "1 failures" in err and "000000000999.jpg" in err
    assert len(list((tmp_path / "b" / "contrast" / "1").glob("*.png"))) == 4
    with pytest.raises(Exception, match="000000000999.jpg"):
        read_image(bad)


def test_refuses_mixing_channel_order_or_format(image_dir, tmp_path, capsys):
    args = ["corrupt", "--images", str(image_dir), "--out", str(tmp_path / "o"), "--corruptions", "brightness",
            "--severities", "1"]
    assert main([*args, "-q"]) == 0
    assert main([*args, "--channel-order", "bgr"]) == 2
    err = capsys.readouterr().err
    assert "--channel-order rgb" in err and "refusing" in err
    assert main([*args, "--format", "jpg"]) == 2
    (tmp_path / "foreign" / "fog" / "1").mkdir(parents=True)
    assert main(["corrupt", "--images", str(image_dir), "--out", str(tmp_path / "foreign")]) == 2
    assert "did not write" in capsys.readouterr().err


def test_bgr_and_jpg_outputs(image_dir, tmp_path):
    out = tmp_path / "bgr"
    assert main(["corrupt", "--images", str(image_dir), "--out", str(out), "--corruptions", "frost",
                 "--severities", "5", "--channel-order", "bgr", "-q"]) == 0
    clean = read_image(image_dir / "000000000100.jpg")
    seed = corruption_seed("000000000100.jpg", "frost", 5)
    expected = corrupt(clean, "frost", 5, seed, channel_order="bgr")
    assert np.array_equal(read_image(out / "frost" / "5" / "000000000100.png"), expected)
    assert not np.array_equal(expected, corrupt(clean, "frost", 5, seed))
    out = tmp_path / "jpg"
    assert main(["corrupt", "--images", str(image_dir), "--out", str(out), "--corruptions", "fog",
                 "--severities", "5", "--format", "jpg", "-q"]) == 0
    assert len(list((out / "fog" / "5").glob("*.jpg"))) == 4
    expected = corrupt(clean, "fog", 5, corruption_seed("000000000100.jpg", "fog", 5)).astype(int)
    got = read_image(out / "fog" / "5" / "000000000100.jpg")
    assert np.abs(got - expected).mean() < 4  # JPEG q95 is lossy, but close


@pytest.mark.parametrize("bad,message", [
    (["--corruptions", "fogg"], "valid: motion_blur"),
    (["--severities", "6"], "valid: 1, 2, 3, 4, 5"),
    (["--shard", "3/3"], "0 <= i < n"),
    (["--subset", "2"], "--ann"),
])
def test_bad_arguments_exit_2(image_dir, tmp_path, capsys, bad, message):
    assert main(["corrupt", "--images", str(image_dir), "--out", str(tmp_path / "x"), *bad]) == 2
    assert message in capsys.readouterr().err


def test_preview_sheet(image_dir, tmp_path):
    sheet = tmp_path / "sheet.png"
    assert main(["corrupt", "--preview", str(image_dir / "000000000107.jpg"), "--out", str(sheet), "-q"]) == 0
    img = read_image(sheet)
    clean = read_image(image_dir / "000000000107.jpg")  # 64 x 100: cells are 160 px wide at most
    h, w = clean.shape[:2]
    assert img.shape == (28 + 16 * (h + 4), 150 + 5 * (w + 4), 3)
    # The top-left cell is motion_blur severity 1 of the image, seeded by its file name.
    cell = img[28 : 28 + h, 150 : 150 + w]
    assert np.array_equal(cell, corrupt(clean, "motion_blur", 1, corruption_seed("000000000107.jpg", "motion_blur", 1)))


def test_on_the_fly_over_panoptic_dataset_equals_disk(synth_root, tmp_path):
    """The evaluation path: CorruptedDataset(PanopticDataset) == PNGs of `harness corrupt --ann`."""
    from harness.data.coco_panoptic import PanopticDataset

    out = tmp_path / "coco_c"
    ann = synth_root / "annotations" / "panoptic_val2017.json"
    assert main(["corrupt", "--images", str(synth_root / "val2017"), "--ann", str(ann), "--out", str(out),
                 "--subset", "3", "--corruptions", "spatter,glass_blur", "--severities", "4", "-q"]) == 0
    chosen = set(json.loads((out / "subset_3_0.json").read_text())["image_ids"])
    dataset = PanopticDataset(synth_root, "val2017")
    for corruption in ("spatter", "glass_blur"):
        wrapped = CorruptedDataset(dataset, corruption, 4)
        checked = 0
        for k, image_id in enumerate(dataset.image_ids):
            if image_id not in chosen:
                continue
            sample = wrapped[k]
            disk = read_image(out / corruption / "4" / (Path(sample.file_name).stem + ".png"))
            assert np.array_equal(sample.image, disk)
            checked += 1
        assert checked == 3


def test_empty_folder_and_colliding_stems(image_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["corrupt", "--images", str(empty), "--out", str(tmp_path / "e")]) == 2
    assert "no images found" in capsys.readouterr().err
    cv2.imwrite(str(image_dir / "000000000100.png"), _photos()[0])
    assert main(["corrupt", "--images", str(image_dir), "--out", str(tmp_path / "d")]) == 2
    assert "share the stem '000000000100'" in capsys.readouterr().err
