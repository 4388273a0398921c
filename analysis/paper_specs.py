"""The specs of every table in the paper (Tables 1-8, 10, 11; B.1-B.6; D.1). There is no Table 9.

Mapping conventions (see docs/analysis.md):

* Panoptic SegFormer rows use post-processor "m" (the official mask-wise merging); baselines their own ("own"),
  except where the paper names the method: "(p)" is the model's own pixel-wise argmax where it has one (DETR,
  D-DETR with DETR's head), else our "p"; MaskFormer "(p*)" is its own inference (= "p*").
* Variants that were never released (joint matching, location-decoder / head ablations, 12-epoch weights) are
  rows of the same model name with a variant label (``harness report --results RUN=joint``).
* Rows of methods this harness does not implement (Panoptic FPN, SOLOv2, K-Net, Max-DeepLab, ...) keep only the
  paper's numbers; their ``note`` says so.
"""

from __future__ import annotations

from analysis.recipes import Recipe, SweepGrid, TrainSpec
from analysis.specs import (BinValue, ColumnSpec, CorruptionMean, CorruptionsMean, Fps, Metric, ProfileValue,
                            RowSpec, Select, TableSpec)
from analysis.thing_preference import BIN_LABELS
from harness.engine.results import CORRUPTIONS_TABLE11

__all__ = ["TABLE_SPECS", "table_spec"]

R50, R101, SWIN, PVT = ("panoptic_segformer_r50", "panoptic_segformer_r101", "panoptic_segformer_swin_l",
                        "panoptic_segformer_pvtv2_b5")
DETR, DETR101, DDETR = "detr_r50_panoptic", "detr_r101_panoptic", ("deformable_detr_r50_ms_refine",
                                                                   "deformable_detr_r50_ms")
MF, MF_SWIN, PFCN = "maskformer_r50_panoptic", "maskformer_swin_l_panoptic", "panoptic_fcn_r50_3x"
NOT_IMPLEMENTED = "method not implemented in this harness: paper value only"
DDETR_TRAIN = TrainSpec(DDETR[0], 50, "DETR's panoptic head on D-DETR-MS (no panoptic D-DETR release)")


def _m(name: str, key: str, column: str) -> ColumnSpec:
    return ColumnSpec(name, key, Metric(column))


PQ3 = (_m("PQ", "PQ", "pq"), _m("PQ^th", "PQ_th", "pq_th"), _m("PQ^st", "PQ_st", "pq_st"))
SQRQ = (_m("SQ", "SQ", "sq"), _m("RQ", "RQ", "rq"))
PROFILE_COLS = (ColumnSpec("#P (M)", "params_M", ProfileValue("params_M")),
                ColumnSpec("#F (G)", "flops_G", ProfileValue("flops_G")))


def _row(label: str, paper: dict, models: str | tuple[str, ...] | None = None, pp: tuple[str, ...] | None = None,
         variant: str = "default", recipe: Recipe | None = None, note: str = "", **select: object) -> RowSpec:
    if models is None:
        return RowSpec(label, paper, None, None, note or NOT_IMPLEMENTED)
    models = (models,) if isinstance(models, str) else models
    return RowSpec(label, paper, Select(models, pp, variant=variant, **select), recipe, note)  # type: ignore[arg-type]


def _psf(model: str, **kw: object) -> Recipe:
    kw.setdefault("post_process", ("m",))
    return Recipe(model, **kw)  # type: ignore[arg-type]


def _base(model: str, pp: tuple[str, ...] = ("own",), **kw: object) -> Recipe:
    train = DDETR_TRAIN if model in DDETR else None
    return Recipe(model, post_process=pp, train=train, **kw)  # type: ignore[arg-type]


def _train(change: str, epochs: int = 24, config: str = R50) -> TrainSpec:
    return TrainSpec(config, epochs, change)


def _table_1() -> TableSpec:
    def r(method: str, backbone: str, epochs: int, model: str | None = None, variant: str = "default",
          note: str = "") -> RowSpec:
        label = f"{method} ({backbone}{', ' + str(epochs) + ' ep' if method == 'Panoptic SegFormer' else ''})"
        pp = ("m",) if model and model.startswith("panoptic_segformer") else ("own",)
        recipe = None if model is None else Recipe(model, variant, pp, profile=True)
        return _row(label, {"method": method, "backbone": backbone, "epochs": epochs}, model, pp, variant, recipe,
                    note)
    rows = (
        r("Panoptic FPN", "R50", 36), r("SOLOv2", "R50", 36), r("DETR", "R50", 325, DETR),
        r("Panoptic FCN", "R50", 36, PFCN), r("K-Net", "R50", 36), r("MaskFormer", "R50", 300, MF),
        r("Panoptic SegFormer", "R50", 12, R50, "1x"), r("Panoptic SegFormer", "R50", 24, R50),
        r("DETR", "R101", 325, DETR101), r("Max-Deeplab-S", "Max-S", 54),
        r("MaskFormer", "R101", 300, note="no MaskFormer R101 config in models/baselines: paper value only"),
        r("Panoptic SegFormer", "R101", 24, R101), r("Max-Deeplab-L", "Max-L", 54),
        r("Panoptic FCN", "Swin-L", 36, note="no Panoptic FCN Swin-L config: paper value only"),
        r("MaskFormer", "Swin-L", 300, MF_SWIN), r("K-Net", "Swin-L", 36), r("Panoptic SegFormer", "Swin-L", 24, SWIN),
        r("Panoptic SegFormer", "PVTv2-B5", 24, PVT),
    )
    return TableSpec("1", rows, PQ3 + PROFILE_COLS, notes=(
        "#P / #F from `harness profile` (trainable parameters and mmcv FLOPs at 1200x800, the official convention).",
        "The 12-epoch row is the `panoptic_segformer_r50_1x.pth` release (variant `1x`).",
    ))


def _table_2() -> TableSpec:
    note = "COCO test-dev GT is not public: score predictions on the evaluation server; no harness recipe"
    rows = tuple(
        _row(f"{m} ({b})", {"method": m, "backbone": b}, model, pp, note=note if model else "")
        for m, b, model, pp in (
            ("Max-Deeplab-L", "Max-L", None, None), ("Innovation", "ensemble", None, None),
            ("MaskFormer", "Swin-L", MF_SWIN, ("own",)), ("K-Net", "Swin-L", None, None),
            ("Panoptic SegFormer", "R50", R50, ("m",)), ("Panoptic SegFormer", "R101", R101, ("m",)),
            ("Panoptic SegFormer", "Swin-L", SWIN, ("m",)), ("Panoptic SegFormer", "PVTv2-B5", PVT, ("m",)),
        ))
    return TableSpec("2", rows, PQ3 + SQRQ, split="test-dev", notes=(note + ".",))


def _table_3() -> TableSpec:
    ade = Recipe(R50, post_process=("m",), data="ade20k",
                 train=_train("ADE20K classes (100 things, 50 stuff queries), 100 epochs, lr decay at 80", 100))
    rows = (
        _row("BGRNet (R50)", {"method": "BGRNet"}), _row("Auto-Panoptic (ShuffleNetV2)", {"method": "Auto-Panoptic"}),
        _row("MaskFormer (R50)", {"method": "MaskFormer", "backbone": "R50"},
             note="no ADE20K MaskFormer weights in models/baselines: paper value only"),
        _row("MaskFormer (R101)", {"method": "MaskFormer", "backbone": "R101"},
             note="no MaskFormer R101 config: paper value only"),
        _row("Panoptic SegFormer (R50)", {"method": "Panoptic SegFormer"}, R50, ("m",), recipe=ade),
    )
    return TableSpec("3", rows, PQ3 + SQRQ, dataset="ade20k")


def _table_4() -> TableSpec:
    note = "COCO test-dev GT is not public; no harness recipe"
    rows = tuple(_row(f"{m} (R50)", {"method": m}) for m in ("Mask R-CNN", "SOLOv2", "K-Net", "SOLQ", "HTC",
                                                               "QueryInst")) + (
        _row("Ours (w/o crop) (R50)", {"method": "Ours (w/o crop)"}, R50, ("m",), "no_crop", note=note),
        _row("Ours (w/ crop) (R50)", {"method": "Ours (w/ crop)"}, R50, ("m",), note=note),
    )
    cols = (_m("AP^seg", "AP_seg", "ap_segm"),) + tuple(
        ColumnSpec(n, k, None) for n, k in (("AP_S^seg", "AP_seg_S"), ("AP_M^seg", "AP_seg_M"),
                                            ("AP_L^seg", "AP_seg_L")))
    return TableSpec("4", rows, cols, split="test-dev", notes=(
        note + ". AP by object size is not in the results table (empty).",))


def _table_5() -> TableSpec:
    joint = _train("decouple_queries=False (joint matching, 353 queries)")
    rows = (
        _row("baseline (DETR [1])", {"step": "baseline (DETR [1])"}, DETR, ("own",),
             recipe=_base(DETR, ("own", "m"), profile=True)),
        _row("+ mask-wise merging", {"step": "+ mask-wise merging"}, DETR, ("m",),
             recipe=_base(DETR, ("own", "m"), profile=True)),
        _row("++ ms deformable attention [12]", {"step": "++ ms deformable attention [12]"}, DDETR, ("m",),
             recipe=_base(DDETR[0], ("m",), profile=True)),
        _row("+++ mask decoder", {"step": "+++ mask decoder"}, R50, ("m",), "joint",
             recipe=_psf(R50, variant="joint", train=joint, profile=True)),
        _row("++++ query decoupling", {"step": "++++ query decoupling"}, R50, ("m",),
             recipe=_psf(R50, profile=True)),
    )
    cols = (_m("PQ", "PQ", "pq"), ColumnSpec("#Params (M)", "params_M", ProfileValue("params_M")),
            ColumnSpec("FLOPs (G)", "flops_G", ProfileValue("flops_G")), ColumnSpec("FPS", "fps", Fps()))
    return TableSpec("5", rows, cols, notes=("FPS = 1 / sec_per_image of the clean eval row (paper: one V100, "
                                             "batch 1).",))


def _table_6() -> TableSpec:
    def r(label: str, variant: str, change: str) -> RowSpec:
        recipe = _psf(R50, variant=variant, train=_train(change)) if change else _psf(R50)
        return _row(label, {"layers": label}, R50, ("m",), variant, recipe)
    rows = (r("0", "loc0", "num_location_layers=0"), r("1", "loc1", "num_location_layers=1"),
            r("2", "loc2", "num_location_layers=2"), r("6* (box-free)", "box_free", "box_free=True"),
            r("6", "default", ""))
    return TableSpec("6", rows, PQ3)


def _table_7() -> TableSpec:
    def r(method: str, pp: str, models: str | tuple[str, ...], select_pp: tuple[str, ...]) -> RowSpec:
        first = models if isinstance(models, str) else models[0]
        recipe = (_psf(first, post_process=("m", "p"), boundary=True) if first == R50
                  else _base(first, tuple(dict.fromkeys(select_pp + ("m", "p"))), boundary=True))
        return _row(f"{method} ({pp})", {"method": method, "postprocess": pp}, models, select_pp, recipe=recipe)
    rows = (r("DETR", "p", DETR, ("own", "p")), r("DETR", "m", DETR, ("m",)),
            r("D-DETR-MS", "p", DDETR, ("own", "p")), r("D-DETR-MS", "m", DDETR, ("m",)),
            r("MaskFormer", "p", MF, ("p",)), r("MaskFormer", "p*", MF, ("own", "p*")),
            r("MaskFormer", "m", MF, ("m",)),
            r("Panoptic SegFormer", "p", R50, ("p",)), r("Panoptic SegFormer", "m", R50, ("m",)))
    cols = tuple(_m(f"{kind} {m}", f"{key}_{m}", f"{prefix}{m.lower()}")
                 for kind, key, prefix in (("Mask", "mask", ""), ("Boundary", "boundary", "b"))
                 for m in ("PQ", "SQ", "RQ"))
    return TableSpec("7", rows, cols, demo=True, notes=(
        "(p): the model's own pixel-wise argmax where it has one (DETR), else ours; (p*): MaskFormer's own.",))


def _table_8() -> TableSpec:
    joint = _train("decouple_queries=False (joint matching, 353 queries)")
    rows = (
        _row("DETR", {"method": "DETR"}, DETR, ("own",), recipe=_base(DETR, ap=True)),
        _row("D-DETR-MS", {"method": "D-DETR-MS"}, DDETR, ("m",), recipe=_base(DDETR[0], ("m",), ap=True),
             note="paper's 47.3 equals D-DETR-MS (m) of Table 7"),
        _row("Panoptic FCN", {"method": "Panoptic FCN"}, PFCN, ("own",), recipe=_base(PFCN, ap=True)),
        _row("Ours (Joint Matching)", {"method": "Ours (Joint Matching)"}, R50, ("m",), "joint",
             recipe=_psf(R50, variant="joint", train=joint, ap=True)),
        _row("Ours (Query Decoupling)", {"method": "Ours (Query Decoupling)"}, R50, ("m",), recipe=_psf(R50, ap=True)),
    )
    cols = PQ3 + (_m("AP^box", "AP_box", "ap_bbox"), _m("AP^seg", "AP_seg", "ap_segm"))
    return TableSpec("8", rows, cols, demo=True)


def _table_10() -> TableSpec:
    rows = tuple(_row(label, {"layer": label}, R50, ("m",), layer=layer, recipe=_psf(R50, layers_all=True))
                 for label, layer in (("1st", "1"), ("2nd", "2"), ("3rd", "3"), ("Last", "last")))
    return TableSpec("10", rows, PQ3 + (ColumnSpec("Fps", "fps", Fps()),), demo=True, notes=(
        "Layer k stops both mask decoders after block k (official hook); Fps = 1 / sec_per_image of that "
        "truncated forward.",))


TABLE11_NAMES = ["Motion", "Defoc", "Glass", "Gauss (blur)", "Gauss (noise)", "Impul", "Shot", "Speck", "Bright",
                 "Contr", "Satur", "JPEG", "Snow", "Spatt", "Fog", "Frost"]
TABLE11_KEYS = ["blur_motion", "blur_defocus", "blur_glass", "blur_gaussian", "noise_gaussian", "noise_impulse",
                "noise_shot", "noise_speckle", "digital_brightness", "digital_contrast", "digital_saturate",
                "digital_jpeg", "weather_snow", "weather_spatter", "weather_fog", "weather_frost"]


def _table_11() -> TableSpec:
    def r(method: str, backbone: str, model: str | tuple[str, ...], pp: str, note: str = "") -> RowSpec:
        first = model if isinstance(model, str) else model[0]
        recipe = Recipe(first, post_process=(pp,), robustness=True, train=DDETR_TRAIN if first in DDETR else None)
        return _row(f"{method} ({backbone})", {"method": method, "backbone": backbone}, model, (pp,),
                    recipe=recipe, note=note)
    rows = (r("Panoptic FCN", "R50", PFCN, "own"), r("MaskFormer", "R50", MF, "own"),
            r("D-DETR", "R50", DDETR, "m", "post-processing not stated; (m) inferred from clean 47.6"),
            r("Ours", "R50", R50, "m"), r("MaskFormer", "Swin-L", MF_SWIN, "own"), r("Ours", "Swin-L", SWIN, "m"),
            r("Ours", "PVTv2-B5", PVT, "m"))
    cols = (_m("Clean", "clean", "pq"), ColumnSpec("Mean", "mean", CorruptionsMean())) + tuple(
        ColumnSpec(n, k, CorruptionMean(c)) for n, k, c in zip(TABLE11_NAMES, TABLE11_KEYS, CORRUPTIONS_TABLE11))
    return TableSpec("11", rows, cols, demo=True, notes=(
        "Each corruption column = mean PQ over the severities measured (the paper does not say which; ours: 1-5); "
        "Mean = mean of the 16 corruption columns (mPC), empty unless all 16 are measured.",))


def _table_b1() -> TableSpec:
    rows = (
        _row("DETR", {"method": "DETR"}, DETR, ("own",), recipe=_base(DETR)),
        _row("D-DETR-SS", {"method": "D-DETR-SS"}, note="no single-scale D-DETR config: paper value only"),
        _row("D-DETR-MS", {"method": "D-DETR-MS"}, DDETR, ("own",), recipe=_base(DDETR[0]),
             note="DETR's panoptic head and post-processing (= Table 7 D-DETR-MS (p))"),
    )
    return TableSpec("B1", rows, PQ3)


def _table_b2() -> TableSpec:
    recipe = _psf(R50, post_process=("m", "p", "heuristic"))
    rows = tuple(_row(label, {"postprocess": label}, R50, (pp,), recipe=recipe)
                 for label, pp in (("Pixel-wise Argmax", "p"), ("Heuristic Procedure", "heuristic"),
                                   ("Mask-wise Merging", "m")))
    return TableSpec("B2", rows, PQ3, demo=True)


def _table_b3() -> TableSpec:
    grid = SweepGrid(alpha=(0.0, 1.0), beta=(0.0, 1.0, 2.0, 3.0))
    rows = tuple(_row(f"alpha={a}, beta={b}", {"alpha": a, "beta": b}, R50, ("m",),
                      recipe=_psf(R50, sweep=grid), sweep={"alpha": a, "beta": b, "t_cnf": 0.25, "t_keep": 0.6})
                 for a, b in ((1, 0), (0, 1), (1, 1), (1, 2), (1, 3)))
    return TableSpec("B3", rows, PQ3, source="sweep", demo=True, notes=(
        "From `harness sweep` over saved candidates (t_cnf 0.25, t_keep 0.6).",))


T_KEEPS = (0.9, 0.8, 0.7, 0.6, 0.5)
T_CNFS = (0.2, 0.25, 0.3, 0.35, 0.4)


def _table_b4() -> TableSpec:
    grid = SweepGrid(t_cnf=T_CNFS, t_keep=T_KEEPS)
    rows = tuple(_row(f"{t:.2f}", {"t_cnf": t}, R50, ("m",), recipe=_psf(R50, sweep=grid),
                      sweep={"alpha": 1.0, "beta": 2.0, "t_cnf": t}) for t in T_CNFS)
    cols = tuple(ColumnSpec(f"{k}", f"t_keep_{k}", Metric("pq", where=(("t_keep", k),))) for k in T_KEEPS)
    return TableSpec("B4", rows, cols, source="sweep", demo=True, notes=(
        "Rows t_cnf, columns t_keep; PQ from `harness sweep` (alpha 1, beta 2). t_keep maps to the thing overlap "
        "limit 1 - t_keep; the stuff limit stays the official 0.2 unless the sweep used --t-keep-applies both "
        "(see docs/analysis.md).",))


def _table_b5() -> TableSpec:
    rows = (_row("1", {"heads": 1}, R50, ("m",), "heads1",
                 recipe=_psf(R50, variant="heads1", train=_train("mask_num_heads=1"))),
            _row("8", {"heads": 8}, R50, ("m",), recipe=_psf(R50)))
    return TableSpec("B5", rows, PQ3)


def _table_b6() -> TableSpec:
    recipe = _psf(R50, variant="joint", thing_preference=True,
                  train=_train("decouple_queries=False (joint matching, 353 queries)"))
    rows = tuple(RowSpec(label, {"P_t_bin": label}, Select((R50,), ("m",), variant="joint"), recipe,
                         bin_label=label) for label in BIN_LABELS + ["Total"])
    names = (("#Query", "num_queries"), ("Stuff TP", "stuff_TP"), ("Stuff TP+FP", "stuff_TP_FP"),
             ("Stuff Precision", "stuff_precision"), ("Things TP", "things_TP"), ("Things TP+FP", "things_TP_FP"),
             ("Things Precision", "things_precision"))
    return TableSpec("B6", rows, tuple(ColumnSpec(n, k, BinValue(k)) for n, k in names), source="thing_preference",
                     demo=True, notes=("Bins of P_t over the joint-matching model's queries (`harness eval --thing-preference`, "
                            "RUN/thing_preference.parquet).",))


def _table_d1() -> TableSpec:
    def r(label: str, model: str | None, note: str = "") -> RowSpec:
        return _row(label, {"backbone": label}, model, ("m",), recipe=_psf(model) if model else None, note=note)
    rows = (r("ResNet-50", R50), r("ResNet-101", R101),
            r("PVTv2-B0", None, "no PVTv2-B0 config in models/configs.py: paper value only"),
            r("PVTv2-B2", None, "no PVTv2-B2 config in models/configs.py: paper value only"),
            r("PVTv2-B5", PVT), r("Swin-L", SWIN))
    cols = tuple(_m(f"{m}{s}", f"{m}{k}", f"{m.lower()}{k.lower()}")
                 for s, k in (("", ""), ("^th", "_th"), ("^st", "_st")) for m in ("PQ", "SQ", "RQ"))
    return TableSpec("D1", rows, cols)


TABLE_SPECS: dict[str, TableSpec] = {s.id: s for s in (
    _table_1(), _table_2(), _table_3(), _table_4(), _table_5(), _table_6(), _table_7(), _table_8(), _table_10(),
    _table_11(), _table_b1(), _table_b2(), _table_b3(), _table_b4(), _table_b5(), _table_b6(), _table_d1())}


def table_spec(table_id: str) -> TableSpec:
    """The spec of one table (``"11"``, ``"B.3"``, ``"b3"`` accepted)."""
    from analysis.paper import normalise_table_id

    return TABLE_SPECS[normalise_table_id(table_id)]
