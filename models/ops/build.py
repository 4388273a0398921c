"""Build the compiled deformable-attention kernels in csrc/ into models/ops/ (run by `make setup`).

Usage: ``python -m models.ops.build [--cpu-only] [--verbose]``.

* The CPU extension (``models/ops/_C.so``: op schemas + C++ kernels) is always built.
* The CUDA extension (``models/ops/_C_cuda.so``: CUDA kernels only) is built when a CUDA toolkit is
  found (``CUDA_HOME``, ``/usr/local/cuda`` or ``nvcc`` on PATH) or ``FORCE_CUDA=1``; ``FORCE_CUDA=0``
  skips it. Architectures: ``TORCH_CUDA_ARCH_LIST`` or sm_80 + sm_90 by default.
* A failed build logs the reason and exits 0 (the PyTorch fallback is used) unless ``CI`` or
  ``STRICT_EXT=1`` is set, in which case it exits 1 so a compile error fails CI.

Environment set here when the toolkit is found (see shared/reference/environment.md §4):
``CUDA_HOME`` (torch guesses ``/usr/local`` from the nvcc wrapper on PATH, which lacks headers),
``CPATH`` += the nvidia-cu13 wheel include dir, ``MAX_JOBS=2`` unless set.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
OPS_DIR = Path(__file__).resolve().parent
BUILD_DIR = REPO / "build" / "msda"
CPU_SOURCES = ["ms_deform_attn_cpu.cpp"]
CUDA_SOURCES = ["ms_deform_attn_cuda.cu"]
DEFAULT_ARCHS = "8.0;9.0"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def strict() -> bool:
    """CI and STRICT_EXT=1 turn a failed build into a non-zero exit."""
    return _truthy("CI") or _truthy("STRICT_EXT")


def find_cuda_home() -> Path | None:
    """The CUDA toolkit root (with bin/nvcc and include/cuda_runtime.h), or None."""
    candidates: list[Path] = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]))
    candidates.append(Path("/usr/local/cuda"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        # Resolve symlinks; a wrapper script on PATH (this machine) has no headers beside it.
        candidates.append(Path(nvcc).resolve().parent.parent)
    for root in candidates:
        if (root / "bin" / "nvcc").exists() and (root / "include" / "cuda_runtime.h").exists():
            return root
    return None


def nvidia_include_dir() -> Path | None:
    """Headers from torch's nvidia-* pip dependencies (cuBLAS etc., absent from a pip-assembled toolkit)."""
    try:
        import nvidia.cu13  # type: ignore[import-not-found]
    except ImportError:
        return None
    for base in nvidia.cu13.__path__:
        inc = Path(base) / "include"
        if inc.is_dir():
            return inc
    return None


def cpu_flags() -> list[str]:
    """Compiler flags for the C++ kernels; MSDA_CPU_FLAGS overrides the ISA part."""
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    isa = os.environ.get("MSDA_CPU_FLAGS")
    if isa is not None:
        flags += isa.split()
    else:
        # AVX2/FMA when this machine has them (the .so is built per machine by `make setup`).
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
        if " avx2" in cpuinfo and " fma" in cpuinfo:
            flags += ["-mavx2", "-mfma"]
    return flags


def _install(built: Path, dest: Path) -> None:
    """Copy the built library next to the loader atomically (a running process keeps the old inode)."""
    tmp = dest.with_name("_tmp" + dest.name)  # still matches the *.so gitignore pattern
    shutil.copy2(built, tmp)
    os.replace(tmp, dest)


def build_cpu(verbose: bool) -> Path:
    """Compile csrc/*.cpp into models/ops/_C.so."""
    from torch.utils import cpp_extension

    out_dir = BUILD_DIR / "cpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = cpp_extension.load(
        name="psf_ops_C",
        sources=[str(CSRC / s) for s in CPU_SOURCES],
        extra_cflags=cpu_flags(),
        extra_ldflags=["-fopenmp"],
        build_directory=str(out_dir),
        with_cuda=False,
        is_python_module=False,
        verbose=verbose,
    )
    dest = OPS_DIR / "_C.so"
    _install(Path(lib), dest)
    return dest


def build_cuda(cuda_home: Path | None, verbose: bool) -> Path:
    """Compile csrc/*.cu into models/ops/_C_cuda.so (CUDA impls of the psf_ops ops only)."""
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = str(cuda_home)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    inc = nvidia_include_dir()
    if inc is not None:
        os.environ["CPATH"] = os.pathsep.join(p for p in (os.environ.get("CPATH"), str(inc)) if p)
    from torch.utils import cpp_extension

    if cuda_home is not None:
        # cpp_extension reads CUDA_HOME once at import time.
        cpp_extension.CUDA_HOME = str(cuda_home)
    out_dir = BUILD_DIR / "cuda"
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("CUDA build: CUDA_HOME=%s TORCH_CUDA_ARCH_LIST=%s", cpp_extension.CUDA_HOME,
             os.environ["TORCH_CUDA_ARCH_LIST"])
    lib = cpp_extension.load(
        name="psf_ops_C_cuda",
        sources=[str(CSRC / s) for s in CUDA_SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo"],
        build_directory=str(out_dir),
        with_cuda=True,
        is_python_module=False,
        verbose=verbose,
    )
    dest = OPS_DIR / "_C_cuda.so"
    _install(Path(lib), dest)
    return dest


def smoke_test() -> str:
    """Load the installed libraries in a fresh interpreter and report the backends (never raises)."""
    code = "from models.ops import _ext; print(_ext.describe())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    return (proc.stdout + proc.stderr).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.ops.build", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true", help="skip the CUDA extension")
    parser.add_argument("--verbose", action="store_true", help="show compiler command lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="models.ops.build: %(message)s")
    os.environ.setdefault("MAX_JOBS", "2")
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        # Before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import time.
        os.environ["CUDA_HOME"] = str(cuda_home)
    failures: list[str] = []

    t0 = time.perf_counter()
    try:
        dest = build_cpu(args.verbose)
        log.info("built CPU extension %s (%.0f s)", dest.relative_to(REPO), time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the fallback"
        failures.append(f"CPU extension: {type(exc).__name__}: {exc}")
        (OPS_DIR / "_C.so").unlink(missing_ok=True)

    force = os.environ.get("FORCE_CUDA", "").strip()
    if args.cpu_only or force == "0":
        log.info("CUDA extension skipped (%s)", "--cpu-only" if args.cpu_only else "FORCE_CUDA=0")
    elif cuda_home is None and not _truthy("FORCE_CUDA"):
        log.info("CUDA extension skipped: no CUDA toolkit found (set CUDA_HOME, or FORCE_CUDA=1)")
    else:
        t0 = time.perf_counter()
        try:
            dest = build_cuda(cuda_home, args.verbose)
            log.info("built CUDA extension %s (%.0f s)", dest.relative_to(REPO), time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"CUDA extension: {type(exc).__name__}: {exc}")
            (OPS_DIR / "_C_cuda.so").unlink(missing_ok=True)

    for msg in failures:
        # The compiler output is above; keep the summary to the first lines of the exception.
        log.error("build failed: %s", "\n".join(msg.splitlines()[:20]))
    log.info("backends: %s", smoke_test())
    if failures:
        if strict():
            log.error("CI/STRICT_EXT set: failing")
            return 1
        log.warning("the pure-PyTorch fallback is used where a kernel is missing (see `harness doctor`)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
