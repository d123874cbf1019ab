"""The native CBAM (csrc/cbam.cu through `naslung.native.cbam`) against the reference modules of
`naslung.models.cbam` run in float64 on the same (rounded) input: the output and the gradients
of x and of all three weights, both variants.

The cases cover every width ConvRes uses, odd ones (C = 1 and 3 have no MLP hidden units) and
the widest the kernels take (512), batches of 1 to 256, odd and one-voxel maps, maps large
enough that the channel reductions split the voxels into chunks, and ReLU-like inputs whose
maxima tie (zero voxels, an all-zero channel): torch.amax splits a gradient evenly between tied
maxima, and so must the kernels. The host library runs
here; one test compares the CUDA library with it where a GPU is present.
"""

from __future__ import annotations

import pytest
import torch

from naslung.native.library import NativeLibraryError, library_path
from naslung.testing import sharp_cbam

pytestmark = [
    pytest.mark.skipif(library_path("host") is None,
                       reason="the host kernel library is not built (pip install -e . builds csrc/)"),
    # C < 4: fc1 and fc2 have no hidden units, and torch warns when it initialises them
    pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning"),
]

WIDTHS = (1, 3, 4, 5, 8, 16, 32, 64, 128)
SHAPES = ((1, 1, 1), (2, 3, 5), (7, 7, 7), (3, 5, 7))
CASES = {
    # id: (variant, batch, channels, spatial size, input kind)
    **{f"{v}-width{c}": (v, 2, c, SHAPES[i % len(SHAPES)], "ties" if i % 2 else "randn")
       for v in ("nas-lung", "woo") for i, c in enumerate(WIDTHS)},
    **{f"{v}-batch1-{'x'.join(map(str, s))}": (v, 1, 8, s, "ties")
       for v in ("nas-lung", "woo") for s in SHAPES},
    **{f"{v}-chunked": (v, 1, 8, (13, 14, 15), "ties") for v in ("nas-lung", "woo")},
    **{f"{v}-width{c}": (v, 2, c, (1, 2, 3), "ties") for v in ("nas-lung", "woo") for c in (256, 512)},
    **{f"{v}-batch256": (v, 256, 4, (2, 2, 2), "ties") for v in ("nas-lung", "woo")},
    **{f"{v}-48x48x48": (v, 2, 4, (48, 48, 48), "ties") for v in ("nas-lung", "woo")},
}
ILL_CONDITIONED = {"4x7x7x7": (1, 4, (7, 7, 7)), "4x13x14x15": (1, 4, (13, 14, 15))}
"""NAS-Lung cases, batch 1 at C = 4 with ties, where the softmax saturates and its backward
cancels: the fc gradients come out 1e-4 of the terms they are made of, and torch's own fp32
loses up to 1e-2 of them. There the kernels are judged against torch's fp32 error."""
TORCH_FACTOR = 10.0
RTOL, ATOL = 1e-4, 1e-5
"""fp32: |error| <= ATOL * max|reference| + RTOL * |reference|, element by element."""
BF16_TOLERANCE = 2e-2
"""bf16 (outputs and dx stored in bf16): largest error relative to max|reference|."""


def _input(batch: int, channels: int, size: tuple[int, ...], kind: str) -> torch.Tensor:
    if kind == "randn":
        return torch.randn(batch, channels, *size)
    # ReLU-like: scattered zeros, all-zero voxels (ties over channels) and an all-zero channel
    # (ties over voxels), keeping some non-zero values in every map.
    x = torch.relu(torch.randn(batch, channels, *size) - 0.3)
    if x[0, 0].numel() >= 3:
        x.view(batch, channels, -1)[:, :, ::3] = 0.0
    if channels > 1:
        x[:, channels // 2] = 0.0
    return x


def _run(variant: str, batch: int, channels: int, size: tuple[int, ...], kind: str,
         dtype: torch.dtype = torch.float32, device: str = "cpu",
         native: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The native kernels (or, with ``native`` False, the reference module in ``dtype``) and the
    float64 reference on the same input: name -> (result, float64 reference)."""
    from naslung.native.cbam import cbam

    module = sharp_cbam(channels, variant, seed=batch * 1000 + channels)
    x = _input(batch, channels, size, kind).to(dtype)
    dout = torch.randn(x.shape).to(dtype)
    weights = [p.detach().clone().to(device).requires_grad_()
               for p in (module.fc1.weight, module.fc2.weight, module.spatial_conv.weight)]
    xk = x.clone().to(device).requires_grad_()
    if native:
        out = cbam(xk, *weights, variant)
    else:
        names = ("fc1.weight", "fc2.weight", "spatial_conv.weight")
        out = torch.func.functional_call(module, dict(zip(names, weights, strict=True)), (xk,))
    out.backward(dout.to(device))

    reference = module.double()
    xr = x.double().requires_grad_()
    expected = reference(xr)
    expected.backward(dout.double())
    return {"out": (out, expected), "x.grad": (xk.grad, xr.grad),
            "fc1.grad": (weights[0].grad, reference.fc1.weight.grad),
            "fc2.grad": (weights[1].grad, reference.fc2.weight.grad),
            "spatial_conv.grad": (weights[2].grad, reference.spatial_conv.weight.grad)}


def _scale(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return _scale(got.double() - expected) / max(_scale(expected), 1e-12)


@pytest.mark.parametrize("case_id", list(CASES))
def test_fp32_matches_float64_reference(case_id):
    for name, (got, expected) in _run(*CASES[case_id]).items():
        assert got.shape == expected.shape, name
        assert got.dtype == torch.float32, name
        error = (got.double() - expected).abs()
        allowed = ATOL * _scale(expected) + RTOL * expected.abs()
        assert bool((error <= allowed).all()), \
            f"{name}: error {_scale(error):.3g} against max |reference| {_scale(expected):.3g}"


@pytest.mark.parametrize("case_id", list(ILL_CONDITIONED))
def test_ill_conditioned_fp32_is_no_worse_than_torch_fp32(case_id):
    case = ("nas-lung", *ILL_CONDITIONED[case_id], "ties")
    native, torch_fp32 = _run(*case), _run(*case, native=False)
    for name, (got, expected) in native.items():
        error, torch_error = _relative_error(got, expected), _relative_error(torch_fp32[name][0], expected)
        assert error <= max(RTOL, TORCH_FACTOR * torch_error), \
            f"{name}: relative error {error:.3g}, torch fp32's {torch_error:.3g}"


@pytest.mark.parametrize("variant", ["nas-lung", "woo"])
def test_bf16_matches_float64_reference_loosely(variant):
    for name, (got, expected) in _run(variant, 2, 16, (5, 6, 7), "ties", dtype=torch.bfloat16).items():
        assert got.dtype == (torch.bfloat16 if name in ("out", "x.grad") else torch.float32), name
        error = _relative_error(got, expected)
        assert error <= BF16_TOLERANCE, f"{name}: relative error {error:.3g}"


@pytest.mark.parametrize("variant", ["nas-lung", "woo"])
def test_attention_map_is_the_reference_one(variant):
    from naslung.native.cbam import cbam_forward

    module = sharp_cbam(8, variant, seed=3)
    x = _input(2, 8, (3, 5, 7), "ties")
    weights = (module.fc1.weight.detach(), module.fc2.weight.detach(), module.spatial_conv.weight.detach())
    out, *_, gate = cbam_forward(x, *weights, variant)
    expected_out, expected_gate = module.double().forward_with_attention(x.double())
    assert torch.allclose(gate.double(), expected_gate, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.double(), expected_out, rtol=1e-5, atol=1e-5)


def test_results_are_bitwise_reproducible():
    """Partial sums are combined in a fixed order, never with atomics."""
    runs = [_run("woo", 3, 12, (13, 14, 15), "ties") for _ in range(2)]
    for name in runs[0]:
        assert torch.equal(runs[0][name][0], runs[1][name][0]), name


def test_rejects_unknown_variant_wrong_weights_and_too_many_channels():
    from naslung.native.cbam import cbam, cbam_forward

    module = sharp_cbam(8, "woo", seed=2)
    x = torch.randn(1, 8, 2, 2, 2)
    with pytest.raises(ValueError, match="choose from nas-lung, woo"):
        cbam(x, module.fc1.weight, module.fc2.weight, module.spatial_conv.weight, "cbam")
    with pytest.raises(ValueError, match="must be fc1"):
        cbam(x, module.fc2.weight, module.fc1.weight, module.spatial_conv.weight)
    wide = torch.randn(1, 513, 1, 1, 1)
    with pytest.raises(ValueError, match="1 to 512 channels"):
        cbam(wide, torch.zeros(128, 513), torch.zeros(513, 128), module.spatial_conv.weight)
    with pytest.raises(NativeLibraryError, match="bad arguments"):  # the library checks too
        cbam_forward(wide, torch.zeros(128, 513), torch.zeros(513, 128), module.spatial_conv.weight, "woo")


def test_ops_pass_torch_library_checks():
    """Schema, fake (meta) kernel, autograd registration, and tracing by AOTAutograd."""
    from naslung.native.cbam import cbam_forward

    module = sharp_cbam(4, "nas-lung", seed=4)
    x = torch.randn(2, 4, 2, 3, 3, requires_grad=True)
    weights = [p.detach().clone().requires_grad_()
               for p in (module.fc1.weight, module.fc2.weight, module.spatial_conv.weight)]
    torch.library.opcheck(cbam_forward, (x, *weights, "nas-lung"))


# ------------------------------------------------------------------------------ on a GPU

GPU_CASES = [("nas-lung", 2, 4, (48, 48, 48)), ("woo", 2, 4, (48, 48, 48)), ("nas-lung", 4, 64, (8, 8, 8)),
             ("woo", 4, 128, (4, 4, 4)), ("nas-lung", 2, 512, (3, 5, 7)), ("woo", 3, 5, (1, 1, 1))]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("variant", "batch", "channels", "size"), GPU_CASES)
def test_cuda_library_matches_host_library(variant, batch, channels, size, dtype):
    if library_path("cuda") is None:
        pytest.skip("the CUDA kernel library is not built (no CUDA compiler when naslung was installed)")
    cuda = _run(variant, batch, channels, size, "ties", dtype=dtype, device="cuda")
    host = _run(variant, batch, channels, size, "ties", dtype=dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # FMA contraction on the GPU; bf16 rounding
    for name in cuda:
        error = _relative_error(cuda[name][0].cpu(), host[name][0].double())
        assert error <= tolerance, f"{name}: CUDA against host, relative error {error:.3g}"
