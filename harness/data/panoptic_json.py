"""Validating readers for the JSON files the harness reads: one reader per format, shared by every command.

* COCO panoptic (GT and predictions): :func:`load_panoptic` -> :class:`PanopticJSON`;
* COCO instances GT: :func:`load_instances`;
* COCO results (a list of detections): :func:`load_results`;
* a category list (``--categories``): :func:`load_categories`.

Every problem raises :class:`harness.errors.DataError` with one line that names the file and the offending entry
(``annotations[3] (image id 139), segments_info[2]: ...``): a segment without ``category_id``, ids that are strings,
floats or null, ``segments_info`` null, categories that are bare numbers, duplicate image or segment ids, unknown
category ids, an RLE whose ``size`` differs from its image or whose ``counts`` are garbage (checked before
pycocotools sees them: its C decoder trusts the counts and would write past its buffer).

Rules (COCO's own, made explicit):

* image ids are integers, or non-empty strings (ADE20K conversions); never null, floats or booleans;
* segment ids are integers in ``[1, 256^3)`` (they are PNG colours), unique per image;
* category ids are integers listed in ``categories`` (``isthing`` 0/1 for panoptic files);
* ``file_name`` is a plain relative name (no absolute path, no ``..``).

PNG-level helpers: :func:`check_png_sizes` compares every PNG's header size (no decoding) with the size of its GT
image, :func:`pair_by_image` pairs predictions with GT by image id (eval-pq's rule: every GT image needs a
prediction unless ``allow_missing``; predictions of unknown images are counted and ignored).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

from harness.errors import DataError

if TYPE_CHECKING:  # numpy is imported only where RLE counts are decoded: `eval-pq` never loads it
    import numpy as np

log = logging.getLogger(__name__)

ImageId = Union[int, str]
MAX_SEGMENT_ID = 256**3  # exclusive

__all__ = [
    "ImageId",
    "PanopticJSON",
    "check_category_ids",
    "check_file_name",
    "check_image_id",
    "check_png_sizes",
    "check_rle",
    "check_segments",
    "gt_image_sizes",
    "load_categories",
    "load_instances",
    "load_panoptic",
    "load_results",
    "pair_by_image",
    "read_json",
]


# ----------------------------------------------------------------------------- primitives


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Parse a JSON file; DataError naming `what` and the file (missing, a folder, not UTF-8, not JSON)."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {p}") from None
    except IsADirectoryError:
        raise DataError(f"{what} {p} is a folder, expected a JSON file") from None
    except OSError as exc:
        raise DataError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise DataError(f"cannot read {what} {p}: not a text (UTF-8) file") from None
    except ValueError as exc:
        raise DataError(f"cannot read {what} {p}: not valid JSON ({exc})") from None
    except RecursionError:
        raise DataError(f"cannot read {what} {p}: nested too deeply to be a COCO file") from None


def _short(obj: Any, limit: int = 60) -> str:
    text = json.dumps(obj, default=str) if not isinstance(obj, str) else repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(v: Any) -> bool:
    # numbers.Integral covers Python and numpy integers (numpy registers them); bool (and numpy's bool_, which is
    # not registered) are refused.
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def check_image_id(value: Any, where: str) -> ImageId:
    """An image id: an integer or a non-empty string."""
    if _is_int(value):
        return int(value)
    if isinstance(value, str) and value:
        return value
    raise DataError(f"{where}: image id {_short(value)} is not an integer or a non-empty string")


def _int_field(entry: Mapping[str, Any], key: str, where: str, lo: int | None = None,
               hi: int | None = None) -> int:
    if key not in entry:
        raise DataError(f"{where} lacks '{key}'")
    v = entry[key]
    if not _is_int(v):
        raise DataError(f"{where}: '{key}' is {_short(v)}, expected an integer")
    if (lo is not None and v < lo) or (hi is not None and v >= hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'})"
        raise DataError(f"{where}: '{key}' {v} is outside {bounds}")
    return int(v)


def check_file_name(entry: Mapping[str, Any], where: str) -> str:
    name = entry.get("file_name")
    if type(name) is str and name and "/" not in name and "\\" not in name and name != "..":
        return name  # a plain file name (the common case, checked without pathlib)
    if "file_name" not in entry:
        raise DataError(f"{where} lacks 'file_name'")
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: 'file_name' is {_short(name)}, expected a file name")
    parts = PurePosixPath(name.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts:
        raise DataError(f"{where}: 'file_name' {name!r} must be a plain name relative to its folder")
    return name


def _check_optional(seg: Mapping[str, Any], where: str) -> None:
    if "iscrowd" in seg and seg["iscrowd"] not in (0, 1):  # True/False compare equal to 1/0
        raise DataError(f"{where}: 'iscrowd' is {_short(seg['iscrowd'])}, expected 0 or 1")
    if "area" in seg and not (_is_number(seg["area"]) and seg["area"] >= 0):
        raise DataError(f"{where}: 'area' is {_short(seg['area'])}, expected a number >= 0")
    if "bbox" in seg:
        box = seg["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)
                and box[2] >= 0 and box[3] >= 0):
            raise DataError(f"{where}: 'bbox' is {_short(box)}, expected [x, y, width, height] numbers")
    if "score" in seg and not _is_number(seg["score"]):
        raise DataError(f"{where}: 'score' is {_short(seg['score'])}, expected a finite number")


# ----------------------------------------------------------------------------- categories


def check_categories(cats: Any, where: str, require_isthing: bool = True) -> list[dict[str, Any]]:
    """A COCO ``categories`` list: dicts with a unique integer ``id`` (and ``isthing`` 0/1 when required)."""
    if not isinstance(cats, list):
        raise DataError(f"{where}: 'categories' is {_short(cats)}, expected a list of objects")
    seen: set[int] = set()
    for i, c in enumerate(cats):
        w = f"{where}: categories[{i}]"
        if not isinstance(c, dict):
            raise DataError(f"{w} is {_short(c)}, expected an object with 'id' and 'isthing'")
        cid = _int_field(c, "id", w)
        w = f"{where}: category id {cid}"
        if cid in seen:
            raise DataError(f"{where}: duplicate category id {cid} in 'categories'")
        seen.add(cid)
        if require_isthing:
            if "isthing" not in c:
                raise DataError(f"{w} lacks 'isthing'")
            if c["isthing"] not in (0, 1):
                raise DataError(f"{w}: 'isthing' is {_short(c['isthing'])}, expected 0 or 1")
        if "name" in c and not isinstance(c["name"], str):
            raise DataError(f"{w}: 'name' is {_short(c['name'])}, expected a string")
        if "color" in c and not (isinstance(c["color"], list) and len(c["color"]) == 3
                                 and all(_is_int(v) and 0 <= v <= 255 for v in c["color"])):
            raise DataError(f"{w}: 'color' is {_short(c['color'])}, expected [r, g, b] integers in 0..255")
    return cats


def load_categories(path: str | os.PathLike[str], what: str = "categories JSON",
                    require_isthing: bool = True) -> list[dict[str, Any]]:
    """A category list from a JSON file holding a list or an object with ``categories``."""
    doc = read_json(path, what)
    cats = doc.get("categories") if isinstance(doc, dict) else doc
    if isinstance(doc, dict) and "categories" not in doc:
        raise DataError(f"{what} {path} lacks 'categories'")
    return check_categories(cats, str(path), require_isthing)


# ----------------------------------------------------------------------------- COCO panoptic


@dataclass
class PanopticJSON:
    """A validated COCO panoptic JSON (GT or predictions).

    Attributes:
        path: the file.
        what: its role, for messages ("GT JSON", "prediction JSON").
        data: the parsed document (unchanged).
        by_image: annotation per image id, in file order.
        images: ``images`` entry per image id (None when the file has no ``images``).
        categories: the category list used for checks (the file's own or the one given), or None.
    """

    path: Path
    what: str
    data: dict[str, Any]
    by_image: dict[ImageId, dict[str, Any]]
    images: dict[ImageId, dict[str, Any]] | None
    categories: list[dict[str, Any]] | None

    @property
    def annotations(self) -> list[dict[str, Any]]:
        return list(self.by_image.values())

    def image_size(self, image_id: ImageId) -> tuple[int, int] | None:
        """``(H, W)`` from the ``images`` entry, when it has both."""
        img = (self.images or {}).get(image_id)
        if img is None or "height" not in img or "width" not in img:
            return None
        return int(img["height"]), int(img["width"])


def _check_images(images: Any, where: str) -> dict[ImageId, dict[str, Any]]:
    if not isinstance(images, list):
        raise DataError(f"{where}: 'images' is {_short(images)}, expected a list of objects")
    out: dict[ImageId, dict[str, Any]] = {}
    for i, img in enumerate(images):
        w = f"{where}: images[{i}]"
        if not isinstance(img, dict):
            raise DataError(f"{w} is {_short(img)}, expected an object with 'id' and 'file_name'")
        if "id" not in img:
            raise DataError(f"{w} lacks 'id'")
        iid = check_image_id(img["id"], w)
        w = f"{where}: image id {iid!r}" if isinstance(iid, str) else f"{where}: image id {iid}"
        if iid in out:
            raise DataError(f"{where}: duplicate image id {iid!r} in 'images'")
        check_file_name(img, w)
        for key in ("height", "width"):
            if key in img:
                _int_field(img, key, w, lo=1)
        out[iid] = img
    return out


def load_panoptic(
    path: str | os.PathLike[str],
    what: str = "panoptic JSON",
    *,
    categories: Sequence[Mapping[str, Any]] | None = None,
    require_categories: bool = True,
    require_images: bool = False,
    match_images: bool = False,
    void_segment: bool = False,
) -> PanopticJSON:
    """Read and validate a COCO panoptic JSON.

    Args:
        path: the file.
        what: its role in messages (``"GT JSON"``, ``"prediction JSON"``).
        categories: check category ids against these instead of the file's own ``categories`` (a prediction
            against its GT); the file's own list, when present, is still checked for form.
        require_categories: the file must have ``categories`` (GT files; predictions may omit them).
        require_images: the file must have ``images``.
        match_images: every annotation's image is in ``images`` and every image has an annotation (a data set).
        void_segment: accept a segment with id 0 (panopticapi scores a GT segment listed with id 0 like any other:
            ``eval-pq`` keeps that quirk for exact parity); refused otherwise.

    Raises:
        DataError: naming the file and the offending entry.
    """
    p = Path(path)
    doc = read_json(p, what)
    where = f"{what} {p}"
    if not isinstance(doc, dict):
        raise DataError(f"{where}: expected a JSON object with 'annotations', got {type(doc).__name__}")
    if "annotations" not in doc:
        raise DataError(f"{where} lacks 'annotations'" + (" (is it a COCO results list or an instances file?)"
                                                          if "images" in doc else ""))
    if not isinstance(doc["annotations"], list):
        raise DataError(f"{where}: 'annotations' is {_short(doc['annotations'])}, expected a list")
    own = None
    if "categories" in doc:
        own = check_categories(doc["categories"], where)
    elif require_categories and categories is None:
        raise DataError(f"{where} lacks 'categories'")
    cats = list(categories) if categories is not None else own
    cat_ids = {int(c["id"]) for c in cats} if cats is not None else None
    images = None
    if "images" in doc:
        images = _check_images(doc["images"], where)
    elif require_images or match_images:
        raise DataError(f"{where} lacks 'images'")

    by_image: dict[ImageId, dict[str, Any]] = {}
    for i, ann in enumerate(doc["annotations"]):
        w = f"{where}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise DataError(f"{w} is {_short(ann)}, expected an object")
        if "image_id" not in ann:
            raise DataError(f"{w} lacks 'image_id'")
        iid = check_image_id(ann["image_id"], w)
        w = f"{where}: image id {iid!r}" if isinstance(iid, str) else f"{where}: image id {iid}"
        if iid in by_image:
            raise DataError(f"{where}: duplicate image id {iid!r} in 'annotations'")
        if match_images and iid not in images:  # type: ignore[operator]
            raise DataError(f"{w}: annotation for image id {iid!r} which is not in 'images'")
        check_file_name(ann, w)
        if "segments_info" not in ann:
            raise DataError(f"{w} lacks 'segments_info'")
        segs = ann["segments_info"]
        if not isinstance(segs, list):
            raise DataError(f"{w}: 'segments_info' is {_short(segs)}, expected a list")
        seen: set[int] = set()
        for j, seg in enumerate(segs):
            # Fast path for a well-formed segment (COCO train has 1.3M; eval-pq reads it on every run), inlined:
            # any doubt goes to the precise checks of _check_segment, which name the entry.
            if type(seg) is dict:
                get = seg.get
                sid, cid = get("id"), get("category_id")
                if (type(sid) is int and 0 < sid < MAX_SEGMENT_ID and type(cid) is int and sid not in seen
                        and (cat_ids is None or cid in cat_ids)):
                    v = get("iscrowd", 0)
                    a = get("area", 0)
                    b = get("bbox")
                    sc = get("score", 0)
                    if ((v == 0 or v == 1) and type(v) in _CROWD_TYPES and type(a) in _NUMBER_TYPES and a >= 0
                            and a - a == 0 and type(sc) in _NUMBER_TYPES and sc - sc == 0
                            and (b is None or (type(b) is list and len(b) == 4 and type(b[0]) in _NUMBER_TYPES
                                               and type(b[1]) in _NUMBER_TYPES and type(b[2]) in _NUMBER_TYPES
                                               and type(b[3]) in _NUMBER_TYPES and b[2] >= 0 and b[3] >= 0
                                               and (b[0] - b[0]) + (b[1] - b[1]) + (b[2] - b[2]) + (b[3] - b[3])
                                               == 0))):
                        seen.add(sid)
                        continue
            _check_segment(seg, j, w, seen, cat_ids, void_segment)
        by_image[iid] = ann
    if match_images and images is not None:
        missing = [iid for iid in images if iid not in by_image]
        if missing:
            raise DataError(f"{where}: image id {missing[0]!r} has no annotation ({len(missing)} image(s) "
                            "without one)")
    return PanopticJSON(p, what, doc, by_image, images, cats)


def check_segments(segments: Any, where: str, cat_ids: set[int] | None = None, void_segment: bool = False) -> None:
    """The precise checks of one annotation's ``segments_info`` (those of :func:`load_panoptic`, same words), for a
    reader that validated everything else itself (``eval-pq``'s fast reader).

    Args:
        segments: the annotation's ``segments_info``.
        where: ``"<what> <file>: image id <id>"``, the start of every message.
        cat_ids: the known category ids (None: not checked).
        void_segment: accept a segment id 0 (see :func:`load_panoptic`).
    """
    if not isinstance(segments, list):
        raise DataError(f"{where}: 'segments_info' is {_short(segments)}, expected a list")
    seen: set[int] = set()
    for j, seg in enumerate(segments):
        _check_segment(seg, j, where, seen, cat_ids, void_segment)


def check_category_ids(parsed: PanopticJSON, known: set[int]) -> None:
    """Every segment's ``category_id`` is in `known` (e.g. a prediction's against its GT's categories)."""
    for iid, ann in parsed.by_image.items():
        for seg in ann["segments_info"]:
            if seg["category_id"] not in known:
                raise DataError(f"{parsed.what} {parsed.path}: image id {iid!r}, segment id {seg['id']}: unknown "
                                f"category id {seg['category_id']}")


_NUMBER_TYPES = frozenset((int, float))  # `x - x == 0` below: False for nan and +-inf
_CROWD_TYPES = frozenset((int, bool))


def _check_segment(seg: Any, j: int, w: str, seen: set[int], cat_ids: set[int] | None,
                   void_segment: bool = False) -> None:
    """The precise checks of one segment (raises DataError naming it; records its id in `seen`)."""
    ws = f"{w}, segments_info[{j}]"
    if not isinstance(seg, dict):
        raise DataError(f"{ws} is {_short(seg)}, expected an object with 'id' and 'category_id'")
    if seg.get("id", None) == 0 and _is_int(seg["id"]) and not void_segment:
        raise DataError(f"{ws}: segment id 0 is reserved for VOID")
    sid = _int_field(seg, "id", ws, lo=0 if void_segment else 1, hi=MAX_SEGMENT_ID)
    ws = f"{w}, segment id {sid}"
    if sid in seen:
        raise DataError(f"{w}: duplicate segment id {sid}")
    seen.add(sid)
    cid = _int_field(seg, "category_id", ws)
    if cat_ids is not None and cid not in cat_ids:
        raise DataError(f"{ws}: unknown category id {cid}")
    _check_optional(seg, ws)


def _id_hint(image_id: ImageId, other: Mapping[ImageId, Any]) -> str:
    """' (it has the string "139")' when the other file spells the id with another type."""
    alt: Any = str(image_id) if isinstance(image_id, int) else (int(image_id) if image_id.isdigit() else None)
    if alt is not None and alt in other:
        return f" (it has {alt!r}: image ids must have the same type in both files)"
    return ""


def pair_by_image(gt: PanopticJSON, pred: PanopticJSON, allow_missing: bool = False, refuse_unmatched: bool = True
                  ) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], list[dict[str, Any]]]:
    """Pair GT and predicted annotations by image id, in GT order: ``(pairs, GT annotations without prediction)``.

    Raises DataError for a GT image without prediction unless `allow_missing`; predictions of images that are not
    in the GT are ignored with one warning (and refused when none matches -- wrong files or id types -- unless
    `refuse_unmatched` is False: then the warning says so and every GT image counts as missing).
    """
    pairs, missing = [], []
    for iid, ann in gt.by_image.items():
        pa = pred.by_image.get(iid)
        if pa is None:
            if not allow_missing:
                raise DataError(f"no prediction for image id {iid!r} in {pred.what} {pred.path}"
                                f"{_id_hint(iid, pred.by_image)} (use --allow-missing to score missing images as "
                                "having no segment)")
            missing.append(ann)
        else:
            pairs.append((ann, pa))
    extra = len(pred.by_image) - len(pairs)
    if pred.by_image and not pairs:
        first = next(iter(pred.by_image))
        if refuse_unmatched:
            raise DataError(f"none of the {len(pred.by_image)} image ids of {pred.what} {pred.path} is in {gt.what} "
                            f"{gt.path} (e.g. {first!r}{_id_hint(first, gt.by_image)})")
        log.warning("ignoring predictions for %d image(s) that are not in the %s %s: none of them is (e.g. %r%s)",
                    extra, gt.what, gt.path, first, _id_hint(first, gt.by_image))
    elif extra:
        log.warning("ignoring predictions for %d image(s) that are not in the %s %s", extra, gt.what, gt.path)
    return pairs, missing


def check_png_sizes(ann_json: PanopticJSON, png_dir: str | os.PathLike[str],
                    sizes: Mapping[ImageId, tuple[int, int]] | None, what: str = "PNG") -> dict[ImageId, tuple[int, int]]:
    """Check every annotation's PNG from its header (exists, 8-bit RGB, size equal to `sizes[image id]`).

    Returns:
        ``{image id: (H, W)}`` read from the headers.
    """
    from harness.data.images import png_header

    folder = Path(png_dir)
    if not folder.is_dir():
        raise DataError(f"{what} folder not found: {folder} (needed by {ann_json.path})")
    out: dict[ImageId, tuple[int, int]] = {}
    for iid, ann in ann_json.by_image.items():
        png = folder / ann["file_name"]
        head = png_header(png, f"{what} of image id {iid!r}")
        if not head.is_panoptic:
            raise DataError(f"{png}: a panoptic PNG must be 8-bit RGB(A), this one is {head.description} "
                            f"(image id {iid!r})")
        hw = (head.height, head.width)
        want = None if sizes is None else sizes.get(iid)
        if want is not None and hw != tuple(want):
            raise DataError(f"{png}: {what} is {hw[1]}x{hw[0]} but image id {iid!r} is {want[1]}x{want[0]} in "
                            "the GT")
        out[iid] = hw
    return out


def gt_image_sizes(gt: PanopticJSON, png_dir: str | os.PathLike[str]) -> dict[ImageId, tuple[int, int]]:
    """``{image id: (H, W)}`` of a panoptic GT: its PNG headers, checked against ``images`` height/width."""
    sizes = {iid: hw for iid in gt.by_image if (hw := gt.image_size(iid)) is not None}
    return check_png_sizes(gt, png_dir, sizes, "GT PNG")


# ----------------------------------------------------------------------------- RLE


def _rle_string_counts(s: str) -> np.ndarray | None:
    """Counts of a COCO compressed RLE string (pycocotools ``rleFrString``), or None when it is malformed."""
    import numpy as np

    c = np.frombuffer(s.encode("ascii", "replace"), np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    if c.min() < 0 or c.max() > 63:
        return None
    more = (c & 0x20) != 0
    if more[-1]:
        return None  # the last number is cut off
    ends = np.flatnonzero(~more)
    starts = np.r_[0, ends[:-1] + 1]
    if (ends - starts).max() > 11:  # more than 64 bits: garbage
        return None
    k = np.arange(c.size) - np.repeat(starts, ends - starts + 1)
    vals = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    neg = (c[ends] & 0x10) != 0
    vals = vals - (neg.astype(np.int64) << (5 * (ends - starts + 1)))
    counts = vals.copy()
    # cnts[m] = x[m] + cnts[m - 2] for m > 2: running sums over each parity, from index 1 and from index 2.
    if counts.size > 3:
        counts[1::2] = np.cumsum(vals[1::2])
        counts[2::2] = np.cumsum(vals[2::2])
    return counts


def check_rle(seg: Any, hw: tuple[int, int] | None, where: str) -> None:
    """A COCO RLE (``{"size": [h, w], "counts": str | [int]}``) whose size matches its image and whose counts are
    non-negative and cover exactly ``h * w`` pixels."""
    import numpy as np

    if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
        raise DataError(f"{where}: 'segmentation' is {_short(seg)}, expected an RLE with 'size' and 'counts'")
    size = seg["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v >= 0 for v in size)):
        raise DataError(f"{where}: RLE 'size' is {_short(size)}, expected [height, width]")
    if hw is not None and tuple(size) != tuple(hw):
        raise DataError(f"{where}: RLE size {size[0]}x{size[1]} (h x w) differs from its image, {hw[0]}x{hw[1]}")
    counts = seg["counts"]
    if isinstance(counts, str):
        arr = _rle_string_counts(counts)
        if arr is None:
            raise DataError(f"{where}: RLE 'counts' is not a valid compressed RLE string")
    elif isinstance(counts, list) and all(_is_int(v) for v in counts):
        arr = np.asarray(counts, np.int64)
    else:
        raise DataError(f"{where}: RLE 'counts' is {_short(counts)}, expected a string or a list of integers")
    if arr.size and arr.min() < 0:
        raise DataError(f"{where}: RLE 'counts' holds a negative run (garbage counts)")
    if int(arr.sum()) != size[0] * size[1]:
        raise DataError(f"{where}: RLE 'counts' cover {int(arr.sum())} pixels, not {size[0]}x{size[1]} = "
                        f"{size[0] * size[1]}")


def _check_polygons(seg: Any, where: str) -> None:
    if not (isinstance(seg, list) and seg and all(
            isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 and all(_is_number(v) for v in poly)
            for poly in seg)):
        raise DataError(f"{where}: 'segmentation' is {_short(seg)}, expected an RLE or a list of polygons "
                        "[x1, y1, x2, y2, x3, y3, ...]")


# ----------------------------------------------------------------------------- COCO instances / results


def load_instances(path: str | os.PathLike[str], what: str = "instances GT JSON") -> dict[str, Any]:
    """Read and validate a COCO instances JSON (``images`` with sizes, ``annotations``, ``categories``)."""
    p = Path(path)
    doc = read_json(p, what)
    where = f"{what} {p}"
    if not isinstance(doc, dict):
        raise DataError(f"{where}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise DataError(f"{where} lacks '{key}'")
    cats = check_categories(doc["categories"], where, require_isthing=False)
    cat_ids = {int(c["id"]) for c in cats}
    images = _check_images(doc["images"], where)
    for iid, img in images.items():
        for key in ("height", "width"):
            if key not in img:
                raise DataError(f"{where}: image id {iid!r} lacks '{key}'")
    if not isinstance(doc["annotations"], list):
        raise DataError(f"{where}: 'annotations' is {_short(doc['annotations'])}, expected a list")
    ann_ids: set[int] = set()
    for i, ann in enumerate(doc["annotations"]):
        w = f"{where}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise DataError(f"{w} is {_short(ann)}, expected an object")
        aid = _int_field(ann, "id", w)
        if aid in ann_ids:
            raise DataError(f"{where}: duplicate annotation id {aid}")
        ann_ids.add(aid)
        if "image_id" not in ann:
            raise DataError(f"{w} lacks 'image_id'")
        iid = check_image_id(ann["image_id"], w)
        if iid not in images:
            raise DataError(f"{w}: image id {iid!r} is not in 'images'")
        cid = _int_field(ann, "category_id", w)
        if cid not in cat_ids:
            raise DataError(f"{w}: unknown category id {cid}")
        _check_optional(ann, w)
        if "segmentation" in ann:
            seg = ann["segmentation"]
            if isinstance(seg, dict):
                check_rle(seg, (int(images[iid]["height"]), int(images[iid]["width"])), w)
            elif ann.get("iscrowd", 0):
                raise DataError(f"{w}: a crowd annotation needs an RLE 'segmentation'")
            else:
                _check_polygons(seg, w)
        elif "bbox" not in ann:
            raise DataError(f"{w} has neither 'segmentation' nor 'bbox'")
    return doc


def load_results(path: str | os.PathLike[str], sizes: Mapping[ImageId, tuple[int, int]], category_ids: set[int],
                 what: str = "results JSON") -> list[dict[str, Any]]:
    """Read and validate a COCO results list against its GT images (`sizes`) and categories.

    Detections of images that are not in the GT are dropped with one warning; none matching is an error.
    """
    p = Path(path)
    doc = read_json(p, what)
    where = f"{what} {p}"
    if not isinstance(doc, list):
        hint = " (a panoptic prediction JSON goes to --pred-json)" if isinstance(doc, dict) and "annotations" in doc \
            else ""
        raise DataError(f"{where}: expected a list of detections, got {type(doc).__name__}{hint}")
    kept: list[dict[str, Any]] = []
    unknown: list[ImageId] = []
    for i, r in enumerate(doc):
        w = f"{where}: entry {i}"
        if not isinstance(r, dict):
            raise DataError(f"{w} is {_short(r)}, expected an object")
        if "image_id" not in r:
            raise DataError(f"{w} lacks 'image_id'")
        iid = check_image_id(r["image_id"], w)
        w = f"{w} (image id {iid!r})"
        cid = _int_field(r, "category_id", w)
        if cid not in category_ids:
            raise DataError(f"{w}: unknown category id {cid}")
        if "score" not in r:
            raise DataError(f"{w} lacks 'score'")
        _check_optional(r, w)
        if "segmentation" in r:
            check_rle(r["segmentation"], sizes.get(iid), w)
        elif "bbox" not in r:
            raise DataError(f"{w} has neither 'segmentation' nor 'bbox'")
        if iid in sizes:
            kept.append(r)
        else:
            unknown.append(iid)
    if doc and not kept:
        raise DataError(f"none of the image ids of {where} is in the GT (e.g. {unknown[0]!r}"
                        f"{_id_hint(unknown[0], sizes)})")
    if unknown:
        log.warning("ignoring %d detection(s) of %d image(s) that are not in the GT", len(unknown), len(set(unknown)))
    return kept
