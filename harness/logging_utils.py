"""Logging set-up shared by every subcommand (`-v` / `-q`), and the CPU name that measured figures are logged with."""

from __future__ import annotations

import logging
import platform
import sys
from pathlib import Path


def setup_logging(verbosity: int) -> None:
    """Configure the root logger: 0 = INFO, >0 = DEBUG, <0 = WARNING."""
    level = logging.INFO if verbosity == 0 else (logging.DEBUG if verbosity > 0 else logging.WARNING)
    logging.basicConfig(
        level=level,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def progress_disabled() -> bool:
    """tqdm bars are shown on interactive terminals and hidden when logging is quiet (or stderr is a file or a pipe,
    where a bar is a stream of carriage returns between log lines)."""
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        return True
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):
        return True


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
