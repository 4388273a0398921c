"""Writer for COCO panoptic predictions: one RGB PNG per image plus one JSON, as panopticapi reads them.

Output::

    <out_dir>/<image stem>.png     segment ids as R + 256 G + 256^2 B (0 = VOID)
    <json_path>                    {"images", "annotations", "categories"}

Each annotation is ``{image_id, file_name (PNG), segments_info: [{id, category_id, iscrowd,
area, bbox, ...}]}``; area and bbox are computed from the id map (panopticapi recomputes the
area anyway), extra keys given by the caller (e.g. ``score``) are kept. Segments without a
pixel are dropped, because panopticapi rejects a prediction whose JSON lists an id that is
not in the PNG. The JSON also carries ``images`` and ``categories`` so that the output is a
complete data set our `PanopticDataset` can read back.

PNGs are written atomically as they are added; the JSON is written atomically by `close`.
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path
from types import TracebackType
from typing import Any, Sequence

import numpy as np

from harness.data.coco_panoptic import ImageId, segment_stats
from harness.data.format import OFFSET, VOID, CategoryMap, id2rgb
from harness.errors import DataError
from harness.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


def _to_builtin(value: Any) -> Any:
    """numpy scalars / arrays -> plain Python for JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def encode_id_png(id_map: np.ndarray) -> bytes:
    """(H, W) segment ids -> PNG bytes of the RGB encoding (R + 256 G + 256^2 B)."""
    import cv2

    rgb = id2rgb(id_map)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


class _SegmentIdAssigner:
    """Segment ids for `add_semantic`: category colours, as panopticapi's IdGenerator.

    Stuff gets its category colour when still free; things (and clashes) get the category
    colour jittered by up to +-30 per channel until unused. The RNG is seeded per image so the
    output does not depend on the order images are written. Without category colours, ids
    are sequential (1, 2, ...).
    """

    def __init__(self, categories: CategoryMap, seed: int) -> None:
        self.categories = categories
        self.rng = np.random.default_rng(seed)
        self.used: set[int] = {VOID}
        self.next_seq = 1

    def new_id(self, label: int) -> int:
        cat = self.categories.categories[label]
        color = cat.get("color")
        if color is None or len(color) != 3:
            while self.next_seq in self.used:
                self.next_seq += 1
            self.used.add(self.next_seq)
            return self.next_seq
        base = np.asarray(color, dtype=np.int64)
        candidate = int(base[0] + 256 * base[1] + 65536 * base[2])
        if label < self.categories.num_things or candidate in self.used:
            for _ in range(10000):
                rgb = np.clip(base + self.rng.integers(-30, 31, size=3), 0, 255)
                candidate = int(rgb[0] + 256 * rgb[1] + 65536 * rgb[2])
                if candidate not in self.used:
                    break
            else:  # pragma: no cover - needs > 10^4 segments of one category
                candidate = max(self.used) + 1
        self.used.add(candidate)
        return candidate


class PanopticPredictionWriter:
    """Collects panoptic predictions and writes them in COCO panoptic format.

    Args:
        out_dir: folder for the PNG files (panopticapi's ``pred_folder``).
        json_path: the prediction JSON (panopticapi's ``pred_json_file``).
        categories: the data set's `CategoryMap`; segments name dataset category ids.

    Example:
        >>> with PanopticPredictionWriter(out / "pred", out / "pred.json", cats) as w:
        ...     w.add(139, "000000000139.jpg", id_map, [{"id": 5, "category_id": 1}])
    """

    def __init__(
        self, out_dir: str | os.PathLike[str], json_path: str | os.PathLike[str], categories: CategoryMap
    ) -> None:
        self.out_dir = Path(out_dir)
        self.json_path = Path(json_path)
        self.categories = categories
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._images: list[dict[str, Any]] = []
        self._annotations: list[dict[str, Any]] = []
        self._seen: set[ImageId] = set()
        self._png_names: set[str] = set()
        self.closed = False

    def __len__(self) -> int:
        return len(self._annotations)

    def add(
        self,
        image_id: ImageId,
        file_name: str,
        id_map: np.ndarray,
        segments_info: Sequence[dict[str, Any]],
    ) -> dict[str, Any]:
        """Write one image's prediction PNG and record its JSON annotation.

        Args:
            image_id: the GT image id.
            file_name: the image file name (``000000000139.jpg``); the PNG gets its stem.
            id_map: (H, W) integer segment ids, 0 = VOID, each < 256^3.
            segments_info: one dict per segment with ``id`` and ``category_id`` (dataset id);
                other keys (``score``, ``isthing``, ...) are kept; ``area``/``bbox`` are recomputed.

        Returns:
            The annotation dict recorded for the JSON.

        Raises:
            DataError: duplicate image id, bad id map, duplicate / unknown segment ids or
                category ids (each message names the image id and segment id).
        """
        if self.closed:
            raise RuntimeError("PanopticPredictionWriter is closed")
        if image_id in self._seen:
            raise DataError(f"prediction for image id {image_id} added twice")
        id_map = np.asarray(id_map)
        if id_map.ndim != 2 or not np.issubdtype(id_map.dtype, np.integer):
            raise DataError(
                f"image id {image_id}: id map must be an (H, W) integer array, got {id_map.shape} {id_map.dtype}"
            )
        if id_map.size and (int(id_map.min()) < 0 or int(id_map.max()) >= OFFSET):
            raise DataError(f"image id {image_id}: segment ids must lie in [0, 256^3)")
        stats = segment_stats(id_map)

        infos: list[dict[str, Any]] = []
        listed: set[int] = set()
        for seg in segments_info:
            if "id" not in seg or "category_id" not in seg:
                raise DataError(f"image id {image_id}: segment {seg!r} lacks 'id' or 'category_id'")
            sid, cid = int(seg["id"]), _to_builtin(seg["category_id"])
            if sid == VOID:
                raise DataError(f"image id {image_id}: segment id 0 is reserved for VOID")
            if sid in listed:
                raise DataError(f"image id {image_id}: duplicate segment id {sid}")
            listed.add(sid)
            if cid not in self.categories:
                raise DataError(f"image id {image_id}, segment id {sid}: unknown category id {cid}")
            if sid not in stats:
                log.debug("image id %s: segment id %d has no pixel, dropped", image_id, sid)
                continue
            area, bbox = stats[sid]
            info = {k: _to_builtin(v) for k, v in seg.items()}
            info.update(id=sid, category_id=cid, iscrowd=int(_to_builtin(seg.get("iscrowd", 0))), area=area)
            info["bbox"] = [int(v) for v in bbox]
            infos.append(info)
        unlisted = sorted(set(stats) - listed)
        if unlisted:
            raise DataError(f"image id {image_id}: segment id {unlisted[0]} is in the id map but not in segments_info")

        png_name = Path(file_name).stem + ".png"
        if png_name in self._png_names:
            raise DataError(f"image id {image_id}: PNG name {png_name} already used by another image")
        atomic_write_bytes(self.out_dir / png_name, encode_id_png(id_map))
        self._png_names.add(png_name)
        self._seen.add(image_id)
        h, w = id_map.shape
        self._images.append({"id": image_id, "file_name": file_name, "height": int(h), "width": int(w)})
        ann = {"image_id": image_id, "file_name": png_name, "segments_info": infos}
        self._annotations.append(ann)
        return ann

    def add_semantic(
        self,
        image_id: ImageId,
        file_name: str,
        category: np.ndarray,
        instance: np.ndarray,
        extra: dict[int, dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Write a prediction given per pixel as (class, instance) and assign segment ids.

        Thing pixels form one segment per (class, instance) pair; stuff pixels one segment per
        class (instance ignored). Pixels with class -1 are VOID.

        Args:
            image_id: the GT image id.
            file_name: the image file name.
            category: (H, W) int contiguous class index, -1 = VOID.
            instance: (H, W) int instance index (any values; only equality matters).
            extra: optional ``{instance index: {key: value}}`` merged into thing segments
                (e.g. the query's score).

        Returns:
            The annotation dict recorded for the JSON.
        """
        category = np.asarray(category).astype(np.int64, copy=False)
        instance = np.asarray(instance).astype(np.int64, copy=False)
        if category.shape != instance.shape or category.ndim != 2:
            raise DataError(
                f"image id {image_id}: category and instance maps must be (H, W) of one shape, "
                f"got {category.shape} and {instance.shape}"
            )
        n = self.categories.num_classes
        if category.size and (int(category.min()) < -1 or int(category.max()) >= n):
            raise DataError(f"image id {image_id}: class index outside [-1, {n})")
        num_things = self.categories.num_things
        # One key per segment: stuff drops the instance index.
        is_thing = (category >= 0) & (category < num_things)
        inst_values, inst_index = np.unique(np.where(is_thing, instance, 0).ravel(), return_inverse=True)
        # A 1-D key (class, instance rank) is much faster to unique than (N, 2) rows.
        keys = (category.ravel() + 1) * len(inst_values) + inst_index.ravel()
        ukeys, inverse = np.unique(keys, return_inverse=True)
        uniq = np.stack([ukeys // len(inst_values) - 1, inst_values[ukeys % len(inst_values)]], axis=1)
        # crc32, not hash(): str hashing is salted per process.
        seed = image_id if isinstance(image_id, int) else zlib.crc32(str(image_id).encode())
        assigner = _SegmentIdAssigner(self.categories, abs(seed) % (2**32))
        seg_ids = np.zeros(len(uniq), dtype=np.int64)
        segments: list[dict[str, Any]] = []
        for k, (label, ins) in enumerate(uniq.tolist()):
            if label < 0:
                continue
            sid = assigner.new_id(label)
            seg_ids[k] = sid
            seg: dict[str, Any] = {"id": sid, "category_id": self.categories.to_category_id(label)}
            seg["isthing"] = bool(label < num_things)
            if extra and label < num_things and ins in extra:
                seg.update(extra[ins])
            segments.append(seg)
        id_map = seg_ids[inverse.ravel()].reshape(category.shape)
        return self.add(image_id, file_name, id_map, segments)

    def close(self) -> Path:
        """Write the JSON (atomically) and return its path. Idempotent."""
        if not self.closed:
            data = {
                "images": self._images,
                "annotations": self._annotations,
                "categories": [dict(c) for c in self.categories.categories],
            }
            atomic_write_json(self.json_path, data)
            self.closed = True
            log.info("wrote %d predictions: %s (PNGs in %s)", len(self), self.json_path, self.out_dir)
        return self.json_path

    def __enter__(self) -> "PanopticPredictionWriter":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # On error keep what was written (the PNGs) but do not pretend the JSON is complete.
        if exc_type is None:
            self.close()
