// The C ABI of batchnorm.cu: BatchNorm3d + ReLU (+ a residual after the ReLU) on (N, C, S)
// maps. Conventions of every csrc/ ABI in portable.h; naslung/native/batchnorm.py declares the
// same signatures for ctypes.
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

// fp32 values the workspace of nl_bn_stats and nl_bn_relu_backward needs.
long long nl_bn_workspace_floats(long long n, long long c, long long s);

// Batch mean and 1/sqrt(var + eps) per channel; with running_mean/var (both or neither) also
// the running statistics, updated with momentum (torch's rule, unbiased variance).
int nl_bn_stats(int dtype, const void* x, long long n, long long c, long long s, float eps, float momentum,
                float* running_mean, float* running_var, float* workspace, float* mean, float* invstd,
                void* stream);

// y = relu((x - mean) * invstd * weight + bias) [+ residual]; residual may be null.
int nl_bn_relu_forward(int dtype, const void* x, const void* residual, long long n, long long c, long long s,
                       const float* mean, const float* invstd, const float* weight, const float* bias, void* y,
                       void* stream);

// Gradients of the same with respect to x, weight and bias (training: through the batch
// statistics; eval: the statistics are constants). The residual's gradient is dy itself.
int nl_bn_relu_backward(int dtype, const void* x, const void* dy, long long n, long long c, long long s,
                        int training, const float* mean, const float* invstd, const float* weight,
                        const float* bias, float* workspace, float* grad_weight, float* grad_bias, void* dx,
                        void* stream);

#ifdef __cplusplus
}
#endif
