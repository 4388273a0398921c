"""On-disk COCO-C generation: subset, shards, workers, manifest, resume.

Layout written under ``OUT``::

    OUT/manifest.json                    header: seed rule, channel order, format, library versions
    OUT/manifest.csv                     one row per output (manifest.shard-<i>-of-<n>.csv per shard)
    OUT/<corruption>/<severity>/<stem>.<png|jpg>
    OUT/subset_<N>_<S>.json              with --subset: the chosen image ids and the rule
    OUT/panoptic_subset_<N>_<S>.json     with --subset and --ann: the panoptic JSON filtered to them

Every file is written atomically (temporary file, then rename), so a killed run leaves only
complete outputs; re-running the same command skips them and, because every output depends
only on (image, corruption, severity) through the seed rule, completes the set byte-identically.
Shard ``i/n`` (0-based) takes every n-th image of the sorted image list, so shards never overlap
and their union is the full run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from harness.corruptions import CHANNEL_ORDERS, SEED_RULE, corrupt, corruption_seed
from harness.errors import DataError, UserError
from harness.io import atomic_write_bytes, atomic_write_json, atomic_write_text, is_temporary

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("png", "jpg")
JPEG_QUALITY = 95
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
HEADER_NAME = "manifest.json"
MANIFEST_FIELDS = ("file", "image", "corruption", "severity", "seed", "sha256", "seconds", "written_utc")
SUBSET_RULE = "sorted image ids, permuted with numpy.random.default_rng(S).permutation, first N taken, re-sorted"
_FLUSH_SECONDS = 30.0


@dataclass
class RunConfig:
    """Everything one ``harness corrupt`` generation run needs.

    Attributes:
        images_dir: folder holding the clean images.
        out_dir: output root.
        corruptions: corruption names (Table 11 order).
        severities: severities in 1..5.
        ann: optional COCO (panoptic) JSON whose ``images`` define the image list.
        subset: optional number of annotated images to keep (needs `ann`).
        subset_seed: seed of the subset rule.
        workers: worker processes (1 = in-process).
        shard: (index, count), 0-based index.
        fmt: ``png`` (lossless, identical to on-the-fly) or ``jpg`` (quality 95, lossy).
        channel_order: ``rgb`` or ``bgr`` (see `harness.corruptions.corrupt`).
        keep_going: record failures and continue instead of stopping at the first.
    """

    images_dir: Path
    out_dir: Path
    corruptions: Sequence[str]
    severities: Sequence[int]
    ann: Path | None = None
    subset: int | None = None
    subset_seed: int = 0
    workers: int = 1
    shard: tuple[int, int] = (0, 1)
    fmt: str = "png"
    channel_order: str = "rgb"
    keep_going: bool = False


@dataclass
class RunSummary:
    """What a run did: counts of written/skipped outputs and the failures (file, message)."""

    images: int = 0
    written: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- image I/O


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB with PIL (no EXIF rotation, like panopticapi).

    The on-the-fly dataset uses the same decoder, so on-disk PNGs equal on-the-fly outputs. A 16-bit image is
    scaled to 8 bits (``>> 8``, as OpenCV and mmcv do), not clipped by PIL's ``convert`` (which turns it white).

    Raises:
        DataError: the file is missing, unreadable or truncated (message names the file).
    """
    from harness.data.images import read_image_pil

    return read_image_pil(path)  # full decode (truncated files raise); 16-bit scaled as OpenCV does, never clipped


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    """(H, W, 3) uint8 RGB -> PNG (lossless) or JPEG (quality 95) bytes."""
    import cv2

    bgr = np.ascontiguousarray(image[..., ::-1])
    if fmt == "png":
        ok, buf = cv2.imencode(".png", bgr)
    elif fmt == "jpg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    else:
        raise UserError(f"invalid format {fmt!r}; valid: {', '.join(FORMATS)}")
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} image as {fmt}")
    return buf.tobytes()


def output_relpath(corruption: str, severity: int, file_name: str, fmt: str) -> str:
    """``<corruption>/<severity>/<stem>.<fmt>``: where one output lives under the output root."""
    stem = Path(file_name).stem
    return f"{corruption}/{int(severity)}/{stem}.{fmt}"


def output_path(
    out_dir: str | os.PathLike[str], corruption: str, severity: int, file_name: str, fmt: str = "png"
) -> Path:
    """Absolute path of one output (see `output_relpath`)."""
    return Path(out_dir) / output_relpath(corruption, severity, file_name, fmt)


# ----------------------------------------------------------------------------- image list


@dataclass(frozen=True)
class ImageEntry:
    """One clean image: its COCO id (or list index without annotations) and file name."""

    image_id: int | str
    file_name: str


def load_annotations(path: Path) -> dict[str, Any]:
    """Load a COCO/COCO-panoptic JSON and check the parts the runner uses (`harness.data.panoptic_json` rules:
    image ids are integers or non-empty strings, all of one type; file names are plain relative names)."""
    from harness.data.panoptic_json import check_file_name, check_image_id, read_json

    data = read_json(path, "--ann JSON")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: missing key 'images' (a list)")
    seen: set[Any] = set()
    kinds: set[type] = set()
    for i, img in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise DataError(f"{where} lacks 'id' or 'file_name'")
        iid = check_image_id(img["id"], where)
        check_file_name(img, where)
        if iid in seen:
            raise DataError(f"{path}: duplicate image id {iid!r}")
        seen.add(iid)
        kinds.add(type(iid))
    if len(kinds) > 1:
        raise DataError(f"{path}: image ids mix integers and strings")
    if "annotations" in data and not isinstance(data["annotations"], list):
        raise DataError(f"{path}: 'annotations' is not a list")
    return data


def list_images(images_dir: Path, annotations: dict[str, Any] | None) -> list[ImageEntry]:
    """The sorted image list: annotated images by id, else every image file in `images_dir` by name.

    With annotations, an image counts when it has an entry in ``annotations`` (or every entry of
    ``images`` when the JSON has no ``annotations`` list, e.g. a test-split image list).
    """
    if annotations is not None:
        images = annotations["images"]
        if isinstance(annotations.get("annotations"), list):
            annotated = {a.get("image_id") for a in annotations["annotations"]
                         if isinstance(a, dict) and isinstance(a.get("image_id"), (int, str))}
            images = [img for img in images if img["id"] in annotated]
        entries = [ImageEntry(img["id"], str(img["file_name"])) for img in images]
        return sorted(entries, key=lambda e: e.image_id)
    from harness.io import visible_files

    # Hidden files (our temporaries, .DS_Store, ._name AppleDouble files) are never images.
    names = [p.name for p in visible_files(images_dir, IMAGE_SUFFIXES)]
    return [ImageEntry(i, n) for i, n in enumerate(names)]


def _check_unique_stems(entries: Sequence[ImageEntry], source: Path) -> None:
    """Outputs are named by file stem: two inputs with one stem (a.jpg, a.png) would collide."""
    seen: dict[str, str] = {}
    for e in entries:
        stem = Path(e.file_name).stem
        if stem in seen:
            raise DataError(f"{source}: images {seen[stem]!r} and {e.file_name!r} share the stem {stem!r}, "
                            "so their outputs would overwrite each other")
        seen[stem] = e.file_name


def select_subset(image_ids: Iterable[int | str], n: int, seed: int) -> list[int | str]:
    """Deterministic subset rule (`SUBSET_RULE`): sort, permute with default_rng(seed), take n, sort."""
    ids = sorted(int(i) if isinstance(i, (int, np.integer)) else i for i in image_ids)
    if not 0 < n <= len(ids):
        raise UserError(f"--subset {n} must be between 1 and the number of annotated images ({len(ids)})")
    perm = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[int(k)] for k in perm[:n])


def write_subset_files(out_dir: Path, annotations: dict[str, Any], ids: list[int | str], n: int,
                       seed: int) -> Path:
    """Write ``subset_<n>_<seed>.json`` (ids + rule) and the filtered ``panoptic_subset_<n>_<seed>.json``."""
    keep = set(ids)
    images = [img for img in annotations["images"] if img["id"] in keep]
    subset_path = out_dir / f"subset_{n}_{seed}.json"
    atomic_write_json(
        subset_path,
        {"rule": SUBSET_RULE, "n": n, "seed": seed, "image_ids": ids,
         "file_names": [img["file_name"] for img in sorted(images, key=lambda i: i["id"])]},
        indent=1,
    )
    filtered = {k: v for k, v in annotations.items() if k not in ("images", "annotations")}
    filtered["images"] = images
    if isinstance(annotations.get("annotations"), list):
        filtered["annotations"] = [a for a in annotations["annotations"] if a.get("image_id") in keep]
    atomic_write_json(out_dir / f"panoptic_subset_{n}_{seed}.json", filtered)
    return subset_path


def parse_shard(spec: str) -> tuple[int, int]:
    """Parse ``i/n`` (0 <= i < n), e.g. ``$SLURM_ARRAY_TASK_ID/8``."""
    try:
        i_str, n_str = spec.split("/")
        i, n = int(i_str), int(n_str)
    except ValueError:
        raise UserError(f"invalid --shard {spec!r}; expected i/n with 0 <= i < n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"invalid --shard {spec!r}; expected i/n with 0 <= i < n, e.g. 0/4")
    return i, n


# ----------------------------------------------------------------------------- header / manifest


def library_versions() -> dict[str, str]:
    """Versions the outputs depend on (identity with the reference holds for equal versions)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for dist in ("imagecorruptions", "numpy", "scipy", "scikit-image", "opencv-python-headless", "pillow"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "missing"
    return out


def make_header(config: RunConfig) -> dict[str, Any]:
    """The manifest header: what decides the bytes of every output in this folder."""
    return {
        "tool": "psf-harness corrupt",
        "seed_rule": SEED_RULE,
        "channel_order": config.channel_order,
        "format": config.fmt,
        "versions": library_versions(),
    }


def check_or_write_header(out_dir: Path, header: dict[str, Any]) -> None:
    """Refuse to mix outputs of a different seed rule, channel order or format in one folder."""
    path = out_dir / HEADER_NAME
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable manifest header ({exc}); use another --out") from None
        for key in ("seed_rule", "channel_order", "format"):
            if old.get(key) != header[key]:
                raise UserError(
                    f"{out_dir} holds outputs made with {key}={old.get(key)!r}, this run uses "
                    f"{key}={header[key]!r}; refusing to mix them (use another --out)"
                )
        if old.get("versions") != header["versions"]:
            log.warning("%s was started with library versions %s, now %s: outputs may differ by one grey level",
                        path, old.get("versions"), header["versions"])
        return
    if out_dir.exists():
        from harness.corruptions import ALL_CORRUPTIONS

        foreign = [c for c in ALL_CORRUPTIONS if (out_dir / c).is_dir()]
        if foreign:
            raise UserError(f"{out_dir} already holds corruption folders ({', '.join(foreign)}) but no {HEADER_NAME}; "
                            "refusing to mix with outputs of unknown seed rule/channel order (use another --out)")
    atomic_write_json(path, header, indent=1)


def claim_output(config: RunConfig) -> None:
    """Claim the output folder (``harness.outputs``): only this command's outputs of the same images, seed rule,
    channel order and format may share it. Every output file is complete on its own, so there is no
    "complete" state: other settings are always refused (never mixed). Folders written before markers existed
    are recognised by their ``manifest.json`` header."""
    from harness.outputs import claim_output_dir

    settings = {"seed_rule": SEED_RULE, "channel_order": config.channel_order, "format": config.fmt,
                "images": str(Path(config.images_dir).resolve())}

    def legacy(root: Path) -> dict[str, Any] | None:
        try:
            old = json.loads((root / HEADER_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(old, dict) or old.get("tool") != "psf-harness corrupt":
            return None
        # The image folder was not recorded then: adopt this run's.
        return {"seed_rule": old.get("seed_rule"), "channel_order": old.get("channel_order"),
                "format": old.get("format"), "images": settings["images"]}

    claim_output_dir(config.out_dir, "corrupt", settings, track_status=False, legacy=legacy)


class _RootFiles(set):
    """This shard's files at the output root, plus the subset files (identical whoever writes them)."""

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or (isinstance(name, str) and name.endswith(".json")
                                               and (name.startswith("subset_") or name.startswith("panoptic_subset_")))


def _sweep_temporaries(out_dir: Path, config: RunConfig, pairs: Sequence[tuple[str, int]],
                       entries: Sequence[ImageEntry]) -> None:
    """Remove temporaries of dead writers among this shard's own files (other shards may run elsewhere)."""
    from harness.io import sweep_stale_temporaries

    names = {f"{Path(e.file_name).stem}.{config.fmt}" for e in entries}
    removed = 0
    for corruption, severity in pairs:
        removed += sweep_stale_temporaries(out_dir / corruption / str(severity), targets=names)
    own = _RootFiles({manifest_path(out_dir, config.shard).name, HEADER_NAME, ".psf-harness.json"})
    removed += sweep_stale_temporaries(out_dir, targets=own)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted run", removed)


def manifest_path(out_dir: Path, shard: tuple[int, int]) -> Path:
    """``manifest.csv`` for an unsharded run, ``manifest.shard-<i>-of-<n>.csv`` per shard."""
    i, n = shard
    return out_dir / ("manifest.csv" if n == 1 else f"manifest.shard-{i}-of-{n}.csv")


def read_manifest(path: Path) -> dict[str, dict[str, str]]:
    """Rows of an existing manifest keyed by relative output path (missing file -> empty)."""
    if not path.exists():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is not None and "file" not in reader.fieldnames:
                raise DataError(f"{path}: not a manifest written by harness corrupt (no 'file' column); "
                                "move it aside or use another --out")
            return {row["file"]: row for row in reader if row.get("file") and row.get("sha256")}
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc}); move it aside or use another --out") from None


def write_manifest(path: Path, rows: dict[str, dict[str, str]]) -> None:
    """Rewrite the manifest atomically, rows sorted by output path."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    for key in sorted(rows):
        writer.writerow({k: rows[key].get(k, "") for k in MANIFEST_FIELDS})
    atomic_write_text(path, buf.getvalue())


def _manifest_row(file_name: str, corruption: str, severity: int, fmt: str, sha256: str, seconds: str,
                  written: float) -> dict[str, str]:
    """One manifest row; `seconds` is empty for outputs recovered after a kill (time unknown)."""
    return {
        "file": output_relpath(corruption, severity, file_name, fmt), "image": file_name,
        "corruption": corruption, "severity": str(severity),
        "seed": str(corruption_seed(file_name, corruption, severity)),
        "sha256": sha256, "seconds": seconds, "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(written)),
    }


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _remove_stale_temporaries(out_dir: Path, pairs: Sequence[tuple[str, int]], stems: set[str]) -> None:
    """Delete temporary files a killed run of *this shard* left behind (never another shard's)."""
    for corruption, severity in pairs:
        folder = out_dir / corruption / str(severity)
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            name = entry.name
            if is_temporary(name):  # today's names carry the writer's pid: see sweep_stale_temporaries
                continue
            if name.startswith(".") and ".tmp" in name and name[1:].split(".", 1)[0] in stems:
                Path(entry.path).unlink(missing_ok=True)  # written by an older version


# ----------------------------------------------------------------------------- work


@dataclass(frozen=True)
class ImageJob:
    """Work for one image: the (corruption, severity) outputs it still lacks."""

    path: str
    file_name: str
    tasks: tuple[tuple[str, int], ...]
    out_dir: str
    fmt: str
    channel_order: str


# (manifest rows written, failures as (image path, message)) of one image.
JobResult = tuple[list[dict[str, str]], list[tuple[str, str]]]


def process_image(job: ImageJob) -> JobResult:
    """Read one image and write its pending outputs; returns (manifest rows, failures).

    Runs in worker processes, so it never raises for bad data: failures are returned.
    """
    rows: list[dict[str, str]] = []
    failures: list[tuple[str, str]] = []
    try:
        image = read_image(job.path)
    except DataError as exc:
        return rows, [(job.path, str(exc))]
    for corruption, severity in job.tasks:
        start = time.perf_counter()
        rel = output_relpath(corruption, severity, job.file_name, job.fmt)
        try:
            seed = corruption_seed(job.file_name, corruption, severity)
            out = corrupt(image, corruption, severity, seed, channel_order=job.channel_order)
            data = encode_image(out, job.fmt)
            atomic_write_bytes(Path(job.out_dir) / rel, data)
        except Exception as exc:  # one bad output must not lose the others
            message = f"{job.path}: {corruption} severity {severity} failed ({type(exc).__name__}: {exc})"
            failures.append((job.path, message))
            continue
        rows.append(_manifest_row(job.file_name, corruption, severity, job.fmt, hashlib.sha256(data).hexdigest(),
                                  f"{time.perf_counter() - start:.4f}", time.time()))
    return rows, failures


def _worker_init() -> None:
    """Load the upstream copy and the compiled loop once per worker process."""
    from harness.io import init_worker_signals

    def load() -> None:
        import cv2

        from harness.corruptions.compat import upstream
        from harness.corruptions.fast import warm_up

        cv2.setNumThreads(1)  # one process per core already
        upstream()
        warm_up()  # numba compilation: killed outright by SIGTERM here (see init_worker_signals)

    init_worker_signals(load)  # then SIGTERM / Ctrl-C: exit quietly, the temporary file being written removed


def run(config: RunConfig) -> RunSummary:
    """Generate the corrupted images described by `config` (see module docstring).

    Raises:
        UserError: bad arguments or an output folder made with another seed rule/channel order.
        DataError: an unreadable image (only without `keep_going`; with it, failures are returned).
    """
    from tqdm import tqdm

    from harness.logging_utils import progress_disabled

    t0 = time.perf_counter()
    if config.fmt not in FORMATS:
        raise UserError(f"invalid format {config.fmt!r}; valid: {', '.join(FORMATS)}")
    if config.channel_order not in CHANNEL_ORDERS:
        raise UserError(f"invalid channel order {config.channel_order!r}; valid: {', '.join(CHANNEL_ORDERS)}")
    if config.subset is not None and config.ann is None:
        raise UserError("--subset selects among annotated images: pass --ann panoptic.json")
    out_dir = Path(config.out_dir)
    annotations = load_annotations(config.ann) if config.ann is not None else None
    entries = list_images(Path(config.images_dir), annotations)
    if not entries:
        raise UserError(f"no images found in {config.images_dir}" + (f" listed by {config.ann}" if config.ann else
                        f" (looked for {', '.join(IMAGE_SUFFIXES)})"))
    _check_unique_stems(entries, config.ann or Path(config.images_dir))
    claim_output(config)
    check_or_write_header(out_dir, make_header(config))
    if config.subset is not None and annotations is not None:
        keep = set(select_subset((e.image_id for e in entries), config.subset, config.subset_seed))
        entries = [e for e in entries if e.image_id in keep]
        write_subset_files(out_dir, annotations, sorted(keep), config.subset, config.subset_seed)
    i, n = config.shard
    entries = entries[i::n]
    pairs = [(c, s) for c in config.corruptions for s in config.severities]
    _sweep_temporaries(out_dir, config, pairs, entries)
    _remove_stale_temporaries(out_dir, pairs, {Path(e.file_name).stem for e in entries})

    mpath = manifest_path(out_dir, config.shard)
    rows = read_manifest(mpath)
    summary = RunSummary(images=len(entries))
    jobs: list[ImageJob] = []
    for e in entries:
        pending = []
        for c, s in pairs:
            rel = output_relpath(c, s, e.file_name, config.fmt)
            target = out_dir / rel
            if target.exists():
                summary.skipped += 1
                if rel not in rows:  # finished by a killed run after its last manifest flush
                    rows[rel] = _manifest_row(e.file_name, c, s, config.fmt, sha256_file(target), "",
                                              target.stat().st_mtime)
            else:
                pending.append((c, s))
        if pending:
            jobs.append(ImageJob(str(Path(config.images_dir) / e.file_name), e.file_name, tuple(pending),
                                 str(out_dir), config.fmt, config.channel_order))
    log.info("%d images (shard %d/%d), %d outputs to write, %d already present",
             len(entries), i, n, sum(len(j.tasks) for j in jobs), summary.skipped)

    last_flush = time.monotonic()
    bar = tqdm(total=len(jobs), unit="img", desc="corrupt", disable=progress_disabled())
    pool = None
    try:
        if config.workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            # spawn: workers must not inherit OpenCV/OpenMP thread pools from the parent.
            pool = mp.get_context("spawn").Pool(min(config.workers, len(jobs)), initializer=_worker_init)
            results: Iterable[JobResult] = pool.imap_unordered(process_image, jobs)
        else:
            results = map(process_image, jobs)
        for new_rows, failures in results:
            for row in new_rows:
                rows[row["file"]] = row
            summary.written += len(new_rows)
            bar.update(1)
            if failures:
                summary.failures.extend(failures)
                if not config.keep_going:
                    raise DataError(failures[0][1] + " (use --keep-going to continue past bad images)")
                for _, msg in failures:
                    log.error("%s", msg)
            if time.monotonic() - last_flush > _FLUSH_SECONDS:
                write_manifest(mpath, rows)
                last_flush = time.monotonic()
    finally:
        bar.close()
        if pool is not None:
            if sys.exc_info()[0] is None:  # finished: the workers end when the queue says so
                pool.close()
                pool.join()
            else:  # an error, Ctrl-C or SIGTERM: stop them now (SIGTERM, then SIGKILL): never hangs
                from harness.io import stop_process_pool

                stop_process_pool(pool)
        write_manifest(mpath, rows)
    summary.seconds = time.perf_counter() - t0
    return summary
