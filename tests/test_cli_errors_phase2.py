"""Issue #15 phases 2 and 3, driven as a user would: eval, predict, eval-pq, sweep, report, profile, train and demo
keep the promise.

One table of cases per issue class and command, run through :mod:`cli_table` (every case is
``harness.cli.main(argv)`` in ONE subprocess, file-descriptor level stderr, the whole workspace hashed before and
after each case: a refused run changes, creates and deletes nothing there). The workspace holds a tiny random
Panoptic SegFormer, a 3-image synthetic data set, damaged checkpoints, malformed JSON, and one complete output of
every command (made first, in this process, under umask 027 and with stale temporary files of dead processes
planted where they write). The SIGTERM tests start ``python -m harness`` itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cli_table import ENV, REPO, Case, check_case, run_cases
from _helpers import Evil as _Evil, jdump as _jdump

W = "{ws}"
DATA = f"{W}/data"
GT = f"{W}/data/annotations/panoptic_val2017.json"
GTD = f"{W}/data/annotations/panoptic_val2017"
IMG = f"{W}/data/val2017/000001000001.jpg"
RUN = f"{W}/run"  # a complete `harness eval` run with candidates and predictions
MODEL = "panoptic_segformer_tiny"
FAST = ["--workers", "0", "--score-workers", "0", "--warmup", "0", "--timing-images", "1"]
UMASK = 0o027


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant(folder: Path, name: str, pid: int) -> Path:
    """A temporary file of `harness.io.atomic_write` whose writer (pid) is dead: the next run must sweep it."""
    stem, dot, suffix = name.partition(".")
    p = folder / f".{stem}.tmp-{pid}-abc123{dot}{suffix}"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"partial")
    return p


def _main(*argv: str) -> None:
    from harness.cli import main

    assert main([*argv, "-q"]) == 0, argv


def _build_workspace(ws: Path) -> dict[str, Any]:
    """Inputs of every case, and one complete output per command (umask 027, over planted stale temporaries)."""
    import torch

    from harness.data.coco_panoptic import PanopticDataset
    from harness.data.synthetic import generate_dataset
    from models.checkpoint import read_checkpoint, save_checkpoint
    from models.zoo import build_model, get_config

    data = generate_dataset(ws / "data", 0, 3, seed=5, size=64, workers=1, preview=False, remove_stale=False)
    cats = PanopticDataset(data, "val2017").categories
    cfg = get_config(MODEL, num_things=cats.num_things, num_stuff=cats.num_stuff)
    torch.manual_seed(0)
    save_checkpoint(build_model(cfg).state_dict(), cfg, ws / "w", meta={"categories": list(cats.categories)})
    state, _ = read_checkpoint(ws / "w")
    (ws / "trainrun").mkdir()
    torch.save({"model": state, "config": cfg.to_dict(), "family": "panoptic_segformer"},
               ws / "trainrun" / "checkpoint_last.pt")
    (ws / "plain").mkdir()
    torch.save(state, ws / "plain" / "checkpoint_last.pt")  # a plain state dict where a training checkpoint goes
    ck = ws / "ckpt"
    ck.mkdir()
    (ck / "random.pth").write_bytes(np.random.default_rng(1).bytes(5000))
    (ck / "text.pth").write_text("this is not a checkpoint\n")
    (ck / "empty.pth").write_bytes(b"")
    torch.save({"x": _Evil()}, ck / "evil.pth")
    shutil.copyfile(ck / "evil.pth", ck / "evil.pt")  # the suffix of a training checkpoint (`train --init`)
    (ws / "emptyw").mkdir()
    (ws / "textlink.csv").symlink_to(ck / "text.pth")

    # Folders and files that are not outputs of the command at hand.
    (ws / "coco" / "val2017").mkdir(parents=True)
    (ws / "coco" / "val2017" / "000000000139.jpg").write_bytes(b"the user's photo")
    (ws / "afile").write_text("a plain file")
    for name in ("adir.json", "adir.csv"):
        (ws / name).mkdir()

    # Malformed panoptic JSON (one mistake each), image id lists, categories.
    gt = json.loads((data / "annotations" / "panoptic_val2017.json").read_text())
    bad = ws / "bad"

    def variant(name: str, mutate: Any) -> None:
        doc = json.loads(json.dumps(gt))
        mutate(doc)
        _jdump(bad / f"{name}.json", doc)

    variant("no_category_id", lambda d: d["annotations"][0]["segments_info"][0].pop("category_id"))
    variant("string_segment_id", lambda d: d["annotations"][0]["segments_info"][0].update(id="7"))
    variant("null_image_id", lambda d: d["annotations"][0].update(image_id=None))
    variant("null_segments_info", lambda d: d["annotations"][0].update(segments_info=None))
    variant("bare_categories", lambda d: d.update(categories=[c["id"] for c in d["categories"]]))
    variant("duplicate_image_id", lambda d: d["annotations"].append(dict(d["annotations"][0])))
    variant("unknown_category", lambda d: d["annotations"][0]["segments_info"][0].update(category_id=4242))
    variant("annotation_number", lambda d: d["annotations"].__setitem__(0, 5))
    variant("absolute_file_name", lambda d: d["annotations"][0].update(file_name="/etc/passwd"))
    variant("iscrowd_2", lambda d: d["annotations"][0]["segments_info"][0].update(iscrowd=2))
    variant("missing_segment", lambda d: d["annotations"][0]["segments_info"].pop())  # PNG id not in the JSON
    (bad / "not_json.json").write_text("{not json")
    (bad / "binary.json").write_bytes(b"\x80\x81 garbage")
    _jdump(bad / "ids_null.json", [None])
    _jdump(bad / "ids_unknown.json", [424242])
    _jdump(bad / "cats_numbers.json", [1, 2, 3])
    _jdump(bad / "cats_no_isthing.json", [{"id": 1, "name": "x"}])

    # A 16-bit grey prediction PNG (eval-pq must say so, not "(H, W, 2)").
    import cv2

    ann0, img0 = gt["annotations"][0], gt["images"][0]
    p16 = ws / "pred16"
    p16.mkdir()
    for a in gt["annotations"]:
        shutil.copyfile(data / "annotations" / "panoptic_val2017" / a["file_name"], p16 / a["file_name"])
    cv2.imwrite(str(p16 / ann0["file_name"]),
                (np.arange(img0["height"] * img0["width"]).reshape(img0["height"], img0["width"]) * 37 % 65536)
                .astype(np.uint16))
    _jdump(ws / "pred16.json", gt)

    # A data set with an image that cannot be decoded (found by a DataLoader worker).
    shutil.copytree(data, ws / "data_badimg")
    (ws / "data_badimg" / "val2017" / "000001000003.jpg").write_bytes(np.random.default_rng(2).bytes(800))

    # One complete output of every command, under umask 027, over stale temporaries of a dead process.
    dead = _dead_pid()
    planted = [_plant(ws / "run", "results.csv", dead), _plant(ws / "pred_out", "000001000001.png", dead),
               _plant(ws / "sweep_out", "results.parquet", dead), _plant(ws / "report_out", "report.md", dead),
               _plant(ws, "pq.json", dead), _plant(ws, "prof.csv", dead),
               _plant(ws / "train_out", "checkpoint_last.pt", dead)]
    # The eval marker is written at claim time: the folder of a killed eval holds it (and only temporaries).
    mask = os.umask(UMASK)
    # One torch thread, as the cases' subprocess (cli_table.ENV): a case re-running predict must rewrite equal bytes,
    # and float sums differ with the thread count.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _main("eval", "--weights", str(ws / "w"), "--data", str(data), "--out", str(ws / "run"), "--corruptions",
              "fog", "--severities", "1", "--save-candidates", "--save-predictions", *FAST)
        _main("predict", "--weights", str(ws / "w"), "--image", str(data / "val2017" / "000001000001.jpg"), "--out",
              str(ws / "pred_out"), "--dump-raw")
        _main("sweep", "--candidates", str(ws / "run"), "--alpha", "0,1", "--out", str(ws / "sweep_out"))
        _main("report", "--results", str(ws / "run"), "--out", str(ws / "report_out"), "--no-pictures")
        _main("eval-pq", "--gt-json", str(data / "annotations" / "panoptic_val2017.json"), "--pred-json",
              str(data / "annotations" / "panoptic_val2017.json"), "--out", str(ws / "pq.json"))
        _main("profile", "--model", MODEL, "--size", "64x64", "--iters", "1", "--warmup", "0", "--no-flops",
              "--out", str(ws / "prof.csv"))
        _main(*_train(data=str(data), out=str(ws / "train_out"), iters="2"))
    finally:
        os.umask(mask)
        torch.set_num_threads(threads)

    # Damaged copies of the complete eval run.
    model_dir = Path("candidates") / MODEL
    for name in ("run_badmeta", "run_badnpz", "run_shapes", "run_badparquet", "run_badjson"):
        shutil.copytree(ws / "run", ws / name, symlinks=True)
    (ws / "run_badmeta" / model_dir / "meta.json").write_text('{"layers": 5}')
    npz = sorted((ws / "run" / model_dir / "none_0").glob("*.npz"))[0]
    (ws / "run_badnpz" / model_dir / "none_0" / npz.name).write_bytes(b"PK\x03\x04 not a zip")
    np.savez_compressed(ws / "run_shapes" / model_dir / "none_0" / npz.name, image_id=np.asarray(1000001),
                        out_size=np.asarray([64, 64]), scores_last=np.ones(2, np.float32),
                        labels_last=np.zeros(2, np.int64), masks_last=np.ones((2, 8), np.float32))
    (ws / "run_badparquet" / "results.parquet").write_bytes(b"PAR1 garbage PAR1")
    (ws / "run_badjson" / "run.json").write_text("{garbage")
    return {"planted": planted, "npz": npz.name}


# ----------------------------------------------------------------------------- the cases


def _eval(*more: str, weights: str = f"{W}/w", data: str = DATA, out: str = "{out}/e") -> list[str]:
    return ["eval", "--weights", weights, "--data", data, "--out", out, *FAST, *more]


def _predict(*more: str, weights: str = f"{W}/w", image: str = IMG, out: str = "{out}/p") -> list[str]:
    return ["predict", "--weights", weights, "--image", image, "--out", out, "--no-overlay", *more]


def _pq(gt: str = GT, pred: str = GT, *more: str, gtd: str = GTD, prd: str = GTD) -> list[str]:
    return ["eval-pq", "--gt-json", gt, "--gt-dir", gtd, "--pred-json", pred, "--pred-dir", prd, *more]


def _sweep(*more: str, run: str = RUN, out: str = "{out}/s") -> list[str]:
    return ["sweep", "--candidates", run, "--out", out, *more]


def _report(*more: str, results: str = RUN, out: str = "{out}/r") -> list[str]:
    return ["report", "--results", results, "--out", out, "--no-pictures", *more]


def _profile(*more: str) -> list[str]:
    return ["profile", "--model", MODEL, "--size", "64x64", "--iters", "1", "--warmup", "0", "--no-flops", *more]


def _train(*more: str, data: str = DATA, out: str = "{out}/t", iters: str = "1") -> list[str]:
    """`harness train` of the tiny model on the workspace's 3 validation images (its training split here)."""
    return ["train", "--config", MODEL, "--data", data, "--split", "val2017", "--out", out, "--iters", iters,
            "--no-augment", *more]


def _demo(*more: str, out: str = "{out}/d") -> list[str]:
    return ["demo", "--quick", "--out", out, *more]


def _option_cases(prefix: str, base: Any, bad: list[tuple[str, ...]]) -> list[Case]:
    """Class 10 / 7: each (option, value) refused at parse time, one line naming the option."""
    return [Case(f"{prefix}-{opt.lstrip('-')}-{val}".replace("/", "_").replace(" ", "_"), base(opt, val),
                 needles=(opt,)) for opt, val in bad]


CASES: list[Case] = [
    # 1. An output that is (or resolves to) an input.
    Case("c01-eval-out-is-data", _eval(out=DATA), needles=("--out", "also an input")),
    Case("c01-eval-out-is-weights", _eval(out=f"{W}/w"), needles=("--out", "also an input")),
    Case("c01-eval-merge-out-is-source", ["eval", "--merge", RUN, "--out", RUN], needles=("also an input",)),
    Case("c01-predict-out-is-weights", _predict(out=f"{W}/w"), needles=("also an input",)),
    Case("c01-predict-output-file-is-the-image", _predict(image=f"{W}/pred_out/000001000001.png",
                                                          out=f"{W}/pred_out"),
         needles=("000001000001.png", "also an input")),
    Case("c01-eval-pq-out-is-pred", _pq(GT, f"{W}/pred16.json", "--out", f"{W}/pred16.json", prd=f"{W}/pred16"),
         needles=("--out", "also an input")),
    Case("c01-eval-pq-out-is-gt", _pq(GT, GT, "--out", GT), needles=("--out", "also an input")),
    Case("c01-sweep-out-is-candidates", _sweep(out=RUN), needles=("--out",)),
    Case("c01-report-out-is-results", _report(out=RUN), needles=("--out", "also an input")),
    Case("c01-profile-out-is-weights", _profile("--weights", f"{W}/ckpt/text.pth", "--out", f"{W}/textlink.csv"),
         needles=("--out", "also an input")),
    # 2. A folder the command did not write (or another command's output).
    Case("c02-eval-into-foreign", _eval(out=f"{W}/coco"), needles=("did not write", "coco")),
    Case("c02-eval-into-synth-data", _eval(out=f"{W}/data_badimg"), needles=("did not write",)),
    Case("c02-eval-into-predict-output", _eval(out=f"{W}/pred_out"), needles=("harness predict",)),
    Case("c02-eval-merge-into-foreign", ["eval", "--merge", RUN, "--out", f"{W}/coco"], needles=("did not write",)),
    Case("c02-predict-into-foreign", _predict(out=f"{W}/coco"), needles=("did not write",)),
    Case("c02-predict-into-eval-run", _predict(out=RUN), needles=("harness eval",)),
    Case("c02-sweep-into-foreign", _sweep(out=f"{W}/coco"), needles=("did not write",)),
    Case("c02-sweep-into-report", _sweep(out=f"{W}/report_out"), needles=("harness report",)),
    Case("c02-report-into-foreign", _report(out=f"{W}/coco"), needles=("did not write",)),
    Case("c02-report-into-sweep", _report(out=f"{W}/sweep_out"), needles=("harness sweep",)),
    Case("c02-train-into-foreign", _train(out=f"{W}/coco"), needles=("did not write", "coco")),
    Case("c02-train-into-eval-run", _train(out=RUN), needles=("harness eval",)),
    Case("c02-eval-into-train-output", _eval(out=f"{W}/train_out"), needles=("harness train",)),
    Case("c02-demo-into-foreign", _demo(out=f"{W}/coco"), needles=("did not write", "coco")),
    Case("c02-demo-fresh-into-foreign", _demo("--fresh", out=f"{W}/coco"), needles=("did not write",)),
    Case("c02-demo-into-eval-run", _demo(out=RUN), needles=("harness eval",)),
    Case("c02-demo-into-train-output", _demo(out=f"{W}/train_out"), needles=("harness train",)),
    # 5. A run with other settings into a complete output: refused, nothing changes; failures change nothing.
    Case("c05-eval-other-settings", _eval("--corruptions", "fog", "--severities", "2", "--save-candidates",
                                          "--save-predictions", out=RUN), needles=("severities", "--overwrite")),
    Case("c05-eval-damaged-weights-into-complete-run", _eval("--corruptions", "fog", "--severities", "1",
                                                             weights=f"{W}/ckpt/random.pth", out=RUN),
         needles=("random.pth",)),
    Case("c05-predict-other-settings", _predict("--post-process", "p", out=f"{W}/pred_out"),
         needles=("post-process", "--overwrite")),
    Case("c05-predict-fails-midway-same-settings", ["predict", "--weights", f"{W}/w", "--image", IMG,
                                                    f"{W}/data_badimg/val2017/000001000003.jpg", "--out",
                                                    f"{W}/pred_out", "--dump-raw"], umask=UMASK,  # equal bytes
         needles=("000001000003.jpg",), midrun=True),
    Case("c05-sweep-other-settings", _sweep("--boundary", out=f"{W}/sweep_out"), needles=("boundary",)),
    Case("c05-train-other-lr", _train("--lr", "0.01", out=f"{W}/train_out"), needles=("(lr: 0.001", "--overwrite")),
    Case("c05-train-other-seed", _train("--seed", "3", out=f"{W}/train_out"), needles=("(seed: 0", "--overwrite")),
    Case("c05-train-other-data", _train(data=f"{W}/data_badimg", out=f"{W}/train_out"), needles=("(data:",)),
    Case("c05-train-other-init", _train("--init", f"{W}/w", out=f"{W}/train_out"), needles=("(init_sha256:",)),
    Case("c05-train-no-resume-over-run", _train("--no-resume", out=f"{W}/train_out"),
         needles=("--no-resume", "--overwrite")),
    Case("c05-train-damaged-init-into-complete-run", _train("--init", f"{W}/ckpt/random.pth", out=f"{W}/train_out"),
         needles=("--init", "random.pth")),
    Case("c05-train-plain-state-dict-as-checkpoint", _train(out=f"{W}/plain"),
         needles=("plain/checkpoint_last.pt", "not a training checkpoint")),
    Case("c05-train-foreign-checkpoint", _train(out=f"{W}/trainrun"),
         needles=("trainrun/checkpoint_last.pt", "not a training checkpoint")),
    # 7. Counts and ranges without bound: refused at parse time, before any list is built.
    Case("c07-eval-severity-range", _eval("--corruptions", "fog", "--severities", "1-1000000000"),
         needles=("--severities", "1000000000")),
    Case("c07-eval-subset-huge", _eval("--subset", "100000000000"), needles=("--subset",)),
    Case("c07-eval-subset-exp", _eval("--subset", "1e20"), needles=("--subset",)),
    Case("c07-sweep-too-many-values", _sweep("--alpha", ",".join(str(i) for i in range(100))),
         needles=("--alpha", "at most")),
    Case("c07-sweep-grid-too-large", _sweep(*[a for o in ("--alpha", "--beta") for a in
                                              (o, ",".join(str(i) for i in range(60)))], "--t-cnf",
                                            ",".join(f"0.{i:02d}" for i in range(60))),
         needles=("settings", "at most")),
    Case("c07-profile-size-huge", _profile("--size", "100000x100000"), needles=("--size",)),
    Case("c07-profile-iters-huge", _profile("--iters", "1000000000"), needles=("--iters",)),
    *_option_cases("c07-eval", lambda o, v: _eval(o, v), [
        ("--batch-size", "100000"), ("--workers", "100000"), ("--timing-images", "0"), ("--warmup", "1000000")]),
    # 8. Unusable output paths, found before the model is loaded (the weights here are random bytes).
    Case("c08-eval-out-under-file", _eval(weights=f"{W}/ckpt/random.pth", out=f"{W}/afile/e"),
         needles=("afile", "is a file"), forbid=("random.pth",)),
    Case("c08-eval-out-is-file", _eval(out=f"{W}/afile"), needles=("afile", "is a file")),
    Case("c08-predict-out-under-file", _predict(weights=f"{W}/ckpt/random.pth", out=f"{W}/afile/p"),
         needles=("afile", "is a file"), forbid=("random.pth",)),
    Case("c08-eval-pq-out-is-dir", _pq(GT, GT, "--out", f"{W}/adir.json"), needles=("adir.json", "is a folder")),
    Case("c08-eval-pq-out-under-file", _pq(GT, GT, "--out", f"{W}/afile/r.json"), needles=("is a file",)),
    Case("c08-sweep-out-under-file", _sweep(out=f"{W}/afile/s"), needles=("is a file",)),
    Case("c08-report-out-is-file", _report(out=f"{W}/afile"), needles=("is a file",)),
    Case("c08-profile-out-suffix", _profile("--weights", f"{W}/ckpt/random.pth", "--out", "{out}/p.txt"),
         needles=(".csv",), forbid=("random.pth",)),
    Case("c08-profile-out-is-dir", _profile("--out", f"{W}/adir.csv"), needles=("is a folder",)),
    Case("c08-profile-out-under-file", _profile("--out", f"{W}/afile/p.csv"), needles=("is a file",)),
    Case("c08-train-out-under-file", _train("--init", f"{W}/ckpt/random.pth", out=f"{W}/afile/t"),
         needles=("afile", "is a file"), forbid=("random.pth",)),
    Case("c08-train-out-is-file", _train(out=f"{W}/afile"), needles=("afile", "is a file")),
    Case("c08-train-out-is-data", _train(out=DATA), needles=("--out", "also an input")),
    Case("c08-train-out-is-init", _train("--init", f"{W}/w", out=f"{W}/w"), needles=("--out", "also an input")),
    Case("c08-demo-out-under-file", _demo(out=f"{W}/afile/d"), needles=("afile", "is a file")),
    Case("c08-demo-out-is-file", _demo(out=f"{W}/afile"), needles=("afile", "is a file")),
    # 9. Malformed JSON and files: one line naming the file and the entry.
    *[Case(f"c09-eval-pq-gt-{name}", _pq(f"{W}/bad/{name}.json", GT), needles=(f"{name}.json", *needles))
      for name, needles in [
          ("no_category_id", ("'category_id'",)), ("string_segment_id", ("'id'", "expected an integer")),
          ("null_image_id", ("image id null",)), ("null_segments_info", ("'segments_info' is null",)),
          ("bare_categories", ("categories[0]",)), ("duplicate_image_id", ("duplicate image id",)),
          ("annotation_number", ("annotations[0]",)), ("absolute_file_name", ("plain name",)),
          ("iscrowd_2", ("'iscrowd'",)), ("not_json", ("not valid JSON",)), ("binary", ("not a text",))]],
    *[Case(f"c09-eval-pq-pred-{name}", _pq(GT, f"{W}/bad/{name}.json"), needles=(f"{name}.json", *needles))
      for name, needles in [
          ("unknown_category", ("unknown category id 4242",)), ("null_segments_info", ("'segments_info'",)),
          ("string_segment_id", ("'id'",)), ("duplicate_image_id", ("duplicate image id",))]],
    Case("c09-eval-subset-file-nulls", _eval("--subset-file", f"{W}/bad/ids_null.json"), needles=("ids_null.json",)),
    Case("c09-eval-subset-file-unknown", _eval("--subset-file", f"{W}/bad/ids_unknown.json"),
         needles=("ids_unknown.json", "424242")),
    Case("c09-eval-resume-garbage-run-json", _eval("--corruptions", "fog", "--severities", "1", "--save-candidates",
                                                   "--save-predictions", out=f"{W}/run_badjson"),
         needles=("run.json",)),
    Case("c09-eval-merge-garbage-run-json", ["eval", "--merge", f"{W}/run_badjson", "--out", "{out}/m"],
         needles=("run.json",)),
    Case("c09-eval-merge-not-a-shard", ["eval", "--merge", RUN, "--out", "{out}/m"], needles=("not a shard",)),
    Case("c09-predict-categories-numbers", _predict("--categories", f"{W}/bad/cats_numbers.json"),
         needles=("cats_numbers.json", "categories[0]")),
    Case("c09-predict-categories-not-json", _predict("--categories", f"{W}/bad/not_json.json"),
         needles=("not_json.json",)),
    Case("c09-sweep-garbage-meta", _sweep(run=f"{W}/run_badmeta"), needles=("meta.json", "'layers'")),
    Case("c09-sweep-garbage-npz", _sweep(run=f"{W}/run_badnpz"), needles=(".npz",)),
    Case("c09-sweep-npz-shapes", _sweep(run=f"{W}/run_shapes"), needles=(".npz", "masks_last")),
    Case("c09-report-garbage-parquet", _report(results=f"{W}/run_badparquet"), needles=("results.parquet",)),
    Case("c09-report-garbage-run-json", _report(results=f"{W}/run_badjson"), needles=("run.json",)),
    # 10. Bad option values, at parse time.
    *_option_cases("c10-eval-pq", lambda o, v: _pq(GT, GT, o, v), [
        ("--dilation-ratio", "nan"), ("--dilation-ratio", "inf"), ("--dilation-ratio", "0"),
        ("--dilation-ratio", "-1"), ("--workers", "0"), ("--workers", "100000")]),
    *_option_cases("c10-eval", lambda o, v: _eval(o, v), [
        ("--threads", "-1"), ("--device", "tpu"), ("--score-workers", "-1"), ("--layers", "0"),
        ("--post-process", "x"), ("--shard", "3/3"), ("--corruptions", "fogg"), ("--subset-seed", "-1")]),
    *_option_cases("c10-predict", lambda o, v: _predict(o, v), [
        ("--threads", "0"), ("--device", "foo"), ("--num-things", "-1"), ("--mask-layer", "-5"),
        ("--layer", "0"), ("--mask-layer", "1000000")]),
    *_option_cases("c10-sweep", lambda o, v: _sweep(o, v), [
        ("--alpha", "nan"), ("--t-keep", "0"), ("--t-cnf", "2"), ("--beta", "-1"), ("--workers", "0")]),
    *_option_cases("c10-profile", lambda o, v: _profile(o, v), [
        ("--size", "10x10"), ("--iters", "0"), ("--warmup", "-1"), ("--device", "bogus"), ("--batch", "0"),
        ("--threads", "0")]),
    *_option_cases("c10-train", lambda o, v: _train(o, v), [
        ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1"), ("--lr", "0"), ("--lr", "100"), ("--iters", "0"),
        ("--iters", "100000000"), ("--seed", "-1"), ("--seed", "4294967296"), ("--device", "tpu"),
        ("--batch-size", "0"), ("--batch-size", "100000"), ("--checkpoint-every", "0"), ("--warmup", "-1"),
        ("--epochs", "nan")]),
    Case("c10-train-unknown-config", ["train", "--config", "nope", "--data", DATA, "--out", "{out}/t", "--iters",
                                      "1"], needles=("--config", "nope")),
    Case("c10-train-device-unavailable", _train("--device", "cuda:7"), needles=("--device cuda:7",)),
    *_option_cases("c10-demo", lambda o, v: _demo(o, v), [
        ("--iters", "0"), ("--iters", "10000000"), ("--seed", "-1"), ("--eval-images", "0"),
        ("--eval-images", "1e3")]),
    Case("c10-demo-eval-images-too-many", _demo("--eval-images", "99"), needles=("--eval-images",)),
    Case("c10-report-tables", _report("--tables", "99"), needles=("--tables",)),
    Case("c10-eval-device-unavailable", _eval("--device", "cuda:7"), needles=("--device cuda:7",)),
    Case("c10-profile-unknown-model", ["profile", "--model", "nope"], needles=("--model", "nope")),
    # 11. / 12. Damaged checkpoints; a folder works everywhere.
    # (The model name makes the loader try a released checkpoint: the unsafe one must be refused, never run.)
    *[Case(f"c11-{cmd}-{name}", fn(name, path), needles=needles, forbid=("unsafe-code-ran",))
      for cmd, fn in (("eval", lambda n, p: _eval(*(["--model", MODEL] if n == "evil" else []), weights=p)),
                      ("predict", lambda n, p: _predict(*(["--model", MODEL] if n == "evil" else []), weights=p)),
                      ("profile", lambda n, p: _profile("--weights", p)))
      for name, path, needles in [
          ("random", f"{W}/ckpt/random.pth", ("random.pth", "not a PyTorch checkpoint")),
          ("text", f"{W}/ckpt/text.pth", ("text.pth", "text file")),
          ("empty", f"{W}/ckpt/empty.pth", ("empty.pth", "empty")),
          ("evil", f"{W}/ckpt/evil.pth", ("evil.pth", "could run code")),
          ("plain-state-dict", f"{W}/plain", ("checkpoint_last.pt",)),
          ("empty-folder", f"{W}/emptyw", ("emptyw", "neither")),
          ("missing", f"{W}/nope", ("nope", "not found"))]
      if not (cmd == "profile" and name == "plain-state-dict")],
    *[Case(f"c11-train-init-{name}", _train("--init", path), needles=("--init", *needles),
           forbid=("unsafe-code-ran",))
      for name, path, needles in [
          ("random", f"{W}/ckpt/random.pth", ("random.pth", "not a PyTorch checkpoint")),
          ("text", f"{W}/ckpt/text.pth", ("text.pth", "text file")),
          ("empty", f"{W}/ckpt/empty.pth", ("empty.pth", "empty")),
          ("evil", f"{W}/ckpt/evil.pt", ("evil.pt", "could run code")),
          ("plain-state-dict", f"{W}/plain", ("checkpoint_last.pt",)),
          ("empty-folder", f"{W}/emptyw", ("emptyw", "neither")),
          ("missing", f"{W}/nope", ("nope", "not found"))]],
    Case("c12-eval-weights-training-folder", _eval("-q", weights=f"{W}/trainrun", out="{out}/e"), rc=0,
         one_line=False),
    Case("c12-predict-weights-training-folder", _predict("-q", weights=f"{W}/trainrun"), rc=0, one_line=False),
    # 13. One line, even when a DataLoader worker process meets the bad image.
    Case("c13-eval-bad-image-in-worker", ["eval", "--weights", f"{W}/w", "--data", f"{W}/data_badimg", "--out",
                                          "{out}/e", "--workers", "1", "--score-workers", "0", "--warmup", "0"],
         needles=("000001000003.jpg",), midrun=True),
    # 14. Misleading messages.
    Case("c14-eval-pq-16bit-gray-pred", _pq(GT, f"{W}/pred16.json", prd=f"{W}/pred16"),
         needles=("16-bit grayscale",), forbid=(", 2)", "uint16")),
    Case("c14-eval-ap-png-id-not-in-json", ["eval-ap", "--panoptic-gt-json", GT, "--pred-json",
                                            f"{W}/bad/missing_segment.json", "--pred-dir", GTD],
         needles=("in the PNG but not in the JSON",), midrun=True),  # found after the GT conversion
]


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Build the workspace, run every case in one subprocess, return ``{id: result}`` (+ the workspace)."""
    ws = tmp_path_factory.mktemp("ws2")
    info = _build_workspace(ws)
    results = run_cases(CASES, ws, tmp_path_factory.mktemp("scratch2"), tmp_path_factory.mktemp("logs2"))
    results["_ws"] = ws
    results["_info"] = info
    return results


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(table: dict[str, Any], case: Case) -> None:
    check_case(table[case.id], case)
    if case.rc == 2:  # a refused train or demo does not create its --out
        assert not (table[case.id]["out"] / "t").exists() and not (table[case.id]["out"] / "d").exists()


def _temporaries(root: Path) -> list[Path]:
    from harness.io import is_temporary

    return [p for p in root.rglob("*") if is_temporary(p.name)]


def test_outputs_of_every_command(table: dict[str, Any]) -> None:
    """Classes 6 and 15: every command swept the stale temporaries where it writes, and every file it wrote has
    the umask's permissions (0640 under 027), not the 0600 of a temporary file; class 12: --weights FOLDER."""
    ws = table["_ws"]
    assert [p for p in table["_info"]["planted"] if p.exists()] == []
    files = [p for name in ("run", "pred_out", "sweep_out", "report_out", "train_out") for p in (ws / name).rglob("*")
             if p.is_file() and not p.is_symlink()] + [ws / "pq.json", ws / "prof.csv"]
    kinds = {p.suffix for p in files}
    assert {".parquet", ".csv", ".json", ".png", ".npz", ".md", ".html", ".pt", ".safetensors"} <= kinds, kinds
    modes = {oct(p.stat().st_mode & 0o777) for p in files}
    assert modes == {oct(0o640)}, modes
    for name in ("run", "pred_out", "sweep_out", "report_out", "train_out"):
        marker = json.loads((ws / name / ".psf-harness.json").read_text())
        assert marker["status"] == "complete", name
    # A training folder's checkpoint_last.pt evaluates and predicts as our folder does (same weights).
    single = table["c12-eval-weights-training-folder"]["out"] / "e" / "pred"
    grid = ws / "run" / "predictions" / MODEL / "none_0" / "m_last"
    pngs = sorted(p.name for p in grid.glob("*.png"))
    assert pngs and [(single / n).read_bytes() for n in pngs] == [(grid / n).read_bytes() for n in pngs]
    assert (table["c12-predict-weights-training-folder"]["out"] / "p" / "000001000001.png").read_bytes() == \
        (ws / "pred_out" / "000001000001.png").read_bytes()


def test_eval_overwrite_replaces_only_its_own_files(table: dict[str, Any], tmp_path: Path) -> None:
    """`eval --overwrite` replaces a complete run of other settings: the old run's cells go, the user's file in
    the folder stays, the marker and run.json describe the new run."""
    from harness.cli import main

    ws = table["_ws"]
    run = tmp_path / "run"
    shutil.copytree(ws / "run", run, symlinks=True)
    (run / "notes.txt").write_text("the user's")
    argv = ["eval", "--weights", str(ws / "w"), "--data", str(ws / "data"), "--out", str(run), *FAST, "-q"]
    assert main(argv + ["--corruptions", "gaussian_noise", "--severities", "2"]) == 2  # without --overwrite
    assert main(argv + ["--corruptions", "gaussian_noise", "--severities", "2", "--overwrite"]) == 0
    assert sorted(p.name for p in (run / "cells").iterdir()) == ["gaussian_noise_2.json", "none_0.json"]
    assert not (run / "candidates").exists() and not (run / "predictions").exists()
    assert (run / "notes.txt").read_text() == "the user's"
    marker = json.loads((run / ".psf-harness.json").read_text())
    assert marker["status"] == "complete" and marker["settings"]["severities"] == [2]
    assert json.loads((run / "run.json").read_text())["settings"]["corruptions"] == ["gaussian_noise"]
    # The same command again is a resume: nothing to do, nothing changes.
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(argv + ["--corruptions", "gaussian_noise", "--severities", "2"]) == 0
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_predict_and_report_replace_only_their_own_files(table: dict[str, Any], tmp_path: Path) -> None:
    """`predict --overwrite` deletes the earlier run's outputs it recorded (and nothing else); `report` replaces its
    own earlier report, dropping the tables that the new one does not have."""
    from harness.cli import main

    ws = table["_ws"]
    out = tmp_path / "p"
    shutil.copytree(ws / "pred_out", out)
    (out / "mine.txt").write_text("the user's")
    img2 = ws / "data" / "val2017" / "000001000003.jpg"
    assert main(["predict", "--weights", str(ws / "w"), "--image", str(img2), "--out", str(out), "-q",
                 "--post-process", "p", "--overwrite", "--no-overlay"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".psf-harness.json", "000001000003.json", "000001000003.png",
                                                      "mine.txt"]
    rep = tmp_path / "r"
    shutil.copytree(ws / "report_out", rep)
    tables = {p.name for p in (rep / "tables").iterdir()}
    assert main(["report", "--results", str(ws / "run"), "--out", str(rep), "--no-pictures", "--tables", "11",
                 "-q"]) == 0
    left = {p.name for p in (rep / "tables").iterdir()}
    assert left and left < tables and all(n.startswith("table_11") for n in left)


# ----------------------------------------------------------------------------- SIGTERM (real processes)


def _wait_for(predicate: Any, proc: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.05)


def _terminate_and_check(proc: subprocess.Popen[str], out: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err
    lines = err.splitlines()
    assert lines[-1].startswith("ERROR") and "terminated" in lines[-1], err
    assert sum(ln.startswith("ERROR") for ln in lines) == 1, err
    assert all(ln.startswith(("INFO ", "WARNING ")) for ln in lines[:-1]), err
    assert _temporaries(out) == []


@pytest.mark.slow
def test_eval_sigterm_with_worker_processes_then_resume(table: dict[str, Any], tmp_path: Path) -> None:
    """Classes 5 and 6 for the eval grid: SIGTERM with a DataLoader worker and a scorer process -> exit 143, one
    line, no temporary file; the re-run resumes (the finished cells are kept) and completes."""
    ws = table["_ws"]
    out = tmp_path / "e"
    argv = [sys.executable, "-m", "harness", "eval", "--weights", str(ws / "w"), "--data", str(ws / "data"),
            "--out", str(out), "--corruptions", "fog,frost", "--severities", "1-3", "--save-predictions",
            "--save-candidates", "--workers", "1", "--score-workers", "1", "--warmup", "0", "--timing-images", "1"]
    proc = subprocess.Popen(argv, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "cells").is_dir() and len(list((out / "cells").glob("*.json"))) >= 1, proc)
    assert proc.poll() is None, "the run ended before the signal; make it longer"
    _terminate_and_check(proc, out)
    done = {p.name for p in (out / "cells").glob("*.json")}
    assert json.loads((out / ".psf-harness.json").read_text())["status"] == "incomplete"
    rerun = subprocess.run(argv + ["-q"], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert _temporaries(out) == []
    assert done <= {p.name for p in (out / "cells").glob("*.json")} and len(list((out / "cells").iterdir())) == 7
    assert json.loads((out / ".psf-harness.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_sweep_sigterm_with_worker_processes_then_resume(table: dict[str, Any], tmp_path: Path) -> None:
    """Class 6 for sweep: SIGTERM with 2 worker processes -> exit 143, one line, no temporary file; the re-run
    keeps the finished settings and completes the grid."""
    ws = table["_ws"]
    out = tmp_path / "s"
    grid = ["--t-cnf", ",".join(f"{0.05 * i:.2f}" for i in range(1, 19)), "--t-keep",
            ",".join(f"{0.05 * i:.2f}" for i in range(2, 21))]
    argv = [sys.executable, "-m", "harness", "sweep", "--candidates", str(ws / "run"), "--out", str(out),
            "--workers", "2", *grid]
    proc = subprocess.Popen(argv, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "results.parquet").is_file(), proc)
    assert proc.poll() is None, "the sweep ended before the signal; make it longer"
    _terminate_and_check(proc, out)
    rerun = subprocess.run(argv + ["-q"], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert _temporaries(out) == []
    import pandas as pd

    rows = pd.read_parquet(out / "results.parquet")
    assert len(rows) == 18 * 19 * 2  # settings x cells (clean, fog 1), layer last


# ----------------------------------------------------------------------------- train and demo (phase 3)


def test_train_overwrite_replaces_only_its_own_files(table: dict[str, Any], tmp_path: Path) -> None:
    """`train --overwrite` replaces a run of other settings (the user's file in the folder stays); a larger --iters
    continues the same run; the marker follows (settings, incomplete while there are steps to do, complete)."""
    from harness.cli import main

    ws = table["_ws"]
    out = tmp_path / "t"
    shutil.copytree(ws / "train_out", out)
    (out / "notes.txt").write_text("the user's")
    argv = [*_train(data=str(ws / "data"), out=str(out)), "-q"]
    assert main([*argv, "--lr", "0.002"]) == 2  # a run of other settings, without --overwrite
    assert main([*argv, "--lr", "0.002", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "the user's"
    assert not (out / "checkpoint_prev.pt").exists()  # the earlier run's files went
    assert len((out / "train_log.csv").read_text().splitlines()) == 2  # header + the new run's one step
    marker = json.loads((out / ".psf-harness.json").read_text())
    assert marker["status"] == "complete" and marker["settings"]["lr"] == 0.002
    argv[argv.index("--iters") + 1] = "2"
    assert main([*argv, "--lr", "0.002"]) == 0  # continues: one more step
    assert [r.split(",")[0] for r in (out / "train_log.csv").read_text().splitlines()[1:]] == ["1", "2"]
    marker = json.loads((out / ".psf-harness.json").read_text())
    assert marker["status"] == "complete" and marker["settings"]["iters"] == 2
    assert _temporaries(out) == []


def test_demo_stage_failure_is_one_line_and_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A stage's own mistake (here: the demo's data folder holds a user's file, so `harness synth` refuses it) is
    that command's one line, not a second "stage failed" line; the stage is recorded as failed, nothing deleted."""
    from harness.cli import main
    from harness.demo_stages import QUICK, DemoRun

    out = tmp_path / "demo"
    DemoRun(out, QUICK).save()
    (out / "data").mkdir()
    (out / "data" / "thesis.tex").write_text("x")
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ERROR") and "harness synth" in err and "thesis.tex" in err, err
    stages = json.loads((out / "demo.json").read_text())["stages"]
    assert [(s["name"], s["status"]) for s in stages] == [("synthetic data", "failed")]
    assert (out / "data" / "thesis.tex").read_text() == "x"
    # --fresh does not delete a sub-folder holding a file the demo did not write either.
    assert main(["demo", "--quick", "--out", str(out), "--fresh", "-q"]) == 2
    assert "thesis.tex" in capsys.readouterr().err and (out / "demo.json").is_file()


@pytest.mark.slow
def test_train_sigterm_then_rerun_resumes(table: dict[str, Any], tmp_path: Path) -> None:
    """SIGTERM during training -> exit 143, one line, no temporary file, the marker says incomplete; the re-run
    (a schedule one step longer than the checkpoint) resumes from the checkpoint and completes."""
    ws = table["_ws"]
    out = tmp_path / "t"
    argv = [sys.executable, "-m", "harness", *_train(data=str(ws / "data"), out=str(out), iters="1000"),
            "--checkpoint-every", "2"]
    proc = subprocess.Popen(argv, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "checkpoint_last.pt").is_file(), proc)
    assert proc.poll() is None, "the run ended before the signal"
    _terminate_and_check(proc, out)
    assert json.loads((out / ".psf-harness.json").read_text())["status"] == "incomplete"
    import torch

    step = torch.load(out / "checkpoint_last.pt", weights_only=True)["step"]
    argv[argv.index("--iters") + 1] = str(step + 1)
    rerun = subprocess.run([*argv, "-q"], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert _temporaries(out) == []
    steps = [r.split(",")[0] for r in (out / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == [str(i) for i in range(1, step + 2)]
    assert json.loads((out / ".psf-harness.json").read_text())["status"] == "complete"


def _training_children(pid: int) -> list[int]:
    """Ids of the running `harness train` processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"train" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has ended (its parent, the demo, is gone)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")
def test_demo_sigterm_during_training_leaves_no_training_process(tmp_path: Path) -> None:
    """SIGTERM to the demo while its `harness train` children run: exit 143, one line, every child ended (each
    keeps its last checkpoint, no temporary file)."""
    out = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-m", "harness", "demo", "--quick", "--out", str(out)], env=ENV,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "train_qd" / "checkpoint_last.pt").is_file(), proc)
    children = _training_children(proc.pid)
    assert proc.poll() is None and children, "the demo left its training stage before the signal"
    _terminate_and_check(proc, out)
    assert [pid for pid in children if _running(pid)] == []
    assert json.loads((out / ".psf-harness.json").read_text())["status"] == "incomplete"
    stages = json.loads((out / "demo.json").read_text())["stages"]
    assert stages[-1]["name"] == "train the tiny models" and stages[-1]["status"] == "failed"
