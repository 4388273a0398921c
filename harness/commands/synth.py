"""`harness synth`: write the embedded synthetic dataset in COCO panoptic layout."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from harness.commands._common import int_range

HELP = "generate the synthetic panoptic dataset (COCO layout)"
DESCRIPTION = """\
Generate the embedded synthetic panoptic dataset in the exact COCO panoptic layout:

  DIR/train2017/*.jpg  DIR/val2017/*.jpg
  DIR/annotations/panoptic_{train,val}2017.json  DIR/annotations/panoptic_{train,val}2017/*.png
  DIR/annotations/instances_{train,val}2017.json (things, RLE)  DIR/preview_val.png
  DIR/.psf-harness.json (marks the folder as this command's output: settings, complete or not)

10 thing classes (shapes) and 6 stuff classes (textures), crowd clumps, VOID pixels, a few
aspect ratios with long side --size. Files are byte-identical for equal --seed/--size,
whatever --workers.

DIR must be new, empty, or an earlier output of this command: a re-run with the same settings
completes or regenerates it (identical bytes); other settings are refused when the earlier run
finished (--overwrite replaces it, deleting only the files that run wrote) and replace an
interrupted one. Files synth did not write are never touched.

example: harness synth --out data/synth --train 2000 --val 200 --seed 0
"""

log = logging.getLogger(__name__)

MAX_IMAGES = 499_999  # train ids 2i+1 stay below the val offset (1,000,000): ids and 12-digit names stay unique
COMMAND = "synth"
SPLIT_KEYS = (("train2017", "train"), ("val2017", "val"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="dataset root to write (created if missing)")
    parser.add_argument("--train", type=int_range(0, MAX_IMAGES), default=200, metavar="N",
                        help=f"train2017 images, 0..{MAX_IMAGES} (default 200)")
    parser.add_argument("--val", type=int_range(0, MAX_IMAGES), default=50, metavar="M",
                        help=f"val2017 images, 0..{MAX_IMAGES} (default 50)")
    parser.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0, metavar="S",
                        help="dataset seed, 0..2^32-1 (default 0)")
    parser.add_argument("--size", type=int_range(32, 4096), default=256,
                        help="long image side in pixels, 32..4096 (default 256)")
    parser.add_argument("--workers", type=int_range(1, 256), default=1, metavar="K",
                        help="rendering processes (default 1)")
    parser.add_argument("--no-preview", action="store_true", help="skip DIR/preview_val.png")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a complete earlier synth output in --out made with other settings")


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """What decides the bytes of the data set (the marker's settings)."""
    return {"train": args.train, "val": args.val, "seed": args.seed, "size": args.size}


def _legacy_settings(root: Path) -> dict[str, Any] | None:
    """Settings of a data set written by `harness synth` before output markers existed (from its JSON files)."""
    import json

    found: dict[str, Any] = {}
    complete = True
    for split, key in SPLIT_KEYS:
        path = root / "annotations" / f"panoptic_{split}.json"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            info = doc["info"]
            if info.get("description") != "psf-harness synthetic panoptic dataset":
                return None
            found.update(seed=int(info["seed"]), size=int(info["size"]))
            found[key] = len(doc["images"])
        except FileNotFoundError:
            complete = False
        except (OSError, ValueError, KeyError, TypeError):
            return None
    if "seed" not in found:
        return None
    found.setdefault("train", 0)
    found.setdefault("val", 0)
    found["status"] = "complete" if complete else "incomplete"
    return found


def _owned_files(root: Path, settings: dict[str, Any]) -> tuple[list[Path], dict[str, set[str]]]:
    """(JSON/preview files, {split: image stems}) that a synth run with `settings` writes under `root`."""
    from harness.data.synthetic import image_id_for

    singles = [root / "preview_val.png"]
    stems: dict[str, set[str]] = {}
    for split, key in SPLIT_KEYS:
        singles += [root / "annotations" / f"panoptic_{split}.json", root / "annotations" / f"instances_{split}.json"]
        stems[split] = {f"{image_id_for(split, i):012d}" for i in range(int(settings.get(key, 0)))}
    return singles, stems


def _remove_previous(root: Path, previous: dict[str, Any], new: dict[str, Any]) -> int:
    """Before writing `new` over an output of `previous` settings: delete that run's JSON files and preview (no
    reader may pair them with new images) and its images/PNGs that `new` will not rewrite. Nothing else."""
    old_singles, old_stems = _owned_files(root, previous)
    _, new_stems = _owned_files(root, new)
    removed = 0
    for p in old_singles:
        if p.is_file():
            p.unlink()
            removed += 1
    for split, stems in old_stems.items():
        for stem in stems - new_stems[split]:
            for p in (root / split / f"{stem}.jpg", root / "annotations" / f"panoptic_{split}" / f"{stem}.png"):
                if p.is_file():
                    p.unlink()
                    removed += 1
    return removed


def run(args: argparse.Namespace) -> int:
    import time

    from harness.commands._common import check_output
    from harness.data.synthetic import generate_dataset
    from harness.io import sweep_stale_temporaries
    from harness.outputs import claim_output_dir

    out = check_output(args.out, "--out", kind="dir")
    settings = settings_of(args)
    claim = claim_output_dir(out, COMMAND, settings, overwrite=args.overwrite, overwrite_flag="--overwrite",
                             legacy=_legacy_settings)
    swept = sweep_stale_temporaries(out, recursive=True)
    if swept:
        log.info("removed %d temporary file(s) of an interrupted run", swept)
    if claim.previous is not None:
        n = _remove_previous(out, claim.previous, settings)
        log.info("replacing the earlier synth output in %s (%d of its files removed)", out, n)

    t0 = time.perf_counter()
    root = generate_dataset(out, args.train, args.val, args.seed, size=args.size, workers=args.workers,
                            preview=not args.no_preview, remove_stale=False)
    claim.complete()
    dt = time.perf_counter() - t0
    n = args.train + args.val
    log.info("%d images in %.1f s (%.0f images/s) -> %s", n, dt, n / max(dt, 1e-9), root)
    if not args.no_preview and args.val > 0:
        log.info("preview sheet: %s", root / "preview_val.png")
    return 0
