"""The `harness` command line: one subcommand per module in `harness/commands/`.

Each command module is cheap to import (heavy imports such as torch happen inside its
`run`), defines `HELP: str`, `add_arguments(parser)` and `run(args) -> int`. The list below
is the whole set; there is no registry.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from typing import Sequence

from harness import __version__
from harness.errors import UserError
from harness.logging_utils import setup_logging

# (subcommand, module under harness.commands). Order = order shown in --help.
COMMANDS: list[tuple[str, str]] = [
    ("synth", "synth"),
    ("show", "show"),
    ("eval-pq", "eval_pq"),
    ("eval-ap", "eval_ap"),
    ("corrupt", "corrupt"),
    ("train", "train"),
    ("eval", "evaluate"),
    ("predict", "predict"),
    ("profile", "profile"),
    ("convert", "convert"),
    ("report", "report"),
    ("sweep", "sweep"),
    ("doctor", "doctor"),
    ("demo", "demo"),
]

log = logging.getLogger("harness")


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: atomic writers drop their temporary files, finished outputs stay."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


class OneLineParser(argparse.ArgumentParser):
    """An argument error is one line (no usage block) and exit status 2, like every other user mistake."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _available_commands() -> list[tuple[str, object]]:
    """Import the command modules that exist (later issues add the rest)."""
    found = []
    for name, module in COMMANDS:
        try:
            mod = importlib.import_module(f"harness.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"harness.commands.{module}":
                continue
            raise
        found.append((name, mod))
    return found


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand."""
    parser = OneLineParser(
        prog="harness",
        description="Panoptic SegFormer robustness and analysis harness.",
    )
    parser.add_argument("--version", action="version", version=f"psf-harness {__version__}")
    common = OneLineParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    common.add_argument("-q", "--quiet", action="count", default=0, help="less log output, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _available_commands():
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=getattr(mod, "DESCRIPTION", mod.HELP),
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (2 for user errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    setup_logging(args.verbose - args.quiet)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a test thread): leave SIGTERM alone
        previous = None
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        log.error("%s", exc)
        return 2
    except Terminated:
        log.error("terminated; outputs written so far are complete (atomic writes), re-run to resume")
        return 143
    except KeyboardInterrupt:
        log.error("interrupted; outputs written so far are complete (atomic writes), re-run to resume")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
