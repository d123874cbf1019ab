"""The CUDA C++ kernels of csrc/ from Python: the libraries (`library`), one module of torch ops
with autograd per csrc/ file, and the ConvRes modules that use them (`modules`)."""
