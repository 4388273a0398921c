"""The compiled PQ kernel (`csrc/png_pq.c`): build, locate, load; never required.

`make setup` builds it next to this module (`python -m harness.metrics.native`, stamp keyed on the
source). At run time `load()` uses, in order:

1. `harness/metrics/_png_pq.so` (or $HARNESS_PQ_LIB) when it was built from the current source (the
   source tag is compiled in);
2. otherwise a build in the per-user cache (`$XDG_CACHE_HOME` or `~/.cache` / `psf-harness`), compiled
   at first use with the system C compiler (`$CC`, else Python's, else `cc`) in about a second;
3. otherwise nothing: the numpy path and a general PNG decoder (pyspng, OpenCV, PIL) take over,
   with the same results, and `reason()` says why (no compiler, read-only cache, no libdeflate, a
   failed build, HARNESS_PNG_DECODER set) -- `harness doctor` prints it.

Inflate is libdeflate's: the library gets its entry points from the `deflate` package (a declared
dependency that bundles libdeflate) or a system `libdeflate`, so the C file needs no headers or
link flags beyond libc and libm. The hot loops exist for SSE2 and AVX2 (+ popcnt) in one library;
the CPU picks (PQ_NO_AVX2=1 forces the SSE2 ones, for tests).

This module imports neither numpy nor anything heavy: `harness eval-pq` starts with it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import zlib
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

__all__ = ["Native", "load", "reason", "status", "build", "source_hash", "LIB_PATH", "SOURCE"]

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "png_pq.c"
SOURCES = (SOURCE, SOURCE.with_name("png_pq_simd.h"))  # the .c includes the header twice
LIB_PATH = Path(__file__).resolve().parent / "_png_pq.so"
ABI_VERSION = 1
CFLAGS = ["-O3", "-shared", "-fPIC", "-std=c99", "-fno-strict-aliasing"]
BUILD_HINT = "run `make setup` or `python -m harness.metrics.native`"

# Reason codes of pq_score_files (csrc/png_pq.c): why a batch stopped at an image.
STOP_REASONS = {
    1: "cannot read a file",
    2: "PNG kind not handled by the kernel (or corrupt)",
    3: "GT and prediction sizes differ",
    4: "segment ids out of range, duplicated or too many",
    5: "predicted id in the PNG but not in the JSON",
    6: "predicted JSON segment not in the PNG",
    7: "a segment id equals BOUNDARY_ID",
    8: "out of memory",
    9: "no inflate entry points",
}


def _compiler() -> str | None:
    """The C compiler to use: $CC, Python's build compiler, or cc/gcc/clang on PATH."""
    import shutil
    import sysconfig

    for cand in (os.environ.get("CC"), (sysconfig.get_config_var("CC") or "").split()[:1], "cc", "gcc", "clang"):
        if isinstance(cand, list):
            cand = cand[0] if cand else None
        if cand and shutil.which(cand):
            return cand
    return None


def source_hash() -> str | None:
    """Tag of the C source and the compile flags (None when the source is not shipped).

    Two CRC-32s (zlib is already loaded; hashlib costs milliseconds of start-up): this detects a
    stale build, it is not a security check.
    """
    try:
        text = b"".join(p.read_bytes() for p in SOURCES) + "\0".join(CFLAGS).encode()
    except OSError:
        return None
    return f"{zlib.crc32(text):08x}{zlib.crc32(text[::-1]):08x}"


def build(dest: Path = LIB_PATH, cc: str | None = None, verbose: bool = False, extra: Sequence[str] = ()) -> Path:
    """Compile csrc/png_pq.c into `dest` (atomic replace). Raises RuntimeError with the reason.

    `extra`: more compiler flags (the tests build -DPQ_NO_SIMD / -DPQ_NO_AVX2 variants with them).
    """
    import subprocess
    import tempfile

    tag = source_hash()
    if tag is None:
        raise RuntimeError(f"C source {SOURCE} not found")
    cc = cc or _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc/clang)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".build-") as tmp:
        out = Path(tmp) / dest.name
        cmd = [cc, *CFLAGS, *extra, f'-DPQ_SOURCE_HASH="{tag}"', "-o", str(out), str(SOURCE), "-lm"]
        if verbose:
            log.info("%s", " ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"{cc} failed to run: {exc}") from None
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise RuntimeError(f"{cc} exited with {proc.returncode}: " + " | ".join(lines[:5]))
        os.replace(out, dest)  # atomic: a concurrent loader never sees a half-written library
    return dest


def _inflate_symbols() -> tuple[ctypes.CDLL, str]:
    """libdeflate's decompressor entry points: from the `deflate` package, else a system libdeflate."""
    errors = []
    try:
        import deflate._deflate as mod  # type: ignore[import-not-found]

        lib = ctypes.CDLL(mod.__file__)
        lib.libdeflate_zlib_decompress  # noqa: B018 - raises AttributeError when not exported
        return lib, f"libdeflate from the deflate package ({Path(mod.__file__).name})"
    except (ImportError, OSError, AttributeError) as exc:
        errors.append(f"deflate package: {exc}")
    from ctypes import util

    name = util.find_library("deflate")
    if name:
        try:
            lib = ctypes.CDLL(name)
            lib.libdeflate_zlib_decompress  # noqa: B018
            return lib, f"system {name}"
        except (OSError, AttributeError) as exc:
            errors.append(f"{name}: {exc}")
    raise RuntimeError("no libdeflate (pip install deflate): " + "; ".join(errors or ["not found"]))


class Native:
    """The loaded library with typed entry points; `ctx()` is this thread's decoder context."""

    def __init__(self, path: Path, inflate: ctypes.CDLL, inflate_desc: str) -> None:
        lib = ctypes.CDLL(str(path))
        vp, i64, i32, dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
        lib.pq_abi_version.restype = i32
        lib.pq_abi_version.argtypes = []
        if lib.pq_abi_version() != ABI_VERSION:
            raise RuntimeError(f"{path.name}: ABI {lib.pq_abi_version()}, expected {ABI_VERSION}")
        lib.pq_source_hash.restype = ctypes.c_char_p
        lib.pq_source_hash.argtypes = []
        lib.pq_simd.restype = ctypes.c_char_p
        lib.pq_simd.argtypes = []
        lib.pq_set_inflate.restype = None
        lib.pq_set_inflate.argtypes = [vp, vp, vp]
        lib.pq_ctx_new.restype = vp
        lib.pq_ctx_new.argtypes = []
        lib.pq_ctx_free.restype = None
        lib.pq_ctx_free.argtypes = [vp]
        lib.pq_png_info.restype = i32
        lib.pq_png_info.argtypes = [vp, i64, vp]
        lib.pq_decode_ids.restype = i32
        lib.pq_decode_ids.argtypes = [vp, vp, i64, vp, vp]
        lib.pq_joint_histogram.restype = None
        lib.pq_joint_histogram.argtypes = [vp, vp, i64, vp, vp, i64, vp]
        lib.pq_boundary_histogram.restype = None
        lib.pq_boundary_histogram.argtypes = [vp, vp, i64, vp, vp, i64, i64, i64, vp]
        lib.pq_band.restype = i32
        lib.pq_band.argtypes = [vp, i64, i64, i64, vp]
        lib.pq_dilation_pixels.restype = i64
        lib.pq_dilation_pixels.argtypes = [i64, i64, dbl]
        lib.pq_score_files.restype = i64
        lib.pq_score_files.argtypes = [vp, i64, i64, ctypes.c_char_p, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, dbl,
                                       vp, vp, vp, vp, vp, vp, vp, vp, vp]
        funcs = [ctypes.cast(getattr(inflate, f"libdeflate_{n}"), vp).value
                 for n in ("alloc_decompressor", "zlib_decompress", "free_decompressor")]
        lib.pq_set_inflate(*funcs)
        self.lib = lib
        self.path = path
        self.inflate = inflate_desc
        self.built_from = lib.pq_source_hash().decode()
        self.simd = lib.pq_simd().decode()
        self._local = threading.local()

    def ctx(self) -> int:
        """This thread's pq_ctx (decompressor, tables and buffers), created on first use."""
        holder = getattr(self._local, "ctx", None)
        if holder is None:
            ptr = self.lib.pq_ctx_new()
            if not ptr:
                raise MemoryError("pq_ctx_new failed")
            holder = _Ctx(self.lib, ptr)
            self._local.ctx = holder
        return holder.ptr


class _Ctx:
    """Frees a thread's context when the thread's locals go away."""

    def __init__(self, lib: ctypes.CDLL, ptr: int) -> None:
        self.lib, self.ptr = lib, ptr

    def __del__(self) -> None:
        try:
            self.lib.pq_ctx_free(self.ptr)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


_lock = threading.Lock()
_native: Native | None = None
_reason = ""
_resolved = False


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "psf-harness"


def _disabled_by_env() -> str | None:
    choice = os.environ.get("HARNESS_PNG_DECODER", "").strip().lower()
    if choice not in ("", "fast"):
        return f"switched off by HARNESS_PNG_DECODER={choice}"
    return None


def resolve(lib_path: Path | None = None, cache_dir: Path | None = None, cc: str | None = None,
            allow_build: bool = True) -> tuple[Native | None, str]:
    """Find or build the library without touching the module state: (Native or None, reason).

    The reason is a line for `harness doctor`: where the library came from, or why there is none.
    """
    off = _disabled_by_env()
    if off:
        return None, off
    try:
        inflate, inflate_desc = _inflate_symbols()
    except RuntimeError as exc:
        return None, str(exc)
    lib_path = lib_path or Path(os.environ.get("HARNESS_PQ_LIB") or LIB_PATH)
    want = source_hash()
    problems: list[str] = []
    if lib_path.is_file():
        try:
            native = Native(lib_path, inflate, inflate_desc)
            if want is None or native.built_from == want:
                return native, "built by make setup" if lib_path == LIB_PATH else f"from {lib_path}"
            problems.append(f"{lib_path.name} is stale (built from {native.built_from}, source is {want})")
        except (OSError, RuntimeError, AttributeError) as exc:
            problems.append(f"{lib_path.name} does not load ({exc})")
    else:
        problems.append(f"{lib_path.name} not built ({BUILD_HINT})")
    if want is None:
        return None, "; ".join(problems + [f"C source {SOURCE} not found"])
    if not allow_build:
        return None, "; ".join(problems)
    cached = (cache_dir or _cache_dir()) / f"png_pq-{want}.so"
    try:
        if not cached.is_file():
            build(cached, cc=cc)
        native = Native(cached, inflate, inflate_desc)
        return native, "; ".join(problems) + f"; using a first-use build in {cached}"
    except (OSError, RuntimeError, AttributeError) as exc:
        problems.append(f"first-use build in {cached.parent} failed: {exc}")
    return None, "; ".join(problems)


def load() -> Native | None:
    """The library for this process (resolved once), or None: then use the numpy path."""
    global _native, _reason, _resolved
    if not _resolved:
        with _lock:
            if not _resolved:
                _native, _reason = resolve()
                if _native is None:
                    log.debug("compiled PQ kernel unavailable, using numpy and a general PNG decoder: %s", _reason)
                _resolved = True
    return _native


def reason() -> str:
    """Where the library came from, or why it is unavailable (after `load()`)."""
    load()
    return _reason


def status() -> dict[str, object]:
    """For `harness doctor`: {available, library, source, inflate, simd, reason}."""
    native = load()
    return {
        "available": native is not None,
        "library": str(native.path) if native else None,
        "source": str(SOURCE),
        "inflate": native.inflate if native else None,
        "simd": native.simd if native else None,
        "reason": _reason,
    }


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.metrics.native`: build the library next to this module (make setup)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m harness.metrics.native", description=main.__doc__)
    parser.add_argument("--verbose", action="store_true", help="show the compiler command line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="harness.metrics.native: %(message)s")
    try:
        dest = build(verbose=args.verbose)
        inflate, inflate_desc = _inflate_symbols()
        try:
            native = Native(dest, inflate, inflate_desc)  # loads, whatever HARNESS_PNG_DECODER says
        except (OSError, RuntimeError, AttributeError) as exc:
            raise RuntimeError(f"built {dest.name} but it does not load: {exc}") from None
        log.info("built %s (%s; inflate: %s; vector loops: %s)", dest, native.built_from, native.inflate,
                 native.simd)
        return 0
    except RuntimeError as exc:
        log.error("PQ kernel build failed: %s", exc)
        if _truthy("CI") or _truthy("STRICT_EXT"):
            log.error("CI/STRICT_EXT set: failing")
            return 1
        log.warning("eval-pq uses the numpy path and a general PNG decoder (same results, slower)")
        return 0


if __name__ == "__main__":
    sys.exit(main())
