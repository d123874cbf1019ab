// The C ABI of cbam.cu: CBAM attention, both variants of naslung/models/cbam.py, forward and
// backward, on (N, C, D, H, W) maps. Conventions of every csrc/ ABI in portable.h;
// naslung/native/cbam.py declares the same signatures for ctypes.
//
// Shapes: C from 1 to 512 (the MLP's hidden width C/4 may be 0: its scores are then 0),
// N up to 65535, D*H*W up to 2^24. Weights are fp32 and contiguous as torch holds them:
// fc1 (C/4, C), fc2 (C, C/4), conv_weight (1, 2, 3, 3, 3).
//
// What the forward saves for the backward (all fp32, written by nl_cbam_forward):
//   channel_weights (N, C)     w: softmax (nas-lung) or sigmoid (woo) of the MLP scores
//   channel_stats   (N, 3, C)  mean, max and ties at the max of x over voxels, per channel
//   spatial_stats   (N, 3, S)  max, mean and ties at the max of g = x * w over channels, per voxel
//   gate            (N, S)     the spatial attention map s = sigmoid(conv([max, mean]))
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

// The variant codes: NAS-Lung's residual CBAM (out = s * x + x) and Woo et al.'s (out = s * g).
enum nl_cbam_variant { NL_CBAM_NAS_LUNG = 0, NL_CBAM_WOO = 1 };

// fp32 values the workspace of nl_cbam_forward and of nl_cbam_backward needs (0 for shapes
// the kernels do not take).
long long nl_cbam_forward_workspace_floats(long long n, long long c, long long d, long long h, long long w);
long long nl_cbam_backward_workspace_floats(long long n, long long c, long long d, long long h, long long w);

// out (x's dtype) and the saved tensors above.
int nl_cbam_forward(int dtype, int variant, const void* x, long long n, long long c, long long d,
                    long long h, long long w, const float* fc1, const float* fc2, const float* conv_weight,
                    float* workspace, float* channel_weights, float* channel_stats, float* spatial_stats,
                    float* gate, void* out, void* stream);

// Gradients of out with respect to x (dx, x's dtype) and the three weights (fp32, their shapes),
// from dout (x's dtype) and what nl_cbam_forward saved.
int nl_cbam_backward(int dtype, int variant, const void* x, const void* dout, long long n, long long c,
                     long long d, long long h, long long w, const float* fc1, const float* fc2,
                     const float* conv_weight, const float* channel_weights, const float* channel_stats,
                     const float* spatial_stats, const float* gate, float* workspace, float* grad_fc1,
                     float* grad_fc2, float* grad_conv_weight, void* dx, void* stream);

#ifdef __cplusplus
}
#endif
