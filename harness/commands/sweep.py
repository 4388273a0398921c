"""`harness sweep`: re-merge saved candidates over an alpha/beta/t_cnf/t_keep grid, without re-inference."""

from __future__ import annotations

import argparse

from harness.commands._common import float_list, int_range

MAX_SETTINGS = 4096  # settings of one sweep (the product of the value lists), checked before any list is built

HELP = "re-merge saved candidates over alpha/beta/t_cnf/t_keep grids and score them (Tables B.3, B.4)"
DESCRIPTION = """Re-run the mask-wise merging "(m)" on the candidates that `harness eval --save-candidates` saved in
RUN/candidates/, for every combination of the given values, and score each with the evaluation's PQ code
(GT from the data set named in RUN/candidates/<model>/meta.json, or --data). Writes OUT/results.parquet and
OUT/results.csv (the results-table columns plus alpha, beta, t_cnf, t_keep) and OUT/run.json. A value list that is
not given stays at the run's own setting, so a sweep without arguments reproduces the evaluation's "m" rows exactly.
Re-running with the same --out skips finished settings.

t_keep: a candidate is kept when at least t_keep of its mask is still free (overlap limit 1 - t_keep). The
official code limits things to 0.4 (t_keep 0.6) and stuff to 0.2 (t_keep 0.8): by default --t-keep sets the
thing limit and leaves the stuff limit as in the run; --t-keep-applies both sets both (the paper's single t_keep).

examples:
  harness sweep --candidates runs/tiny/eval --alpha 0,1 --beta 0,1,2,3 --out runs/tiny/sweep_ab
  harness sweep --candidates runs/tiny/eval --t-cnf 0.2,0.25,0.3,0.35,0.4 --t-keep 0.9,0.8,0.7,0.6,0.5 \\
      --out runs/tiny/sweep_thresholds --workers 2
"""


def _names(text: str | None) -> list[str]:
    return [v.strip() for v in (text or "").split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--candidates", required=True, metavar="RUN",
                        help="run folder of `harness eval --save-candidates` (holds candidates/)")
    parser.add_argument("--out", required=True,
                        help="output folder of the sweep: new, empty, or a sweep of the same run (its finished "
                             "settings are kept and skipped)")
    parser.add_argument("--alpha", default=None, type=float_list(0, 100),
                        help="class-score exponents in [0, 100], e.g. 0,1 (default: the run's, 1)")
    parser.add_argument("--beta", default=None, type=float_list(0, 100),
                        help="mask-score exponents in [0, 100], e.g. 0,1,2,3 (default: the run's, 2)")
    parser.add_argument("--t-cnf", default=None, type=float_list(0, 1),
                        help="confidence thresholds in [0, 1], e.g. 0.2,0.25 (default: the run's)")
    parser.add_argument("--t-keep", default=None, type=float_list(0, 1, lo_open=True),
                        help="keep ratios in (0, 1], e.g. 0.9,0.8,0.7 (default: the run's, 0.6)")
    parser.add_argument("--t-keep-applies", choices=("things", "both"), default="things",
                        help="t_keep sets the thing overlap limit only (official, default) or things and stuff")
    parser.add_argument("--models", default=None, help="comma-separated model names (default: all in candidates/)")
    parser.add_argument("--cells", default=None,
                        help="comma-separated cells such as none_0,fog_3 (default: all saved)")
    parser.add_argument("--layers", default=None, help="comma-separated mask layers (default: all saved)")
    parser.add_argument("--data", default=None, help="data set root (default: the one in meta.json)")
    parser.add_argument("--boundary", action="store_true", help="also compute Boundary PQ")
    parser.add_argument("--workers", type=int_range(1, 256), default=1,
                        help="processes (images are split across them; default 1)")


def run(args: argparse.Namespace) -> int:
    from harness.commands._common import check_output, existing_dir
    from harness.engine.sweep import COMMAND, legacy_sweep, plan_sweep, run_sweep
    from harness.errors import UserError
    from harness.outputs import check_claimable

    source = existing_dir(args.candidates, "--candidates")
    data = existing_dir(args.data, "--data") if args.data is not None else None
    out = check_output(args.out, "--out", kind="dir", input_dirs=[source, data])
    check_claimable(out, COMMAND, legacy=legacy_sweep)
    grid = {k: v for k, v in (("alpha", args.alpha), ("beta", args.beta), ("t_cnf", args.t_cnf),
                              ("t_keep", args.t_keep)) if v is not None}
    size = 1
    for values in grid.values():
        size *= len(values)
    if size > MAX_SETTINGS:
        raise UserError(f"--alpha x --beta x --t-cnf x --t-keep asks for {size} settings; at most {MAX_SETTINGS} per "
                        "sweep (split it over several --out folders)")
    plan = plan_sweep(source, grid, models=_names(args.models), cells=_names(args.cells),
                      layers=_names(args.layers), t_keep_applies=args.t_keep_applies, data_root=data,
                      boundary=args.boundary)
    df = run_sweep(plan, out, workers=args.workers)
    if len(df):
        cols = ["model", "corruption", "severity", "layer", "alpha", "beta", "t_cnf", "t_keep", "pq", "pq_th",
                "pq_st"]
        print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"results: {out}/results.csv")
    return 0
