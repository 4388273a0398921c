"""Exact bilinear resizing of single masks inside boxes (the engine of the fast post-processors).

``F.interpolate(masks[None], (H, W), mode="bilinear", align_corners=False)`` on a CPU runs PyTorch's generic
separable kernel (ATen ``UpSampleKernel.cpp``): per output pixel ``t_r = x[r, j0] * a0 + x[r, j1] * a1`` for its
two source rows, then ``t_r0 * b0 + t_r1 * b1``, in float32 (contracted to FMAs on AVX builds), with index and
weight tables that depend only on the input and output lengths. A 1-d ``linear`` interpolation along W of the
source rows a box needs, then the 2-d kernel on the box's columns with an unchanged width (identity W tables, so
only its H step acts; unread source rows left at 0), evaluates the same expressions with the same tables, so
:class:`BoxMasks` gives every value of the full resize, bit for bit, at about the cost of the box. :func:`separable_is_exact` checks this once per process on probes, and
:func:`reference_kernel_is_generic` says when ``F.interpolate`` would take its other (channels-last) kernel
instead; callers then use the full resize (:func:`exact_box_masks` puts these conditions together). :func:`view`
and :func:`paint` are the box helpers the fast post-processors share.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Box", "BoxMasks", "support_threshold", "separable_is_exact", "reference_kernel_is_generic",
           "exact_box_masks", "view", "paint"]


Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), half-open, in output pixels


def support_threshold(threshold: float) -> float:
    """A source threshold below ``threshold`` with margin: bilinear outputs are convex combinations of four
    source pixels (float32 weights summing to 1 within 1e-7), so an output > or >= ``threshold`` needs a source
    neighbour above this value."""
    return float(threshold) - 0.01 - 0.01 * abs(float(threshold))


def _approx_source_index(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear source indices (i0, i1) per output index, as PyTorch computes them up to +-1 (float64 here; the
    kernel's float32/FMA arithmetic may move ``floor`` by one at exact integers, which the box margins absorb)."""
    if n_in == n_out:
        idx = np.arange(n_out, dtype=np.int64)
        return idx, idx
    scale = float(np.float32(n_in) / np.float32(n_out))
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1)


def _output_range(i0: np.ndarray, i1: np.ndarray, a: np.ndarray, b: np.ndarray, n_in: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Half-open ranges of output indices whose source pixels (true indices within +-1 of ``i0``/``i1``) may
    include any of ``a..b`` (element-wise over arrays of ranges)."""
    a, b = np.maximum(a - 1, 0), np.minimum(b + 1, n_in - 1)
    return np.searchsorted(i1, a, "left"), np.searchsorted(i0, b, "right")


class BoxMasks:
    """Full-resolution values of single candidates inside boxes, bit-identical to
    ``F.interpolate(masks[None], out_size, mode="bilinear", align_corners=False)[0, k, y0:y1, x0:x1]`` (see the
    module docstring; valid when :func:`reference_kernel_is_generic` and :func:`separable_is_exact`).

    Args:
        masks: (K, h, w) float32 low-resolution masks.
        out_size: (H, W).

    Attributes:
        vmax / vmin: (K,) float64 largest / smallest low-resolution value of each candidate.
    """

    # Elements per F.interpolate call (bounds the temporary memory).
    CHUNK = 1 << 22

    def __init__(self, masks: Tensor, out_size: tuple[int, int]) -> None:
        self.masks = masks
        self.h, self.w = int(masks.shape[-2]), int(masks.shape[-1])
        self.H, self.W = int(out_size[0]), int(out_size[1])
        self.identity = (self.h, self.w) == (self.H, self.W)
        self.vmax = masks.amax((1, 2)).double().numpy()
        self.vmin = masks.amin((1, 2)).double().numpy()
        self.nonneg = bool((self.vmin >= 0).all())
        self.r0, self.r1 = _approx_source_index(self.h, self.H)
        self.c0, self.c1 = _approx_source_index(self.w, self.W)

    def boxes(self, ks: list[int], above: float | None) -> list[Box | None]:
        """Output boxes holding every pixel where candidate ``ks[i]`` can exceed a threshold whose support
        threshold is ``above`` (see `support_threshold`), or every non-zero pixel (``above=None``); None when
        there is none."""
        if not ks:
            return []
        sel = self.masks if len(ks) == self.masks.shape[0] and ks == list(range(len(ks))) else \
            self.masks[torch.as_tensor(ks, dtype=torch.long)]
        if above is None:  # non-zero support
            sel, above = (sel if self.nonneg else sel.abs()), 0.0
        rows, cols = (sel.amax(2) > above).numpy(), (sel.amax(1) > above).numpy()  # amax: 10x faster than any
        has = rows.any(1)
        r_first, r_last = rows.argmax(1), self.h - 1 - rows[:, ::-1].argmax(1)
        c_first, c_last = cols.argmax(1), self.w - 1 - cols[:, ::-1].argmax(1)
        y0, y1 = _output_range(self.r0, self.r1, r_first, r_last, self.h)
        x0, x1 = _output_range(self.c0, self.c1, c_first, c_last, self.w)
        ok = has & (y0 < y1) & (x0 < x1)
        return [(int(y0[i]), int(y1[i]), int(x0[i]), int(x1[i])) if ok[i] else None for i in range(len(ks))]

    def values(self, ks: list[int], boxes: list[Box]) -> list[np.ndarray]:
        """Float32 ``(y1 - y0, x1 - x0)`` values of the resized candidates ``ks`` inside ``boxes`` (read-only views)."""
        if self.identity:
            return [self.masks[k, y0:y1, x0:x1].numpy() for k, (y0, y1, x0, x1) in zip(ks, boxes)]
        out: list[np.ndarray] = []
        start = 0
        while start < len(ks):
            stop, cost = start, 0
            while stop < len(ks) and (stop == start or cost < self.CHUNK):
                y0, y1, x0, x1 = boxes[stop]
                cost += (x1 - x0) * self.H + (self.r1[y1 - 1] - self.r0[y0] + 3) * self.W
                stop += 1
            out.extend(self._values(ks[start:stop], boxes[start:stop]))
            start = stop
        return out

    def _values(self, ks: list[int], boxes: list[Box]) -> list[np.ndarray]:
        # Source rows each box reads (true indices within +-1 of the approximate tables).
        rows = [(max(int(self.r0[y0]) - 1, 0), min(int(self.r1[y1 - 1]) + 1, self.h - 1)) for y0, y1, _, _ in boxes]
        src = torch.cat([self.masks[k, a:b + 1] for k, (a, b) in zip(ks, rows)])  # (sum R, w)
        if self.w != self.W:  # along W (identity tables when equal: the kernel returns the source values)
            src = F.interpolate(src[None], size=self.W, mode="linear", align_corners=False)[0]
        offsets = np.cumsum([0] + [b - a + 1 for a, b in rows])
        if self.h == self.H:
            return [src[offsets[i] + y0 - a:offsets[i] + y1 - a, x0:x1].numpy()
                    for i, ((a, _), (y0, y1, x0, x1)) in enumerate(zip(rows, boxes))]
        # Along H: the boxes' columns side by side in one (h, total) plane, resized to (H, total) by the 2-d kernel
        # (its W tables are the identity there, so each output is the H step of the full kernel, row-major). Boxes
        # whose source row ranges do not overlap share columns (an output row of a box reads only source rows in
        # its own range): first fit into strips, in order of the first source row.
        strips: list[list[int]] = []  # [first column, width, last source row used]
        place = [0] * len(boxes)
        total = 0
        for i in sorted(range(len(boxes)), key=lambda i: rows[i][0]):
            nx = boxes[i][3] - boxes[i][2]
            fit = [s for s in strips if s[1] >= nx and s[2] < rows[i][0]]
            if fit:
                strip = min(fit, key=lambda s: s[1])
            else:
                strip = [total, nx, -1]
                strips.append(strip)
                total += nx
            strip[2] = rows[i][1]
            place[i] = strip[0]
        # Unread source rows stay 0; a few spare columns keep H + width > 128 (the generic kernel).
        plane = src.new_zeros((self.h, max(total, 129 - self.H)))
        for i, ((a, b), (_, _, x0, x1)) in enumerate(zip(rows, boxes)):
            plane[a:b + 1, place[i]:place[i] + x1 - x0] = src[offsets[i]:offsets[i + 1], x0:x1]
        full = F.interpolate(plane[None, None], size=(self.H, plane.shape[1]), mode="bilinear",
                             align_corners=False)[0, 0].numpy()  # (H, width)
        return [full[y0:y1, place[i]:place[i] + x1 - x0] for i, (y0, y1, x0, x1) in enumerate(boxes)]


@functools.lru_cache(maxsize=1)
def separable_is_exact() -> bool:
    """Probe once per process that `BoxMasks` reproduces ``F.interpolate`` bilinear bit for bit here."""
    gen = torch.Generator().manual_seed(0)
    for (h, w), (hh, ww) in (((23, 31), (157, 211)), ((40, 30), (40, 190)), ((37, 29), (301, 29)),
                              ((50, 67), (41, 95))):  # all with H + W > 128 (generic kernel)
        x = torch.rand((2, h, w), generator=gen) * (torch.rand((2, h, w), generator=gen) > 0.3)
        ref = F.interpolate(x[None], size=(hh, ww), mode="bilinear", align_corners=False)[0]
        bm = BoxMasks(x, (hh, ww))
        full = (0, hh, 0, ww)
        sub = (hh // 5, hh - hh // 4, ww // 3, ww - ww // 7)
        got = bm.values([0, 1, 1], [full, full, sub])
        want = [ref[0], ref[1], ref[1, sub[0]:sub[1], sub[2]:sub[3]]]
        if not all(np.array_equal(g, r.numpy()) for g, r in zip(got, want)):
            return False
    return True


def reference_kernel_is_generic(masks: Tensor, out_size: tuple[int, int]) -> bool:
    """Would ``F.interpolate(masks[None], out_size, bilinear)`` run the generic (separable) CPU kernel?

    Mirrors ``upsample_bilinear2d_kernel_impl_float`` (ATen ``UpSampleKernel.cpp``): the channels-last kernel
    (another float expression) runs for small outputs (H + W <= 128), channels-last inputs with more than 3
    channels, and 3 channels on one thread.
    """
    k = int(masks.shape[0])
    if out_size[0] + out_size[1] <= 128:
        return False
    if k > 3 and masks[None].is_contiguous(memory_format=torch.channels_last):
        return False
    return not (k == 3 and torch.get_num_threads() == 1)


def exact_box_masks(masks: Tensor, scores: Tensor, out_size: tuple[int, int]) -> BoxMasks | None:
    """The box resizer of ``(K, h, w)`` candidate masks with ``(K,)`` scores when the fast post-processors are exact
    (same kernel as ``F.interpolate`` here, CPU tensors, every value finite), else None (use the full-resolution
    definitions, ``models.postprocess_full``)."""
    masks = masks.float()
    k, h, w = masks.shape
    if k < 2 or h == 0 or w == 0 or out_size[0] <= 0 or out_size[1] <= 0 or masks.device.type != "cpu":
        return None
    if (h, w) != tuple(out_size) and not (reference_kernel_is_generic(masks, out_size) and separable_is_exact()):
        return None
    bm = BoxMasks(masks, (int(out_size[0]), int(out_size[1])))
    # amax / amin propagate NaN and show infinities: finite extremes <=> finite values.
    if not (np.isfinite(bm.vmax).all() and np.isfinite(bm.vmin).all() and bool(torch.isfinite(scores.float()).all())):
        return None
    return bm


def view(a: np.ndarray, box: Box) -> np.ndarray:
    """The view of an ``(H, W)`` map under an output box."""
    return a[box[0]:box[1], box[2]:box[3]]


def paint(category: np.ndarray, instance: np.ndarray, filled: np.ndarray, box: Box, region: np.ndarray, label: int,
          inst: int) -> int:
    """Paint ``region`` (bool, box-shaped) into the ``(H, W)`` panoptic maps; returns its pixel count."""
    view(filled, box)[...] |= region
    np.copyto(view(category, box), np.int32(label), where=region)
    if inst:
        np.copyto(view(instance, box), np.int32(inst), where=region)
    return int(np.count_nonzero(region))
