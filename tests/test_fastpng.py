"""The compiled PQ kernel (csrc/png_pq.c): exactly the numpy path, its fallbacks, and how it is found.

The numpy path is tied to panopticapi and boundary-iou-api by tests/test_pq.py and
tests/test_boundary_pq.py; here the kernel must equal it bit for bit (integer counts and float sums)
on sets built to hit every rule, every quirk and every reason the kernel hands an image back.
"""

from __future__ import annotations

import json
import re
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from harness.data.format import id2rgb
from harness.errors import DataError
from harness.metrics import fastpng, native, pq_files
from harness.metrics.pq_core import CategoryTable, PQOptions
from harness.metrics.pq_files import EvalJob, evaluate_pq_files

REPO = Path(__file__).resolve().parents[1]
CATS = [{"id": i, "name": f"c{i}", "isthing": int(i <= 4), "supercategory": "x"} for i in range(1, 9)]
BOUNDARY_ID = 9  # max category id + 1

pytestmark = pytest.mark.skipif(native.load() is None, reason=f"PQ kernel unavailable: {native.reason()}")


# ----------------------------------------------------------------------------- data


def _image(rng: np.random.Generator, h: int, w: int, quirks: bool) -> tuple:
    """Rectangles and speckles over VOID; shifted/relabelled predictions, spurious segments. With
    quirks: GT id 0 listed as a segment, ids equal to BOUNDARY_ID, GT ids missing from the JSON,
    missing JSON areas, wrong JSON areas, crowd regions (several per category)."""
    lab = np.zeros((h, w), np.int64)
    n = int(rng.integers(0, 12))
    for s in range(1, n + 1):
        y, x = rng.integers(0, h), rng.integers(0, w)
        hh, ww = rng.integers(1, max(2, h // 2) + 1), rng.integers(1, max(2, w // 2) + 1)
        lab[y : y + hh, x : x + ww] = s
    speck = rng.random((h, w)) < 0.01
    lab[speck] = rng.integers(0, n + 1, int(speck.sum()))
    small = quirks and rng.random() < 0.5
    gids = (np.arange(n + 2) + 5) if small else rng.choice(np.arange(1, 1 << 24), n + 2, replace=False)
    if small and rng.random() < 0.5 and len(gids) > BOUNDARY_ID - 5:
        gids[[1, BOUNDARY_ID - 5]] = gids[[BOUNDARY_ID - 5, 1]]  # segment 1 gets id BOUNDARY_ID
    g = np.zeros((h, w), np.uint32)
    gs: list[dict[str, Any]] = []
    cat_of: dict[int, int] = {}
    for s in range(1, n + 1):
        m = lab == s
        if not m.any():
            continue
        g[m] = gids[s]
        cat_of[s] = int(rng.integers(1, 9))
        if quirks and rng.random() < 0.1:
            continue  # in the PNG, not in the JSON: neither segment nor VOID
        seg = {"id": int(gids[s]), "category_id": cat_of[s], "iscrowd": int(rng.random() < 0.2)}
        r = rng.random()
        if not quirks or r < 0.7:
            seg["area"] = int(m.sum())
        elif r < 0.85:
            seg["area"] = max(0, int(m.sum()) + int(rng.integers(-3, 4)))  # panopticapi trusts the JSON
        gs.append(seg)  # else: no area, taken from the PNG
    if quirks and rng.random() < 0.2:
        gs.append({"id": 0, "category_id": int(rng.integers(1, 9)), "iscrowd": 0, "area": int((g == 0).sum())})
    rng.shuffle(gs)
    plab = np.roll(lab, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
    for _ in range(int(rng.integers(0, 3))):
        y, x = rng.integers(0, h), rng.integers(0, w)
        plab[y : y + int(rng.integers(1, 8)), x : x + int(rng.integers(1, 8))] = rng.integers(0, n + 2)
    pids = (rng.permutation(np.arange(n + 2)) + 5) if small else rng.choice(np.arange(1, 1 << 24), n + 2,
                                                                            replace=False)
    p = np.zeros((h, w), np.uint32)
    ps: list[dict[str, Any]] = []
    for s in range(1, n + 2):
        m = plab == s
        if m.any():
            p[m] = pids[s]
            c = cat_of.get(s, int(rng.integers(1, 9))) if rng.random() > 0.15 else int(rng.integers(1, 9))
            ps.append({"id": int(pids[s]), "category_id": c})
    rng.shuffle(ps)
    return g, gs, p, ps


def _sizes(rng: np.random.Generator) -> tuple[int, int]:
    """Ordinary sizes and the edge cases of the band: narrower/shorter than 2d + 1, one row."""
    return [(int(rng.integers(20, 70)), int(rng.integers(20, 90))), (1, int(rng.integers(5, 40))),
            (int(rng.integers(2, 9)), int(rng.integers(2, 9))), (int(rng.integers(30, 60)), 3)][
        int(rng.choice(4, p=[0.7, 0.1, 0.1, 0.1]))]


def _write(root: Path, images: list[tuple], writer: Any = None) -> EvalJob:
    (root / "gt").mkdir(parents=True, exist_ok=True)
    (root / "pred").mkdir(parents=True, exist_ok=True)
    gt_anns, pred_anns = [], []
    for i, (g, gs, p, ps) in enumerate(images):
        for ids, folder in ((g, "gt"), (p, "pred")):
            path = root / folder / f"{i}.png"
            if writer is not None and writer(i, folder, ids, path):
                continue
            Image.fromarray(id2rgb(ids)).save(path)
        gt_anns.append({"image_id": i, "file_name": f"{i}.png", "segments_info": gs})
        pred_anns.append({"image_id": i, "file_name": f"{i}.png", "segments_info": ps})
    (root / "gt.json").write_text(json.dumps({"annotations": gt_anns, "categories": CATS}))
    (root / "pred.json").write_text(json.dumps({"annotations": pred_anns}))
    return EvalJob(str(root / "gt"), str(root / "pred"), CATS, PQOptions())


def _both_paths(job: EvalJob, pairs: list) -> tuple[Any, Any]:
    """(kernel counts, numpy counts) of one chunk, as (mask, boundary) lists of arrays."""
    table = CategoryTable(CATS)
    lib = native.load()
    assert lib is not None
    km, kb, _ = pq_files._score_chunk_native(lib, job, table, pairs)
    nm, nb, _ = pq_files._score_chunk(job, pairs)

    def arrays(c: Any) -> list[np.ndarray] | None:
        return None if c is None else [np.asarray(c.tp), np.asarray(c.fp), np.asarray(c.fn), np.asarray(c.iou)]

    return (arrays(km), arrays(kb)), (arrays(nm), arrays(nb))


def _assert_identical(a: list[np.ndarray] | None, b: list[np.ndarray] | None) -> None:
    assert (a is None) == (b is None)
    if a is None or b is None:
        return
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)  # float sums too: same additions in the same order


def _pairs(root: Path) -> list:
    return pq_files.read_inputs(root / "gt.json", root / "pred.json", False)[1]


# ----------------------------------------------------------------------------- kernel == numpy path


@pytest.mark.parametrize("seed, options", [
    (1, PQOptions(boundary=True)),
    (2, PQOptions(boundary=True, dilation_ratio=0.06, all_crowd_regions=True)),
    (3, PQOptions(boundary=True, dilation_ratio=0.2, separate_boundary_label=True)),
    (4, PQOptions(boundary=True, dilation_ratio=0.001)),
])
def test_kernel_equals_numpy_path_bit_for_bit(tmp_path: Path, seed: int, options: PQOptions) -> None:
    rng = np.random.default_rng(seed)
    images = [_image(rng, *_sizes(rng), quirks=True) for _ in range(30)]
    job = _write(tmp_path, images)._replace(options=options)
    (km, kb), (nm, nb) = _both_paths(job, _pairs(tmp_path))
    _assert_identical(km, nm)
    _assert_identical(kb, nb)
    assert km[0].sum() > 0 and kb[0].sum() > 0  # not vacuous: matches happened


def test_threads_give_the_numbers_of_one_thread(tmp_path: Path) -> None:
    """Many images go back to the numpy path (BOUNDARY_ID collisions, duplicates, wrong areas) while
    two threads score chunks: its per-thread tables must not be shared."""
    rng = np.random.default_rng(12)
    _write(tmp_path, [_image(rng, 12, 14, quirks=True) for _ in range(96)])
    args = (tmp_path / "gt.json", tmp_path / "pred.json")
    one = evaluate_pq_files(*args, options=PQOptions(boundary=True), workers=1)
    for _ in range(3):
        assert evaluate_pq_files(*args, options=PQOptions(boundary=True), workers=2) == one


def test_kernel_matches_on_large_maps_and_many_segments(tmp_path: Path) -> None:
    """Long runs and rows wider than any vector register; hundreds of segments per image."""
    rng = np.random.default_rng(7)
    images = []
    for _ in range(3):
        h, w = 150, 211
        g = (cv2.resize(rng.integers(0, 300, (15, 21)).astype(np.float32), (w, h),
                        interpolation=cv2.INTER_NEAREST).astype(np.uint32) + 1) * 977
        p = np.roll(g, 3, axis=1)
        ids = np.unique(g)
        gs = [{"id": int(i), "category_id": int(i % 8) + 1, "iscrowd": 0, "area": int((g == i).sum())} for i in ids]
        ps = [{"id": int(i), "category_id": int(i % 8) + 1} for i in np.unique(p)]
        images.append((g, gs, p, ps))
    job = _write(tmp_path, images)._replace(options=PQOptions(boundary=True))
    (km, kb), (nm, nb) = _both_paths(job, _pairs(tmp_path))
    _assert_identical(km, nm)
    _assert_identical(kb, nb)


@pytest.mark.parametrize("d", [1, 2, 5, 16])
def test_band_kernel_equals_dilation_minus_erosion(d: int) -> None:
    """The O(HW) window test equals max_filter != min_filter over (2d+1)^2 windows (cv2)."""
    rng = np.random.default_rng(d)
    maps = []
    for h, w in ((37, 53), (2 * d, 40), (2 * d + 1, 2 * d + 1), (60, 2 * d), (1, 17), (45, 1)):
        codes = cv2.resize(rng.integers(0, 7, (5, 6)).astype(np.uint16), (w, h), interpolation=cv2.INTER_NEAREST)
        codes[rng.random((h, w)) < 0.02] = 11
        maps.append(codes)
    # long runs whose code changes from one row to the next far from any run start (D alone)
    stripes = np.repeat((np.arange(70) // 3 % 4)[:, None], 150, axis=1).astype(np.uint16)
    stripes[:, 75:] += 4
    maps.append(stripes)
    for codes in maps:
        h, w = codes.shape
        kernel = np.ones((2 * d + 1, 2 * d + 1), np.uint8)
        hi = cv2.dilate(codes, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=65535)
        lo = cv2.erode(codes, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=65535)
        np.testing.assert_array_equal(fastpng.band(codes, d), hi != lo, err_msg=f"{h}x{w} d={d}")


# ----------------------------------------------------------------------------- PNG variants


def _adam7(rgb: np.ndarray) -> bytes:
    """An interlaced (Adam7) 8-bit RGB PNG, filter type 0 in every pass."""
    h, w, _ = rgb.shape
    raw = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        sub = rgb[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.tobytes() for row in sub)

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _palette(ids: np.ndarray) -> Image.Image:
    im = Image.fromarray(id2rgb(ids))
    return im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def test_png_variants_the_kernel_refuses_fall_back(tmp_path: Path) -> None:
    from harness.metrics.pngio import read_id_map

    rng = np.random.default_rng(3)
    ids = rng.choice(np.array([0, 70000, 12345, 9], np.uint32), (13, 17))
    (tmp_path / "i.png").write_bytes(_adam7(id2rgb(ids)))
    _palette(ids).save(tmp_path / "p.png")
    assert fastpng.decode_ids((tmp_path / "i.png").read_bytes()) is None  # refused, not misread
    np.testing.assert_array_equal(read_id_map(tmp_path / "i.png"), ids)
    np.testing.assert_array_equal(read_id_map(tmp_path / "p.png"), ids)  # palette colours are the ids
    ok, png16 = cv2.imencode(".png", id2rgb(ids).astype(np.uint16) * 257)
    (tmp_path / "s.png").write_bytes(png16.tobytes())
    Image.fromarray((ids % 256).astype(np.uint8)).save(tmp_path / "g.png")  # greyscale
    for name in ("s.png", "g.png"):
        with pytest.raises(DataError, match=name):
            read_id_map(tmp_path / name)


def test_image_data_split_over_several_idat_chunks(tmp_path: Path) -> None:
    """PNG writers may split the zlib stream over many IDAT chunks (PIL does past 64 KiB)."""
    rng = np.random.default_rng(8)
    ids = rng.choice(np.array([0, 5, 70000, 123456], np.uint32), (40, 50))
    path = tmp_path / "a.png"
    Image.fromarray(id2rgb(ids)).save(path)
    data = path.read_bytes()
    pos, out, idat = 8, [data[:8]], b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            for k in range(0, len(idat), 7):  # many small IDAT chunks
                part = idat[k : k + 7]
                out.append(struct.pack(">I", len(part)) + b"IDAT" + part +
                           struct.pack(">I", zlib.crc32(b"IDAT" + part) & 0xFFFFFFFF))
            out.append(data[pos : pos + 12 + length])
        else:
            out.append(data[pos : pos + 12 + length])
        pos += 12 + length
    split = b"".join(out)
    assert split.count(b"IDAT") > 3
    np.testing.assert_array_equal(fastpng.decode_ids(split), ids)


def test_eval_with_refused_pngs_equals_eval_with_plain_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    images = [_image(rng, 24, 31, quirks=False) for _ in range(6)]

    def odd(i: int, folder: str, ids: np.ndarray, path: Path) -> bool:
        if i == 1 and folder == "gt":
            path.write_bytes(_adam7(id2rgb(ids)))
            return True
        if i == 3 and folder == "pred" and len(np.unique(ids)) <= 256:
            _palette(ids).save(path)
            return True
        return False

    _write(tmp_path / "plain", images)
    _write(tmp_path / "odd", images, odd)
    opts = PQOptions(boundary=True)
    plain = evaluate_pq_files(tmp_path / "plain/gt.json", tmp_path / "plain/pred.json", options=opts)
    mixed = evaluate_pq_files(tmp_path / "odd/gt.json", tmp_path / "odd/pred.json", options=opts)
    assert plain == mixed


# ----------------------------------------------------------------------------- bad input through the kernel


@pytest.mark.parametrize("case, message", [
    ("truncated", "cannot decode PNG"),
    ("not_png", "cannot decode PNG"),
    ("duplicate_id", "duplicate segment id"),  # JSON-level mistakes: the shared reader (harness.data.panoptic_json)
    ("negative_id", "'id' -4 is outside"),
    ("bad_area", "'area' is 'big'"),
])
def test_bad_input_through_the_kernel_names_the_file_or_id(tmp_path: Path, case: str, message: str) -> None:
    rng = np.random.default_rng(1)
    images = [_image(rng, 20, 20, quirks=False) for _ in range(3)]
    while not images[1][3]:
        images[1] = _image(rng, 20, 20, quirks=False)
    _write(tmp_path, images)
    png = tmp_path / "gt" / "1.png"
    if case == "truncated":
        png.write_bytes(png.read_bytes()[:-40])
    elif case == "not_png":
        png.write_bytes(b"GIF89a not a png at all")
    else:
        pred = json.loads((tmp_path / "pred.json").read_text())
        gt = json.loads((tmp_path / "gt.json").read_text())
        segs = pred["annotations"][1]["segments_info"]
        if case == "duplicate_id":
            segs.append(dict(segs[0]))
        elif case == "negative_id":
            segs.append({"id": -4, "category_id": 1})
        else:
            gt["annotations"][1]["segments_info"].append({"id": 77, "category_id": 1, "area": "big"})
        (tmp_path / "pred.json").write_text(json.dumps(pred))
        (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(DataError, match=message) as err:
        evaluate_pq_files(tmp_path / "gt.json", tmp_path / "pred.json", workers=2)
    assert re.search(r"image (id )?1\b", str(err.value))
    if case in ("truncated", "not_png"):
        assert "1.png" in str(err.value)


# ----------------------------------------------------------------------------- fallbacks and how it is found


def test_without_the_kernel_numbers_are_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(9)
    _write(tmp_path, [_image(rng, *_sizes(rng), quirks=True) for _ in range(70)])
    args = (tmp_path / "gt.json", tmp_path / "pred.json")
    opts = PQOptions(boundary=True)
    with_kernel = evaluate_pq_files(*args, options=opts, workers=2)
    monkeypatch.setattr(native, "_native", None)
    monkeypatch.setattr(native, "_resolved", True)
    monkeypatch.setattr(native, "_reason", "switched off by the test")
    assert fastpng.decode_ids(b"\x89PNG\r\n\x1a\n") is None
    without = evaluate_pq_files(*args, options=opts, workers=2)  # process pool, numpy, general decoder
    assert with_kernel == without


def test_resolve_reports_why_and_builds_at_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    lib, why = native.resolve(lib_path=tmp_path / "missing.so", cache_dir=blocked / "cache")
    assert lib is None
    assert "missing.so not built" in why and "first-use build" in why and "failed" in why
    lib, why = native.resolve(lib_path=tmp_path / "missing.so", cache_dir=tmp_path / "c", cc="/nonexistent/cc")
    assert lib is None and "/nonexistent/cc" in why
    lib, why = native.resolve(lib_path=tmp_path / "missing.so", cache_dir=tmp_path / "cache")
    assert lib is not None and "first-use build" in why  # a compiler exists on this machine
    assert (tmp_path / "cache" / f"png_pq-{native.source_hash()}.so").is_file()
    monkeypatch.setattr(native, "source_hash", lambda: "0" * 16)  # the built library is now stale
    lib, why = native.resolve(lib_path=native.LIB_PATH, cache_dir=blocked)
    assert lib is None and "stale" in why
    monkeypatch.setenv("HARNESS_PNG_DECODER", "pil")
    assert native.resolve() == (None, "switched off by HARNESS_PNG_DECODER=pil")


def _cli(paths: list[str], env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", "eval-pq", "--gt-json", paths[0], "--pred-json", paths[1],
                           "--workers", "2", "-q", *extra], capture_output=True, text=True, env=env, cwd=REPO)


def test_cli_without_compiler_home_or_build_and_with_plain_c(tmp_path: Path) -> None:
    """A read-only (here: impossible) cache, no compiler on PATH and no built library: same R.json
    through numpy. A kernel built without SIMD (the code path of non-x86 machines) and one without
    AVX2: same R.json too."""
    rng = np.random.default_rng(4)
    _write(tmp_path, [_image(rng, *_sizes(rng), quirks=True) for _ in range(40)])
    paths = [str(tmp_path / "gt.json"), str(tmp_path / "pred.json")]
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    base = dict(os.environ, PYTHONPATH=str(REPO))
    runs = {
        "kernel": {},
        "no kernel": {"HARNESS_PQ_LIB": str(tmp_path / "none.so"), "XDG_CACHE_HOME": str(blocked),
                      "PATH": str(tmp_path / "empty"), "CC": ""},
        "plain C": {"HARNESS_PQ_LIB": str(native.build(tmp_path / "plain.so", extra=["-DPQ_NO_SIMD",
                                                                                         "-DPQ_NO_AVX2"]))},
        "no AVX2": {"PQ_NO_AVX2": "1"},
    }
    results = {}
    for name, env in runs.items():
        out = tmp_path / f"{name}.json"
        proc = _cli(paths, {**base, **env}, "--boundary", "--out", str(out))
        assert proc.returncode == 0, (name, proc.stderr)
        results[name] = json.loads(out.read_text())
    for name in runs:
        assert results[name] == results["kernel"], name


def test_eval_pq_imports_neither_numpy_nor_opencv(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    _write(tmp_path, [_image(rng, 16, 16, quirks=False) for _ in range(4)])
    code = (
        "import sys\nfrom harness.cli import main\n"
        f"rc = main(['eval-pq', '--gt-json', {str(tmp_path / 'gt.json')!r}, '--pred-json', "
        f"{str(tmp_path / 'pred.json')!r}, '--boundary', '-q'])\n"
        "heavy = [m for m in ('numpy', 'cv2', 'torch', 'PIL', 'tqdm') if m in sys.modules]\n"
        "assert rc == 0 and not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr


def test_doctor_reports_the_kernel_and_why_not() -> None:
    from harness.commands.doctor import pq_kernel

    report = pq_kernel()
    assert report["available"] and "libdeflate" in report["inflate"] and report["simd"] in ("avx2", "sse2")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "harness", "doctor", "--require", "pq"], capture_output=True,
                          text=True, env=dict(env, HARNESS_PNG_DECODER="opencv"), cwd=REPO)
    assert proc.returncode == 1
    assert "switched off by HARNESS_PNG_DECODER=opencv" in proc.stdout
    assert "required backend(s) not built: pq" in proc.stderr


@pytest.mark.parametrize("size", [(128, 128), (301, 67), (64, 900)])
def test_boundary_kernel_on_single_images_with_empty_predictions(tmp_path: Path, size: tuple[int, int]) -> None:
    """Regression: the band buffers were sized without the run lists they end with (a heap overflow that
    crashed `eval-pq --boundary` on a lone image whose prediction is all void). Run in a child process so a
    crash fails this test only; the numbers must equal the numpy path's."""
    h, w = size
    gt = np.zeros((h, w), np.uint32)
    gt[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 5
    pred = np.zeros((h, w), np.uint32)
    seg = [{"id": 5, "category_id": CATS[0]["id"], "iscrowd": 0, "area": int((gt == 5).sum())}]
    _write(tmp_path, [(gt, seg, pred, [])])
    results = []
    for decoder in ("", "pil"):
        out = tmp_path / f"r{decoder}.json"
        env = {**os.environ, "HARNESS_PNG_DECODER": decoder} if decoder else dict(os.environ)
        proc = subprocess.run([sys.executable, "-m", "harness", "eval-pq", "--gt-json", str(tmp_path / "gt.json"),
                               "--gt-dir", str(tmp_path / "gt"), "--pred-json", str(tmp_path / "pred.json"),
                               "--pred-dir", str(tmp_path / "pred"), "--boundary", "--out", str(out), "-q"],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(out.read_text()))
    assert results[0] == results[1]
    assert results[0]["boundary_pq"]["All"]["pq"] == 0.0 and results[0]["pq"]["All"]["n"] == 1
