"""Reader for data sets in the COCO panoptic layout (COCO, ADE20K-panoptic, the synthetic set).

Layout (``split`` is e.g. ``val2017``)::

    <root>/<split>/*.jpg                          images
    <root>/annotations/panoptic_<split>.json      {images, annotations, categories}
    <root>/annotations/panoptic_<split>/*.png     segment ids: R + 256 G + 256^2 B, 0 = VOID

Validation is split by cost:

- JSON level, always, at construction (`load_panoptic_json`): required keys, duplicate image
  ids, annotations without an image (and the reverse), duplicate or zero segment ids, unknown
  category ids. Plus, with ``validate=True``, that every image and PNG file exists (two
  directory listings, cheap even for COCO train).
- Pixel level, per item when ``validate=True`` (`__getitem__`) or for the whole set with a
  progress bar (`validate_all`): PNG size equals image size, every JSON segment id occurs in
  the PNG, every non-zero PNG id is listed in the JSON.

Every failure raises `DataError` naming the file and the image / segment / category id.

Images are decoded like the official mmcv loader (OpenCV, EXIF orientation ignored) and
always returned as (H, W, 3) uint8 RGB: grayscale is replicated, alpha dropped, CMYK and
palette images converted. PIL is the fallback for files OpenCV cannot read.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np

from harness.data.format import VOID, CategoryMap
from harness.errors import DataError

log = logging.getLogger(__name__)

CATEGORIES_RESOURCE = "coco_panoptic_categories.json"

# COCO image ids are ints; some converters (Mask2Former's ADE20K script) write strings.
ImageId = Union[int, str]


# ----------------------------------------------------------------------------- categories


@lru_cache(maxsize=1)
def _coco_categories_text() -> str:
    return resources.files("harness.data").joinpath(CATEGORIES_RESOURCE).read_text(encoding="utf-8")


def coco_categories() -> list[dict[str, Any]]:
    """The 133 COCO panoptic categories (80 things, 53 stuff), as in panopticapi's JSON.

    Returns:
        A fresh list of dicts with keys ``id, name, supercategory, isthing, color``, by id.
    """
    return json.loads(_coco_categories_text())


def coco_category_map() -> CategoryMap:
    """`CategoryMap` of the COCO panoptic categories: things 0..79, stuff 80..132."""
    return CategoryMap.from_categories(coco_categories())


def load_categories(source: str | os.PathLike[str] | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A category list from a JSON file (a list, or a dict with ``categories``) or a list.

    Raises:
        DataError: unreadable file, or entries that are not objects with an integer ``id`` and ``isthing`` 0/1.
    """
    from harness.data.panoptic_json import check_categories, load_categories as load_categories_file

    if isinstance(source, (str, os.PathLike)):
        return load_categories_file(source, "categories JSON")
    return check_categories(list(source), "the category list")


# ----------------------------------------------------------------------------- samples


@dataclass
class Segment:
    """One segment of a panoptic annotation.

    Attributes:
        id: segment id in the PNG (R + 256 G + 256^2 B), never 0.
        category_id: data set category id (COCO: 1..200).
        label: contiguous class index (things first, then stuff).
        iscrowd: crowd region (ignored by PQ, a plain negative in training).
        area: pixel count (from the JSON; computed from the PNG when the JSON has none).
        bbox: COCO ``(x, y, w, h)`` in pixels.
        isthing: thing (countable) or stuff category.
        id_map: the sample's (H, W) id map, set by the reader so `mask` works.
    """

    id: int
    category_id: int
    label: int
    iscrowd: bool
    area: int
    bbox: tuple[float, float, float, float]
    isthing: bool
    id_map: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool mask of this segment."""
        if self.id_map is None:
            raise ValueError(f"segment {self.id} is not bound to an id map; use mask_in(id_map)")
        return self.id_map == self.id

    def mask_in(self, id_map: np.ndarray) -> np.ndarray:
        """(H, W) bool mask of this segment in a given (H, W) id map."""
        return np.asarray(id_map) == self.id


@dataclass
class PanopticSample:
    """One image with its panoptic annotation.

    Attributes:
        image_id: image id from the JSON (an int for COCO, a str for some ADE20K conversions).
        file_name: image file name (e.g. ``000000000139.jpg``).
        image: (H, W, 3) uint8 RGB.
        id_map: (H, W) uint32 segment ids, 0 = VOID.
        segments: segments in JSON order.
    """

    image_id: ImageId
    file_name: str
    image: np.ndarray
    id_map: np.ndarray
    segments: list[Segment]

    @property
    def height(self) -> int:
        return int(self.id_map.shape[0])

    @property
    def width(self) -> int:
        return int(self.id_map.shape[1])


# ----------------------------------------------------------------------------- decoding


def read_image_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB, ignoring EXIF orientation (as COCO loaders do).

    OpenCV decodes (``IMREAD_COLOR``: 16-bit images are scaled to 8 bits, never clipped); what its C libraries
    print (a truncated JPEG) becomes one warning naming the file (`harness.data.images`). PIL is the fallback.

    Raises:
        DataError: missing or undecodable file.
    """
    import cv2

    from harness.data.images import native_messages, read_image_pil

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}" if not path.exists() else f"image {path} is not a file")
    # IMREAD_COLOR turns gray / alpha / CMYK into 3-channel 8-bit BGR. The in-place cvtColor is
    # faster than a flipped copy (measured: ~2.5 vs ~4.5 ms for a 640x480 JPEG on 2 cores).
    with native_messages() as msgs:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is not None:
        if msgs:
            log.warning("%s: decoded with a warning from the image library: %s", path, msgs[0])
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr)
    try:
        return read_image_pil(path)
    except DataError as exc:
        raise DataError(f"{exc}" + (f" (decoder: {msgs[0]})" if msgs else "")) from None


def read_image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(H, W) of an image from its header only (no full decode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from None
    return h, w


def read_id_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a panoptic PNG to (H, W) uint32 segment ids with the fastest decoder available.

    One implementation serves the data layer, the metrics and the overlays
    (`harness.metrics.pngio.read_id_map`: libdeflate + C kernel, else pyspng, OpenCV, PIL).

    Raises:
        DataError: missing, undecodable, not 8-bit RGB(A).
    """
    from harness.data.images import png_header
    from harness.metrics.pngio import read_id_map

    try:
        return read_id_map(path)
    except DataError as exc:
        # Say what the file is (the decoders report e.g. a 16-bit grey PNG as "shape (H, W, 2) uint16").
        try:
            head = png_header(path, "panoptic PNG")
        except DataError as why:
            raise why from None
        if not head.is_panoptic:
            raise DataError(f"{path}: a panoptic PNG must be 8-bit RGB(A), this one is {head.description} "
                            f"({head.width}x{head.height})") from None
        raise exc from None


def segment_stats(id_map: np.ndarray) -> dict[int, tuple[int, tuple[float, float, float, float]]]:
    """Area and COCO bbox of every non-VOID id in an id map.

    Args:
        id_map: (H, W) integer segment ids.

    Returns:
        ``{segment_id: (area, (x, y, w, h))}``; the box spans the covered pixels (w = x1 - x0 + 1),
        as panopticapi's converters compute it.
    """
    ids = np.asarray(id_map)
    if ids.ndim != 2:
        raise ValueError(f"segment_stats expects an (H, W) id map, got shape {ids.shape}")
    flat = ids.ravel()
    if flat.size == 0:
        return {}
    # One stable sort groups the pixels of each id; reduceat then gives per-id extents.
    order = np.argsort(flat, kind="stable")
    sorted_ids = flat[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    counts = np.diff(np.r_[starts, flat.size])
    ys, xs = np.divmod(order, ids.shape[1])
    x0, x1 = np.minimum.reduceat(xs, starts), np.maximum.reduceat(xs, starts)
    y0, y1 = np.minimum.reduceat(ys, starts), np.maximum.reduceat(ys, starts)
    out = {}
    for k, sid in enumerate(sorted_ids[starts].tolist()):
        if sid == VOID:
            continue
        box = (float(x0[k]), float(y0[k]), float(x1[k] - x0[k] + 1), float(y1[k] - y0[k] + 1))
        out[int(sid)] = (int(counts[k]), box)
    return out


# ----------------------------------------------------------------------------- JSON validation


def load_panoptic_json(
    path: str | os.PathLike[str],
    categories: str | os.PathLike[str] | Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Load and validate a COCO panoptic JSON (JSON-level checks only, no pixels).

    Args:
        path: the ``panoptic_<split>.json`` file.
        categories: optional category list (or JSON file) used instead of the file's own
            ``categories`` (e.g. when a converted data set ships them separately). It replaces
            ``categories`` in the returned dict.

    Returns:
        The parsed dict (``images``, ``annotations``, ``categories``), validated.

    Raises:
        DataError: naming the file and the image / segment / category id at fault.
    """
    from harness.data.panoptic_json import load_panoptic

    cats = load_categories(categories) if categories is not None else None
    parsed = load_panoptic(path, "panoptic JSON", categories=cats, require_images=True, match_images=True)
    data = parsed.data
    if cats is not None:
        data["categories"] = cats
    try:
        CategoryMap.from_categories(data["categories"])
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None
    return data


# ----------------------------------------------------------------------------- data set


def _check_complete(root: Path) -> None:
    """Refuse a data set whose writer (``harness synth``) marked it incomplete: an interrupted run."""
    from harness.outputs import read_marker

    marker = read_marker(root)
    if marker is not None and marker.get("status") == "incomplete":
        raise DataError(f"{root} is incomplete: the 'harness {marker['command']}' run writing it did not finish "
                        "(re-run it with the same settings to complete it)")


class PanopticDataset:
    """A COCO-panoptic-format data set: ``dataset[i]`` -> `PanopticSample`.

    Args:
        root: data set root (see module docstring for the layout).
        split: split name, e.g. ``val2017``; picks ``<root>/<split>`` and ``panoptic_<split>``.
        validate: check at construction that every image / PNG file exists, and per item that
            the PNG matches the image size and the JSON segment list.
        image_dir: override for the image folder (default ``<root>/<split>``).
        json_path: override for the JSON (default ``<root>/annotations/panoptic_<split>.json``).
        png_dir: override for the PNG folder (default: the JSON path without ``.json``).
        categories: a category list or JSON file to use instead of the JSON's own.
        allow_missing_segments: drop (with a debug log) JSON segments that have no pixel in the
            PNG instead of raising. Needed for ADE20K converted with Mask2Former's script, which
            pastes things over stuff and can leave a stuff segment fully covered; panopticapi
            tolerates such GT segments too (it only rejects them in predictions).

    Attributes:
        categories: `CategoryMap` of the data set's categories.
        image_ids: image ids in the order of the JSON ``annotations``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None,
        split: str = "val2017",
        validate: bool = True,
        *,
        image_dir: str | os.PathLike[str] | None = None,
        json_path: str | os.PathLike[str] | None = None,
        png_dir: str | os.PathLike[str] | None = None,
        categories: str | os.PathLike[str] | Sequence[dict[str, Any]] | None = None,
        allow_missing_segments: bool = False,
    ) -> None:
        if root is not None and not Path(root).is_dir():
            raise DataError(f"data set root is not a folder: {root}")
        if root is not None:
            _check_complete(Path(root))
        if json_path is None or image_dir is None:
            if root is None:
                raise DataError("PanopticDataset needs a root, or both image_dir and json_path")
            json_path = json_path if json_path is not None else Path(root) / "annotations" / f"panoptic_{split}.json"
            image_dir = image_dir if image_dir is not None else Path(root) / split
        self.split = split
        self.validate = validate
        self.allow_missing_segments = allow_missing_segments
        self.json_path = Path(json_path)
        self.image_dir = Path(image_dir)
        self.png_dir = Path(png_dir) if png_dir is not None else self.json_path.with_suffix("")

        data = load_panoptic_json(self.json_path, categories)
        self.raw_categories: list[dict[str, Any]] = data["categories"]
        self.categories: CategoryMap = CategoryMap.from_categories(self.raw_categories)
        self._images = {img["id"]: img for img in data["images"]}
        self._annotations = {ann["image_id"]: ann for ann in data["annotations"]}
        self.image_ids: list[ImageId] = [ann["image_id"] for ann in data["annotations"]]
        if validate:
            self._check_files_exist()

    # -- checks ---------------------------------------------------------------------------

    def _check_files_exist(self) -> None:
        for folder, what in ((self.image_dir, "image folder"), (self.png_dir, "panoptic PNG folder")):
            if not folder.is_dir():
                raise DataError(f"{what} not found: {folder} (needed by {self.json_path})")
        image_files = set(os.listdir(self.image_dir))
        png_files = set(os.listdir(self.png_dir))
        for iid in self.image_ids:
            name = self._images[iid]["file_name"]
            if name not in image_files and not (self.image_dir / name).is_file():
                raise DataError(f"image file not found: {self.image_dir / name} (image id {iid}, {self.json_path})")
            png = self._annotations[iid]["file_name"]
            if png not in png_files and not (self.png_dir / png).is_file():
                raise DataError(f"panoptic PNG not found: {self.png_dir / png} (image id {iid}, {self.json_path})")

    def _check_pixels(self, image_id: ImageId, id_map: np.ndarray, image_hw: tuple[int, int]) -> set[int]:
        """PNG size and segment ids against the image and the JSON (raises DataError).

        Returns:
            The non-VOID ids present in the PNG.
        """
        ann = self._annotations[image_id]
        png = self.png_dir / ann["file_name"]
        if tuple(id_map.shape) != tuple(image_hw):
            image = self.image_dir / self._images[image_id]["file_name"]
            raise DataError(
                f"{png}: PNG size {id_map.shape[1]}x{id_map.shape[0]} differs from image {image} "
                f"size {image_hw[1]}x{image_hw[0]} (image id {image_id})"
            )
        png_ids = set(np.unique(id_map).tolist())
        png_ids.discard(VOID)
        json_ids = {seg["id"] for seg in ann["segments_info"]}
        if not self.allow_missing_segments:
            for seg in ann["segments_info"]:
                if seg["id"] not in png_ids:
                    raise DataError(
                        f"{png}: segment id {seg['id']} (image id {image_id}) is in {self.json_path.name} "
                        "but not in the PNG"
                    )
        extra = sorted(png_ids - json_ids)
        if extra:
            raise DataError(
                f"{png}: segment id {extra[0]} (image id {image_id}) is in the PNG but not in {self.json_path.name}"
                + (f" ({len(extra)} such ids)" if len(extra) > 1 else "")
            )
        return png_ids

    def validate_all(self) -> int:
        """Pixel-level check of every image (progress bar); raises the first `DataError`.

        Reads image sizes from the file headers and decodes only the PNGs.

        Returns:
            The number of images checked.
        """
        from tqdm import tqdm

        from harness.logging_utils import progress_disabled

        if not self.validate:
            self._check_files_exist()
        for iid in tqdm(self.image_ids, desc="validate", unit="img", disable=progress_disabled()):
            id_map = read_id_png(self.png_dir / self._annotations[iid]["file_name"])
            hw = read_image_size(self.image_dir / self._images[iid]["file_name"])
            self._check_pixels(iid, id_map, hw)
        return len(self.image_ids)

    # -- access ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.image_ids)

    def __iter__(self) -> Iterator[PanopticSample]:
        for i in range(len(self)):
            yield self[i]

    def index_of(self, image_id: ImageId) -> int:
        """Position of an image id in `image_ids` (KeyError naming the id)."""
        if not hasattr(self, "_positions"):
            self._positions = {iid: i for i, iid in enumerate(self.image_ids)}
        try:
            return self._positions[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id} not in {self.json_path}") from None

    def image_info(self, image_id: ImageId) -> dict[str, Any]:
        """The JSON ``images`` entry of an image id."""
        return self._images[image_id]

    def annotation(self, image_id: ImageId) -> dict[str, Any]:
        """The JSON ``annotations`` entry (PNG file name, segments_info) of an image id."""
        return self._annotations[image_id]

    def image_path(self, image_id: ImageId) -> Path:
        return self.image_dir / self._images[image_id]["file_name"]

    def png_path(self, image_id: ImageId) -> Path:
        return self.png_dir / self._annotations[image_id]["file_name"]

    def load_id_map(self, image_id: ImageId) -> np.ndarray:
        """(H, W) uint32 segment ids of an image (no image decode, no checks)."""
        return read_id_png(self.png_path(image_id))

    def __getitem__(self, index: int) -> PanopticSample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        iid = self.image_ids[index]
        info = self._images[iid]
        image = read_image_rgb(self.image_path(iid))
        id_map = read_id_png(self.png_path(iid))
        present = None
        if self.validate:
            present = self._check_pixels(iid, id_map, image.shape[:2])
        elif self.allow_missing_segments:
            present = set(np.unique(id_map).tolist())
        return PanopticSample(iid, info["file_name"], image, id_map, self._segments(iid, id_map, present))

    def _segments(self, image_id: ImageId, id_map: np.ndarray, present: set[int] | None) -> list[Segment]:
        infos = self._annotations[image_id]["segments_info"]
        if self.allow_missing_segments and present is not None:
            kept = [s for s in infos if s["id"] in present]
            if len(kept) != len(infos):
                log.debug("image id %s: dropped %d segment(s) absent from the PNG", image_id, len(infos) - len(kept))
            infos = kept
        stats = None
        if any("area" not in s or "bbox" not in s for s in infos):
            stats = segment_stats(id_map)
        segments = []
        for s in infos:
            label = self.categories.to_contiguous(s["category_id"])
            if "area" in s and "bbox" in s:
                area, bbox = int(s["area"]), tuple(float(v) for v in s["bbox"])
            else:
                area, bbox = stats.get(s["id"], (0, (0.0, 0.0, 0.0, 0.0)))
                area = int(s.get("area", area))
                bbox = tuple(float(v) for v in s.get("bbox", bbox))
            segments.append(
                Segment(
                    id=int(s["id"]),
                    category_id=int(s["category_id"]),
                    label=label,
                    iscrowd=bool(s.get("iscrowd", 0)),
                    area=area,
                    bbox=bbox,  # type: ignore[arg-type]
                    isthing=label < self.categories.num_things,
                    id_map=id_map,
                )
            )
        return segments

    def __repr__(self) -> str:
        return (
            f"PanopticDataset({str(self.json_path)!r}, images={len(self)}, "
            f"things={self.categories.num_things}, stuff={self.categories.num_stuff})"
        )
