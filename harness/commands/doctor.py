"""`harness doctor`: what this installation can run (torch, CUDA, compiled kernels) and why not."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
from typing import Any

HELP = "report torch/CUDA versions, devices and which compiled kernels (deformable attention, PQ) are available"
DESCRIPTION = """\
Report the Python/torch/CUDA versions, the devices, the CUDA toolkit used for builds, for each
multi-scale deformable attention backend (cuda, cpp, pytorch) whether it is available and, if not, why,
and whether eval-pq's compiled kernel (csrc/png_pq.c: PNG decoding, histograms, boundaries) loads,
from where, or why not (then eval-pq uses numpy and a general PNG decoder: same numbers, slower).
`backend=None` uses the first available one for the tensors' device.

Exit status 0; with --require NAME (repeatable), 1 when a named kernel is not built
(for 'cuda' this checks the build, not the presence of a GPU; 'pq' is eval-pq's kernel).

Examples:
  harness doctor
  harness doctor --json
  harness doctor --require cpp --require cuda --require pq    # CI: fail when a kernel did not build
"""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument(
        "--require",
        action="append",
        default=[],
        choices=["cpp", "cuda", "pq"],
        metavar="BACKEND",
        help="exit 1 unless this compiled kernel is built (cpp, cuda or pq; repeatable)",
    )


def _nvcc_version(cuda_home: str | None) -> str | None:
    if cuda_home is None:
        return None
    try:
        proc = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln for ln in proc.stdout.splitlines() if "release" in ln]
    return lines[0].split("release", 1)[1].strip() if lines else None


def pq_kernel() -> dict[str, Any]:
    """eval-pq's compiled kernel: {available, library, source, inflate, reason} (no torch needed)."""
    from harness.metrics import native

    return native.status()


def collect() -> dict[str, Any]:
    """The report as a plain dict (also used by tests)."""
    import torch

    from models.ops import _ext, available_backends
    from models.ops.build import find_cuda_home

    cuda_available = torch.cuda.is_available()
    devices = []
    if cuda_available:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            memory = f"{props.total_memory / 2**30:.0f} GiB"
            devices.append(f"cuda:{i} {props.name} (sm_{props.major}{props.minor}, {memory})")
    cuda_home = find_cuda_home()
    backends = [
        {"name": s.name, "available": s.usable, "built": s.built, "reason": s.reason, "library": s.path}
        for s in _ext.status().values()
    ]
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda_available,
        "devices": devices,
        "cpu_threads": torch.get_num_threads(),
        "parallel_backend": "OpenMP" if torch.backends.openmp.is_available() else "native",
        "cuda_home": str(cuda_home) if cuda_home else None,
        "nvcc": _nvcc_version(str(cuda_home) if cuda_home else None),
        "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
        "backends": backends,
        "default_backend": {
            "cpu": available_backends("cpu")[0],
            "cuda": available_backends("cuda")[0] if cuda_available else None,
        },
        "pq_kernel": pq_kernel(),
    }


def _print_table(report: dict[str, Any]) -> None:
    rows = [
        ("python", report["python"]),
        ("platform", report["platform"]),
        ("torch", f"{report['torch']} (built for CUDA {report['torch_cuda'] or 'none'})"),
        ("CUDA device", ", ".join(report["devices"]) if report["devices"] else "none available"),
        ("CPU threads", f"{report['cpu_threads']} ({report['parallel_backend']})"),
        ("CUDA toolkit", f"{report['cuda_home']} (nvcc {report['nvcc']})" if report["cuda_home"] else "not found"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, val in rows:
        print(f"{key:<{width}}  {val}")
    print()
    print("multi-scale deformable attention backends:")
    for b in report["backends"]:
        state = "available" if b["available"] else ("built, unusable here" if b["built"] else "unavailable")
        print(f"  {b['name']:<8} {state:<21} {b['reason']}".rstrip())
    dflt = report["default_backend"]
    print(f"  backend=None uses: cpu -> {dflt['cpu']}" + (f", cuda -> {dflt['cuda']}" if dflt["cuda"] else ""))
    print()
    pq = report["pq_kernel"]
    print("eval-pq kernel (csrc/png_pq.c: PNG decoding, histograms, boundaries):")
    if pq["available"]:
        print(f"  available  {pq['library']}")
        print(f"  inflate    {pq['inflate']}; vector loops: {pq['simd']}")
        print(f"  from       {pq['reason']}")
    else:
        print("  unavailable: eval-pq uses numpy and a general PNG decoder (same numbers, slower)")
        print(f"  reason     {pq['reason']}")


def run(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    missing = [b["name"] for b in report["backends"] if b["name"] in args.require and not b["built"]]
    if "pq" in args.require and not report["pq_kernel"]["available"]:
        missing.append("pq")
    if missing:
        log.error("required backend(s) not built: %s", ", ".join(missing))
        return 1
    return 0
