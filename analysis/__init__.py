"""Analysis: paper tables, figures and statistics, computed from results files (never a model).

Modules:

* :mod:`analysis.runs`: read run folders (results tables, sweeps, thing-preference, profiles, attention dumps);
* :mod:`analysis.paper`: the paper's numbers (shipped ``tables.json``);
* :mod:`analysis.model_names`: results rows (model, variant) <-> paper rows; tiny demo stand-ins;
* :mod:`analysis.specs`, :mod:`analysis.paper_specs`: declarative specs of every paper table;
* :mod:`analysis.recipes`: the commands that produce a table's rows on COCO;
* :mod:`analysis.tables`: evaluate specs, render Markdown / LaTeX / long-form CSV;
* :mod:`analysis.figures`: PNG figures; :mod:`analysis.thing_preference`: Table B.6 bins and the Fig. 7 fit;
* :mod:`analysis.report`: ``report.md`` and a self-contained ``report.html``.

Quick use::

    from analysis import load_runs, build_table, write_report
    data = load_runs(["runs/demo/eval_qd", "runs/demo/eval_joint"])
    print(build_table("11", data).markdown())
    write_report(data, "runs/demo/report")

Importing this package is cheap (pandas and matplotlib load on first use).
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_runs", "build_table", "build_tables", "write_report", "paper_table", "TABLE_SPECS"]

_LAZY = {"load_runs": "analysis.runs", "build_table": "analysis.tables", "build_tables": "analysis.tables",
         "write_report": "analysis.report", "paper_table": "analysis.paper", "TABLE_SPECS": "analysis.paper_specs"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
