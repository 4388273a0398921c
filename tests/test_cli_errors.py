"""Issue #15, driven as a user would: every mistake is one line and exit 2, and nothing pre-existing changes.

One table of cases per issue class and command (phase 1 commands: synth, show, eval-ap, corrupt, convert, doctor).
Each case runs ``harness.cli.main(argv)`` -- the function ``python -m harness`` calls -- with the process's own
stdout/stderr file descriptors redirected to files, so C-library messages are seen too. To keep the file fast, the
cases of the table run in ONE ``python`` subprocess (imports paid once); the signal, umask and spot checks below
start ``python -m harness`` itself. For every case the workspace (all inputs, every pre-existing output) is hashed
before and after: a refused run must not change, create or delete anything there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from cli_table import ENV, REPO, Case, check_case, run_cases
from _helpers import Evil as _Evil, jdump as _jdump


# ----------------------------------------------------------------------------- the workspace


def _build_workspace(ws: Path) -> dict[str, Any]:
    """Every input the cases need (small files; built in-process once)."""
    import torch

    from harness.data.synthetic import generate_dataset

    data = generate_dataset(ws / "data", 0, 3, seed=5, size=64, workers=1, preview=False, remove_stale=False)
    gt_json = data / "annotations" / "panoptic_val2017.json"
    gt = json.loads(gt_json.read_text())
    ann0, img0 = gt["annotations"][0], gt["images"][0]
    h, w = img0["height"], img0["width"]
    image = data / "val2017" / img0["file_name"]
    png = data / "annotations" / "panoptic_val2017" / ann0["file_name"]

    img = ws / "img"
    img.mkdir()
    photo = cv2.imread(str(image))
    cv2.imwrite(str(img / "a.png"), photo)
    gray16 = (np.arange(h * w).reshape(h, w) * 37 % 65536).astype(np.uint16)
    cv2.imwrite(str(img / "gray16.png"), gray16)
    ok, buf = cv2.imencode(".jpg", photo)
    (img / "trunc.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])  # same size as the GT PNG
    ok, buf = cv2.imencode(".jpg", cv2.resize(photo, (256, 256)))
    (img / "large.jpg").write_bytes(buf.tobytes())
    (img / "random.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    (img / "text.png").write_text("hello")
    (img / "empty.jpg").write_bytes(b"")
    (img / ".hidden.jpg").write_bytes(b"not an image")  # dot-files are never inputs
    (img / "._a.jpg").write_bytes(b"AppleDouble junk")
    big = ws / "big"
    big.mkdir()
    cv2.imwrite(str(big / "big.png"), np.zeros((800, 800, 3), np.uint8))
    cv2.imwrite(str(big / "big_pan.png"), np.zeros((800, 800, 3), np.uint8))
    _jdump(big / "big.json", {"annotations": [{"image_id": 1, "file_name": "big_pan.png", "segments_info": []}],
                              "categories": gt["categories"]})

    # Panoptic JSON variants: one mistake each (named in the message).
    bad = ws / "bad"

    def variant(name: str, mutate: Any) -> Path:
        doc = json.loads(gt_json.read_text())
        mutate(doc)
        return _jdump(bad / f"{name}.json", doc)

    seg0 = dict(ann0["segments_info"][0])
    variant("no_category_id", lambda d: d["annotations"][0]["segments_info"][0].pop("category_id"))
    variant("string_segment_id", lambda d: d["annotations"][0]["segments_info"][0].update(id=str(seg0["id"])))
    variant("null_image_id", lambda d: d["annotations"][0].update(image_id=None))
    variant("float_image_id", lambda d: d["annotations"][0].update(image_id=1.5))
    variant("null_segments_info", lambda d: d["annotations"][0].update(segments_info=None))
    variant("bare_categories", lambda d: d.update(categories=[c["id"] for c in d["categories"]]))
    variant("duplicate_image_id", lambda d: d["annotations"].append(dict(d["annotations"][0])))
    variant("unknown_category", lambda d: d["annotations"][0]["segments_info"][0].update(category_id=4242))
    variant("no_annotations", lambda d: d.pop("annotations"))
    variant("absolute_file_name", lambda d: d["annotations"][0].update(file_name="/etc/passwd"))
    (bad / "not_json.json").write_text("{not json")
    (bad / "binary.json").write_bytes(b"\x80\x81 garbage")
    _jdump(bad / "list.json", [1, 2, 3])

    # Predictions: the GT itself (valid), and one with a PNG of the wrong size.
    pred = ws / "pred"
    (pred / "ok").mkdir(parents=True)
    (pred / "small").mkdir(parents=True)
    for a in gt["annotations"]:
        src = data / "annotations" / "panoptic_val2017" / a["file_name"]
        (pred / "ok" / a["file_name"]).write_bytes(src.read_bytes())
        ids = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(pred / "small" / a["file_name"]), ids[:-3, :-2])
    _jdump(pred / "ok.json", gt)
    _jdump(pred / "small.json", gt)
    _jdump(pred / "nested.json", {"annotations": gt["annotations"]})  # no categories (allowed)
    cv2.imwrite(str(pred / "gray16.png"), gray16)
    _jdump(pred / "gray16.json", {"annotations": [{**ann0, "file_name": "gray16.png"}], "categories": gt["categories"]})

    # COCO results lists (instances AP).
    inst = json.loads((data / "annotations" / "instances_val2017.json").read_text())
    a0 = inst["annotations"][0]
    det = {"image_id": a0["image_id"], "category_id": a0["category_id"], "score": 0.9,
           "segmentation": a0["segmentation"]}
    res = ws / "res"
    _jdump(res / "ok.json", [det])
    _jdump(res / "wrong_size.json", [{**det, "segmentation": {**det["segmentation"], "size": [h + 1, w]}}])
    _jdump(res / "garbage_counts.json", [{**det, "segmentation": {"size": [h, w], "counts": "~~~~garbage"}}])
    _jdump(res / "short_counts.json", [{**det, "segmentation": {"size": [h, w], "counts": [5, 3]}}])
    _jdump(res / "nan_score.json", [{**det, "score": "nan"}])
    _jdump(res / "string_ids.json", [{**det, "image_id": str(det["image_id"])}])
    _jdump(res / "dict.json", gt)

    # Checkpoints.
    ck = ws / "ckpt"
    ck.mkdir()
    (ck / "random.pth").write_bytes(np.random.default_rng(1).bytes(5000))
    (ck / "text.pth").write_text("this is not a checkpoint\n")
    (ck / "empty.pth").write_bytes(b"")
    torch.save({"x": _Evil()}, ck / "evil.pth")
    torch.save({"w": torch.ones(2)}, ck / "plain.pt")
    with open(ck / "evil.pkl", "wb") as fh:
        pickle.dump({"model": _Evil()}, fh)
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": {"epoch": np.int64(3)},
                "args": argparse.Namespace(lr=1.0)}, ck / "wrongkeys.pth")

    # Folders and files that are not ours.
    coco = ws / "coco"
    (coco / "val2017").mkdir(parents=True)
    (coco / "val2017" / "000000000139.jpg").write_bytes(image.read_bytes())
    _jdump(coco / "annotations" / "panoptic_val2017.json", {"note": "the user's own file"})
    (ws / "notes").mkdir()
    (ws / "notes" / "model.json").write_text('{"mine": true}')
    (ws / "afile").write_text("a plain file")
    (ws / "adir.png").mkdir()
    (ws / "adir.json").mkdir()
    return {"gt_json": gt_json, "gt_dir": data / "annotations" / "panoptic_val2017", "image": image, "png": png,
            "inst_json": data / "annotations" / "instances_val2017.json", "val": data / "val2017"}


# ----------------------------------------------------------------------------- the cases


W = "{ws}"
GT = f"{W}/data/annotations/panoptic_val2017.json"
GTD = f"{W}/data/annotations/panoptic_val2017"
INST = f"{W}/data/annotations/instances_val2017.json"
PNG = f"{W}/data/annotations/panoptic_val2017/000001000001.png"
IMG = f"{W}/data/val2017/000001000001.jpg"


def _show(json_path: str = GT, image: str = IMG, png: str = PNG, out: str = "{out}/o.png", *more: str) -> list[str]:
    return ["show", "--image", image, "--panoptic", png, "--json", json_path, "--out", out, *more]


def _ap(gt: list[str], pred: list[str], *more: str) -> list[str]:
    return ["eval-ap", *gt, *pred, *more]


PAN_GT = ["--panoptic-gt-json", GT]
PRED_OK = ["--pred-json", f"{W}/pred/ok.json"]
CONV = ["convert", "--model", "panoptic_segformer_tiny", "--num-things", "10", "--num-stuff", "6"]

CASES: list[Case] = [
    # 1. An output that is (or resolves to) an input.
    Case("c01-show-out-is-png", _show(out=PNG), needles=("--out", "also an input")),
    Case("c01-show-out-is-symlinked-json", _show(out=f"{W}/link_to_gt.png"), needles=("also an input",),
         extra={"symlink": ("link_to_gt.png", GT)}),
    Case("c01-eval-ap-out-is-pred", _ap(PAN_GT, PRED_OK, "--out", f"{W}/pred/ok.json"), needles=("--out", "ok.json")),
    Case("c01-eval-ap-write-instances-is-gt", _ap(PAN_GT, PRED_OK, "--write-instances", GT),
         needles=("--write-instances", "also an input")),
    Case("c01-eval-ap-two-outputs-same", _ap(PAN_GT, PRED_OK, "--out", "{out}/a.json", "--write-instances",
                                             "{out}/a.json"), needles=("same file",)),
    Case("c01-corrupt-out-is-images", ["corrupt", "--images", f"{W}/img", "--out", f"{W}/img"],
         needles=("also an input",)),
    Case("c01-corrupt-preview-out-is-image", ["corrupt", "--preview", f"{W}/img/a.png", "--out", f"{W}/img/a.png"],
         needles=("also an input",)),
    Case("c01-convert-out-is-in", [*CONV, "--in", f"{W}/ckpt/random.pth", "--out", f"{W}/ckpt/random.pth"],
         needles=("also an input",)),
    # 2. A folder the command did not write.
    Case("c02-synth-into-coco", ["synth", "--out", f"{W}/coco", "--train", "1", "--val", "1"],
         needles=("did not write", "coco")),
    Case("c02-synth-overwrite-still-refuses-foreign", ["synth", "--out", f"{W}/coco", "--overwrite"],
         needles=("did not write",)),
    Case("c02-corrupt-into-foreign", ["corrupt", "--images", f"{W}/img", "--out", f"{W}/coco"],
         needles=("did not write",)),
    Case("c02-convert-into-foreign-json", [*CONV, "--in", f"{W}/ckpt/wrongkeys.pth", "--out", f"{W}/notes"],
         needles=("model.json", "not one of our")),
    # 3. / 12. eval-ap validates like eval-pq and pairs synth's own files.
    Case("c03-eval-ap-pred-png-size", _ap(PAN_GT, ["--pred-json", f"{W}/pred/small.json"]),
         needles=("000001000001.png", "in the GT")),
    Case("c03-eval-ap-rle-wrong-size", _ap(PAN_GT, ["--results", f"{W}/res/wrong_size.json"]),
         needles=("wrong_size.json", "differs from its image")),
    Case("c03-eval-ap-rle-garbage", _ap(PAN_GT, ["--results", f"{W}/res/garbage_counts.json"]),
         needles=("garbage_counts.json", "counts")),
    Case("c03-eval-ap-rle-short", _ap(["--gt-json", INST], ["--results", f"{W}/res/short_counts.json"]),
         needles=("short_counts.json", "cover 8 pixels")),
    Case("c03-eval-ap-no-annotations", _ap(PAN_GT, ["--pred-json", f"{W}/bad/no_annotations.json",
                                                    "--pred-dir", GTD]), needles=("no_annotations.json",
                                                                                  "'annotations'")),
    Case("c03-eval-ap-unknown-category", _ap(PAN_GT, ["--pred-json", f"{W}/bad/unknown_category.json",
                                                      "--pred-dir", GTD]), needles=("unknown category id 4242",)),
    Case("c03-eval-ap-duplicate-image", _ap(PAN_GT, ["--pred-json", f"{W}/bad/duplicate_image_id.json",
                                                     "--pred-dir", GTD]), needles=("duplicate image id",)),
    Case("c03-eval-ap-string-ids", _ap(PAN_GT, ["--results", f"{W}/res/string_ids.json"]),
         needles=("string_ids.json", "same type")),
    Case("c03-eval-ap-results-not-list", _ap(PAN_GT, ["--results", f"{W}/res/dict.json"]),
         needles=("expected a list", "--pred-json")),
    Case("c12-eval-ap-instances-gt-with-pred-json", _ap(["--gt-json", INST], PRED_OK), rc=0, one_line=False),
    Case("c12-eval-ap-instances-gt-with-results", _ap(["--gt-json", INST], ["--results", f"{W}/res/ok.json"]),
         rc=0, one_line=False),
    Case("c12-eval-ap-pred-without-categories", _ap(PAN_GT, ["--pred-json", f"{W}/pred/nested.json",
                                                             "--pred-dir", f"{W}/pred/ok"]), rc=0, one_line=False),
    # 4. / 14. High bit depth.
    Case("c04-corrupt-16bit-scaled", ["corrupt", "--images", f"{W}/img16", "--out", "{out}/c16", "--corruptions",
                                      "contrast", "--severities", "1", "-q"], rc=0, one_line=False,
         extra={"copy": ("img/gray16.png", "img16/gray16.png")}),
    Case("c04-show-16bit-image", _show(image=f"{W}/img/gray16.png", png=PNG), rc=0, one_line=False),
    Case("c14-show-16bit-gray-panoptic", _show(json_path=f"{W}/pred/gray16.json", png=f"{W}/pred/gray16.png"),
         needles=("16-bit grayscale",), forbid=("uint16", ", 2)")),
    Case("c14-eval-ap-16bit-gray-pred", _ap(PAN_GT, ["--pred-json", f"{W}/pred/gray16.json", "--allow-missing",
                                                     "--pred-dir", f"{W}/pred"]), needles=("16-bit grayscale",)),
    # 6. Dot-files are never inputs.
    Case("c06-corrupt-skips-dot-files", ["corrupt", "--images", f"{W}/imgdot", "--out", "{out}/cdot",
                                         "--corruptions", "brightness", "--severities", "1", "-q"], rc=0,
         one_line=False, extra={"copy": ("img/a.png", "imgdot/a.png"),
                                "copy2": ("img/.hidden.jpg", "imgdot/.hidden.jpg"),
                                "copy3": ("img/._a.jpg", "imgdot/._a.jpg")}),
    # 7. Counts without bound are refused before any work.
    Case("c07-synth-huge-train", ["synth", "--out", "{out}/s", "--train", "100000000000000000000"],
         needles=("--train", "outside")),
    Case("c07-synth-exp-notation", ["synth", "--out", "{out}/s", "--train", "1e20"], needles=("--train",)),
    Case("c07-corrupt-huge-severity-range", ["corrupt", "--images", f"{W}/img", "--out", "{out}/c", "--severities",
                                             "1-1000000000"], needles=("--severities", "1000000000")),
    Case("c07-show-scale-1000", _show(GT, IMG, PNG, "{out}/o.png", "--scale", "1000"), needles=("--scale",)),
    Case("c07-show-pixel-budget", _show(f"{W}/big/big.json", f"{W}/big/big.png", f"{W}/big/big_pan.png",
                                        "{out}/o.png", "--scale", "16"), needles=("Mpixel",)),
    # 8. Unusable output paths, checked before any work.
    Case("c08-synth-under-file", ["synth", "--out", f"{W}/afile/sub"], needles=("afile", "is a file")),
    Case("c08-synth-out-is-file", ["synth", "--out", f"{W}/afile"], needles=("afile", "is a file")),
    Case("c08-show-out-is-dir", _show(out=f"{W}/adir.png"), needles=("adir.png", "is a folder")),
    Case("c08-show-out-under-file", _show(out=f"{W}/afile/o.png"), needles=("afile", "is a file")),
    Case("c08-show-out-not-png", _show(out="{out}/o.jpg"), needles=(".png",)),
    Case("c08-eval-ap-out-is-dir", _ap(PAN_GT, PRED_OK, "--out", f"{W}/adir.json"), needles=("is a folder",)),
    Case("c08-eval-ap-out-under-file", _ap(PAN_GT, PRED_OK, "--out", f"{W}/afile/r.json"), needles=("is a file",)),
    Case("c08-corrupt-out-under-file", ["corrupt", "--images", f"{W}/img", "--out", f"{W}/afile/c"],
         needles=("is a file",)),
    Case("c08-corrupt-preview-out-dir", ["corrupt", "--preview", f"{W}/img/a.png", "--out", f"{W}/adir.png"],
         needles=("is a folder",)),
    Case("c08-convert-out-under-file", [*CONV, "--in", f"{W}/ckpt/wrongkeys.pth", "--out", f"{W}/afile/w"],
         needles=("is a file",)),
    Case("c08-convert-out-wrong-suffix", [*CONV, "--in", f"{W}/ckpt/wrongkeys.pth", "--out", "{out}/w.pth"],
         needles=(".safetensors",)),
    # 9. Malformed JSON content: one line naming the file and the entry.
    *[Case(f"c09-show-{name}", _show(json_path=f"{W}/bad/{name}.json"), needles=(f"{name}.json", *needles))
      for name, needles in [
          ("no_category_id", ("'category_id'",)), ("string_segment_id", ("'id'", "expected an integer")),
          ("null_image_id", ("image id null",)), ("float_image_id", ("image id 1.5",)),
          ("null_segments_info", ("'segments_info' is null",)), ("bare_categories", ("categories[0]",)),
          ("duplicate_image_id", ("duplicate image id",)), ("unknown_category", ("unknown category id 4242",)),
          ("no_annotations", ("'annotations'",)), ("not_json", ("not valid JSON",)),
          ("binary", ("not a text",)), ("list", ("expected a JSON object",)),
          ("absolute_file_name", ("plain name",))]],
    *[Case(f"c09-eval-ap-gt-{name}", _ap(["--panoptic-gt-json", f"{W}/bad/{name}.json", "--panoptic-gt-dir", GTD],
                                         PRED_OK), needles=(f"{name}.json",))
      for name in ("no_category_id", "null_segments_info", "bare_categories", "string_segment_id")],
    Case("c09-eval-ap-nan-score", _ap(PAN_GT, ["--results", f"{W}/res/nan_score.json"]), needles=("'score'",)),
    Case("c09-corrupt-ann-garbage", ["corrupt", "--images", f"{W}/img", "--ann", f"{W}/bad/list.json", "--out",
                                     "{out}/c"], needles=("list.json",)),
    Case("c09-synth-garbage-marker", ["synth", "--out", f"{W}/garbage_marker"], needles=(".psf-harness.json",),
         extra={"write": ("garbage_marker/.psf-harness.json", "{not json")}),
    Case("c09-corrupt-garbage-manifest", ["corrupt", "--images", f"{W}/imggood", "--out", f"{W}/cgarbage",
                                          "--corruptions", "fog", "--severities", "1"], needles=("manifest.csv",),
         extra={"corrupt_garbage": True}),
    # 10. Bad option values, at parse time.
    *[Case(f"c10-{a[0]}-{a[1].lstrip('-')}-{a[2].replace('/', '_')}", a, needles=(a[1],)) for a in [
        ["show", "--alpha", "nan", "--image", IMG, "--panoptic", PNG, "--json", GT, "--out", "{out}/o.png"],
        ["show", "--alpha", "inf", "--image", IMG, "--panoptic", PNG, "--json", GT, "--out", "{out}/o.png"],
        ["show", "--cols", "0", "--grid", "--image", IMG, "--panoptic", PNG, "--json", GT, "--out", "{out}/o.png"],
        ["synth", "--seed", "-1", "--out", "{out}/s"],
        ["synth", "--workers", "0", "--out", "{out}/s"],
        ["synth", "--size", "1e9", "--out", "{out}/s"],
        ["corrupt", "--workers", "-1", "--images", f"{W}/img", "--out", "{out}/c"],
        ["corrupt", "--shard", "1/0", "--images", f"{W}/img", "--out", "{out}/c"],
        ["corrupt", "--subset", "0", "--images", f"{W}/img", "--out", "{out}/c"],
        ["corrupt", "--subset-seed", "-1", "--images", f"{W}/img", "--out", "{out}/c"],
        ["corrupt", "--corruptions", "fogg", "--images", f"{W}/img", "--out", "{out}/c"],
        ["convert", "--num-things", "nan", "--model", "panoptic_segformer_tiny", "--in", "x", "--out", "y"],
        ["doctor", "--require", "bogus"],
    ]],
    # 11. / 14. Damaged or unsafe checkpoints.
    Case("c11-convert-random-bytes", [*CONV, "--in", f"{W}/ckpt/random.pth", "--out", "{out}/w"],
         needles=("random.pth", "not a PyTorch checkpoint"), forbid=("model name",)),
    Case("c11-convert-text", [*CONV, "--in", f"{W}/ckpt/text.pth", "--out", "{out}/w"], needles=("text file",)),
    Case("c11-convert-empty", [*CONV, "--in", f"{W}/ckpt/empty.pth", "--out", "{out}/w"], needles=("empty",)),
    Case("c11-convert-folder", [*CONV, "--in", f"{W}/ckpt", "--out", "{out}/w"], needles=("folder",)),
    Case("c11-convert-evil", [*CONV, "--in", f"{W}/ckpt/evil.pth", "--out", "{out}/w"],
         needles=("evil.pth", "could run code"), forbid=("unsafe-code-ran",)),
    Case("c11-convert-wrong-keys", [*CONV, "--in", f"{W}/ckpt/wrongkeys.pth", "--out", "{out}/w"],
         needles=("wrongkeys.pth", "missing keys", "unexpected keys")),
    # 13. C-library messages never precede our line (a truncated JPEG).
    Case("c13-corrupt-truncated-jpeg", ["corrupt", "--images", f"{W}/imgtrunc", "--out", "{out}/ct",
                                        "--corruptions", "fog", "--severities", "1"], needles=("trunc.jpg",),
         midrun=True, extra={"copy": ("img/trunc.jpg", "imgtrunc/trunc.jpg")}),
    Case("c13-corrupt-preview-random", ["corrupt", "--preview", f"{W}/img/random.jpg", "--out", "{out}/p.png"],
         needles=("random.jpg",)),
    Case("c13-show-truncated-jpeg", _show(image=f"{W}/img/trunc.jpg"), rc=0, one_line=False,
         needles=("WARNING", "trunc.jpg")),
    Case("c03-show-image-size-differs", _show(image=f"{W}/img/large.jpg"), needles=("large.jpg", "256x256")),
    Case("c13-show-random-image", _show(image=f"{W}/img/random.jpg"), needles=("random.jpg",)),
    Case("c13-show-empty-image", _show(image=f"{W}/img/empty.jpg"), needles=("empty.jpg",)),
]


def _corrupt_garbage_manifest(ws: Path) -> None:
    """An earlier corrupt output (ours) whose manifest.csv was overwritten with garbage."""
    from harness.cli import main

    out = ws / "cgarbage"
    (ws / "imggood").mkdir(exist_ok=True)
    (ws / "imggood" / "a.png").write_bytes((ws / "img" / "a.png").read_bytes())
    assert main(["corrupt", "--images", str(ws / "imggood"), "--out", str(out), "--corruptions", "fog",
                 "--severities", "1", "-q"]) == 0
    (out / "manifest.csv").write_bytes(b"\xff\xfe garbage \x00\x01")


def _prepare(case: Case, ws: Path) -> None:
    for key in ("copy", "copy2", "copy3"):
        if key in case.extra:
            src, dst = case.extra[key]
            (ws / dst).parent.mkdir(parents=True, exist_ok=True)
            (ws / dst).write_bytes((ws / src).read_bytes())
    if "symlink" in case.extra:
        name, target = case.extra["symlink"]
        link = ws / name
        if not link.is_symlink():
            link.symlink_to(target.replace("{ws}", str(ws)))
    if "write" in case.extra:
        name, text = case.extra["write"]
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_text(text)
    if case.extra.get("corrupt_garbage"):
        _corrupt_garbage_manifest(ws)


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Build the workspace, run every case in one subprocess, return ``{id: result}`` (+ paths)."""
    ws = tmp_path_factory.mktemp("ws")
    scratch = tmp_path_factory.mktemp("scratch")
    info = _build_workspace(ws)
    logs = tmp_path_factory.mktemp("logs")
    for case in CASES:
        _prepare(case, ws)
    results = run_cases(CASES, ws, scratch, logs)
    results["_ws"] = ws
    results["_info"] = info
    return results


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(table: dict[str, Any], case: Case) -> None:
    check_case(table[case.id], case)


def test_results_of_valid_runs(table: dict[str, Any]) -> None:
    """The valid cases above produce correct results, not just exit 0."""
    from harness.corruptions import corrupt, corruption_seed

    ws = table["_ws"]
    # 16-bit input is scaled (>> 8, as OpenCV reads it), never clipped to white.
    gray16 = cv2.imread(str(ws / "img" / "gray16.png"), cv2.IMREAD_UNCHANGED)
    clean = np.repeat((gray16 >> 8).astype(np.uint8)[..., None], 3, axis=2)
    got = cv2.imread(str(table["c04-corrupt-16bit-scaled"]["out"] / "c16" / "contrast" / "1" / "gray16.png"))
    expected = corrupt(clean, "contrast", 1, corruption_seed("gray16.png", "contrast", 1))
    np.testing.assert_array_equal(got[..., ::-1], expected)
    # Dot-files were not taken for images.
    done = sorted(p.name for p in (table["c06-corrupt-skips-dot-files"]["out"] / "cdot").rglob("*.png"))
    assert done == ["a.png"]
    # synth's own instances JSON pairs with --pred-json: the GT scored against itself is perfect.
    assert "100.0" in table["c12-eval-ap-instances-gt-with-pred-json"]["stdout"]
    assert "100.0" in table["c12-eval-ap-pred-without-categories"]["stdout"]


# ----------------------------------------------------------------------------- real `python -m harness` runs


def _harness(*args: str, umask: int | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "harness", *args], env=ENV, cwd=REPO, capture_output=True,
                          text=True, preexec_fn=pre, timeout=600, **kw)


def _temporaries(root: Path) -> list[Path]:
    from harness.io import is_temporary

    return [p for p in root.rglob("*") if is_temporary(p.name)]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_one_line_from_a_real_process(tmp_path: Path) -> None:
    proc = _harness("show", "--image", "nope.jpg", "--panoptic", "nope.png", "--json", "x.json", "--out",
                    str(tmp_path / "o.png"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "nope.jpg" in proc.stderr


def test_umask_is_applied_to_every_output(tmp_path: Path) -> None:
    """Class 15: outputs get 0666 & ~umask (here 0640), not the 0600 of a temporary file."""
    data = tmp_path / "data"
    assert _harness("synth", "--out", str(data), "--train", "1", "--val", "2", "--size", "64", "-q",
                    umask=0o027).returncode == 0
    gt = data / "annotations" / "panoptic_val2017.json"
    png = next((data / "annotations" / "panoptic_val2017").iterdir())
    image = data / "val2017" / (png.stem + ".jpg")
    assert _harness("show", "--image", str(image), "--panoptic", str(png), "--json", str(gt), "--out",
                    str(tmp_path / "show.png"), "-q", umask=0o027).returncode == 0
    assert _harness("corrupt", "--images", str(data / "val2017"), "--out", str(tmp_path / "c"), "--corruptions",
                    "fog", "--severities", "1", "-q", umask=0o027).returncode == 0
    assert _harness("eval-ap", "--panoptic-gt-json", str(gt), "--pred-json", str(gt), "--out",
                    str(tmp_path / "ap.json"), "-q", umask=0o027).returncode == 0
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 10
    modes = {oct(p.stat().st_mode & 0o777) for p in files}
    assert modes == {oct(0o640)}, modes


def _wait_for(predicate: Any, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.01)


@pytest.mark.slow
def test_synth_sigterm_and_reruns_never_mix_or_leak(tmp_path: Path) -> None:
    """Classes 5 and 6 for synth: SIGTERM mid-run (2 workers) -> exit 143, one line, no temporary file; the
    interrupted output is refused by readers; a re-run with other settings replaces it cleanly; a complete output
    is never replaced by other settings (unchanged, byte for byte)."""
    from harness.data.coco_panoptic import PanopticDataset
    from harness.errors import DataError

    out = tmp_path / "s"
    args = ["synth", "--out", str(out), "--size", "96", "--no-preview"]
    proc = subprocess.Popen([sys.executable, "-m", "harness", *args, "--train", "400", "--val", "10",
                             "--workers", "2"], env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(lambda: (out / "train2017").is_dir() and len(list((out / "train2017").glob("*.jpg"))) > 20, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = err.splitlines()
    assert lines[-1].startswith("ERROR") and "terminated" in lines[-1], err
    assert all(ln.startswith("INFO ") for ln in lines[:-1]), err
    assert _temporaries(out) == []
    with pytest.raises(DataError, match="incomplete"):
        PanopticDataset(out, "val2017")
    # A temporary of a SIGKILL'd writer (dead pid) is swept by the next run.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "train2017" / f".000000000001.tmp-{dead.pid}-abc123.jpg").write_bytes(b"partial")
    # Another seed replaces the interrupted run: no file of the first run survives that the second did not write.
    assert _harness(*args, "--train", "3", "--val", "2", "--seed", "1", "-q").returncode == 0
    assert _temporaries(out) == []
    assert sorted(p.name for p in (out / "train2017").iterdir()) == [f"{2 * i + 1:012d}.jpg" for i in range(3)]
    assert PanopticDataset(out, "val2017").validate_all() == 2
    # Complete now: other settings are refused and nothing changes; the same settings are a no-op rewrite.
    before = _tree(out)
    proc = _harness(*args, "--train", "3", "--val", "2", "--seed", "2")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--seed 1" in proc.stderr
    assert _tree(out) == before
    assert _harness(*args, "--train", "3", "--val", "2", "--seed", "1", "-q").returncode == 0
    assert _tree(out) == before
    # --overwrite replaces it, removing only what the first run wrote.
    (out / "mine.txt").write_text("the user's")
    assert _harness(*args, "--train", "1", "--val", "1", "--seed", "2", "--overwrite", "-q").returncode == 0
    assert (out / "mine.txt").read_text() == "the user's"
    assert sorted(p.name for p in (out / "train2017").iterdir()) == ["000000000001.jpg"]


@pytest.mark.slow
def test_corrupt_sigterm_with_workers_leaves_no_temporary(tmp_path: Path) -> None:
    """Class 6 for corrupt: SIGTERM with 2 workers -> 143, one line, no temporary file, and the re-run completes
    the set byte-identically to an uninterrupted run."""
    images = tmp_path / "img"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        cv2.imwrite(str(images / f"{i:012d}.png"), rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    args = ["corrupt", "--images", str(images), "--corruptions", "glass_blur,fog,frost", "--severities", "1-2",
            "--workers", "2"]
    out = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-m", "harness", *args, "--out", str(out)], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(list(out.glob("*/*/*.png"))) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = err.splitlines()  # the run's progress log, then our one line
    assert lines[-1].startswith("ERROR") and "terminated" in lines[-1], err
    assert all(ln.startswith("INFO ") for ln in lines[:-1]), err
    assert _temporaries(out) == []
    assert _harness(*args, "--out", str(out), "-q").returncode == 0
    assert _harness(*args, "--out", str(tmp_path / "clean"), "-q").returncode == 0
    strip = {"manifest.csv", ".psf-harness.json", "manifest.json"}
    assert {k: v for k, v in _tree(out).items() if k not in strip} == \
        {k: v for k, v in _tree(tmp_path / "clean").items() if k not in strip}
