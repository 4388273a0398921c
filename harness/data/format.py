"""COCO panoptic format primitives: id <-> RGB encoding and the category mapping.

Segment id = R + 256 * G + 256**2 * B (panopticapi `rgb2id`); id 0 is VOID.
Contiguous class indices put every thing category first, then every stuff category, each
group in ascending category id: on COCO this gives 0-79 things and 80-132 stuff, the order
the official Panoptic SegFormer code uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

VOID = 0
OFFSET = 256 * 256 * 256


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint32 segment ids (integer arithmetic, no float)."""
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"rgb2id expects (H, W, 3), got shape {rgb.shape}")
    rgb = rgb[..., :3].astype(np.uint32)
    return rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) integer segment ids -> (H, W, 3) uint8 RGB."""
    ids = np.asarray(ids).astype(np.uint32)
    out = np.empty(ids.shape + (3,), dtype=np.uint8)
    out[..., 0] = ids & 255
    out[..., 1] = (ids >> 8) & 255
    out[..., 2] = (ids >> 16) & 255
    return out


@dataclass(frozen=True)
class CategoryMap:
    """Dataset categories and the contiguous index mapping (things first, then stuff).

    Attributes:
        categories: the JSON category dicts in contiguous order.
        ids: category id per contiguous index.
        num_things: number of thing categories (indices [0, num_things) are things).
    """

    categories: tuple[dict[str, Any], ...]
    ids: tuple[int, ...]
    num_things: int
    _index: dict[int, int] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_categories(cls, categories: Sequence[dict[str, Any]]) -> "CategoryMap":
        """Build from a COCO-style `categories` list (each with `id` and `isthing`)."""
        seen: set[int] = set()
        for c in categories:
            if "id" not in c or "isthing" not in c:
                raise ValueError(f"category entry {c!r} lacks 'id' or 'isthing'")
            if c["id"] in seen:
                raise ValueError(f"duplicate category id {c['id']} in categories")
            seen.add(c["id"])
        things = sorted((c for c in categories if c["isthing"]), key=lambda c: c["id"])
        stuff = sorted((c for c in categories if not c["isthing"]), key=lambda c: c["id"])
        ordered = tuple(things + stuff)
        ids = tuple(int(c["id"]) for c in ordered)
        return cls(ordered, ids, len(things), {cid: i for i, cid in enumerate(ids)})

    @property
    def num_classes(self) -> int:
        return len(self.ids)

    @property
    def num_stuff(self) -> int:
        return self.num_classes - self.num_things

    @property
    def names(self) -> list[str]:
        return [str(c.get("name", c["id"])) for c in self.categories]

    def to_contiguous(self, category_id: int) -> int:
        """Category id -> contiguous index; KeyError names the unknown id."""
        try:
            return self._index[int(category_id)]
        except KeyError:
            raise KeyError(f"unknown category id {category_id}") from None

    def to_category_id(self, index: int) -> int:
        """Contiguous index -> category id."""
        return self.ids[int(index)]

    def is_thing_id(self, category_id: int) -> bool:
        return self.to_contiguous(category_id) < self.num_things

    def __contains__(self, category_id: object) -> bool:
        return category_id in self._index
