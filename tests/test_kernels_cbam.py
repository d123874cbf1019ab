"""The CBAM Triton kernels against the reference modules: outputs and all four gradients.

On the CPU the kernels run under the Triton interpreter, in one subprocess started with
TRITON_INTERPRET=1. It cannot be switched on inside this process: Triton reads the variable
when a function is decorated with ``@triton.jit``, and its own standard library (``tl.sum``,
``tl.sigmoid``, ``tl.zeros`` ...) is decorated when triton is first imported, which has
happened by the time this module is collected; an interpreted kernel calling a compiled
``tl.sigmoid`` fails. Setting the variable before any import would make every kernel module
imported later in the test run interpreted too. The subprocess (this file run as a script)
computes every case's errors at once; the tests here only judge them, so the test run's own
environment is never touched. The reference modules run in float64 on the same (rounded) input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from naslung.models.cbam import make_cbam
from naslung.testing import sharp_cbam

CASES = {
    # id: (variant, batch, channels, spatial size, dtype, input kind)
    **{f"fp32-{v}-{n}x{c}x{'x'.join(map(str, s))}": (v, n, c, s, "float32", "randn")
       for v in ("nas-lung", "woo")
       for n, c, s in ((1, 4, (5, 5, 5)), (3, 12, (7, 7, 7)), (2, 36, (4, 5, 6)))},
    **{f"ties-{v}": (v, 3, 12, (6, 6, 6), "float32", "ties") for v in ("nas-lung", "woo")},
    **{f"bf16-{v}": (v, 2, 12, (5, 5, 5), "bfloat16", "randn") for v in ("nas-lung", "woo")},
}
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
"""Largest error allowed, relative to the largest magnitude of the float64 reference tensor,
unless the reference module itself, run in the same dtype, is further off (an ill-conditioned
case: batch 1, C = 4 loses 2e-4 of the fc gradients to cancellation in torch's fp32 too)."""
TORCH_FACTOR = 4.0


def _input(batch: int, channels: int, size: tuple[int, ...], kind: str) -> torch.Tensor:
    if kind == "randn":
        return torch.randn(batch, channels, *size)
    # ReLU-like: scattered zeros, all-zero voxels (ties over channels) and an all-zero channel
    # (ties over voxels); torch's amax splits the gradient evenly between ties, so must we.
    x = torch.relu(torch.randn(batch, channels, *size) - 0.8)
    x[:, :, :2] = 0.0
    x[:, channels // 4] = 0.0
    return x


def _errors(cbam, variant, batch, channels, size, dtype, kind, device="cpu") -> dict:
    """Run ``cbam`` and the float64 reference; max error of the output and every gradient,
    relative to the reference's largest magnitude, and the layout facts."""
    dtype = getattr(torch, dtype)
    module = sharp_cbam(channels, variant, seed=batch * 1000 + channels).to(device)
    x = _input(batch, channels, size, kind).to(device=device, dtype=dtype)
    dout = torch.randn(x.shape, device=device).to(dtype)
    params = [p.detach().clone().requires_grad_()
              for p in (module.fc1.weight, module.fc2.weight, module.spatial_conv.weight)]
    xk = x.clone().requires_grad_()
    out = cbam(xk, *params, variant)
    out.backward(dout)

    reference = make_cbam(channels, variant).to(device=device, dtype=torch.float64)
    reference.load_state_dict(module.state_dict())
    xr = x.detach().double().requires_grad_()
    expected = reference(xr)
    expected.backward(dout.double())

    pairs = {"out": (out, expected), "x.grad": (xk.grad, xr.grad),
             "fc1.grad": (params[0].grad, reference.fc1.weight.grad),
             "fc2.grad": (params[1].grad, reference.fc2.weight.grad),
             "spatial_conv.grad": (params[2].grad, reference.spatial_conv.weight.grad)}
    errors = {name: ((a.double() - e).abs().max() / e.abs().max().clamp_min(1e-3)).item()
              if a is not None and a.shape == e.shape else float("inf") for name, (a, e) in pairs.items()}
    facts = {"dtype": str(out.dtype), "grad dtype": str(xk.grad.dtype),
             "channels_last": out.is_contiguous(memory_format=torch.channels_last_3d)}
    return {"errors": errors, "facts": facts}


def _torch_cbam(x, fc1_weight, fc2_weight, spatial_weight, variant):
    """The reference module in x's dtype, differentiable in the given weights."""
    weights = {"fc1.weight": fc1_weight, "fc2.weight": fc2_weight, "spatial_conv.weight": spatial_weight}
    module = make_cbam(x.shape[1], variant).to(x.device)
    return torch.func.functional_call(module, {k: w.to(x.dtype) for k, w in weights.items()}, (x,))


def _facts(dtype: str) -> dict:
    return {"dtype": f"torch.{dtype}", "grad dtype": f"torch.{dtype}", "channels_last": True}


def _judge(kernel: dict, torch_run: dict, tolerance: float) -> dict[str, tuple[float, float]]:
    """The tensors where the kernels are off by more than both the tolerance and TORCH_FACTOR
    times torch's own error in the same dtype: name -> (kernel error, torch error)."""
    return {name: (error, torch_run["errors"][name]) for name, error in kernel["errors"].items()
            if not error <= max(tolerance, TORCH_FACTOR * torch_run["errors"][name])}


def _layout(cbam) -> dict:
    """The same result from NCDHW and NDHWC input; always channels_last_3d out."""
    module = sharp_cbam(4, "nas-lung", seed=1)
    x = torch.randn(1, 4, 3, 4, 5)
    weights = (module.fc1.weight, module.fc2.weight, module.spatial_conv.weight)
    out = cbam(x, *weights)
    out_cl = cbam(x.contiguous(memory_format=torch.channels_last_3d), *weights)
    return {"channels_last": out.is_contiguous(memory_format=torch.channels_last_3d),
            "same": bool(torch.equal(out, out_cl)),
            "error": (out.double() - module(x).double()).abs().max().item()}


def main() -> None:
    """Interpreter side: one JSON line per case."""
    from naslung.kernels.cbam import cbam
    from naslung.kernels.runtime import interpreting

    assert interpreting(), "run with TRITON_INTERPRET=1"

    print(json.dumps({"id": "layout", **_layout(cbam)}), flush=True)
    for case_id, case in CASES.items():
        try:
            row = {"kernel": _errors(cbam, *case), "torch": _errors(_torch_cbam, *case)}
        except Exception as err:  # report every case, not just the first failure
            row = {"failure": f"{type(err).__name__}: {err}"[:2000]}
        print(json.dumps({"id": case_id, **row}), flush=True)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    rows = {row["id"]: row for row in map(json.loads, filter(None, proc.stdout.splitlines()))}
    assert proc.returncode == 0 and rows, f"the interpreter run failed:\n{proc.stderr[-4000:]}"
    return rows


@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_float64_reference_in_the_interpreter(interpreted, case_id):
    row = interpreted[case_id]
    assert "failure" not in row, row.get("failure")
    dtype = CASES[case_id][4]
    assert row["kernel"]["facts"] == _facts(dtype)
    worst = _judge(row["kernel"], row["torch"], TOLERANCE[dtype])
    assert not worst, f"(kernel, torch {dtype}) errors over {TOLERANCE[dtype]}: {worst}"


def test_any_input_layout_gives_the_same_channels_last_output(interpreted):
    row = interpreted["layout"]
    assert row["channels_last"] and row["same"]
    assert row["error"] < 1e-5


def test_rejects_unknown_variant_and_wrong_weights():
    from naslung.kernels.cbam import cbam

    module = sharp_cbam(8, "woo", seed=2)
    x = torch.randn(1, 8, 4, 4, 4)
    with pytest.raises(ValueError, match="choose from nas-lung, woo"):
        cbam(x, module.fc1.weight, module.fc2.weight, module.spatial_conv.weight, "cbam")
    with pytest.raises(ValueError, match="must be fc1"):
        cbam(x, module.fc2.weight, module.fc1.weight, module.spatial_conv.weight)


def test_compile_specs_cover_every_kernel_config_and_dtype():
    from naslung.kernels import cbam as kernels

    specs = kernels.compile_specs()
    assert len({spec.name for spec in specs}) == len(specs)
    expected = sum((2 if has_variant else 1) * (1 if name == "spatial_grad" else 2) * len(configs)
                   * (2 if name in kernels._ONE_CHUNK else 1)
                   for name, _, configs, has_variant in kernels._COMPILED)
    assert len(specs) == expected
    for spec in specs:
        assert list(spec.signature) == spec.fn.arg_names, spec.name
        assert {k for k, v in spec.signature.items() if v == "constexpr"} == set(spec.constexprs), spec.name


# ------------------------------------------------------------------------------ on a GPU

GPU_SHAPES = [(32, 4, 32), (16, 32, 16), (8, 64, 16), (8, 128, 8), (32, 256, 8), (16, 512, 4),
              (8, 12, 7), (8, 36, 5)]
GPU_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["nas-lung", "woo"])
@pytest.mark.parametrize(("batch", "channels", "side"), GPU_SHAPES)
def test_gpu_matches_float64_reference(variant, dtype, batch, channels, side):
    from naslung.kernels.cbam import cbam

    case = (variant, batch, channels, (side,) * 3, dtype, "ties")
    kernel = _errors(cbam, *case, device="cuda")
    assert kernel["facts"] == _facts(dtype)
    worst = _judge(kernel, _errors(_torch_cbam, *case, device="cuda"), GPU_TOLERANCE[dtype])
    assert not worst, f"(kernel, torch {dtype}) errors over {GPU_TOLERANCE[dtype]}: {worst}"


if __name__ == "__main__":
    main()
