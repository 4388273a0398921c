"""Multi-scale deformable attention: every built backend against independent oracles.

Oracles: a naive per-sample loop written from the Deformable DETR kernel's definition (`naive_msda`),
hand-computed bilinear values, `torch.autograd.gradcheck` (float64) and the grid_sample fallback.
CUDA tests are skipped without a GPU; compiled-CPU tests are skipped when `_C.so` is not built
(except under CI, where a missing build fails).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.ops import BackendUnavailableError, MSDeformAttn, ms_deform_attn, ms_deform_attn_pytorch, select_backend
from models.ops import _ext

CPP_BUILT = _ext.status()["cpp"].usable
CUDA_OK = _ext.status()["cuda"].usable
needs_cpp = pytest.mark.skipif(not CPP_BUILT, reason=f"C++ extension: {_ext.status()['cpp'].reason}")
needs_cuda = pytest.mark.skipif(not CUDA_OK, reason=f"CUDA backend: {_ext.status()['cuda'].reason}")

# (backend, device) pairs that can run here; the fallback always can.
RUNNABLE = [("pytorch", "cpu")]
if CPP_BUILT:
    RUNNABLE.append(("cpp", "cpu"))
if CUDA_OK:
    RUNNABLE += [("cuda", "cuda"), ("pytorch", "cuda")]
COMPILED = [(b, dev) for b, dev in RUNNABLE if b != "pytorch"]


def make_inputs(
    n: int = 2,
    m: int = 2,
    d: int = 4,
    lq: int = 5,
    shapes: tuple[tuple[int, int], ...] = ((6, 7), (3, 4)),
    p: int = 3,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    lo: float = -0.1,
    hi: float = 1.1,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Random inputs; locations uniform in [lo, hi] (partly outside the maps)."""
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.long)
    lsi = torch.cat([ss.new_zeros(1), (ss[:, 0] * ss[:, 1]).cumsum(0)[:-1]])
    s = int((ss[:, 0] * ss[:, 1]).sum())
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    attn = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=torch.float64)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    tensors = (value, ss, lsi, loc, attn)
    return tuple(t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in tensors)


def naive_msda(value, spatial_shapes, level_start_index, loc, attn) -> torch.Tensor:  # noqa: ANN001
    """Direct transcription of the definition (float64, Python loops): out (N, Lq, M*D)."""
    value, loc, attn = value.double().cpu(), loc.double().cpu(), attn.double().cpu()
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = loc.shape
    out = torch.zeros(n, lq, m, d, dtype=torch.float64)
    for b in range(n):
        for q in range(lq):
            for h in range(m):
                for lvl in range(num_levels):
                    hh, ww = (int(x) for x in spatial_shapes[lvl])
                    start = int(level_start_index[lvl])
                    for pt in range(num_points):
                        x, y = float(loc[b, q, h, lvl, pt, 0]), float(loc[b, q, h, lvl, pt, 1])
                        h_im, w_im = y * hh - 0.5, x * ww - 0.5
                        if not (h_im > -1 and w_im > -1 and h_im < hh and w_im < ww):
                            continue
                        y0, x0 = math.floor(h_im), math.floor(w_im)
                        for yy, wy in ((y0, 1 - (h_im - y0)), (y0 + 1, h_im - y0)):
                            for xx, wx in ((x0, 1 - (w_im - x0)), (x0 + 1, w_im - x0)):
                                if 0 <= yy < hh and 0 <= xx < ww:
                                    out[b, q, h] += attn[b, q, h, lvl, pt] * wy * wx * value[b, start + yy * ww + xx, h]
    return out.view(n, lq, m * d)


def grads(fn, inputs, grad_out):  # noqa: ANN001
    """(out, d value, d loc, d attn) of fn(value, ss, lsi, loc, attn) for the upstream gradient grad_out."""
    value, ss, lsi, loc, attn = (t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs)
    out = fn(value, ss, lsi, loc, attn)
    gv, gl, ga = torch.autograd.grad(out, (value, loc, attn), grad_out)
    return out.detach(), gv, gl, ga


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (the issue's float32 criterion)."""
    ref = ref.detach().double().cpu()
    return float((a.detach().double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------- values


def test_hand_computed_bilinear_values() -> None:
    """2x2 map [[1, 2], [3, 4]], D=1: centre, pixel centres, corners, borders and outside."""
    ss = torch.tensor([[2, 2]])
    lsi = torch.tensor([0])
    value = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 4, 1, 1)
    pts = [(0.5, 0.5), (0.25, 0.25), (0.75, 0.25), (0.0, 0.0), (1.0, 1.0), (0.5, 0.0), (-0.5, 0.5), (1.1, 0.75),
           (1.25, 0.75)]
    expected = [2.5, 1.0, 2.0, 0.25, 1.0, 0.75, 0.0, 1.2, 0.0]
    loc = torch.tensor(pts, dtype=torch.float64).view(1, len(pts), 1, 1, 1, 2)
    attn = torch.ones(1, len(pts), 1, 1, 1, dtype=torch.float64)
    for backend, _ in [r for r in RUNNABLE if r[1] == "cpu"]:
        out = ms_deform_attn(value, ss, lsi, loc, attn, backend=backend)
        torch.testing.assert_close(out.view(-1), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend,device", RUNNABLE)
def test_forward_matches_naive_oracle(backend: str, device: str) -> None:
    inputs = make_inputs(device=device, lo=-0.3, hi=1.3)
    out = ms_deform_attn(*inputs, backend=backend)
    assert out.shape == (2, 5, 2 * 4)
    torch.testing.assert_close(out.cpu(), naive_msda(*inputs), rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend,device", COMPILED)
def test_float64_forward_and_grads_match_fallback(backend: str, device: str) -> None:
    inputs = make_inputs(n=3, m=3, d=5, lq=7, p=2, device=device, seed=1)
    grad_out = torch.randn(3, 7, 15, dtype=torch.float64, device=device)
    got = grads(lambda *a: ms_deform_attn(*a, backend=backend), inputs, grad_out)
    ref = grads(ms_deform_attn_pytorch, [t.cpu() for t in inputs], grad_out.cpu())
    for name, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, ref):
        assert (a.cpu() - b).abs().max() <= 1e-10, name


@pytest.mark.parametrize("backend,device", RUNNABLE)
def test_gradcheck_float64(backend: str, device: str) -> None:
    # Locations strictly inside (0.05, 0.95): away from the early-out boundary where the derivative jumps.
    value, ss, lsi, loc, attn = make_inputs(n=1, m=2, d=3, lq=3, shapes=((4, 5), (2, 3)), p=2, device=device,
                                            lo=0.05, hi=0.95, seed=2)
    args = [value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_()]
    assert torch.autograd.gradcheck(
        lambda v, lc, a: ms_deform_attn(v, ss, lsi, lc, a, backend=backend), args, eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("backend,device", COMPILED)
def test_float32_within_1e4_of_float64_fallback(backend: str, device: str) -> None:
    inputs64 = make_inputs(n=2, m=4, d=8, lq=40, shapes=((16, 20), (8, 10), (4, 5)), p=4, seed=3)
    grad_out = torch.randn(2, 40, 32, dtype=torch.float64)
    ref = grads(ms_deform_attn_pytorch, inputs64, grad_out)
    inputs32 = [t.to(device=device, dtype=torch.float32) if t.is_floating_point() else t.to(device) for t in inputs64]
    got = grads(lambda *a: ms_deform_attn(*a, backend=backend), inputs32, grad_out.float().to(device))
    for name, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, ref):
        assert a.dtype == torch.float32
        assert rel_err(a, b) <= 1e-4, name


# ------------------------------------------------------------------------------------------- borders


def border_locations(shapes: tuple[tuple[int, int], ...], p: int, centres: bool = True) -> torch.Tensor:
    """(1, K, 1, L, P, 2) locations on 0, 1, first/last pixel centres, half-pixel outside and far outside.

    centres=False moves the pixel-centre points off the centre: the derivative jumps there, and grid_sample's
    `2 * loc - 1` round trip can land on either side, so gradients are only comparable off-centre.
    """
    c = 0.5 if centres else 0.3
    coords = []
    for h, w in shapes:
        xs = [0.0, 1.0, c / w, 1 - c / w, -0.25 / w, 1 + 0.25 / w, -0.3, 1.7, 0.5]
        ys = [0.0, 1.0, c / h, 1 - c / h, -0.25 / h, 1 + 0.25 / h, 1.5, -2.0, 0.5]
        coords.append(list(zip(xs, ys)))
    k = len(coords[0])
    loc = torch.tensor([[[c[(i + j) % k] for j in range(p)] for c in coords] for i in range(k)], dtype=torch.float64)
    return loc.view(1, k, 1, len(shapes), p, 2)


@pytest.mark.parametrize("backend,device", RUNNABLE)
def test_borders_and_outside(backend: str, device: str) -> None:
    shapes = ((5, 6), (2, 3))
    value, ss, lsi, _, _ = make_inputs(n=1, m=1, d=3, lq=1, shapes=shapes, p=3, seed=4)
    loc = border_locations(shapes, 3)
    attn = torch.rand(1, loc.shape[1], 1, 2, 3, dtype=torch.float64)
    inputs = [t.to(device) for t in (value, ss, lsi, loc, attn)]
    torch.testing.assert_close(ms_deform_attn(*inputs, backend=backend).cpu(), naive_msda(*inputs), rtol=0, atol=1e-12)
    # Far outside every map: exactly zero output, zero gradients.
    far = torch.full_like(inputs[3], 3.0)
    out, gv, gl, ga = grads(lambda *a: ms_deform_attn(*a, backend=backend), [*inputs[:3], far, inputs[4]],
                            torch.ones(1, loc.shape[1], 3, dtype=torch.float64, device=device))
    assert out.abs().max() == 0 and gv.abs().max() == 0 and gl.abs().max() == 0 and ga.abs().max() == 0


@pytest.mark.parametrize("backend,device", COMPILED)
def test_border_gradients_match_fallback(backend: str, device: str) -> None:
    # Avoids -0.5/W exactly (h_im == -1), the one documented measure-zero difference from grid_sample.
    shapes = ((5, 6), (2, 3))
    value, ss, lsi, _, _ = make_inputs(n=1, m=1, d=3, lq=1, shapes=shapes, p=3, seed=5)
    loc = border_locations(shapes, 3, centres=False)
    attn = torch.rand(1, loc.shape[1], 1, 2, 3, dtype=torch.float64)
    grad_out = torch.randn(1, loc.shape[1], 3, dtype=torch.float64)
    inputs = (value, ss, lsi, loc, attn)
    got = grads(lambda *a: ms_deform_attn(*a, backend=backend), [t.to(device) for t in inputs], grad_out.to(device))
    ref = grads(ms_deform_attn_pytorch, inputs, grad_out)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-10)


@needs_cpp
def test_nan_location_is_skipped_like_reference_kernel() -> None:
    value, ss, lsi, loc, attn = make_inputs(n=1, m=1, d=2, lq=2, p=2, seed=6)
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    out = ms_deform_attn(value, ss, lsi, loc, attn, backend="cpp")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, naive_msda(value, ss, lsi, loc, attn), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ dtypes and layouts


@pytest.mark.parametrize("backend,device", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_and_grad_dtype_equal_input_dtype(backend: str, device: str, dtype: torch.dtype) -> None:
    inputs64 = make_inputs(n=1, m=2, d=8, lq=6, shapes=((70, 66), (9, 8)), p=2, seed=7)
    inputs = [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in inputs64]
    grad_out = torch.randn(1, 6, 16, dtype=torch.float64)
    out, gv, gl, ga = grads(lambda *a: ms_deform_attn(*a, backend=backend), inputs, grad_out.to(device, dtype))
    assert out.dtype == gv.dtype == gl.dtype == ga.dtype == dtype
    # Reference: fp64 on the same rounded inputs. fp32 accumulation leaves only input/output rounding.
    ref = grads(ms_deform_attn_pytorch, [t.double().cpu() if t.is_floating_point() else t.cpu() for t in inputs],
                grad_out.to(dtype).double())
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    assert rel_err(out, ref[0]) <= tol
    assert rel_err(gv, ref[1]) <= tol


@pytest.mark.parametrize("backend,device", RUNNABLE)
def test_batch_larger_than_im2col_step(backend: str, device: str) -> None:
    # The reference kernel required batch % 64 == 0 once batch > 64 (Deformable-DETR#224).
    inputs = make_inputs(n=67, m=1, d=2, lq=2, shapes=((3, 4),), p=2, device=device, seed=8)
    grad_out = torch.randn(67, 2, 2, dtype=torch.float64, device=device)
    got = grads(lambda *a: ms_deform_attn(*a, backend=backend), inputs, grad_out)
    ref = grads(ms_deform_attn_pytorch, [t.cpu() for t in inputs], grad_out.cpu())
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend,device", RUNNABLE)
def test_non_contiguous_inputs(backend: str, device: str) -> None:
    value, ss, lsi, loc, attn = make_inputs(n=2, m=2, d=4, lq=5, device=device, seed=9)
    expected = ms_deform_attn(value, ss, lsi, loc, attn, backend=backend)
    # Same values through strided views: channel-last value, transposed loc/attn, strided index tensors.
    value_nc = value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    loc_nc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    attn_nc = attn.transpose(3, 4).contiguous().transpose(3, 4)
    ss_nc = ss.t().contiguous().t()
    lsi_nc = torch.stack([lsi, lsi], 1)[:, 0]
    for t in (value_nc, loc_nc, attn_nc, ss_nc, lsi_nc):
        assert not t.is_contiguous()
    got = ms_deform_attn(value_nc, ss_nc, lsi_nc, loc_nc, attn_nc, backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    gv = grads(lambda *a: ms_deform_attn(*a, backend=backend), (value_nc, ss_nc, lsi_nc, loc_nc, attn_nc),
               torch.ones_like(expected).transpose(0, 1).contiguous().transpose(0, 1))
    gv_ref = grads(lambda *a: ms_deform_attn(*a, backend=backend), (value, ss, lsi, loc, attn),
                   torch.ones_like(expected))
    for a, b in zip(gv, gv_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend,device", RUNNABLE)
def test_empty_query_set(backend: str, device: str) -> None:
    value, ss, lsi, loc, attn = make_inputs(n=2, m=2, d=4, lq=0, device=device)
    out, gv, gl, ga = grads(lambda *a: ms_deform_attn(*a, backend=backend), (value, ss, lsi, loc, attn),
                            torch.zeros(2, 0, 8, dtype=torch.float64, device=device))
    assert out.shape == (2, 0, 8) and gl.shape == loc.shape and ga.shape == attn.shape
    assert gv.shape == value.shape and gv.abs().max() == 0


@needs_cpp
def test_cpu_backward_is_deterministic() -> None:
    inputs = make_inputs(n=2, m=4, d=8, lq=50, p=4, dtype=torch.float32, seed=10)
    grad_out = torch.randn(2, 50, 32)
    a = grads(lambda *x: ms_deform_attn(*x, backend="cpp"), inputs, grad_out)
    b = grads(lambda *x: ms_deform_attn(*x, backend="cpp"), inputs, grad_out)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------- bad input


def _bad(**override: object) -> dict[str, object]:
    value, ss, lsi, loc, attn = make_inputs(n=2, m=2, d=4, lq=5, shapes=((6, 7), (3, 4)), p=3)
    args: dict[str, object] = dict(value=value, spatial_shapes=ss, level_start_index=lsi, sampling_locations=loc,
                                   attention_weights=attn)
    args.update(override)
    return args


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(value=torch.zeros(2, 53, 2, 4, dtype=torch.float64)), r"value has S=53 tokens.*sum\(H\*W\) = 54"),
        (dict(spatial_shapes=torch.tensor([[6, 7]]), level_start_index=torch.tensor([0])),
         r"sampling_locations must be \(N, Lq, M, L, P, 2\) = \(2, 5, 2, 1, 3, 2\)"),
        (dict(level_start_index=torch.tensor([0, 40])), r"level_start_index must be \[0, 42\]"),
        (dict(level_start_index=torch.tensor([0])), r"level_start_index must be \(2,\)"),
        (dict(attention_weights=torch.zeros(2, 5, 2, 2, 4, dtype=torch.float64)),
         r"attention_weights must be \(N, Lq, M, L, P\) = \(2, 5, 2, 2, 3\)"),
        (dict(sampling_locations=torch.zeros(2, 5, 3, 2, 3, 2, dtype=torch.float64)),
         r"sampling_locations must be .*M=2 from value"),
        (dict(sampling_locations=torch.zeros(2, 5, 2, 2, 3, 3, dtype=torch.float64)), r"sampling_locations must be"),
        (dict(value=torch.zeros(2, 54, 8, dtype=torch.float64)), r"value must be \(N, S, M, D\)"),
        (dict(attention_weights=torch.zeros(2, 5, 2, 2, 3, dtype=torch.float32)),
         r"attention_weights has dtype torch.float32 but value has torch.float64"),
        (dict(spatial_shapes=torch.tensor([[6, 7], [3, 4]], dtype=torch.int32)), r"spatial_shapes must be torch.int64"),
        (dict(sampling_locations=torch.zeros(2, 5, 2, 2, 3, 2, dtype=torch.float64, device="meta")),
         r"sampling_locations is on meta but value is on cpu"),
    ],
)
@pytest.mark.parametrize("backend", [None, "pytorch"])
def test_bad_input_raises_value_error_naming_argument(override: dict, match: str, backend: str | None) -> None:
    with pytest.raises(ValueError, match=match):
        ms_deform_attn(**_bad(**override), backend=backend)


def test_unknown_and_unavailable_backends() -> None:
    with pytest.raises(ValueError, match="backend must be None or one of"):
        ms_deform_attn(**_bad(), backend="triton")
    if not CUDA_OK:
        with pytest.raises(BackendUnavailableError, match="'cuda'"):
            ms_deform_attn(**_bad(), backend="cuda")
    if CPP_BUILT:
        with pytest.raises(BackendUnavailableError, match="runs on cpu tensors"):
            select_backend("cuda", "cpp")


def test_backend_none_picks_compiled_kernel_on_cpu() -> None:
    if os.environ.get("CI") and not CPP_BUILT:
        pytest.fail(f"CI must build the C++ extension: {_ext.status()['cpp'].reason}")
    assert select_backend("cpu") == ("cpp" if CPP_BUILT else "pytorch")
    if CUDA_OK:
        assert select_backend("cuda") == "cuda"


# ------------------------------------------------------------------------- custom op integration


@needs_cpp
def test_opcheck_schema_fake_and_autograd_registration() -> None:
    inputs = make_inputs(n=2, m=2, d=4, lq=3, p=2, seed=11)
    args = [t.requires_grad_() if t.is_floating_point() else t for t in inputs]
    torch.library.opcheck(torch.ops.psf_ops.ms_deform_attn_forward.default, args)
    grad_out = torch.randn(2, 3, 8, dtype=torch.float64)
    plain = [t.detach() for t in inputs]
    torch.library.opcheck(torch.ops.psf_ops.ms_deform_attn_backward.default, [*plain, grad_out])


@needs_cpp
def test_meta_tensors_give_shapes() -> None:
    value, ss, lsi, loc, attn = (t.to("meta") for t in make_inputs(n=2, m=2, d=4, lq=3, p=2))
    out = ms_deform_attn(value, ss, lsi, loc, attn, backend="cpp")
    assert out.device.type == "meta" and out.shape == (2, 3, 8)


@needs_cpp
def test_torch_compile_and_export() -> None:
    inputs = make_inputs(n=1, m=2, d=4, lq=6, p=2, dtype=torch.float32, seed=12)

    def f(value, ss, lsi, loc, attn):  # noqa: ANN001, ANN202
        return ms_deform_attn(value, ss, lsi, loc, attn, backend="cpp").square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    eager = grads(lambda *a: f(*a).view(1), inputs, torch.ones(1))
    traced = grads(lambda *a: compiled(*a).view(1), inputs, torch.ones(1))
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b)

    class Wrap(torch.nn.Module):
        def forward(self, value, ss, lsi, loc, attn):  # noqa: ANN001, ANN202
            return ms_deform_attn(value, ss, lsi, loc, attn)

    ep = torch.export.export(Wrap(), tuple(inputs))
    assert "psf_ops.ms_deform_attn_forward" in str(ep.graph)
    torch.testing.assert_close(ep.module()(*inputs), ms_deform_attn(*inputs))


# --------------------------------------------------------------------------------------- module


@pytest.mark.parametrize("backend,device", RUNNABLE)
def test_module_backends_agree_and_standard_init(backend: str, device: str) -> None:
    torch.manual_seed(0)
    attn_mod = MSDeformAttn(embed_dim=32, num_heads=4, num_levels=2, num_points=2).double().to(device)
    # Standard init: zero attention logits -> uniform weights; offsets = per-head direction * (point index + 1).
    assert attn_mod.attention_weights.weight.abs().max() == 0
    bias = attn_mod.sampling_offsets.bias.view(4, 2, 2, 2)
    torch.testing.assert_close(bias[0, 0, 1], torch.tensor([2.0, 0.0], dtype=torch.float64, device=device))
    torch.testing.assert_close(bias[1, 1, 0], torch.tensor([0.0, 1.0], dtype=torch.float64, device=device))
    ss = torch.tensor([[6, 5], [3, 3]], device=device)
    lsi = torch.tensor([0, 30], device=device)
    query = torch.randn(2, 7, 32, dtype=torch.float64, device=device)
    value = torch.randn(2, 39, 32, dtype=torch.float64, device=device)
    ref_points = torch.rand(2, 7, 2, 2, dtype=torch.float64, device=device)
    mask = torch.zeros(2, 39, dtype=torch.bool, device=device)
    mask[1, -5:] = True
    attn_mod.backend = backend
    out = attn_mod(query, ref_points, value, ss, lsi, mask)
    attn_mod.backend = "pytorch"
    ref = attn_mod(query.cpu() if device == "cpu" else query, ref_points, value, ss, lsi, mask)
    assert out.shape == (2, 7, 32)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------- CUDA


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_against_float32(dtype: torch.dtype) -> None:
    inputs = make_inputs(n=2, m=8, d=32, lq=300, shapes=((40, 60), (20, 30), (10, 15), (5, 8)), p=4, seed=13)
    ref = ms_deform_attn_pytorch(*[t.float() if t.is_floating_point() else t for t in inputs])
    cuda_in = [t.to("cuda", dtype) if t.is_floating_point() else t.cuda() for t in inputs]
    out = ms_deform_attn(*cuda_in, backend="cuda")
    assert out.dtype == dtype
    assert rel_err(out, ref) <= (1e-2 if dtype == torch.float16 else 3e-2)


@needs_cuda
@pytest.mark.parametrize("d", [1, 3, 6, 32, 64, 136, 256])
def test_cuda_channel_counts_all_reduction_paths(d: int) -> None:
    # d=3 (1 ch/thread), 6 (2), 32/64 (4, shuffle groups of 8/16), 136 (34 threads: atomic path), 256 (64: atomic).
    inputs = make_inputs(n=2, m=2, d=d, lq=9, shapes=((7, 9), (4, 5)), p=3, dtype=torch.float64, seed=14)
    grad_out = torch.randn(2, 9, 2 * d, dtype=torch.float64)
    got = grads(lambda *a: ms_deform_attn(*a, backend="cuda"), [t.cuda() for t in inputs], grad_out.cuda())
    ref = grads(ms_deform_attn_pytorch, inputs, grad_out)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------- doctor


def test_doctor_reports_backends_and_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from harness.cli import main

    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_name = {b["name"]: b for b in report["backends"]}
    assert set(by_name) == {"pytorch", "cpp", "cuda"}
    assert report["torch"] == torch.__version__
    assert by_name["pytorch"]["available"]
    assert by_name["cpp"]["available"] == CPP_BUILT
    assert by_name["cuda"]["available"] == CUDA_OK
    for b in by_name.values():
        assert b["available"] or b["reason"], b  # every unavailable backend says why
    assert report["default_backend"]["cpu"] == select_backend("cpu")
    assert main(["doctor", "--require", "cpp"]) == (0 if CPP_BUILT else 1)


# --------------------------------------------------------------------------------------- loader

_LOADER_SCRIPT = """
import sys
from pathlib import Path
import torch
from models.ops import _ext, ms_deform_attn, select_backend
_ext.CPU_LIB = Path(sys.argv[1])
st = _ext.status()
assert not st["cpp"].usable and not st["cuda"].usable, st
assert select_backend("cpu") == "pytorch"
ss, lsi = torch.tensor([[2, 3]]), torch.tensor([0])
out = ms_deform_attn(torch.ones(1, 6, 1, 2), ss, lsi, torch.full((1, 4, 1, 1, 1, 2), 0.5), torch.ones(1, 4, 1, 1, 1))
assert out.shape == (1, 4, 2) and torch.allclose(out, torch.ones(1, 4, 2))
print(st["cpp"].reason)
"""


@pytest.mark.parametrize("content,reason", [(None, "not built"), (b"not an ELF file", "failed to load")])
def test_missing_or_broken_library_falls_back_without_breaking_import(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    lib = tmp_path / "_C.so"
    if content is not None:
        lib.write_bytes(content)
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _LOADER_SCRIPT, str(lib)], cwd=repo, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert reason in proc.stdout


def test_stale_build_is_detected() -> None:
    assert "stale build: compiled against torch 2.0.0" in (_ext._torch_version_mismatch("torch=2.0.0;openmp=1") or "")
    assert _ext._torch_version_mismatch(f"torch={torch.__version__.split('+')[0]};openmp=1") is None


def test_ci_builds_the_cuda_extension_when_a_toolkit_is_present() -> None:
    from models.ops.build import find_cuda_home, strict

    if not strict():
        pytest.skip("only enforced under CI / STRICT_EXT=1")
    if find_cuda_home() is None or os.environ.get("FORCE_CUDA") == "0":
        pytest.skip("no CUDA toolkit on this machine")
    assert _ext.status()["cuda"].built, _ext.status()["cuda"].reason


@needs_cuda
def test_cuda_opcheck_schema_fake_and_autograd_registration() -> None:
    inputs = [t.cuda() for t in make_inputs(n=2, m=2, d=4, lq=3, p=2, seed=15)]
    args = [t.requires_grad_() if t.is_floating_point() else t for t in inputs]
    torch.library.opcheck(torch.ops.psf_ops.ms_deform_attn_forward.default, args)


@needs_cuda
def test_cuda_realistic_float32_shape_against_cpu_kernel() -> None:
    # A full warp-shuffle configuration (D=32, 8 heads, 4 levels, 4 points) on 500 queries.
    inputs = make_inputs(n=2, m=8, d=32, lq=500, shapes=((50, 75), (25, 38), (13, 19), (7, 10)), p=4,
                         dtype=torch.float32, seed=16)
    grad_out = torch.randn(2, 500, 256)
    ref = grads(ms_deform_attn_pytorch, [t.double() if t.is_floating_point() else t for t in inputs], grad_out.double())
    got = grads(lambda *a: ms_deform_attn(*a, backend="cuda"), [t.cuda() for t in inputs], grad_out.cuda())
    for name, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, ref):
        assert a.dtype == torch.float32
        assert rel_err(a, b) <= 1e-4, name


# ---------------------------------------------------------------------------------------- build

_BUILD_SCRIPT = """
import sys
from pathlib import Path
import models.ops.build as b
root = Path(sys.argv[1])
b.CSRC, b.OPS_DIR, b.BUILD_DIR = root / "csrc", root / "ops", root / "build"
b.smoke_test = lambda: "skipped"
sys.exit(b.main(["--cpu-only"]))
"""


@pytest.mark.parametrize("strict_env,expected_rc", [({}, 0), ({"STRICT_EXT": "1"}, 1)])
def test_failed_build_exits_zero_unless_strict(tmp_path: Path, strict_env: dict, expected_rc: int) -> None:
    (tmp_path / "csrc").mkdir()
    (tmp_path / "ops").mkdir()
    (tmp_path / "csrc" / "ms_deform_attn_cpu.cpp").write_text("this is not C++;\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "STRICT_EXT")} | strict_env
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, str(tmp_path)], cwd=repo, env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == expected_rc, proc.stderr[-2000:]
    assert "build failed: CPU extension" in proc.stderr
    assert not (tmp_path / "ops" / "_C.so").exists()


def test_module_under_autocast_mixed_dtypes() -> None:
    # bf16 projections + fp32 reference points give mixed dtypes inside the module: computed in fp32, no error.
    torch.manual_seed(0)
    attn_mod = MSDeformAttn(embed_dim=32, num_heads=4, num_levels=2, num_points=2)
    ss, lsi = torch.tensor([[6, 5], [3, 3]]), torch.tensor([0, 30])
    query, value, ref_points = torch.randn(1, 7, 32), torch.randn(1, 39, 32), torch.rand(1, 7, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn_mod(query, ref_points, value, ss, lsi)
    ref = attn_mod(query, ref_points, value, ss, lsi)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 5e-2
