"""Benchmark multi-scale deformable attention: every available backend, forward and forward+backward.

Cases (Panoptic SegFormer R50 at 800x1333, 4 levels 100x150, 50x75, 25x38, 13x19; 8 heads x 32 channels;
4 points):
  encoder: queries = all 19,947 pixels (self-attention over the flattened multi-scale features);
  decoder: 300 queries.
Locations are realistic (each query's reference point plus offsets of a few pixels, as after the standard
init), not uniform noise, so the memory-access locality matches the model.

CPU: fp32 at each of --threads. GPU (when available): fp32, fp16, bf16, with the achieved bandwidth
(compulsory bytes / time) and the ratio to the L2-gather estimate of shared/reference/deformable_attention.md §4
(every corner read from L2 at 7 TB/s for H100). Backends are timed interleaved, run by run, and each keeps its
minimum, so a shared machine's load affects them alike.

Usage:
  .venv/bin/python benchmarks/bench_msda.py                      # all cases, threads 1 and 2
  .venv/bin/python benchmarks/bench_msda.py --cases decoder --threads 2 --repeat 20
  .venv/bin/python benchmarks/bench_msda.py --out runs/bench/msda.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.ops import _ext, ms_deform_attn, ms_deform_attn_pytorch  # noqa: E402

LEVELS = ((100, 150), (50, 75), (25, 38), (13, 19))
HEADS, CHANNELS, POINTS = 8, 32, 4
L2_BANDWIDTH = 7.0e12  # bytes/s, H100 L2 (upper end of the reference's 5.5-7 TB/s assumption)
HBM_BANDWIDTH = 3.0e12  # bytes/s, the reference's H100 HBM figure


@dataclass
class Result:
    case: str
    backend: str
    device: str
    dtype: str
    threads: int
    queries: int
    fwd_ms: float
    fwd_bwd_ms: float
    speedup_fwd: float | None = None  # vs the PyTorch fallback, same device/dtype/threads
    speedup_fwd_bwd: float | None = None
    fwd_gbps: float | None = None  # compulsory bytes / forward time (GPU only)
    fwd_vs_l2_estimate: float | None = None  # forward time / L2-gather estimate (GPU only)


def make_case(case: str, batch: int, dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    """Inputs (value, spatial_shapes, level_start_index, locations, weights) for 'encoder' or 'decoder'."""
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(LEVELS, dtype=torch.long)
    sizes = ss[:, 0] * ss[:, 1]
    lsi = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    s = int(sizes.sum())
    num_levels = len(LEVELS)
    if case == "encoder":
        # Reference point of each query = its own pixel centre, shared by all levels (as in the encoder).
        refs = []
        for h, w in LEVELS:
            ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
            refs.append(torch.stack([xs.flatten(), ys.flatten()], -1))
        ref = torch.cat(refs).double()  # (S, 2)
    elif case == "decoder":
        ref = torch.rand(300, 2, generator=g, dtype=torch.float64)
    else:
        raise ValueError(f"unknown case {case!r}")
    lq = ref.shape[0]
    norm = torch.tensor([[w, h] for h, w in LEVELS], dtype=torch.float64)  # (L, 2) as (W, H)
    offsets = torch.randn(batch, lq, HEADS, num_levels, POINTS, 2, generator=g, dtype=torch.float64) * 2.0
    loc = ref[None, :, None, None, None, :] + offsets / norm[None, None, None, :, None, :]
    logits = torch.randn(batch, lq, HEADS, num_levels * POINTS, generator=g, dtype=torch.float64)
    weights = logits.softmax(-1).view(batch, lq, HEADS, num_levels, POINTS)
    value = torch.randn(batch, s, HEADS, CHANNELS, generator=g, dtype=torch.float64)
    return [
        t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
        for t in (value, ss, lsi, loc, weights)
    ]


def op_for(backend: str) -> Callable[..., torch.Tensor]:
    """The raw op (inputs are validated once up front, so per-call checks/syncs are not timed)."""
    if backend == "pytorch":
        return ms_deform_attn_pytorch
    return torch.ops.psf_ops.ms_deform_attn_forward


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_once_ms(fn: Callable[[], object], device: str) -> float:
    """Wall time of one fn() call in ms (CUDA-synchronised)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def compulsory_bytes(inputs: list[torch.Tensor]) -> int:
    """value + locations + weights read once, output written once."""
    value, _, _, loc, attn = inputs
    out_bytes = loc.shape[0] * loc.shape[1] * value.shape[2] * value.shape[3] * value.element_size()
    return sum(t.numel() * t.element_size() for t in (value, loc, attn)) + out_bytes


def l2_gather_bytes(inputs: list[torch.Tensor]) -> int:
    """Every bilinear corner's D-vector read once from L2 (no L1 reuse)."""
    value, _, _, loc, _ = inputs
    n, lq, m, num_levels, p, _ = loc.shape
    return n * lq * m * num_levels * p * 4 * value.shape[3] * value.element_size()


def prepare(
    case: str, backend: str, device: str, dtype: torch.dtype, batch: int
) -> tuple[list[torch.Tensor], Callable[[], object], Callable[[], object]]:
    """Inputs and the (forward, forward+backward) closures of one backend."""
    inputs = make_case(case, batch, dtype, device)
    ms_deform_attn(*inputs, backend=backend)  # validates the inputs and the backend once
    op = op_for(backend)
    value, ss, lsi, loc, attn = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    grad_out = torch.randn(loc.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=device, dtype=dtype)

    def fwd() -> None:
        with torch.no_grad():
            op(value, ss, lsi, loc, attn)

    def fwd_bwd() -> None:
        out = op(leaves[0], ss, lsi, leaves[1], leaves[2])
        torch.autograd.grad(out, leaves, grad_out)

    return inputs, fwd, fwd_bwd


def bench_config(
    case: str, backends: list[str], device: str, dtype: torch.dtype, threads: int, args: argparse.Namespace
) -> list[Result]:
    """Time all backends of one configuration, interleaved run by run, and keep each one's minimum.

    Interleaving gives every backend the same share of a shared machine's quiet moments, so the ratios
    stay meaningful when other jobs load the CPU.
    """
    repeat = args.repeat if case == "decoder" or device == "cuda" else max(1, args.repeat // 4)
    prepared = {b: prepare(case, b, device, dtype, args.batch) for b in backends}
    best = {b: [float("inf"), float("inf")] for b in backends}
    for i in range(args.warmup + repeat):
        for b, (_, fwd, fwd_bwd) in prepared.items():
            t_f, t_fb = time_once_ms(fwd, device), time_once_ms(fwd_bwd, device)
            if i >= args.warmup:
                best[b] = [min(best[b][0], t_f), min(best[b][1], t_fb)]
    results = []
    for b, (inputs, _, _) in prepared.items():
        r = Result(case, b, device, str(dtype).replace("torch.", ""), threads, inputs[3].shape[1], *best[b])
        if device == "cuda":
            r.fwd_gbps = compulsory_bytes(inputs) / (r.fwd_ms * 1e-3) / 1e9
            r.fwd_vs_l2_estimate = r.fwd_ms * 1e-3 / (l2_gather_bytes(inputs) / L2_BANDWIDTH)
        print(f"  {case:<8} {device:<4} {r.dtype:<8} threads={threads} {b:<8} "
              f"fwd {r.fwd_ms:9.2f} ms  fwd+bwd {r.fwd_bwd_ms:9.2f} ms", file=sys.stderr, flush=True)
        results.append(r)
    base = next((r for r in results if r.backend == "pytorch"), None)
    if base is not None:
        for r in results:
            r.speedup_fwd = base.fwd_ms / r.fwd_ms
            r.speedup_fwd_bwd = base.fwd_bwd_ms / r.fwd_bwd_ms
    return results


def run(args: argparse.Namespace) -> list[Result]:
    status = _ext.status()
    results: list[Result] = []
    plans: list[tuple[str, torch.dtype, list[int], list[str]]] = []
    cpu_backends = [b for b in args.backends if b == "pytorch" or (b == "cpp" and status["cpp"].usable)]
    plans.append(("cpu", torch.float32, args.threads, cpu_backends))
    if torch.cuda.is_available() and not args.cpu_only:
        gpu_backends = [b for b in args.backends if b == "pytorch" or (b == "cuda" and status["cuda"].usable)]
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            plans.append(("cuda", dt, [torch.get_num_threads()], gpu_backends))
    for device, dtype, thread_list, backends in plans:
        for threads in thread_list:
            torch.set_num_threads(threads)
            for case in args.cases:
                results += bench_config(case, backends, device, dtype, threads, args)
    return results


def markdown(results: list[Result]) -> str:
    head = ("| case | device | dtype | threads | backend | fwd ms | fwd+bwd ms | speed-up fwd | speed-up fwd+bwd "
            "| fwd GB/s | fwd / L2 est. |")
    lines = [head, "|" + "---|" * 11]
    for r in results:
        def f(x: float | None, fmt: str) -> str:
            return "" if x is None else format(x, fmt)

        lines.append(
            f"| {r.case} | {r.device} | {r.dtype} | {r.threads} | {r.backend} | {r.fwd_ms:.2f} | {r.fwd_bwd_ms:.2f} "
            f"| {f(r.speedup_fwd, '.2f')} | {f(r.speedup_fwd_bwd, '.2f')} | {f(r.fwd_gbps, '.0f')} "
            f"| {f(r.fwd_vs_l2_estimate, '.2f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["encoder", "decoder"], choices=["encoder", "decoder"])
    parser.add_argument("--backends", nargs="+", default=["pytorch", "cpp", "cuda"], choices=["pytorch", "cpp", "cuda"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="CPU thread counts")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=20, help="timed runs (CPU encoder uses a quarter)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cpu_threads_available": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    print(f"machine: {machine}", file=sys.stderr)
    print(f"backends: {_ext.describe()}", file=sys.stderr)
    results = run(args)
    print(markdown(results))
    if args.out is not None:
        from harness.io import atomic_write_json

        atomic_write_json(args.out, {"machine": machine, "results": [asdict(r) for r in results]}, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
