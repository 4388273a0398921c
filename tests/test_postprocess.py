"""Post-processors on hand-made candidate sets whose panoptic answer is known."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from models.postprocess import (
    Candidates,
    candidates_from_outputs,
    heuristic_merge,
    mask_wise_merge,
    maskformer_merge,
    pixel_argmax,
    post_process,
)

NT = 2  # things: labels 0, 1; stuff: labels 2, 3


def _cands(scores: list[float], labels: list[int], masks: list[np.ndarray]) -> Candidates:
    return Candidates(
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.tensor(labels, dtype=torch.long),
        masks=torch.from_numpy(np.stack(masks).astype(np.float32)),
    )


def _rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int, value: float = 1.0) -> np.ndarray:
    m = np.zeros((h, w), np.float32)
    m[y0:y1, x0:x1] = value
    return m


def test_rescoring_uses_plus_one_denominator() -> None:
    # 4 pixels of value 1.0 -> s_mask = 4 / (4 + 1) = 0.8; score 0.5 * 0.8**2 = 0.32.
    m = _rect(4, 4, 0, 2, 0, 2)
    res = mask_wise_merge(_cands([0.5], [0], [m]), NT, (4, 4), return_candidates=True)
    assert res.candidate_scores[0] == pytest.approx(0.32, abs=1e-6)
    # The paper's plain mean gives 0.5 * 1.0**2.
    res_paper = mask_wise_merge(_cands([0.5], [0], [m]), NT, (4, 4), plus_one=False, return_candidates=True)
    assert res_paper.candidate_scores[0] == pytest.approx(0.5, abs=1e-6)
    # alpha / beta exponents (Table B.3): alpha=0 ignores the class score.
    res_ab = mask_wise_merge(_cands([0.5], [0], [m]), NT, (4, 4), alpha=0.0, beta=1.0, return_candidates=True)
    assert res_ab.candidate_scores[0] == pytest.approx(0.8, abs=1e-6)


def test_mask_score_ignores_values_at_or_below_threshold() -> None:
    m = np.array([[2.0, 0.5], [0.4, 0.0]], np.float32)  # only the 2.0 pixel is > 0.5
    res = mask_wise_merge(_cands([1.0], [0], [m]), NT, (2, 2), return_candidates=True)
    assert res.candidate_scores[0] == pytest.approx((2.0 / 2) ** 2, abs=1e-6)  # mask scores may exceed 1
    assert (res.category == np.array([[0, -1], [-1, -1]])).all()


def test_confidence_threshold_boundary() -> None:
    m = _rect(4, 4, 0, 4, 0, 4)  # 16 px of 1.0 -> s = 16 / 17
    expected = np.float32(0.3) * np.float32(16.0 / 17.0) ** 2
    kept = mask_wise_merge(_cands([0.3], [0], [m]), NT, (4, 4), thing_threshold=float(expected), return_candidates=True)
    assert (kept.category == 0).all() and (kept.instance == 1).all()
    above = float(np.nextafter(np.float32(kept.candidate_scores[0]), np.float32(1)))
    dropped = mask_wise_merge(_cands([0.3], [0], [m]), NT, (4, 4), thing_threshold=above)
    assert (dropped.category == -1).all() and (dropped.instance == 0).all() and dropped.segments == []


def test_thing_overlap_boundary_is_point_four() -> None:
    # A: 10 px (row 0), painted first (higher score). B: 10 px, of which k overlap A.
    h, w = 3, 10
    a = _rect(h, w, 0, 1, 0, 10)
    for k, kept in ((4, True), (5, False)):
        b = np.zeros((h, w), np.float32)
        b[0, :k] = 1.0
        b[1, : 10 - k] = 1.0
        res = mask_wise_merge(_cands([0.9, 0.8], [0, 1], [a, b]), NT, (h, w))
        assert (res.category[0] == 0).all() and (res.instance[0] == 1).all()
        if kept:
            assert (res.category[1, : 10 - k] == 1).all() and (res.instance[1, : 10 - k] == 2).all()
            assert [s["area"] for s in res.segments] == [10, 10 - k]
        else:
            assert (res.category[1] == -1).all()
            assert len(res.segments) == 1


def test_stuff_overlap_boundary_is_point_two() -> None:
    h, w = 3, 10
    a = _rect(h, w, 0, 1, 0, 10)
    for k, kept in ((2, True), (3, False)):
        s = np.zeros((h, w), np.float32)
        s[0, :k] = 1.0
        s[2, : 10 - k] = 1.0
        res = mask_wise_merge(_cands([0.9, 0.8], [0, 2], [a, s]), NT, (h, w))
        assert (res.category[2, : 10 - k] == (2 if kept else -1)).all()
        assert (res.instance[2] == 0).all()
        # The paper's single t_keep = 0.6 accepts both.
        res_paper = mask_wise_merge(_cands([0.9, 0.8], [0, 2], [a, s]), NT, (h, w), stuff_overlap=0.4)
        assert (res_paper.category[2, : 10 - k] == 2).all()


def test_stuff_painting_order_and_sorted_candidates() -> None:
    # Two stuff classes share the middle column; the higher-scored one takes it, the other keeps 2/3.
    h, w = 3, 3
    s2 = _rect(h, w, 0, 3, 0, 2)  # columns 0-1
    s3 = _rect(h, w, 0, 3, 1, 3)  # columns 1-2 ... overlap 3/6 = 0.5 > 0.2 -> dropped entirely
    res = mask_wise_merge(_cands([0.5, 0.9], [2, 3], [s2, s3]), NT, (h, w), return_candidates=True)
    assert list(res.candidate_labels) == [3, 2]
    assert res.candidate_scores[0] >= res.candidate_scores[1]
    assert (res.category[:, 1:] == 3).all() and (res.category[:, 0] == -1).all()
    np.testing.assert_array_equal(res.candidate_masks[0], s3)  # masks are reordered with the scores


def test_void_when_nothing_is_confident() -> None:
    m = _rect(4, 4, 0, 4, 0, 4)
    res = mask_wise_merge(_cands([0.2, 0.1], [0, 2], [m, m]), NT, (4, 4))
    assert (res.category == -1).all() and res.segments == []


def test_instances_numbered_in_painting_order() -> None:
    h, w = 2, 6
    masks = [_rect(h, w, 0, 2, 0, 2), _rect(h, w, 0, 2, 2, 4), _rect(h, w, 0, 2, 4, 6)]
    res = mask_wise_merge(_cands([0.4, 0.9, 0.6], [1, 0, 1], masks), NT, (h, w))
    assert res.instance[0].tolist() == [3, 3, 1, 1, 2, 2]
    assert res.category[0].tolist() == [1, 1, 0, 0, 1, 1]
    assert [s["instance"] for s in res.segments] == [1, 2, 3]


def test_masks_are_resized_like_opencv_bilinear() -> None:
    rng = np.random.default_rng(0)
    small = rng.uniform(0, 1.5, size=(2, 5, 7)).astype(np.float32)
    res = mask_wise_merge(_cands([0.9, 0.8], [0, 2], list(small)), NT, (20, 28), return_candidates=True)
    order = [list(res.candidate_labels).index(0), list(res.candidate_labels).index(2)]
    for k in range(2):
        # Upsampling: OpenCV INTER_LINEAR == bilinear with half-pixel centres (align_corners=False).
        ref = cv2.resize(small[k], (28, 20), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(res.candidate_masks[order[k]], ref, atol=1e-5)


def test_mask_wise_invariants_on_random_candidates() -> None:
    rng = np.random.default_rng(1)
    k, h, w = 30, 12, 16
    masks = list(rng.uniform(0, 1.2, size=(k, h, w)).astype(np.float32) * (rng.uniform(size=(k, 1, 1)) > 0.3))
    scores = list(rng.uniform(0.2, 1.0, size=k))
    labels = list(rng.integers(0, 4, size=k))
    cands = _cands(scores, labels, masks)
    res = mask_wise_merge(cands, NT, (h, w), return_candidates=True)
    assert np.all(np.diff(res.candidate_scores) <= 0)
    assert ((res.instance > 0) == ((res.category >= 0) & (res.category < NT))).all()
    for s in res.segments:
        region = (res.category == s["label"]) & (res.instance == s["instance"])
        assert region.sum() == s["area"]
        assert s["score"] >= 0.25
    # Every painted thing kept at least 60 % of its binary mask.
    for s in [s for s in res.segments if s["isthing"]]:
        idx = int(
            np.flatnonzero(np.isclose(res.candidate_scores, s["score"]) & (res.candidate_labels == s["label"]))[0]
        )
        binary = res.candidate_masks[idx] > 0.5
        assert s["area"] >= 0.6 * binary.sum() - 1e-9


def test_pixel_argmax() -> None:
    h, w = 2, 8
    a = _rect(h, w, 0, 2, 0, 5, 0.9)  # thing, columns 0-4
    b = _rect(h, w, 0, 2, 3, 8, 0.7)  # stuff, columns 3-7 (loses 3-4 to a)
    low = _rect(h, w, 0, 2, 0, 8, 5.0)  # score below threshold: ignored however large
    res = pixel_argmax(_cands([0.3, 0.6, 0.1], [0, 2, 1], [a, b, low]), NT, (h, w))
    assert res.category[0].tolist() == [0, 0, 0, 0, 0, 2, 2, 2]
    assert res.instance[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    # Void where the winning value is below 0.5.
    c = _rect(h, w, 0, 2, 0, 8, 0.4)
    res2 = pixel_argmax(_cands([0.9], [2], [c]), NT, (h, w))
    assert (res2.category == -1).all()
    # A candidate winning <= 4 pixels is removed and its pixels re-assigned.
    big = _rect(h, w, 0, 2, 0, 8, 0.6)
    tiny = _rect(h, w, 0, 1, 0, 2, 0.9)
    res3 = pixel_argmax(_cands([0.9, 0.9], [2, 0], [big, tiny]), NT, (h, w))
    assert (res3.category == 2).all() and [s["label"] for s in res3.segments] == [2]


def test_maskformer_merge() -> None:
    h, w = 2, 10
    a = _rect(h, w, 0, 2, 0, 6, 0.9)  # 12 px binary
    b = _rect(h, w, 0, 2, 4, 10, 0.9)  # 12 px binary; loses columns 4-5 to a (score 0.95 > 0.85)
    res = maskformer_merge(_cands([0.95, 0.85, 0.5], [0, 1, 2], [a, b, b]), NT, (h, w))
    # b keeps 8/12 = 0.67 < 0.8 -> dropped, its pixels void; the 0.5-score candidate is not kept at all.
    assert res.category[0].tolist() == [0] * 6 + [-1] * 4
    assert res.instance[0].tolist() == [1] * 6 + [0] * 4
    # With overlap 0.6 b survives with instance 2.
    res2 = maskformer_merge(_cands([0.95, 0.85], [0, 1], [a, b]), NT, (h, w), overlap_threshold=0.6)
    assert res2.category[0].tolist() == [0] * 6 + [1] * 4 and res2.instance[0, 9] == 2
    # Nothing above 0.8 -> all void.
    assert (maskformer_merge(_cands([0.8], [0], [a]), NT, (h, w)).category == -1).all()


def test_heuristic_merge() -> None:
    h, w = 10, 10
    t1 = _rect(h, w, 0, 5, 0, 5, 0.9)  # score 0.7: kept
    t2 = _rect(h, w, 0, 5, 2, 7, 0.9)  # score 0.6: overlaps t1 on 15/25 = 0.6 > 0.5 -> dropped
    t3 = _rect(h, w, 5, 10, 5, 10, 0.9)  # score 0.4 < 0.5 -> dropped
    s2 = _rect(h, w, 0, 10, 0, 10, 0.8)  # stuff everywhere
    s3 = _rect(h, w, 5, 10, 0, 10, 0.9)  # stuff on the lower half, stronger there
    c = _cands([0.7, 0.6, 0.4, 0.9, 0.9], [0, 1, 0, 2, 3], [t1, t2, t3, s2, s3])
    res = heuristic_merge(c, NT, (h, w), stuff_area_limit=20)
    assert (res.category[:5, :5] == 0).all() and (res.instance[:5, :5] == 1).all()
    # t3's 0.9 mask scored 0.36 < s3's 0.81: the semantic map says stuff 3 on the lower half.
    assert (res.category[5:] == 3).all()
    assert (res.category[:5, 5:] == 2).all()
    assert sorted(s["label"] for s in res.segments) == [0, 2, 3]
    # Area limit: stuff 2's 25 free pixels are below 30 -> void.
    res2 = heuristic_merge(c, NT, (h, w), stuff_area_limit=30)
    assert (res2.category[:5, 5:] == -1).all() and (res2.category[5:] == 3).all()


def test_candidates_from_outputs_and_dispatch() -> None:
    b, t, ns, h, w = 2, 3, 2, 4, 6
    g = torch.Generator().manual_seed(0)
    outputs = {
        "thing_scores": torch.rand(b, t, generator=g),
        "thing_labels": torch.randint(0, NT, (b, t), generator=g),
        "thing_boxes": torch.rand(b, t, 4, generator=g),
        "thing_masks": torch.rand(b, t, h, w, generator=g),
        "stuff_scores": torch.rand(b, ns, generator=g),
        "stuff_masks": torch.rand(b, ns, h, w, generator=g),
    }
    c = candidates_from_outputs(outputs, 1, NT, valid_hw=(3, 5))
    assert c.masks.shape == (t + ns, 3, 5)
    assert c.labels.tolist() == outputs["thing_labels"][1].tolist() + [2, 3]
    torch.testing.assert_close(c.masks[t + 1], outputs["stuff_masks"][1, 1, :3, :5])
    assert c.boxes is not None and c.boxes.shape == (t + ns, 4)
    for method in ("m", "p", "p*", "heuristic"):
        res = post_process(method, c, NT, (12, 15))
        assert res.category.shape == (12, 15) and res.category.dtype == np.int32
        assert res.instance.shape == (12, 15) and res.instance.dtype == np.int32
    with pytest.raises(ValueError, match="unknown post-processing"):
        post_process("x", c, NT, (12, 15))
