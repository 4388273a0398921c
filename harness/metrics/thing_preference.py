"""Thing-preference statistics of queries (paper Fig. 7, Table B.6, App. B.4).

For every query ``i`` of a model, over an evaluation set:

* ``N_things^i`` / ``N_stuff^i``: the thing / stuff masks the query predicted;
* ``P_t^i = N_things^i / (N_things^i + N_stuff^i)`` (Eq. 7), undefined (NaN) for a query that predicted nothing;
* thing precision and stuff precision: a predicted mask is a true positive when its IoU with a GT mask of the same
  category is > 0.5; precision = TP / (TP + FP).

Table B.6 bins the queries by ``P_t`` into ten groups ``[0.0, 0.1) ... [0.8, 0.9), [0.9, 1.0]`` and pools TP and
TP + FP per group; Fig. 7 plots stuff precision against ``P_t`` per query with its least-squares line
(:meth:`ThingPreferenceStats.regression`, ``scipy.stats.linregress``). For a joint-matching model
(``decouple_queries=False``: one shared query set, e.g. 353 queries) this measures how a query's preference for
things hurts its stuff masks; for a query-decoupling model the comparison number is the stuff precision of its
stuff queries (the paper: 0.66 vs 0.60 for joint matching), :meth:`ThingPreferenceStats.summary`.

Choices (the paper and the official script leave them open; see docs/thing_preference.md):

* **What a "predicted mask" is: a segment of the final panoptic output** (``stage="merged"``, default). A query
  predicts a mask when the official mask-wise merge (m) paints one of its candidates: rescored score ``>= t_cnf``,
  non-empty binary mask, overlap test passed; its mask is the pixels it actually painted. Why: Table B.6 totals
  51,131 masks on the 5,000 COCO val images, 10.2 per image, the size of a panoptic result, not the 100 top-k
  candidates every image has (500,000); the official script (``tools/ana_tools/ana_query.py``) reads a per-query
  dump of ``label, box, mask_area`` lines and buckets mask areas at COCO's 32^2 / 96^2, i.e. masks at the original
  resolution; and after the merge masks are disjoint, so an IoU > 0.5 match is one-to-one, as in PQ. The paper
  does not say whether the merge's overlap test ran before the dump, so ``stage="candidates"`` counts before it:
  every candidate with rescored score ``>= t_cnf`` and a non-empty binary mask, with its full mask (overlapping
  candidates may then both be TPs of one GT segment).
* **Resolution: the original GT resolution**, as the merge and PQ work. The masks are those of the mask-wise merge
  itself (``models.mask_wise.mask_wise_trace``: the post-processor ``models.postprocess.mask_wise_merge`` with its
  working shown), so merge decisions, painting order and painted pixels equal the post-processor's bit for bit
  (float32 rescoring and the official, unstable sort included). It stays cheap: a candidate whose rescored score
  cannot reach t_cnf is never resized, and the others are resized only on the output box around their input
  pixels above 0.5, exactly as ``F.interpolate`` (``models.box_resize``).
* **Crowd and void** follow PQ (panopticapi): GT crowd segments are never matched; the IoU union leaves out the
  predicted pixels on VOID; an unmatched predicted mask with more than half of its pixels on VOID or on crowd
  regions of its category is neither TP nor FP (``ignored``; panopticapi's rule, with all crowd regions of the
  category rather than panopticapi's last one). ``ignore_crowd_void=False`` counts plain IoU over all pixels and
  every unmatched mask as FP. P_t counts every predicted mask, ignored or not.

Counts are integers only, so :meth:`ThingPreferenceStats.merge` of shards equals one run exactly.

Unlike the rest of ``harness.metrics`` this module works on torch tensors (the candidates); it is imported only by
the eval grid, never by ``harness.metrics`` itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from harness.data.coco_panoptic import PanopticSample
from models.mask_wise import MaskWiseOptions, mask_wise_trace
from models.postprocess import Candidates

log = logging.getLogger(__name__)

__all__ = ["ThingPreferenceStats", "TABLE_B6_EDGES", "bin_labels", "MergeOptions", "CountedMask", "counted_masks"]

# Table B.6: ten bins of width 0.1; [lo, hi) except the last, [0.9, 1.0]. The paper prints the first as
# "(0.0, 0.1)" but its query counts sum to all 353 queries, so P_t = 0 falls in it: we write "[0.0, 0.1)".
TABLE_B6_EDGES: tuple[float, ...] = tuple(i / 10 for i in range(11))
_NUM_BINS = 10

_COUNTERS = ("n_things", "n_stuff", "thing_tp", "stuff_tp", "thing_ignored", "stuff_ignored")


def bin_labels() -> list[str]:
    """``["[0.0, 0.1)", ..., "[0.8, 0.9)", "[0.9, 1.0]"]``."""
    e = TABLE_B6_EDGES
    return [f"[{e[i]:.1f}, {e[i + 1]:.1f}{']' if i == _NUM_BINS - 1 else ')'}" for i in range(_NUM_BINS)]


@dataclass(frozen=True)
class MergeOptions(MaskWiseOptions):
    """The mask-wise merge (m) settings that decide which candidates are predicted masks.

    Those of ``models.postprocess.mask_wise_merge`` (pass the model's ``post_process_options("m")``: t_cnf 0.3 for
    Swin-L / PVTv2-B5).
    """

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> "MergeOptions":
        """From keyword options of ``mask_wise_merge``; ``ValueError`` naming an unknown key."""
        options = dict(options or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown mask-wise merge options for thing-preference: {', '.join(unknown)}")
        return cls(**options)


@dataclass(frozen=True)
class CountedMask:
    """One candidate that counts as a predicted mask.

    Attributes:
        index: position in the image's K candidates.
        box: ``(y0, y1, x0, x1)`` window of the output image holding every pixel of the mask.
        mask: ``(y1 - y0, x1 - x0)`` bool mask inside the window (painted pixels for ``stage="merged"``).
    """

    index: int
    box: tuple[int, int, int, int]
    mask: np.ndarray

    def full(self, out_size: tuple[int, int]) -> np.ndarray:
        """The mask pasted into an ``(H, W)`` bool array."""
        out = np.zeros(out_size, bool)
        y0, y1, x0, x1 = self.box
        out[y0:y1, x0:x1] = self.mask
        return out


def counted_masks(cands: Candidates, num_things: int, out_size: tuple[int, int], stage: str = "merged",
                  options: MergeOptions | None = None) -> list[CountedMask]:
    """The candidates that count as predicted masks, with their masks at ``out_size``.

    Args:
        cands: K candidates, masks ``(K, h, w)`` raw values.
        num_things: labels below it are things.
        out_size: ``(H, W)`` (the GT resolution).
        stage: ``"merged"`` (painted by the mask-wise merge; masks = painted pixels, disjoint) or ``"candidates"``
            (rescored score >= t_cnf and non-empty binary mask; full binary masks).
        options: merge settings (defaults: the official R50 ones).

    Returns:
        The counted masks in painting (merged) or descending rescored-score (candidates) order.
    """
    if stage not in ("merged", "candidates"):
        raise ValueError(f"stage must be 'merged' or 'candidates', got {stage!r}")
    k = int(cands.scores.shape[0])
    if k == 0 or cands.masks.shape[1] == 0 or cands.masks.shape[2] == 0:
        return []
    cpu = Candidates(cands.scores.detach().float().cpu(), cands.labels.detach().long().cpu(),
                     cands.masks.detach().float().cpu())
    trace = mask_wise_trace(cpu, num_things, (int(out_size[0]), int(out_size[1])), options or MergeOptions())
    if stage == "candidates":
        return [CountedMask(int(i), box, m) for i, box, m in zip(trace.index, trace.boxes, trace.masks)]
    return [CountedMask(int(i), box, p) for i, box, p in zip(trace.index, trace.boxes, trace.painted)
            if p is not None]


class ThingPreferenceStats:
    """Per-query counts of predicted thing / stuff masks and their true positives (see the module docstring).

    Args:
        num_queries: queries of the model (353 for the joint-matching R50 variant; 300 + 53 for the decoupled one).
        num_things: thing classes (labels below it are things).
        num_stuff: stuff classes.
        iou_threshold: TP when IoU with a same-category GT mask is strictly above it (0.5).
        num_thing_queries: None for a joint-matching model (every query ``"shared"``); for a query-decoupling model
            the number of thing queries: queries below it are ``"thing"``, the rest ``"stuff"`` (stuff query j has
            index ``num_thing_queries + j``, as ``Candidates.query_index``).
        stage: ``"merged"`` (default) or ``"candidates"``: which masks count as predicted.
        merge_options: mask-wise merge settings (``model.post_process_options("m")``); defaults are the R50 ones.
        ignore_crowd_void: PQ's crowd/void rules (default) or plain IoU with every unmatched mask a FP.
    """

    def __init__(self, num_queries: int, num_things: int, num_stuff: int, iou_threshold: float = 0.5,
                 num_thing_queries: int | None = None, stage: str = "merged",
                 merge_options: Mapping[str, Any] | MergeOptions | None = None,
                 ignore_crowd_void: bool = True) -> None:
        if num_queries < 1 or num_things < 0 or num_stuff < 0:
            raise ValueError(f"bad sizes: num_queries={num_queries}, num_things={num_things}, num_stuff={num_stuff}")
        if num_thing_queries is not None and not 0 <= num_thing_queries <= num_queries:
            raise ValueError(f"num_thing_queries {num_thing_queries} must lie in 0..num_queries ({num_queries})")
        if stage not in ("merged", "candidates"):
            raise ValueError(f"stage must be 'merged' or 'candidates', got {stage!r}")
        self.num_queries = int(num_queries)
        self.num_things = int(num_things)
        self.num_stuff = int(num_stuff)
        self.iou_threshold = float(iou_threshold)
        self.num_thing_queries = None if num_thing_queries is None else int(num_thing_queries)
        self.stage = stage
        self.merge_options = (merge_options if isinstance(merge_options, MergeOptions)
                              else MergeOptions.from_mapping(merge_options))
        self.ignore_crowd_void = bool(ignore_crowd_void)
        self.images = 0
        self.counts = {name: np.zeros(self.num_queries, np.int64) for name in _COUNTERS}

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def for_model(cls, model: Any, **kwargs: Any) -> "ThingPreferenceStats":
        """Sizes and merge options from a model: Panoptic SegFormer (joint or decoupled) or any model whose config
        has ``num_queries`` (one shared query set, e.g. DETR)."""
        cfg = model.cfg
        if hasattr(cfg, "decouple_queries"):
            if cfg.decouple_queries:
                nq, ntq = cfg.num_thing_queries + cfg.num_stuff, cfg.num_thing_queries
            else:
                nq, ntq = cfg.num_thing_queries, None
        elif hasattr(cfg, "num_queries"):
            nq, ntq = cfg.num_queries, None
        else:
            raise ValueError(f"model {getattr(cfg, 'name', type(model).__name__)}: cannot tell its number of queries")
        kwargs.setdefault("num_thing_queries", ntq)
        if "merge_options" not in kwargs and hasattr(model, "post_process_options"):
            opts = dict(model.post_process_options("m"))
            known = set(MergeOptions.__dataclass_fields__)
            ignored = sorted(set(opts) - known)
            if ignored:  # e.g. speed settings of the merge that do not change its decisions
                log.warning("thing-preference ignores merge options %s", ", ".join(ignored))
            kwargs["merge_options"] = {k: v for k, v in opts.items() if k in known}
        return cls(nq, cfg.num_things, cfg.num_stuff, **kwargs)

    def settings(self) -> dict[str, Any]:
        """Everything that must agree for two stats objects to merge (JSON-serialisable)."""
        return {"num_queries": self.num_queries, "num_things": self.num_things, "num_stuff": self.num_stuff,
                "iou_threshold": self.iou_threshold, "num_thing_queries": self.num_thing_queries,
                "stage": self.stage, "merge_options": dict(vars(self.merge_options)),
                "ignore_crowd_void": self.ignore_crowd_void}

    # ------------------------------------------------------------------ accumulation
    def add(self, cands: Candidates, sample: PanopticSample, out_size: tuple[int, int]) -> None:
        """Count one image's predicted masks (see the module docstring for what counts).

        Args:
            cands: the image's candidates, with ``query_index`` (K,).
            sample: its GT (``id_map`` (H, W), ``segments`` with contiguous ``label`` and ``iscrowd``).
            out_size: ``(H, W)`` of the original image; must equal the GT size.
        """
        if cands.query_index is None:
            raise ValueError(f"image {sample.image_id}: candidates carry no query_index; thing-preference "
                             "statistics need the query of every candidate")
        h, w = int(out_size[0]), int(out_size[1])
        if (h, w) != tuple(sample.id_map.shape):
            raise ValueError(f"image {sample.image_id}: out_size {(h, w)} differs from the GT size "
                             f"{tuple(sample.id_map.shape)}")
        qidx_all = cands.query_index.detach().long().cpu().numpy()
        if qidx_all.size and (qidx_all.min() < 0 or qidx_all.max() >= self.num_queries):
            raise ValueError(f"image {sample.image_id}: query index {int(qidx_all.max())} outside 0.."
                             f"{self.num_queries - 1}")
        counted = counted_masks(cands, self.num_things, (h, w), self.stage, self.merge_options)
        self.images += 1
        if not counted:
            return
        index = np.asarray([c.index for c in counted], np.int64)
        labels = cands.labels.detach().long().cpu().numpy()[index]
        tp, ignored = self._match(counted, labels, sample)
        qidx = qidx_all[index]
        isthing = labels < self.num_things
        for name, sel in (("n_things", isthing), ("n_stuff", ~isthing), ("thing_tp", isthing & tp),
                          ("stuff_tp", ~isthing & tp), ("thing_ignored", isthing & ignored),
                          ("stuff_ignored", ~isthing & ignored)):
            np.add.at(self.counts[name], qidx[sel], 1)

    def _match(self, counted: list[CountedMask], labels: np.ndarray, sample: PanopticSample
               ) -> tuple[np.ndarray, np.ndarray]:
        """TP and ignored flags (P,) of P counted masks with contiguous ``labels`` (P,)."""
        segs = sample.segments
        n = len(segs)
        # GT code map: 1..n = segments in JSON order, 0 = VOID (id 0) or an id the JSON does not list.
        seg_ids = np.asarray([s.id for s in segs], np.int64)
        id_map = np.asarray(sample.id_map)
        if n:
            order = np.argsort(seg_ids)
            sorted_ids = seg_ids[order]
            pos = np.clip(np.searchsorted(sorted_ids, id_map), 0, n - 1)
            gcode = np.where(sorted_ids[pos] == id_map, order[pos] + 1, 0)
        else:
            gcode = np.zeros(id_map.shape, np.int64)
        # (n + 1, P) intersections with every GT segment; row 0 = VOID.
        hist = np.stack([np.bincount(gcode[c.box[0]:c.box[1], c.box[2]:c.box[3]][c.mask], minlength=n + 1)
                         for c in counted], 1)
        p = len(counted)
        pred_area = hist.sum(0)
        gt_area = np.asarray([s.area for s in segs], np.int64)  # the JSON's areas, as panopticapi
        gt_label = np.asarray([s.label for s in segs], np.int64)
        crowd = np.asarray([bool(s.iscrowd) for s in segs], bool)
        inter = hist[1:]  # (n, P)
        void = hist[0] if self.ignore_crowd_void else np.zeros(p, np.int64)
        union = pred_area[None, :] + gt_area[:, None] - inter - void[None, :]
        same = (gt_label[:, None] == labels[None, :]) & ~crowd[:, None]
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        tp = ((iou > self.iou_threshold) & same & (inter > 0)).any(0)
        if not self.ignore_crowd_void:
            return tp, np.zeros(p, bool)
        on_crowd = (inter * (crowd[:, None] & (gt_label[:, None] == labels[None, :]))).sum(0)
        ignored = ~tp & ((void + on_crowd) / np.maximum(pred_area, 1) > 0.5)
        return tp, ignored

    def merge(self, other: "ThingPreferenceStats") -> None:
        """Add another object's counts (shards of one run); settings must agree. Exact (integers only)."""
        if other.settings() != self.settings():
            raise ValueError(f"cannot merge thing-preference statistics with different settings: "
                             f"{other.settings()} vs {self.settings()}")
        self.images += other.images
        for name in _COUNTERS:
            self.counts[name] += other.counts[name]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (settings, image count, integer counts) for shard files."""
        return {"settings": self.settings(), "images": self.images,
                "counts": {name: self.counts[name].tolist() for name in _COUNTERS}}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "ThingPreferenceStats":
        """Inverse of :meth:`state_dict`."""
        s = dict(state["settings"])
        obj = cls(s.pop("num_queries"), s.pop("num_things"), s.pop("num_stuff"), **s)
        obj.images = int(state["images"])
        for name in _COUNTERS:
            values = np.asarray(state["counts"][name], np.int64)
            if values.shape != (obj.num_queries,):
                raise ValueError(f"thing-preference state: counts {name!r} has {values.size} entries, "
                                 f"expected {obj.num_queries}")
            obj.counts[name] = values
        return obj

    # ------------------------------------------------------------------ results
    def kinds(self) -> list[str]:
        """``"shared"`` for every query of a joint-matching model, else ``"thing"`` / ``"stuff"``."""
        if self.num_thing_queries is None:
            return ["shared"] * self.num_queries
        return ["thing" if q < self.num_thing_queries else "stuff" for q in range(self.num_queries)]

    def per_query(self):  # -> pandas.DataFrame
        """One row per query: ``query, kind, n_things, n_stuff, p_t, thing_tp, stuff_tp, thing_precision,
        stuff_precision, thing_ignored, stuff_ignored``. ``p_t`` is NaN for a query without predictions; a
        precision is NaN when its TP + FP (= predicted - ignored) is 0."""
        import pandas as pd

        c = self.counts
        n = c["n_things"] + c["n_stuff"]
        with np.errstate(divide="ignore", invalid="ignore"):
            p_t = np.where(n > 0, c["n_things"] / np.maximum(n, 1), np.nan)
        return pd.DataFrame({
            "query": np.arange(self.num_queries, dtype=np.int64),
            "kind": self.kinds(),
            "n_things": c["n_things"].copy(),
            "n_stuff": c["n_stuff"].copy(),
            "p_t": p_t,
            "thing_tp": c["thing_tp"].copy(),
            "stuff_tp": c["stuff_tp"].copy(),
            "thing_precision": _ratio(c["thing_tp"], c["n_things"] - c["thing_ignored"]),
            "stuff_precision": _ratio(c["stuff_tp"], c["n_stuff"] - c["stuff_ignored"]),
            "thing_ignored": c["thing_ignored"].copy(),
            "stuff_ignored": c["stuff_ignored"].copy(),
        })

    def bin_index(self) -> np.ndarray:
        """(num_queries,) Table B.6 bin of each query (0..9), -1 without predictions. Exact integer arithmetic:
        bin = floor(10 * N_things / N), so P_t = 0.3 lands in [0.3, 0.4) and P_t = 1 in [0.9, 1.0]."""
        nt = self.counts["n_things"]
        n = nt + self.counts["n_stuff"]
        b = np.where(n > 0, np.minimum((_NUM_BINS * nt) // np.maximum(n, 1), _NUM_BINS - 1), -1)
        return b.astype(np.int64)

    def bins(self):  # -> pandas.DataFrame
        """Table B.6: rows for the ten P_t bins, ``none`` (queries that predicted nothing) and ``total``.

        Columns: ``bin, lo, hi, queries, stuff_tp, stuff_tp_fp, stuff_precision, thing_tp, thing_tp_fp,
        thing_precision``; TP + FP excludes ignored (crowd/void) masks; precisions pool the group's counts.
        """
        import pandas as pd

        c = self.counts
        b = self.bin_index()
        stuff_tpfp = c["n_stuff"] - c["stuff_ignored"]
        thing_tpfp = c["n_things"] - c["thing_ignored"]
        groups = [(label, TABLE_B6_EDGES[i], TABLE_B6_EDGES[i + 1], b == i) for i, label in enumerate(bin_labels())]
        groups.append(("none", np.nan, np.nan, b < 0))
        groups.append(("total", 0.0, 1.0, np.ones(self.num_queries, bool)))
        rows = []
        for label, lo, hi, sel in groups:
            s_tp, s_n = int(c["stuff_tp"][sel].sum()), int(stuff_tpfp[sel].sum())
            t_tp, t_n = int(c["thing_tp"][sel].sum()), int(thing_tpfp[sel].sum())
            rows.append({"bin": label, "lo": lo, "hi": hi, "queries": int(sel.sum()),
                         "stuff_tp": s_tp, "stuff_tp_fp": s_n, "stuff_precision": s_tp / s_n if s_n else np.nan,
                         "thing_tp": t_tp, "thing_tp_fp": t_n, "thing_precision": t_tp / t_n if t_n else np.nan})
        return pd.DataFrame(rows)

    def regression(self, min_stuff: int = 1, kinds: Sequence[str] | None = None) -> dict[str, float]:
        """Least-squares line of stuff precision on P_t over queries (Fig. 7), ``scipy.stats.linregress``.

        Args:
            min_stuff: use queries with at least this many stuff masks counted (TP + FP), so the stuff precision
                exists (queries with P_t = 1 never enter).
            kinds: restrict to these query kinds (e.g. ``["stuff"]``); None = all.

        Returns:
            ``slope, intercept, r, p, stderr, n``; NaN (with the n used) when fewer than two queries qualify or
            all their P_t are equal (a decoupled model's stuff queries all have P_t = 0).
        """
        from scipy import stats

        df = self.per_query()
        sel = (df["n_stuff"] - df["stuff_ignored"] >= max(int(min_stuff), 1)).to_numpy()
        if kinds is not None:
            sel &= df["kind"].isin(list(kinds)).to_numpy()
        x = df["p_t"].to_numpy()[sel]
        y = df["stuff_precision"].to_numpy()[sel]
        nan = float("nan")
        out = {"slope": nan, "intercept": nan, "r": nan, "p": nan, "stderr": nan, "n": int(sel.sum())}
        if x.size < 2 or np.all(x == x[0]):
            return out
        res = stats.linregress(x, y)
        out.update(slope=float(res.slope), intercept=float(res.intercept), r=float(res.rvalue),
                   p=float(res.pvalue), stderr=float(res.stderr))
        return out

    def summary(self) -> dict[str, Any]:
        """Pooled numbers: images, masks, TPs and precisions overall and per query kind (for a decoupled model the
        ``stuff_precision_stuff`` entry is the paper's comparison number, the stuff precision of stuff queries)."""
        c = self.counts
        kinds = np.asarray(self.kinds())
        out: dict[str, Any] = {"images": self.images, "queries": self.num_queries, "stage": self.stage}
        for kind in ["all", *sorted(set(kinds.tolist()))]:
            sel = np.ones(self.num_queries, bool) if kind == "all" else kinds == kind
            for what in ("thing", "stuff"):
                n_key = "n_things" if what == "thing" else "n_stuff"
                tp = int(c[f"{what}_tp"][sel].sum())
                tpfp = int((c[n_key] - c[f"{what}_ignored"])[sel].sum())
                out[f"{what}_tp_{kind}"] = tp
                out[f"{what}_tp_fp_{kind}"] = tpfp
                out[f"{what}_precision_{kind}"] = tp / tpfp if tpfp else float("nan")
        return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)
