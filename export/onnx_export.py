"""Write a `DeployedEnsemble` as one checked ONNX graph with its metadata inside.

Every BatchNorm is folded into the convolution before it (`fold_batchnorm`, in PyTorch, on a
copy), then torch.onnx's TorchScript exporter traces the reference modules in eval mode with a
dynamic batch axis. Not the dynamo exporter: with torch 2.13 and onnxscript 0.7 its graphs of
this model did not run (its optimiser's initializer deduplication left a dangling input when
members share a constant; without the optimiser, a bias-free Conv3d got a zero bias of the
wrong shape, which ONNX Runtime refuses). The file is checked with `onnx.checker` (full check,
which runs strict shape inference; a graph that still holds a BatchNorm is refused) and
written atomically.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from naslung.data.augment import AIR_HU
from naslung.export.ensemble import DeployedEnsemble, ExportError
from naslung.export.metadata import INPUT_NAME, METADATA_KEY, OUTPUT_NAMES
from naslung.fileio import write_atomically
from naslung.models.blocks import ConvBNReLU

OPSET = 18
MIN_OPSET = 17
"""The oldest opset the export is tested with."""


def max_opset() -> int:
    """The newest opset both torch's TorchScript exporter and this onnx package support."""
    from torch.onnx import _constants  # the exporter's limit has no public name

    exporter = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", OPSET)
    return min(int(exporter), onnx.defs.onnx_opset_version())


def fold_batchnorm(ensemble: DeployedEnsemble) -> DeployedEnsemble:
    """A copy of ``ensemble`` whose conv+BN pairs are single convolutions with the BN's
    running statistics and affine folded into weights and bias (eval-mode arithmetic)."""
    folded = copy.deepcopy(ensemble).eval()
    for module in folded.modules():
        if isinstance(module, ConvBNReLU) and isinstance(module.bn, nn.BatchNorm3d):
            module.conv = fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = nn.Identity()
    return folded


def trace_to_onnx(ensemble: DeployedEnsemble, opset: int = OPSET) -> onnx.ModelProto:
    """The ensemble's ONNX graph: input `INPUT_NAME` (batch dynamic), outputs `OUTPUT_NAMES`."""
    crop = ensemble.metadata.crop
    example = torch.full((2, 1, crop, crop, crop), AIR_HU)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(fold_batchnorm(ensemble), (example,), buffer, dynamo=False,
                          opset_version=opset, do_constant_folding=True, input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), dynamic_axes={INPUT_NAME: {0: "batch"}})
    return onnx.load_model_from_string(buffer.getvalue())


def check_graph(model: onnx.ModelProto) -> None:
    """Refuse a graph that fails onnx.checker (with strict shape inference), lacks the expected
    inputs and outputs, or still holds a BatchNorm."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"the exported graph is invalid: {str(err).splitlines()[0]}") from err
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != [INPUT_NAME] or outputs != list(OUTPUT_NAMES):
        raise ExportError(f"the exported graph has inputs {inputs} and outputs {outputs}")
    unfolded = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    if unfolded:
        raise ExportError(f"{unfolded} BatchNormalization node(s) were not folded into convolutions")


def export_onnx(ensemble: DeployedEnsemble, path: str | Path, opset: int = OPSET) -> Path:
    """Export, attach the metadata, check, and write ``path`` atomically."""
    model = trace_to_onnx(ensemble, opset)
    del model.metadata_props[:]
    metadata = dataclasses.replace(ensemble.metadata, versions={
        **ensemble.metadata.versions, "onnx": onnx.__version__, "opset": str(opset)})
    onnx.helper.set_model_props(model, {METADATA_KEY: metadata.to_json()})
    model.producer_name, model.doc_string = "naslung", (
        f"NAS-Lung ensemble of {len(ensemble.members)}: {', '.join(ensemble.metadata.archs)}; "
        f"{INPUT_NAME} float32 (N, 1, {ensemble.metadata.crop}^3) HU -> {', '.join(OUTPUT_NAMES)}")
    check_graph(model)
    return write_atomically(Path(path), lambda tmp: onnx.save(model, str(tmp)))
