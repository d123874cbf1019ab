"""Triton kernels for ConvRes training and inference, with their autograd wrappers.

One file per op (conv3d, batchnorm, cbam); `compile_proof` builds every kernel for the GPU
targets without a GPU. Installed as `naslung.kernels`.
"""
