"""The `harness` command line: one subcommand per module in `harness/commands/`.

Each command module is cheap to import (heavy imports such as torch happen inside its
`run`), defines `HELP: str`, `add_arguments(parser)` and `run(args) -> int`. The list below
is the whole set; there is no registry.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import signal
import sys
import warnings
from typing import Any, Sequence

from harness import __version__
from harness.logging_utils import setup_logging
from models.files import InputError

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


_TERMINATING = False


def _on_sigterm(signum: int, frame: object) -> None:
    global _TERMINATING
    _TERMINATING = True
    raise Terminated()


def terminating() -> bool:
    """True once SIGTERM arrived: an error that follows (a worker that the same signal killed, a broken pool) is
    part of the termination, reported as such in one line, not as a bug."""
    return _TERMINATING


class _Warnings:
    """Python warnings (torch, numpy ...) as one log line each, never a multi-line source excerpt on stderr.

    They are kept out of the failure path: collected while the command runs and logged when it ends normally (a
    user error shows only its own line; ``-v`` logs every warning at once, as it happens).
    """

    def __init__(self, immediate: bool) -> None:
        self.immediate = immediate
        self.pending: list[str] = []

    def show(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        text = f"{' '.join(str(message).split())} ({category.__name__} from {os.path.basename(filename)})"
        if self.immediate:
            logging.getLogger("harness.warnings").warning("%s", text)
        elif text not in self.pending:
            self.pending.append(text)

    def flush(self) -> None:
        for text in self.pending:
            logging.getLogger("harness.warnings").warning("%s", text)
        self.pending.clear()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class OneLineParser(argparse.ArgumentParser):
    """An argument error is one line (no usage block) and exit status 2, like every other user mistake."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _available_commands(only: str | None = None) -> list[tuple[str, object]]:
    """Import the command modules that exist (later issues add the rest); `only`: just that one."""
    found = []
    for name, module in COMMANDS:
        if only is not None and name != only:
            continue
        try:
            mod = importlib.import_module(f"harness.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"harness.commands.{module}":
                continue
            raise
        found.append((name, mod))
    return found


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand (or only the named one: start-up)."""
    parser = OneLineParser(
        prog="harness",
        description="Panoptic SegFormer robustness and analysis harness.",
    )
    parser.add_argument("--version", action="version", version=f"psf-harness {__version__}")
    common = OneLineParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    common.add_argument("-q", "--quiet", action="count", default=0, help="less log output, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _available_commands(only):
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
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the requested command's module: `harness eval-pq` should not pay for the others.
    first = next((a for a in argv if not a.startswith("-")), None)
    only = first if first in {name for name, _ in COMMANDS} else None
    parser = build_parser(only)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argument error (2, one line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    setup_logging(args.verbose - args.quiet)
    debug = args.verbose > 0
    global _TERMINATING
    _TERMINATING = False
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a test thread): leave SIGTERM alone
        previous = None
    previous_showwarning = warnings.showwarning
    collected = _Warnings(immediate=debug)
    warnings.showwarning = collected.show
    try:
        status = int(args._run(args) or 0)
        collected.flush()
        return status
    except InputError as exc:  # UserError / DataError, CheckpointError, UnsafeCheckpointError
        log.error("%s", _one_line(exc), exc_info=debug)
        return 2
    except Terminated:
        log.error("terminated; outputs written so far are complete (atomic writes), re-run to resume")
        return 143
    except KeyboardInterrupt:
        log.error("interrupted; outputs written so far are complete (atomic writes), re-run to resume")
        return 130
    except BrokenPipeError:  # `harness doctor | head`: the reader left; not an error of ours
        try:  # keep the interpreter's final flush from failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except OSError as exc:
        if _TERMINATING:  # e.g. a pipe to a worker the same SIGTERM ended
            log.error("terminated; outputs written so far are complete (atomic writes), re-run to resume")
            return 143
        # The machine, not the input: disk full, permission changed during the run, ... One line; -v for the trace.
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                         errno.ENAMETOOLONG, errno.EMFILE, errno.ENOTDIR, errno.EISDIR, errno.ENOENT):
            where = f" ({exc.filename})" if exc.filename else ""
            log.error("%s%s; outputs written so far are complete (atomic writes)", exc.strerror or _one_line(exc),
                      where, exc_info=debug)
            return 1
        raise
    except MemoryError:
        log.error("out of memory; use smaller inputs or settings (outputs written so far are complete)")
        return 1
    except Exception:
        if not _TERMINATING:  # a bug: the traceback is for the report
            raise
        # SIGTERM reached the worker processes too (a scheduler kills the process group): their exit surfaced
        # first (e.g. "DataLoader worker exited unexpectedly"). It is the termination, not an error of ours.
        log.error("terminated; outputs written so far are complete (atomic writes), re-run to resume",
                  exc_info=debug)
        return 143
    finally:
        warnings.showwarning = previous_showwarning
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
