"""Deployment: the ensemble as one ONNX graph, its ONNX Runtime and TensorRT runners.

Installed as ``naslung.export``. `ensemble` builds the deployable module from a run,
`onnx_export` writes and checks the ONNX file, `metadata` is what the file says about its
input pipeline, `runners` run it (PyTorch reference, ONNX Runtime), `tensorrt` builds and runs
TensorRT engines.
"""
