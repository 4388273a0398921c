"""Loader for the compiled deformable-attention kernels (`models/ops/_C.so`, `models/ops/_C_cuda.so`).

Loading is lazy (first call to `status()`), happens once per process and never raises: a missing,
broken or stale (built against another torch) library is recorded with the reason, which
`harness doctor` prints, and the PyTorch fallback is used instead.

`_C.so` defines the `psf_ops` op schemas and the CPU kernels; `_C_cuda.so` adds CUDA kernels for
the same ops, so it needs `_C.so`. Once loaded, the ops get a fake (meta) implementation and an
autograd formula here, so `torch.compile` and `torch.export` trace through them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

OPS_DIR = Path(__file__).resolve().parent
CPU_LIB = OPS_DIR / "_C.so"
CUDA_LIB = OPS_DIR / "_C_cuda.so"
BUILD_HINT = "run `make setup` or `.venv/bin/python -m models.ops.build`"


@dataclass(frozen=True)
class BackendStatus:
    """Whether one backend can run, and why not.

    Attributes:
        name: 'pytorch', 'cpp' or 'cuda'.
        built: the compiled library loaded and matches this torch (always True for 'pytorch').
        usable: built and a device to run on exists (for 'cuda': a CUDA device).
        reason: one line explaining `usable`; empty when usable.
        path: the library file, if any.
    """

    name: str
    built: bool
    usable: bool
    reason: str = ""
    path: str | None = None


_lock = threading.Lock()
_status: dict[str, BackendStatus] | None = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _load_library(path: Path) -> str | None:
    """Load one library with torch.ops.load_library; returns an error reason or None."""
    import torch

    if not path.is_file():
        return f"not built ({path.name} missing; {BUILD_HINT})"
    try:
        torch.ops.load_library(str(path))
    except Exception as exc:  # noqa: BLE001 - OSError (undefined symbol), RuntimeError (registration)
        return f"failed to load {path.name} ({_first_line(exc)}); rebuild: {BUILD_HINT}"
    return None


def _torch_version_mismatch(info: str) -> str | None:
    """Compare 'torch=X.Y.Z;...' compiled into the library with the running torch."""
    import torch

    fields = dict(kv.split("=", 1) for kv in info.split(";") if "=" in kv)
    built = fields.get("torch", "?")
    running = torch.__version__.split("+")[0]
    if built != running:
        return f"stale build: compiled against torch {built}, running torch {running}; rebuild: {BUILD_HINT}"
    return None


def _register_python_parts() -> None:
    """Fake implementations and autograd for the psf_ops ops (needs the schemas from _C.so)."""
    import torch
    from torch import Tensor

    @torch.library.register_fake("psf_ops::ms_deform_attn_forward")
    def _forward_fake(
        value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, loc: Tensor, attn: Tensor
    ) -> Tensor:
        n, _, m, d = value.shape
        return value.new_empty((n, loc.shape[1], m * d))

    @torch.library.register_fake("psf_ops::ms_deform_attn_backward")
    def _backward_fake(
        value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, loc: Tensor, attn: Tensor, grad: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        return value.new_empty(value.shape), loc.new_empty(loc.shape), attn.new_empty(attn.shape)

    def _setup_context(ctx, inputs: tuple[Tensor, ...], output: Tensor) -> None:  # noqa: ANN001
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        value, spatial_shapes, level_start_index, loc, attn = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = torch.ops.psf_ops.ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, loc, attn, grad_output
        )
        needs = ctx.needs_input_grad
        return (
            grad_value if needs[0] else None,
            None,
            None,
            grad_loc if needs[3] else None,
            grad_attn if needs[4] else None,
        )

    torch.library.register_autograd("psf_ops::ms_deform_attn_forward", _backward, setup_context=_setup_context)

    def _no_double_backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        raise RuntimeError("ms_deform_attn: double backward is not supported by the compiled kernels "
                           "(use backend='pytorch')")

    def _setup_nothing(ctx, inputs: tuple[Tensor, ...], output: tuple[Tensor, ...]) -> None:  # noqa: ANN001
        pass

    torch.library.register_autograd("psf_ops::ms_deform_attn_backward", _no_double_backward,
                                    setup_context=_setup_nothing)


def _load_all() -> dict[str, BackendStatus]:
    import torch

    out = {"pytorch": BackendStatus("pytorch", built=True, usable=True)}
    reason = _load_library(CPU_LIB)
    if reason is None:
        try:
            reason = _torch_version_mismatch(torch.ops.psf_ops.build_info())
        except Exception as exc:  # noqa: BLE001
            reason = f"{CPU_LIB.name} loaded but its ops are missing ({_first_line(exc)}); rebuild: {BUILD_HINT}"
    if reason is None:
        try:
            _register_python_parts()
        except Exception as exc:  # noqa: BLE001
            reason = f"registering fake/autograd for psf_ops failed ({_first_line(exc)})"
    cpp_ok = reason is None
    out["cpp"] = BackendStatus("cpp", built=cpp_ok, usable=cpp_ok, reason=reason or "", path=str(CPU_LIB))

    if not cpp_ok:
        cuda_reason = "needs the CPU extension (_C.so holds the op schemas), which is unavailable"
        out["cuda"] = BackendStatus("cuda", built=False, usable=False, reason=cuda_reason, path=str(CUDA_LIB))
        return out
    cuda_reason = _load_library(CUDA_LIB)
    if cuda_reason is None and not torch.ops.psf_ops.ms_deform_attn_forward.default.has_kernel_for_dispatch_key(
        "CUDA"
    ):
        cuda_reason = f"{CUDA_LIB.name} loaded but registered no CUDA kernel; rebuild: {BUILD_HINT}"
    cuda_built = cuda_reason is None
    if cuda_built and not torch.cuda.is_available():
        cuda_reason = "built, but no CUDA device is available"
    out["cuda"] = BackendStatus(
        "cuda", built=cuda_built, usable=cuda_built and cuda_reason is None, reason=cuda_reason or "",
        path=str(CUDA_LIB),
    )
    return out


def status() -> dict[str, BackendStatus]:
    """Backend name -> status; loads the compiled libraries on the first call."""
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                _status = _load_all()
    return _status


def describe() -> str:
    """One line per backend, e.g. for build logs."""
    return "; ".join(
        f"{s.name}: {'available' if s.usable else 'unavailable'}{' (' + s.reason + ')' if s.reason else ''}"
        for s in status().values()
    )
