"""The fast post-processors equal the full-resolution definitions bit for bit.

Oracle: ``models.postprocess_full``, the previous full-resolution implementation (every candidate resized to the
output size), kept in the package as the fast paths' fallback and independent of the box-restricted code. Every
case compares the panoptic maps, the segment lists (labels, instances, scores, areas, painting candidates) and,
for "(m)" with ``return_candidates``, the sorted candidate list (itself checked against its definition).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import postprocess as pp
from models import postprocess_full as ref
from models.box_resize import BoxMasks, separable_is_exact, support_threshold
from models.mask_wise import MaskWiseOptions, mask_wise_trace
from models.postprocess import Candidates

NT = 5  # things 0..4, stuff 5..8

FAST: dict[str, tuple[Callable[..., pp.PanopticResult], Callable[..., pp.PanopticResult]]] = {
    "m": (pp.mask_wise_merge, ref.mask_wise_merge_full),
    "p": (pp.pixel_argmax, ref.pixel_argmax_full),
    "p*": (pp.maskformer_merge, ref.maskformer_merge_full),
    "heuristic": (pp.heuristic_merge, ref.heuristic_merge_full),
}


def _assert_same(got: pp.PanopticResult, want: pp.PanopticResult, what: str, cands: Candidates | None = None) -> None:
    np.testing.assert_array_equal(got.category, want.category, err_msg=f"{what}: category")
    np.testing.assert_array_equal(got.instance, want.instance, err_msg=f"{what}: instance")
    assert got.category.dtype == np.int32 and got.instance.dtype == np.int32 and got.category.flags.c_contiguous
    # repr: scores compare bit for bit (and NaN equals NaN); "candidate" is the input position that painted it.
    assert [{k: repr(v) for k, v in s.items()} for s in got.segments] == \
        [{k: repr(v) for k, v in s.items()} for s in want.segments], what
    if cands is not None:  # a segment names the candidate that painted it
        assert all(int(cands.labels[s["candidate"]]) == s["label"] for s in got.segments), what


def _random_candidates(rng: np.random.Generator, k: int, h: int, w: int) -> Candidates:
    """Rectangles, diffuse low masks, empty masks, exact duplicates (a query under two labels) and score ties."""
    masks = np.zeros((k, h, w), np.float32)
    for i in range(k):
        kind = rng.integers(0, 5)
        if kind == 0:
            continue  # empty
        if kind == 4:  # diffuse, mostly below 0.5
            masks[i] = rng.uniform(0, 0.7, (h, w)) * (rng.uniform(size=(h, w)) > 0.5)
            continue
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = rng.integers(y0 + 1, h + 1), rng.integers(x0 + 1, w + 1)
        masks[i, y0:y1, x0:x1] = rng.uniform(0, 1.6, (y1 - y0, x1 - x0)) * (rng.uniform(size=(y1 - y0, x1 - x0)) > 0.2)
        if kind == 3:  # quantised values: exact ties between candidates
            masks[i] = np.round(masks[i] * 4) / 4
    scores = rng.uniform(0, 1, k).astype(np.float32)
    if k >= 4:
        masks[1] = masks[0]  # the same query under two labels
        scores[3] = scores[2]
        masks[3] = masks[2]  # a full tie (same score, same mask)
    labels = rng.integers(0, NT + 4, k)
    return Candidates(torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(masks))


def _options(rng: np.random.Generator, method: str) -> dict[str, Any]:
    if method == "m":
        return {"thing_threshold": float(rng.choice([0.0, 0.1, 0.25, 0.4])),
                "stuff_threshold": float(rng.choice([0.1, 0.25, 0.3])),
                "thing_overlap": float(rng.choice([0.2, 0.4, 0.8])), "stuff_overlap": float(rng.choice([0.2, 0.4])),
                "alpha": float(rng.choice([1.0, 1.0, 0.5, 2.0])), "beta": float(rng.choice([2.0, 2.0, 1.0, 1.5])),
                "plus_one": bool(rng.integers(0, 2)), "stable": bool(rng.integers(0, 2))}
    if method == "p":
        return {"score_threshold": float(rng.choice([0.1, 0.25, 0.5])), "min_area": int(rng.choice([0, 4, 40]))}
    if method == "p*":
        return {"object_mask_threshold": float(rng.choice([0.3, 0.5, 0.8])),
                "overlap_threshold": float(rng.choice([0.5, 0.8]))}
    return {"instance_score_threshold": float(rng.choice([0.3, 0.5])),
            "stuff_area_limit": int(rng.choice([1, 200, 4096]))}


@pytest.mark.parametrize("seed", range(4))
def test_box_values_equal_full_interpolation(seed: int) -> None:
    """`_BoxMasks` reproduces F.interpolate bilinear bit for bit: up/down-scaling, equal sides, any sub-box."""
    assert separable_is_exact()
    rng = np.random.default_rng(seed)
    for _ in range(12):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        hh = int(rng.choice([h, rng.integers(70, 500)]))
        ww = int(rng.choice([w, rng.integers(70, 500)]))
        if hh + ww <= 128 or (hh, ww) == (h, w):
            continue
        x = torch.from_numpy(rng.uniform(0, 2, (2, h, w)).astype(np.float32))
        full = F.interpolate(x[None], size=(hh, ww), mode="bilinear", align_corners=False)[0].numpy()
        bm = BoxMasks(x, (hh, ww))
        boxes = []
        for _ in range(5):
            y0, x0 = int(rng.integers(0, hh)), int(rng.integers(0, ww))
            boxes.append((y0, int(rng.integers(y0 + 1, hh + 1)), x0, int(rng.integers(x0 + 1, ww + 1))))
        ks = [int(v) for v in rng.integers(0, 2, len(boxes))]
        for k, (y0, y1, x0, x1), got in zip(ks, boxes, bm.values(ks, boxes)):
            np.testing.assert_array_equal(got, full[k, y0:y1, x0:x1])


def test_support_boxes_hold_every_pixel_above_threshold() -> None:
    rng = np.random.default_rng(7)
    masks = torch.from_numpy((rng.uniform(0, 1.2, (6, 30, 41)) * (rng.uniform(size=(6, 30, 41)) > 0.97))
                             .astype(np.float32))
    out = (317, 203)  # upscale along H, downscale-ish along W
    full = F.interpolate(masks[None], size=out, mode="bilinear", align_corners=False)[0].numpy()
    bm = BoxMasks(masks, out)
    for above, pred in ((support_threshold(0.5), lambda v: v > 0.5), (None, lambda v: v != 0)):
        for k, box in enumerate(bm.boxes(list(range(6)), above)):
            sel = pred(full[k])
            if box is None:
                assert not sel.any()
                continue
            y0, y1, x0, x1 = box
            inside = np.zeros_like(sel)
            inside[y0:y1, x0:x1] = True
            assert not (sel & ~inside).any()


@pytest.mark.parametrize("method", list(FAST))
@pytest.mark.parametrize("seed", range(6))
def test_fast_equals_previous_implementation(method: str, seed: int) -> None:
    fast, slow = FAST[method]
    rng = np.random.default_rng(100 * seed + len(method))
    for _ in range(5):
        k = int(rng.integers(4, 40))
        h, w = (int(v) for v in rng.integers(3, 40, 2))
        out = (int(rng.integers(60, 300)), int(rng.integers(70, 300)))
        cands = _random_candidates(rng, k, h, w)
        opts = _options(rng, method)
        assert pp._fast_masks(cands, out) is not None  # these cases take the fast path
        _assert_same(fast(cands, NT, out, **opts), slow(cands, NT, out, **opts), f"{method} {k} {h}x{w}->{out} {opts}",
                     cands)


def test_mask_wise_candidate_list_and_two_threads() -> None:
    rng = np.random.default_rng(11)
    cands = _random_candidates(rng, 30, 25, 33)
    out = (240, 317)
    want = ref.mask_wise_merge_full(cands, NT, out)
    full = pp.mask_wise_merge(cands, NT, out, return_candidates=True)
    _assert_same(full, want, "return_candidates")
    np.testing.assert_array_equal(full.candidate_scores, want.candidate_scores)
    np.testing.assert_array_equal(full.candidate_labels, want.candidate_labels)
    np.testing.assert_array_equal(full.candidate_masks, want.candidate_masks)
    # The candidate list from its definition: every mask resized, rescored score * s_mask**2 ("+1"), sorted.
    _assert_same(pp.mask_wise_merge(cands, NT, out), full, "fast vs return_candidates", cands)
    idx = torch.from_numpy(full.candidate_index)
    up = F.interpolate(cands.masks[None], size=out, mode="bilinear", align_corners=False)[0]
    seg = (up > 0.5).float()
    rescored = cands.scores * ((up * seg).sum((1, 2)) / (seg.sum((1, 2)) + 1)) ** 2
    np.testing.assert_array_equal(full.candidate_masks, up[idx].numpy())
    np.testing.assert_array_equal(full.candidate_labels, cands.labels[idx].numpy())
    np.testing.assert_array_equal(full.candidate_scores, rescored[idx].numpy())
    assert sorted(full.candidate_index.tolist()) == list(range(30)) and (np.diff(full.candidate_scores) <= 0).all()
    assert pp.mask_wise_merge(cands, NT, out).candidate_scores is None  # fast: no candidate list
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # a 1-row torch sum would split across threads; the 2-row buffer does not
        _assert_same(pp.mask_wise_merge(cands, NT, out), ref.mask_wise_merge_full(cands, NT, out), "2 threads",
                     cands)
    finally:
        torch.set_num_threads(threads)


def test_mask_wise_ties_between_painted_candidates() -> None:
    """Equal rescored scores among painted candidates: the unstable sort's order needs every score (official)."""
    h, w = 12, 16
    masks = np.zeros((24, h, w), np.float32)
    for i in range(24):  # 24 disjoint-ish strips of the same value: identical mask scores
        masks[i, :, (i * 2) % w:(i * 2) % w + 3] = 1.0
    scores = np.full(24, 0.6, np.float32)
    scores[::5] = 0.05  # some below threshold, tied among themselves
    labels = np.arange(24) % (NT + 4)
    cands = Candidates(torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(masks))
    for stable in (False, True):
        for overlap in (0.0, 0.4, 1.0):
            opts = {"stable": stable, "thing_overlap": overlap, "stuff_overlap": overlap}
            _assert_same(pp.mask_wise_merge(cands, NT, (120, 170), **opts),
                         ref.mask_wise_merge_full(cands, NT, (120, 170), **opts), f"ties {opts}", cands)


@pytest.mark.parametrize("method", list(FAST))
def test_fallbacks_equal_previous_implementation(method: str) -> None:
    """Cases another bilinear kernel (or no fast path) handles: small outputs, 3 candidates, equal size, NaN."""
    fast, slow = FAST[method]
    rng = np.random.default_rng(5)
    cases = [(_random_candidates(rng, 12, 9, 11), (40, 50)),  # H + W <= 128: channels-last kernel
             (_random_candidates(rng, 3, 9, 11), (140, 150)),  # 3 planes (channels-last kernel on one thread)
             (_random_candidates(rng, 12, 60, 70), (60, 70))]  # no resize
    nan = _random_candidates(rng, 12, 9, 11)
    nan.masks[4, 2, 3] = float("nan")
    cases.append((nan, (140, 150)))
    for cands, out in cases:
        _assert_same(fast(cands, NT, out), slow(cands, NT, out), f"{method} {tuple(cands.masks.shape)}->{out}", cands)


@pytest.mark.parametrize("seed", range(3))
def test_mask_wise_trace_equals_full_definition(seed: int) -> None:
    """`mask_wise_trace` (box path and fallback): the tried candidates are the full definition's sorted candidates
    with rescored score >= t_cnf and a non-empty binary mask, with their exact binary masks; the painted regions
    rebuild its maps; its result equals it."""
    rng = np.random.default_rng(40 + seed)
    for out in ((140, 150), (40, 50)):  # box path; H + W <= 128: full-resolution ranking
        cands = _random_candidates(rng, 24, 9, 11)
        opts = _options(rng, "m")
        want = ref.mask_wise_merge_full(cands, NT, out, **opts)
        trace = mask_wise_trace(cands, NT, out, MaskWiseOptions(**opts))
        assert trace.result is not None
        _assert_same(trace.result, want, f"trace {out} {opts}", cands)
        thr = np.where(want.candidate_labels < NT, opts["thing_threshold"], opts["stuff_threshold"])
        binary = want.candidate_masks > 0.5
        tried = np.flatnonzero(~(want.candidate_scores < thr) & binary.any((1, 2)))
        np.testing.assert_array_equal(trace.index, want.candidate_index[tried])
        np.testing.assert_array_equal(trace.scores, want.candidate_scores[tried])
        category = np.full(out, -1, np.int32)
        for i, (y0, y1, x0, x1), m, p in zip(tried, trace.boxes, trace.masks, trace.painted):
            pasted = np.zeros(out, bool)
            pasted[y0:y1, x0:x1] = m
            np.testing.assert_array_equal(pasted, binary[i])
            if p is not None:
                assert not (p & ~m).any() and (category[y0:y1, x0:x1][p] == -1).all()  # free pixels of its mask
                category[y0:y1, x0:x1][p] = want.candidate_labels[i]
        np.testing.assert_array_equal(category, want.category)
        assert len(trace.index) > 0


def test_pixel_argmax_removes_small_winners_like_before() -> None:
    """Candidates winning <= min_area pixels are removed and their pixels re-decided (several rounds)."""
    h, w = 20, 24
    masks = np.zeros((6, h, w), np.float32)
    masks[0] = 0.6  # everywhere, weak
    masks[1, 2:8, 2:8] = 0.9
    masks[2, 4:6, 4:6] = 1.0  # wins a tiny patch inside 1 -> removed, 1 takes it back
    masks[3, 10:12, 10:11] = 1.2  # tiny
    masks[4, 15:20, 15:24] = 0.8
    masks[5, 15:20, 15:24] = 0.8  # tie with 4: the first wins
    cands = Candidates(torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.5]), torch.tensor([5, 0, 1, 2, 3, 6]),
                       torch.from_numpy(masks))
    for min_area in (0, 4, 30, 200, 10_000):
        _assert_same(pp.pixel_argmax(cands, NT, (100, 120), min_area=min_area),
                     ref.pixel_argmax_full(cands, NT, (100, 120), min_area=min_area), f"min_area {min_area}", cands)


@pytest.fixture(scope="module")
def golden_candidates() -> Candidates:
    """A fixed random-init tiny Panoptic SegFormer on a 640x480 picture (COCO size), biases raised so it paints."""
    from models.configs import panoptic_segformer_tiny
    from models.panoptic_segformer import PanopticSegFormer

    torch.manual_seed(0)
    # 20 thing queries pinned: the case stays the same when the tiny recipe changes its query count.
    model = PanopticSegFormer(panoptic_segformer_tiny(num_things=80, num_stuff=53, num_thing_queries=20)).eval()
    with torch.no_grad():
        model.bbox_head.cls_branches[-1].bias.fill_(1.0)
        model.bbox_head.cls_stuff_branches[-1].bias.fill_(0.5)
        g = torch.Generator().manual_seed(1)
        x = F.interpolate(torch.randn(1, 3, 24, 32, generator=g), size=(600, 800), mode="bilinear")
        return model.candidates(model(x), 0)


@pytest.mark.parametrize("method", list(FAST))
def test_golden_model_candidates(golden_candidates: Candidates, method: str) -> None:
    fast, slow = FAST[method]
    out = (480, 640)
    assert pp._fast_masks(golden_candidates, out) is not None
    got, want = fast(golden_candidates, 80, out), slow(golden_candidates, 80, out)
    _assert_same(got, want, f"golden {method}", golden_candidates)
    assert want.segments, "the golden case must paint segments"


@pytest.mark.slow
def test_golden_r50_candidates() -> None:
    """A random-init R50 (seed 0) at the COCO test size 800x1067, merged at 480x640: the masks as they come, with
    the class scores as they come (~0.01: nothing painted) and spread over 0..1 (diffuse masks painted)."""
    from models.configs import panoptic_segformer_r50
    from models.panoptic_segformer import PanopticSegFormer

    torch.manual_seed(0)
    model = PanopticSegFormer(panoptic_segformer_r50()).eval()
    g = torch.Generator().manual_seed(1)
    x = F.interpolate(torch.randn(1, 3, 25, 34, generator=g), size=(800, 1067), mode="bilinear")
    with torch.no_grad():
        cands = model.candidates(model(x), 0)
    assert tuple(cands.masks.shape) == (153, 100, 134)
    spread = Candidates(torch.linspace(1.0, 0.0, 153)[torch.randperm(153, generator=g)], cands.labels, cands.masks)
    out = (480, 640)
    for c in (cands, spread):
        assert pp._fast_masks(c, out) is not None
        for method, (fast, slow) in FAST.items():
            _assert_same(fast(c, 80, out), slow(c, 80, out), f"r50 {method}", c)
