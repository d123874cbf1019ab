"""The compile proof covers what runs, and the kernels launch on their tensors' GPU.

Every kernel variant a fused ConvRes launches in training and evaluation (recorded under Triton's
interpreter, in a child process) must be one `naslung.kernels.compile_proof` builds; the spec grid
holds the variants that were once missing; every host function that launches a kernel makes its
tensors' device current (Triton launches on the current one); and on a machine with two or more
GPUs the fused modules train on the second one.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from naslung.kernels import batchnorm, cbam, conv3d, runtime  # noqa: E402
from naslung.kernels.compile_proof import TILE_PARAMETERS, all_specs, stage_specs  # noqa: E402
from naslung.kernels.coverage import recorded_variants  # noqa: E402
from naslung.kernels.runtime import interpreting  # noqa: E402

INTERPRETED = interpreting()


@pytest.fixture(scope="module")
def specs():
    return all_specs()


@pytest.fixture(scope="module")
def recorded():
    if INTERPRETED:
        pytest.skip("records in its own interpreter child")
    return recorded_variants()


@pytest.mark.slow
def test_every_variant_a_fused_convres_launches_is_in_the_compile_proof(specs, recorded):
    missing = recorded - {spec.variant for spec in specs}
    described = [f"{name}: {sorted((a, k) for a, k in kinds if isinstance(k, tuple) or a.endswith('_ptr'))}"
                 for name, kinds in sorted(missing, key=repr)]
    assert not missing, "\n".join(described)
    launched = {name for name, _ in recorded}
    assert launched >= {"_conv3d_fwd_kernel", "_conv3d_dgrad_kernel", "_conv3d_wgrad_kernel",
                        "_bn_finalize_kernel", "_spatial_gate_kernel", "_input_grad_kernel"}


@pytest.mark.slow
def test_the_gpu_check_plan_is_current(recorded):
    """bench/gpu_check_plan.json (which bench/gpu_check.sh prints) counts the builds the stages
    need today; regenerate it with `python -m naslung.kernels.compile_proof --plan --sm 90 --out
    bench/gpu_check_plan.json` when the kernels change."""
    plan = json.loads((Path(__file__).resolve().parents[1] / "bench" / "gpu_check_plan.json").read_text())
    for stage, stage_list in stage_specs(recorded).items():
        entry = plan["stages"][stage]
        variants = len({spec.variant for spec in stage_list})
        assert (entry["builds"], entry["variants"]) == (len(stage_list), variants), stage
        assert entry["failed"] == [] and entry["expected_cold_compile_s"] < 300, stage


def _has(specs, kernel: str, **wanted) -> bool:
    return any(name == kernel and all(dict(kinds).get(k) == v for k, v in wanted.items())
               for name, kinds in {spec.variant for spec in specs})


@pytest.mark.parametrize("kernel, wanted", [
    ("_conv3d_fwd_kernel", dict(KSIZE=("=", 3), STRIDE=("=", 2), HAS_BIAS=("=", False), STATS=("=", True))),
    *[("_conv3d_fwd_kernel", dict(KSIZE=("=", k), STRIDE=("=", s), RELU=("=", True),
                                  HAS_RESIDUAL=("=", False))) for k, s in conv3d.GEOMETRIES],
    ("_conv3d_wgrad_kernel", dict(KSIZE=("=", 3), STRIDE=("=", 2), HAS_BIAS=("=", False))),
    ("_conv3d_fwd_kernel", dict(x_ptr="*fp32", ALLOW_TF32=("=", False))),
    ("_conv3d_fwd_kernel", dict(x_ptr="*fp32", ALLOW_TF32=("=", True))),
    ("_conv3d_dgrad_kernel", dict(dy_ptr="*bf16", ALLOW_TF32=("=", False))),
    ("_conv3d_fwd_kernel", dict(C_in=("=", 1), pad=("=", 1), STATS=("=", True))),
    ("_conv3d_wgrad_kernel", dict(C_in=("=", 1), pad=("=", 1))),
    ("_bn_finalize_kernel", dict(UPDATE_RUNNING=("=", False))),
    ("_bn_finalize_kernel", dict(gamma_ptr="*bf16", rmean_ptr="*bf16")),
    ("_bn_finalize_kernel", dict(CUMULATIVE=("=", True), batches_ptr="*i64")),
    ("_channel_pool_kernel", dict(n_chunks=("=", 1))),
])
def test_the_spec_grid_holds_what_once_was_missing(specs, kernel, wanted):
    assert _has(specs, kernel, **wanted)


def test_bf16_never_asks_for_tf32_and_the_interpreter_flag_is_never_compiled(specs):
    assert not _has(specs, "_conv3d_fwd_kernel", x_ptr="*bf16", ALLOW_TF32=("=", True))
    assert not any(dict(kinds).get("UPCAST") == ("=", True) for _, kinds in {spec.variant for spec in specs})


def test_specs_are_named_uniquely_and_autotune_parameters_are_known(specs):
    assert len({spec.name for spec in specs}) == len(specs)
    for module in (conv3d, batchnorm, cbam):
        for kernel in vars(module).values():
            for config in getattr(kernel, "configs", None) or []:
                assert set(config.kwargs) <= TILE_PARAMETERS, (module.__name__, config.kwargs)


# --- the launch device ------------------------------------------------------------------------------


def _launching_functions(module) -> list[ast.FunctionDef]:
    """The module's functions (and methods) whose body launches a kernel: ``_x_kernel[grid](...)``."""
    tree = ast.parse(inspect.getsource(module))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            launches = [call for call in ast.walk(node) if isinstance(call, ast.Call)
                        and isinstance(call.func, ast.Subscript) and isinstance(call.func.value, ast.Name)
                        and call.func.value.id.endswith("_kernel")]
            if launches:
                found.append(node)
    return found


@pytest.mark.parametrize("module", [conv3d, batchnorm, cbam], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_launching_host_function_makes_its_tensors_device_current(module):
    functions = _launching_functions(module)
    assert functions
    undecorated = [f.name for f in functions if not any(
        isinstance(d, ast.Name) and d.id == "on_tensor_device" for d in f.decorator_list)]
    assert not undecorated


def test_the_guard_takes_the_first_tensors_device(monkeypatch):
    seen = []

    class Recorder:
        def __init__(self, device):
            seen.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(runtime, "device_guard", Recorder)
    launcher = runtime.on_tensor_device(lambda ctx, x, w: (x, w))
    x = torch.zeros(1, device="meta")
    launcher(None, x, torch.zeros(1))
    launcher(None, x=torch.zeros(1), w=x)
    assert seen == [torch.device("meta"), torch.device("cpu")]


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("on", True), ("0", False),
                                             ("", False)])
def test_the_interpreter_switch_reads_as_triton_reads_it(value, expected):
    code = ("import triton.knobs as k; from naslung.kernels.runtime import interpreting; "
            "print(interpreting(), bool(k.runtime.interpret))")
    env = {**os.environ, "TRITON_INTERPRET": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.split()
    assert out == [str(expected), str(expected)]


def test_autotune_first_keeps_one_config_per_kernel(monkeypatch):
    if INTERPRETED:
        pytest.skip("the interpreter uses its own single config")
    monkeypatch.setenv(runtime.AUTOTUNE_ENV, "first")
    assert runtime.autotune_configs(conv3d.FWD_CONFIGS, None) == conv3d.FWD_CONFIGS[:1]
    monkeypatch.setenv(runtime.AUTOTUNE_ENV, "sometimes")
    with pytest.raises(ValueError, match="NASLUNG_AUTOTUNE"):
        runtime.autotune_configs(conv3d.FWD_CONFIGS, None)


# --- two GPUs --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.skipif(INTERPRETED or torch.cuda.device_count() < 2, reason="needs two or more CUDA GPUs")
def test_fused_training_on_the_second_gpu_matches_the_reference(monkeypatch):
    from naslung.models import ConvRes, make_loss
    from naslung.models.fused import fuse

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    reference = ConvRes("4,8/16/32").to("cuda:1")
    ours = fuse(reference, inplace=False)
    x = torch.randn(4, 1, 32, 32, 32, device="cuda:1")
    y = torch.arange(4, device="cuda:1") % 2
    for model in (reference, ours):
        make_loss(model.head)(model(x), y).backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), ours.named_parameters(), strict=True):
        scale = a.grad.abs().max().clamp_min(1e-6)
        assert ((a.grad - b.grad).abs().max() / scale).item() < 2e-3, name
    assert torch.cuda.current_device() == 0


@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.skipif(INTERPRETED or torch.cuda.device_count() < 2, reason="needs two or more CUDA GPUs")
def test_a_cuda_graph_step_captures_on_the_batchs_gpu():
    from naslung.models import ConvRes, make_loss
    from naslung.models.fused import fuse
    from naslung.train.graphs import CapturedTrainStep

    torch.cuda.set_device(0)
    model = fuse(ConvRes("4/8/8")).to("cuda:1").train()
    optimizer = torch.optim.Adam(model.parameters(), capturable=True)
    x = torch.randn(2, 1, 32, 32, 32, device="cuda:1")
    y = torch.tensor([0, 1], device="cuda:1")
    step = CapturedTrainStep(model, make_loss(model.head), optimizer, x, y)
    losses = [step(x, y).item() for _ in range(3)]
    assert step.replays == 3 and all(map(lambda v: v == v, losses))

