"""Thing-preference statistics (Fig. 7, Table B.6) against hand counts and plain independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from harness.data.coco_panoptic import PanopticSample, Segment
from harness.metrics.thing_preference import MergeOptions, ThingPreferenceStats, bin_labels, counted_masks
from models.box_resize import exact_box_masks
from models.postprocess import Candidates, mask_wise_merge

NUM_THINGS, NUM_STUFF = 2, 2  # labels 0, 1 things; 2, 3 stuff


def _sample(id_map: np.ndarray, segs: list[tuple[int, int, bool]], image_id: int = 1) -> PanopticSample:
    """segs: (segment id, contiguous label, iscrowd); areas from the map (category id = label + 1)."""
    segments = [Segment(sid, label + 1, label, crowd, int((id_map == sid).sum()), (0.0, 0.0, 1.0, 1.0),
                        label < NUM_THINGS, id_map) for sid, label, crowd in segs]
    return PanopticSample(image_id, f"{image_id}.jpg", np.zeros((*id_map.shape, 3), np.uint8),
                          id_map.astype(np.uint32), segments)


def _cands(masks: list[np.ndarray], labels: list[int], queries: list[int], scores: list[float] | None = None
           ) -> Candidates:
    k = len(masks)
    return Candidates(scores=torch.tensor(scores or [1.0] * k, dtype=torch.float32),
                      labels=torch.tensor(labels, dtype=torch.long),
                      masks=torch.tensor(np.stack(masks).astype(np.float32)),
                      query_index=torch.tensor(queries, dtype=torch.long))


def _rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), np.float32)
    m[y0:y1, x0:x1] = 1.0
    return m


# GT of the hand-made image (8 x 10):
#   rows 0-3, cols 0-4: thing "A" (label 0, id 11)    rows 0-3, cols 5-9: stuff "S" (label 2, id 21)
#   rows 4-7, cols 0-4: stuff "T" (label 3, id 22)    rows 4-5, cols 5-9: crowd of label 1 (id 31)
#   rows 6-7, cols 5-9: VOID
H, W = 8, 10


def _hand_gt() -> PanopticSample:
    ids = np.zeros((H, W), np.int64)
    ids[0:4, 0:5] = 11
    ids[0:4, 5:10] = 21
    ids[4:8, 0:5] = 22
    ids[4:6, 5:10] = 31
    return _sample(ids, [(11, 0, False), (21, 2, False), (22, 3, False), (31, 1, True)])


def _hand_cands() -> Candidates:
    """Five candidates at full resolution (no resize), scores 1 (rescored = (c / (c + 1))^2 >= 0.25)."""
    return _cands(
        [
            _rect(H, W, 0, 4, 0, 5),    # q0, label 0: exactly A -> TP thing
            _rect(H, W, 0, 4, 5, 10),   # q1, label 2: exactly S -> TP stuff
            _rect(H, W, 4, 8, 0, 3),    # q1, label 3: 12 of T's 20 pixels, IoU 0.6 -> TP stuff
            _rect(H, W, 4, 8, 5, 10),   # q2, label 1: on crowd (10 px) + VOID (10 px) -> ignored thing
            _rect(H, W, 4, 8, 3, 5),    # q2, label 2: 8 px inside T, wrong class -> FP stuff
        ],
        labels=[0, 2, 3, 1, 2], queries=[0, 1, 1, 2, 2])


def test_hand_counts_p_t_precisions() -> None:
    st = ThingPreferenceStats(4, NUM_THINGS, NUM_STUFF)
    st.add(_hand_cands(), _hand_gt(), (H, W))
    df = st.per_query().set_index("query")
    assert list(df["kind"]) == ["shared"] * 4
    assert df["n_things"].tolist() == [1, 0, 1, 0]
    assert df["n_stuff"].tolist() == [0, 2, 1, 0]
    assert df["thing_tp"].tolist() == [1, 0, 0, 0]
    assert df["stuff_tp"].tolist() == [0, 2, 0, 0]
    assert df["thing_ignored"].tolist() == [0, 0, 1, 0]
    np.testing.assert_allclose(df["p_t"].to_numpy(), [1.0, 0.0, 0.5, np.nan])
    # q2's thing mask is ignored (crowd + VOID), so its thing precision has no denominator.
    np.testing.assert_allclose(df["thing_precision"].to_numpy(), [1.0, np.nan, np.nan, np.nan])
    np.testing.assert_allclose(df["stuff_precision"].to_numpy(), [np.nan, 1.0, 0.0, np.nan])


def test_plain_iou_without_crowd_void_rules() -> None:
    st = ThingPreferenceStats(4, NUM_THINGS, NUM_STUFF, ignore_crowd_void=False)
    st.add(_hand_cands(), _hand_gt(), (H, W))
    df = st.per_query()
    assert df["thing_ignored"].sum() == 0 and df["stuff_ignored"].sum() == 0
    assert df.loc[2, "thing_precision"] == 0.0  # the crowd/VOID mask is now a plain FP


def test_void_leaves_the_union() -> None:
    """S (20 px) + VOID (10 px) + crowd of another class (10 px) = 40 px, predicted as S's class: IoU 20 / 40 = 0.5
    (not > 0.5) with plain IoU; 20 / (40 - 10 VOID) = 0.67 with PQ's rule. S + VOID alone: TP either way."""
    gt = _hand_gt()
    s_void = _rect(H, W, 0, 4, 5, 10) + _rect(H, W, 6, 8, 5, 10)
    s_void_crowd = s_void + _rect(H, W, 4, 6, 5, 10)
    for mask, rule, expect in ((s_void, True, 1), (s_void, False, 1), (s_void_crowd, True, 1),
                               (s_void_crowd, False, 0)):
        st = ThingPreferenceStats(1, NUM_THINGS, NUM_STUFF, ignore_crowd_void=rule)
        st.add(_cands([mask], [2], [0]), gt, (H, W))
        assert st.counts["n_stuff"][0] == 1
        assert st.counts["stuff_tp"][0] == expect, (mask.sum(), rule)


def test_stage_merged_vs_candidates() -> None:
    """Two candidates on the same GT: the merge drops the second (overlap 1 > 0.4); before the merge both count
    and both are TPs; the lower-scored one of another query."""
    gt = _hand_gt()
    a = _rect(H, W, 0, 4, 0, 5)
    c = _cands([a, a], [0, 0], [0, 1], scores=[0.9, 0.8])
    merged = ThingPreferenceStats(2, NUM_THINGS, NUM_STUFF)
    merged.add(c, gt, (H, W))
    before = ThingPreferenceStats(2, NUM_THINGS, NUM_STUFF, stage="candidates")
    before.add(c, gt, (H, W))
    assert merged.counts["n_things"].tolist() == [1, 0] and merged.counts["thing_tp"].tolist() == [1, 0]
    assert before.counts["n_things"].tolist() == [1, 1] and before.counts["thing_tp"].tolist() == [1, 1]


def test_confidence_threshold_decides_what_counts() -> None:
    gt = _hand_gt()
    a = _rect(H, W, 0, 4, 0, 5)  # 20 px: s_mask = 20/21, rescored = score * 0.907
    c = _cands([a], [0], [0], scores=[0.26])  # 0.236 < 0.25: not predicted
    st = ThingPreferenceStats(1, NUM_THINGS, NUM_STUFF)
    st.add(c, gt, (H, W))
    assert st.counts["n_things"][0] == 0 and st.images == 1
    st = ThingPreferenceStats(1, NUM_THINGS, NUM_STUFF, merge_options={"thing_threshold": 0.2})
    st.add(c, gt, (H, W))
    assert st.counts["n_things"][0] == 1


# ----------------------------------------------------------------------------- independent oracle


def _plain_count(cands: Candidates, sample: PanopticSample, out_size: tuple[int, int], stage: str,
                 num_queries: int) -> dict[str, np.ndarray]:
    """Independent per-candidate loop: full-resolution masks of every candidate, the merge written out plainly,
    IoU with Python sets of pixel coordinates."""
    h, w = out_size
    up = torch.nn.functional.interpolate(cands.masks[None].float(), size=(h, w), mode="bilinear",
                                         align_corners=False)[0]
    out = {k: np.zeros(num_queries, np.int64) for k in
           ("n_things", "n_stuff", "thing_tp", "stuff_tp", "thing_ignored", "stuff_ignored")}
    seg = (up > 0.5).numpy()
    vals = up.numpy()
    rescored = []
    for k in range(len(seg)):
        c = seg[k].sum()
        s = (vals[k] * seg[k]).sum() / (c + 1)
        rescored.append(float(cands.scores[k]) * s * s)
    order = sorted(range(len(seg)), key=lambda k: -rescored[k])
    filled = np.zeros((h, w), bool)
    preds = []
    for k in order:
        label = int(cands.labels[k])
        if rescored[k] < 0.25 or seg[k].sum() == 0:
            continue
        if stage == "candidates":
            preds.append((k, seg[k]))
            continue
        overlap = (seg[k] & filled).sum() / seg[k].sum()
        if overlap > (0.4 if label < NUM_THINGS else 0.2):
            continue
        m = seg[k] & ~filled
        filled |= m
        preds.append((k, m))
    ids = np.asarray(sample.id_map)
    void = {(y, x) for y, x in zip(*np.nonzero(ids == 0))}
    for k, m in preds:
        label = int(cands.labels[k])
        q = int(cands.query_index[k])
        kind = "things" if label < NUM_THINGS else "stuff"
        pix = {(y, x) for y, x in zip(*np.nonzero(m))}
        out[f"n_{kind}"][q] += 1
        tp = False
        crowd_pix: set = set()
        for s in sample.segments:
            g = {(y, x) for y, x in zip(*np.nonzero(ids == s.id))}
            if s.label != label:
                continue
            if s.iscrowd:
                crowd_pix |= g
                continue
            inter = len(pix & g)
            union = len(pix | g) - len(pix & void)
            if inter and inter / union > 0.5:
                tp = True
        name = "thing" if kind == "things" else "stuff"
        if tp:
            out[f"{name}_tp"][q] += 1
        elif (len(pix & void) + len(pix & crowd_pix)) / len(pix) > 0.5:
            out[f"{name}_ignored"][q] += 1
    return out


def _random_image(rng: np.random.Generator, num_queries: int, low: tuple[int, int], out: tuple[int, int],
                  k: int, image_id: int) -> tuple[Candidates, PanopticSample]:
    h, w = out
    ids = np.zeros((h, w), np.int64)
    segs = []
    # Stuff bands, then thing boxes, a crowd box and a VOID strip.
    for j, y0 in enumerate(range(0, h, h // 3)):
        ids[y0:y0 + h // 3] = 100 + j
        segs.append((100 + j, NUM_THINGS + j % NUM_STUFF, False))
    for j in range(4):
        y0, x0 = rng.integers(0, h - 16), rng.integers(3, w - 16)
        ids[y0:y0 + rng.integers(12, 24), x0:x0 + rng.integers(12, 24)] = 200 + j
        segs.append((200 + j, j % NUM_THINGS, j == 3))
    ids[:, :12] = 0  # VOID strip
    present = set(np.unique(ids).tolist())
    segs = [s for s in segs if s[0] in present]
    # Candidates: blobs on GT segments or on VOID (some shifted, some with the wrong label) over weak noise.
    lh, lw = low
    masks = rng.random((k, lh, lw)).astype(np.float32) * 0.55
    labels = rng.integers(0, NUM_THINGS + NUM_STUFF, k)
    small = torch.nn.functional.interpolate(torch.tensor(ids, dtype=torch.float32)[None, None], size=low,
                                            mode="nearest")[0, 0].numpy()
    targets = segs + [(0, int(rng.integers(0, NUM_THINGS + NUM_STUFF)), False)]
    for j in range(k):
        sid, label, _ = targets[rng.integers(len(targets))]
        region = small == sid
        if rng.random() < 0.3:
            region = np.roll(region, 1, axis=int(rng.integers(2)))
        masks[j][region] += rng.uniform(0.5, 1.5)
        if rng.random() < 0.8:
            labels[j] = label
    scores = rng.uniform(0.1, 1.0, k).astype(np.float32)
    queries = rng.integers(0, num_queries, k)
    cands = Candidates(torch.tensor(scores), torch.tensor(labels, dtype=torch.long), torch.tensor(masks),
                       query_index=torch.tensor(queries, dtype=torch.long))
    return cands, _sample(ids, segs, image_id)


@pytest.mark.parametrize("stage", ["merged", "candidates"])
def test_random_images_equal_plain_computation(stage: str) -> None:
    rng = np.random.default_rng(0)
    nq = 12
    st = ThingPreferenceStats(nq, NUM_THINGS, NUM_STUFF, stage=stage)
    expect = {k: np.zeros(nq, np.int64) for k in st.counts}
    for i in range(6):
        cands, sample = _random_image(rng, nq, (9, 12), (70, 90), 20, i)
        st.add(cands, sample, sample.id_map.shape)
        for k, v in _plain_count(cands, sample, sample.id_map.shape, stage, nq).items():
            expect[k] += v
    for k in st.counts:
        np.testing.assert_array_equal(st.counts[k], expect[k], err_msg=k)
    assert st.counts["n_things"].sum() + st.counts["n_stuff"].sum() > 20  # the test exercises something
    assert st.counts["thing_tp"].sum() > 0 and st.counts["stuff_tp"].sum() > 0
    assert st.counts["thing_ignored"].sum() + st.counts["stuff_ignored"].sum() > 0


def test_merged_masks_reproduce_mask_wise_merge() -> None:
    """The painted masks of `counted_masks` rebuild mask_wise_merge's panoptic map exactly (R50 options), and they
    are its segments' painting candidates, in order (box path at 67x85, full-resolution path at 45x61)."""
    rng = np.random.default_rng(1)
    for i in range(6):
        cands, sample = _random_image(rng, 12, (9, 11) if i % 3 else (6, 8), (67, 85) if i % 3 else (45, 61), 25, i)
        out_size = sample.id_map.shape
        for opts in ({}, {"thing_threshold": 0.3, "stuff_threshold": 0.3, "stuff_overlap": 0.4}, {"stable": True}):
            ref = mask_wise_merge(cands, NUM_THINGS, out_size, **opts)
            counted = counted_masks(cands, NUM_THINGS, out_size, "merged", MergeOptions.from_mapping(opts))
            category = np.full(out_size, -1, np.int32)
            instance = np.zeros(out_size, np.int32)
            inst = 1
            for c in counted:
                m = c.full(out_size)
                label = int(cands.labels[c.index])
                category[m] = label
                if label < NUM_THINGS:
                    instance[m] = inst
                    inst += 1
            np.testing.assert_array_equal(category, ref.category)
            np.testing.assert_array_equal(instance, ref.instance)
            assert [c.index for c in counted if c.mask.any()] == [s["candidate"] for s in ref.segments]
            assert len(counted) > 0


def test_counted_masks_equal_interpolate() -> None:
    """Counted masks are F.interpolate's binary masks exactly, up- and downsampling (box path and the small-output
    fallback); the box resize they come from gives F.interpolate's values bit for bit; a mask with no value above
    0.5 counts nothing."""
    rng = np.random.default_rng(2)
    for h, w, big_h, big_w in ((13, 17, 101, 133), (60, 80, 480, 640), (40, 30, 25, 21), (9, 9, 9, 9)):
        low = torch.tensor(rng.random((2, h, w)).astype(np.float32) * 0.5)
        low[:, rng.integers(0, h), rng.integers(0, w)] = 1.7
        low[:, rng.integers(0, h):, rng.integers(0, w):] += 0.3
        ref = torch.nn.functional.interpolate(low[None], size=(big_h, big_w), mode="bilinear",
                                              align_corners=False)[0]
        cands = _cands(list(low.numpy()), [0, 2], [0, 1])
        counted = counted_masks(cands, NUM_THINGS, (big_h, big_w), "candidates",
                                MergeOptions(thing_threshold=0.0, stuff_threshold=0.0))
        assert sorted(c.index for c in counted) == [0, 1]
        for c in counted:
            np.testing.assert_array_equal(c.full((big_h, big_w)), (ref[c.index] > 0.5).numpy())
        bm = exact_box_masks(low, cands.scores, (big_h, big_w))
        if big_h + big_w > 128:  # the box path
            assert bm is not None
            for c, values in zip(counted, bm.values([c.index for c in counted], [c.box for c in counted])):
                y0, y1, x0, x1 = c.box
                np.testing.assert_array_equal(values, ref[c.index, y0:y1, x0:x1].numpy())
    flat = _cands([np.full((5, 5), 0.5, np.float32)] * 2, [0, 2], [0, 1])
    assert counted_masks(flat, NUM_THINGS, (40, 100), "candidates", MergeOptions(0.0, 0.0)) == []


# ----------------------------------------------------------------------------- bins and regression


def _stats_with_counts(n_things: list[int], n_stuff: list[int], thing_tp: list[int], stuff_tp: list[int]
                       ) -> ThingPreferenceStats:
    st = ThingPreferenceStats(len(n_things), 80, 53)
    for name, v in (("n_things", n_things), ("n_stuff", n_stuff), ("thing_tp", thing_tp), ("stuff_tp", stuff_tp)):
        st.counts[name] = np.asarray(v, np.int64)
    return st


def test_bins_edges_and_totals() -> None:
    # P_t = 0, 1/10, 3/10 (float 0.3 trap), 2/3, 0.9, 1, and one query without predictions.
    st = _stats_with_counts([0, 1, 3, 2, 9, 5, 0], [4, 9, 7, 1, 1, 0, 0], [0, 1, 2, 1, 6, 4, 0],
                            [3, 5, 2, 0, 1, 0, 0])
    df = st.bins().set_index("bin")
    assert list(df.index) == bin_labels() + ["none", "total"]
    assert bin_labels()[0] == "[0.0, 0.1)" and bin_labels()[-1] == "[0.9, 1.0]"
    expect_queries = {"[0.0, 0.1)": 1, "[0.1, 0.2)": 1, "[0.3, 0.4)": 1, "[0.6, 0.7)": 1, "[0.9, 1.0]": 2,
                      "none": 1, "total": 7}
    for label in df.index:
        assert df.loc[label, "queries"] == expect_queries.get(label, 0), label
    # Plain pooling for the [0.9, 1.0] bin: queries 4 and 5.
    assert df.loc["[0.9, 1.0]", "thing_tp"] == 10 and df.loc["[0.9, 1.0]", "thing_tp_fp"] == 14
    assert df.loc["[0.9, 1.0]", "stuff_tp"] == 1 and df.loc["[0.9, 1.0]", "stuff_tp_fp"] == 1
    assert df.loc["total", "stuff_tp"] == 11 and df.loc["total", "stuff_tp_fp"] == 22
    assert df.loc["total", "stuff_precision"] == pytest.approx(0.5)
    assert df.loc["total", "thing_precision"] == pytest.approx(14 / 20)
    assert math.isnan(df.loc["[0.2, 0.3)", "stuff_precision"])


def test_table_b6_counts_reproduce_its_precisions() -> None:
    """Feeding Table B.6's pooled counts (one query per bin) gives its printed precisions."""
    table = [(7318, 10060, 136, 222), (839, 1308, 140, 198), (121, 212, 53, 69), (339, 646, 252, 368),
             (211, 446, 212, 365), (327, 684, 477, 903), (339, 810, 1001, 1465), (400, 1094, 2019, 3255),
             (539, 1586, 6325, 9687), (309, 1029, 11252, 16724)]
    # One synthetic query per row cannot have the row's P_t, so check pooling only (bins by P_t are tested above).
    st = _stats_with_counts([r[3] for r in table], [r[1] for r in table], [r[2] for r in table],
                            [r[0] for r in table])
    total = st.bins().set_index("bin").loc["total"]
    assert (total["stuff_tp"], total["stuff_tp_fp"], total["thing_tp"], total["thing_tp_fp"]) == (
        10742, 17875, 21867, 33256)
    assert round(total["stuff_precision"], 2) == 0.60 and round(total["thing_precision"], 2) == 0.66


def test_regression_equals_plain_formulas() -> None:
    rng = np.random.default_rng(3)
    n = 40
    nt = rng.integers(0, 50, n)
    ns = rng.integers(1, 50, n)
    ns[:3] = 0  # no stuff: excluded
    st = _stats_with_counts(nt.tolist(), ns.tolist(), (nt // 2).tolist(), (ns * rng.random(n)).astype(int).tolist())
    reg = st.regression()
    sel = ns > 0
    x = nt[sel] / (nt[sel] + ns[sel])
    y = (ns * 0 + st.counts["stuff_tp"])[sel] / ns[sel]
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    r = np.corrcoef(x, y)[0, 1]
    t = r * math.sqrt((len(x) - 2) / (1 - r * r))
    p = 2 * sps.t.sf(abs(t), len(x) - 2)
    assert reg["n"] == n - 3
    assert reg["slope"] == pytest.approx(slope, rel=1e-12)
    assert reg["intercept"] == pytest.approx(y.mean() - slope * x.mean(), rel=1e-12)
    assert reg["r"] == pytest.approx(r, rel=1e-12)
    assert reg["p"] == pytest.approx(p, rel=1e-9)


def test_regression_degenerate_and_decoupled_summary() -> None:
    # Decoupled: 3 thing queries (things only), 2 stuff queries (stuff only): P_t constant over stuff queries.
    st = ThingPreferenceStats(5, 80, 53, num_thing_queries=3)
    st.counts["n_things"] = np.array([5, 4, 3, 0, 0])
    st.counts["thing_tp"] = np.array([3, 2, 1, 0, 0])
    st.counts["n_stuff"] = np.array([0, 0, 0, 10, 6])
    st.counts["stuff_tp"] = np.array([0, 0, 0, 7, 3])
    assert st.kinds() == ["thing"] * 3 + ["stuff"] * 2
    reg = st.regression()
    assert reg["n"] == 2 and math.isnan(reg["slope"])
    s = st.summary()
    assert s["stuff_precision_stuff"] == pytest.approx(10 / 16)
    assert s["thing_precision_thing"] == pytest.approx(6 / 12)
    assert s["stuff_precision_all"] == pytest.approx(10 / 16)


# ----------------------------------------------------------------------------- merge, state, errors


def test_merge_equals_single_run_and_state_round_trip() -> None:
    rng = np.random.default_rng(5)
    images = [_random_image(rng, 10, (6, 8), (45, 61), 15, i) for i in range(6)]
    single = ThingPreferenceStats(10, NUM_THINGS, NUM_STUFF)
    a = ThingPreferenceStats(10, NUM_THINGS, NUM_STUFF)
    b = ThingPreferenceStats(10, NUM_THINGS, NUM_STUFF)
    for i, (c, s) in enumerate(images):
        single.add(c, s, s.id_map.shape)
        (a if i % 2 else b).add(c, s, s.id_map.shape)
    a.merge(ThingPreferenceStats.from_state_dict(b.state_dict()))
    assert a.images == single.images == 6
    assert a.per_query().equals(single.per_query())
    assert a.bins().equals(single.bins())


def test_bad_input() -> None:
    gt = _hand_gt()
    c = _hand_cands()
    st = ThingPreferenceStats(4, NUM_THINGS, NUM_STUFF)
    with pytest.raises(ValueError, match="query_index"):
        st.add(Candidates(c.scores, c.labels, c.masks), gt, (H, W))
    with pytest.raises(ValueError, match="differs from the GT size"):
        st.add(c, gt, (H + 1, W))
    with pytest.raises(ValueError, match="outside 0..1"):
        ThingPreferenceStats(2, NUM_THINGS, NUM_STUFF).add(c, gt, (H, W))
    with pytest.raises(ValueError, match="different settings"):
        st.merge(ThingPreferenceStats(4, NUM_THINGS, NUM_STUFF, stage="candidates"))
    with pytest.raises(ValueError, match="unknown mask-wise merge options"):
        ThingPreferenceStats(4, NUM_THINGS, NUM_STUFF, merge_options={"t_cnf": 0.3})


@pytest.mark.parametrize("decouple", [True, False])
def test_tiny_model_candidates(decouple: bool) -> None:
    """Real query indices from the tiny model: joint (one shared set) and decoupled (stuff j -> Qt + j)."""
    from models.zoo import build_model, get_config

    torch.manual_seed(0)
    cfg = get_config("panoptic_segformer_tiny", num_things=NUM_THINGS, num_stuff=NUM_STUFF,
                     decouple_queries=decouple, num_thing_queries=12, max_per_image=10)
    model = build_model(cfg).eval()
    st = ThingPreferenceStats.for_model(model, merge_options={"thing_threshold": 0.0, "stuff_threshold": 0.0})
    assert st.num_queries == (12 + NUM_STUFF if decouple else 12)
    assert st.num_thing_queries == (12 if decouple else None)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    cands = model.candidates(out, 0)
    # Make every mask non-empty so every candidate can count.
    cands = Candidates(cands.scores, cands.labels, cands.masks + 1.0, query_index=cands.query_index)
    ids = np.zeros((40, 48), np.int64)
    ids[:20] = 5
    ids[20:] = 6
    sample = _sample(ids, [(5, 2, False), (6, 0, False)])
    st.add(cands, sample, (40, 48))
    df = st.per_query()
    assert (df["n_things"] + df["n_stuff"]).sum() >= 1
    if decouple:
        assert set(df.loc[df["n_stuff"] > 0, "kind"]) <= {"stuff"}
        assert set(df.loc[df["n_things"] > 0, "kind"]) <= {"thing"}
