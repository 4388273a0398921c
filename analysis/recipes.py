"""Recipes: the exact ``harness`` commands that produce a table's rows on COCO (or ADE20K) with released weights.

A :class:`Recipe` says what one paper row needs (model, variant, post-processors, flags, sweeps, profile);
:func:`table_commands` merges the recipes of a table's missing rows per run (one ``harness eval`` per model and
variant, with the union of post-processors and flags) and renders shell commands. Paths are shell variables the
user sets first: ``COCO`` (COCO root: ``val2017/``, ``annotations/panoptic_val2017.json``), ``ADE`` (ADE20K in the
same layout) and ``WEIGHTS`` (folder holding the released files, names as published; see
:data:`analysis.model_names.MODELS`). Rows whose weights were never released start with ``harness train``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from analysis.model_names import DEFAULT_VARIANT, MODELS

__all__ = ["Recipe", "SweepGrid", "TrainSpec", "table_commands", "merge_recipes", "PREAMBLE", "run_folder"]

PREAMBLE = """# Set these first:
#   COCO=/path/to/coco        (val2017/, annotations/panoptic_val2017.json, annotations/panoptic_val2017/)
#   WEIGHTS=/path/to/weights  (released checkpoints under their published file names)
#   ADE=/path/to/ade20k       (only for Table 3; COCO panoptic layout)
# Commands run on one GPU (--device cuda); drop --device for CPU. Multi-GPU: torchrun --nproc-per-node N -m harness eval ...
"""

ROBUSTNESS_SUBSET = 2000  # Table 11: "a subset of 2000 images from the COCO val2017"


@dataclass(frozen=True)
class TrainSpec:
    """A model without released weights: how to train it.

    Attributes:
        config: ``harness train --config`` name.
        epochs: training epochs (paper schedule).
        change: the config change that makes the variant (a comment for the user; e.g. ``decouple_queries=False``).
    """

    config: str
    epochs: int
    change: str = ""


@dataclass(frozen=True)
class SweepGrid:
    """``harness sweep`` values (each a tuple; empty = the run's default)."""

    alpha: tuple[float, ...] = ()
    beta: tuple[float, ...] = ()
    t_cnf: tuple[float, ...] = ()
    t_keep: tuple[float, ...] = ()

    def merged(self, other: "SweepGrid") -> "SweepGrid":
        def u(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
            return tuple(sorted(set(a) | set(b)))
        return SweepGrid(u(self.alpha, other.alpha), u(self.beta, other.beta), u(self.t_cnf, other.t_cnf),
                         u(self.t_keep, other.t_keep))


@dataclass(frozen=True)
class Recipe:
    """What one paper row needs.

    Attributes:
        model: model name (``models.zoo``).
        variant: training variant label (``harness report --results RUN=variant`` when not "default").
        post_process: post-processors to score.
        boundary, ap, layers_all, thing_preference: ``harness eval`` flags.
        robustness: COCO-C: ``--subset 2000 --corruptions all --severities 1-5``.
        sweep: candidates sweep after the eval (implies ``--save-candidates``).
        profile: also ``harness profile`` the model (#P, #F).
        data: "coco" or "ade20k"; split: the split evaluated.
        train: set when no released weights exist for this model / variant.
    """

    model: str
    variant: str = DEFAULT_VARIANT
    post_process: tuple[str, ...] = ()
    boundary: bool = False
    ap: bool = False
    layers_all: bool = False
    thing_preference: bool = False
    robustness: bool = False
    sweep: SweepGrid | None = None
    profile: bool = False
    data: str = "coco"
    split: str = "val2017"
    train: TrainSpec | None = None

    @property
    def run_key(self) -> tuple[str, str, str, str, bool]:
        return self.model, self.variant, self.data, self.split, self.robustness

    def merged(self, other: "Recipe") -> "Recipe":
        """Union of two recipes of the same run (post-processors, flags, sweep values)."""
        sweep = self.sweep if other.sweep is None else (other.sweep if self.sweep is None
                                                        else self.sweep.merged(other.sweep))
        return replace(
            self,
            post_process=tuple(dict.fromkeys(self.post_process + other.post_process)),
            boundary=self.boundary or other.boundary, ap=self.ap or other.ap,
            layers_all=self.layers_all or other.layers_all,
            thing_preference=self.thing_preference or other.thing_preference,
            sweep=sweep, profile=self.profile or other.profile, train=self.train or other.train,
        )

    def weights_arg(self) -> str:
        if self.train is not None:
            return f"runs/train/{_slug(self)}/model.safetensors"
        info = MODELS.get(self.model)
        if info is None or info.weights is None:
            return f"$WEIGHTS/{self.model}.pth"
        name = info.weights
        if self.variant == "1x":
            name = name.replace("_2x", "_1x")
        return f"$WEIGHTS/{name}"

    def commands(self) -> list[str]:
        """Shell commands, in order (train, eval, sweep, profile)."""
        cmds: list[str] = []
        root = "$ADE" if self.data == "ade20k" else "$COCO"
        if self.train is not None:
            if self.train.change:
                cmds.append(f"# {self.model} [{self.variant}]: no released weights; train a config with "
                            f"{self.train.change}")
            else:
                cmds.append(f"# {self.model}: no released weights; train it")
            cmds.append(f"harness train --config {self.train.config} --data {root} --epochs {self.train.epochs} "
                        f"--out runs/train/{_slug(self)}")
        out = run_folder(self)
        parts = [f"harness eval --weights {self.weights_arg()} --model {self.model} --data {root} "
                 f"--split {self.split}"]
        if self.robustness:
            parts.append(f"--subset {ROBUSTNESS_SUBSET} --corruptions all --severities 1-5")
        parts.append(f"--post-process {','.join(self.post_process) or 'm'}")
        for flag, on in (("--layers all", self.layers_all), ("--boundary", self.boundary), ("--ap", self.ap),
                         ("--thing-preference", self.thing_preference),
                         ("--save-candidates", self.sweep is not None)):
            if on:
                parts.append(flag)
        parts.append(f"--device cuda --out {out}")
        cmds.append(" ".join(parts))
        if self.sweep is not None:
            s = self.sweep
            args = " ".join(f"--{name.replace('_', '-')} {','.join(_fmt(v) for v in vals)}"
                            for name, vals in (("alpha", s.alpha), ("beta", s.beta), ("t_cnf", s.t_cnf),
                                               ("t_keep", s.t_keep)) if vals)
            cmds.append(f"harness sweep --candidates {out} {args} --out {out}_sweep".replace("  ", " "))
        if self.profile:
            cmds.append(f"harness profile --model {self.model} --weights {self.weights_arg()} --size 1200x800 "
                        f"--post-process {self.post_process[0] if self.post_process else 'm'} --device cuda "
                        f"--out {out}/profile.csv")
        return cmds

    def report_inputs(self) -> list[str]:
        """The ``--results`` arguments of this recipe's outputs (``=variant`` where needed)."""
        label = "" if self.variant == DEFAULT_VARIANT else f"={self.variant}"
        out = [run_folder(self) + label]
        if self.sweep is not None:
            out.append(run_folder(self) + "_sweep" + label)
        return out


def _fmt(v: float) -> str:
    return f"{v:g}"


def _slug(r: Recipe) -> str:
    return r.model + ("" if r.variant == DEFAULT_VARIANT else f"_{r.variant}")


def run_folder(r: Recipe) -> str:
    """Output folder of a recipe's ``harness eval``."""
    suffix = "_coco_c" if r.robustness else ""
    data = "" if r.data == "coco" else f"_{r.data}"
    split = "" if r.split == "val2017" else f"_{r.split}"
    return f"runs/paper/{_slug(r)}{data}{split}{suffix}"


def merge_recipes(recipes: Iterable[Recipe]) -> list[Recipe]:
    """One recipe per run (model, variant, data, split, robustness), in first-seen order."""
    merged: dict[tuple, Recipe] = {}
    for r in recipes:
        merged[r.run_key] = merged[r.run_key].merged(r) if r.run_key in merged else r
    return list(merged.values())


def table_commands(recipes: Sequence[Recipe], table_ids: Sequence[str] = (), report_out: str = "runs/paper/report"
                   ) -> list[str]:
    """Shell commands for ``recipes`` (merged per run) followed by the ``harness report`` call."""
    runs = merge_recipes(recipes)
    cmds: list[str] = []
    inputs: list[str] = []
    for r in runs:
        cmds.extend(r.commands())
        inputs.extend(r.report_inputs())
    if runs:
        tables = f" --tables {','.join(table_ids)}" if table_ids else ""
        cmds.append(f"harness report --results {' '.join(dict.fromkeys(inputs))} --out {report_out}{tables}")
    return cmds

