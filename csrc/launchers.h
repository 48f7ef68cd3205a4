// Launchers of afkern's CUDA kernels: plain pointers and sizes, no torch types, so the .cu
// files include only CUDA headers (nvcc's per-architecture passes never parse ATen, which
// keeps the build to seconds per architecture). ops.cpp checks the tensors and calls these.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace afkern {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Kernel limits; afkern/ops/limits.py is their Python source and tests/test_limits.py checks
// that these agree with it.
constexpr int kMaxAdapters = 64;    // MAX_ADAPTERS: warp 0 of the row-op kernels holds two adapters per lane
constexpr int kNumActs = 9;         // len(KERNEL_ACTIVATIONS): activation codes 0 .. kNumActs - 1
constexpr int kMaxLnWidth = 16384;  // MAX_LN_WIDTH: LayerNorm backward keeps 2 d float32 partials in shared memory

// Row op forward. Z, A: [T, W] with row strides z_stride, a_stride (elements, unit column
// stride); sb: [T, N] (Z's dtype) or nullptr; ss: [T, N] float32 score-dropout scale or nullptr;
// pr: [T, N] float32 prior added after the temperature (row stride 0: one row for all) or nullptr;
// Y: [T, W] contiguous out; P: [T, N] float32 contiguous out. W = N r, 1 <= N <= 64.
cudaError_t launch_rowop_fwd(DType dt, const void* Z, int64_t z_stride, const void* A, int64_t a_stride,
                             const void* sb, int64_t sb_stride, const float* ss, int64_t ss_stride, const float* pr,
                             int64_t pr_stride, void* Y, float* P, int64_t T, int W, int N, int act, float inv_temp,
                             cudaStream_t stream);

// Row op backward. dY: [T, W] (Z's dtype), dp: [T, N] float32 or nullptr, P: forward's [T, N];
// outputs dZ, dA: [T, W] contiguous (Z's dtype), dsb: [T, N] float32 contiguous.
cudaError_t launch_rowop_bwd(DType dt, const void* dY, int64_t dy_stride, const float* dp, int64_t dp_stride,
                             const void* Z, int64_t z_stride, const void* A, int64_t a_stride, const float* P,
                             int64_t p_stride, const float* ss, int64_t ss_stride, void* dZ, void* dA, float* dsb,
                             int64_t T, int W, int N, int act, float inv_temp, cudaStream_t stream);

// Residual add + LayerNorm forward on contiguous [T, d] rows; mean, rstd: [T] float32 out.
cudaError_t launch_add_ln_fwd(DType dt, const void* x, const void* res, const void* w, const void* b, void* out,
                              float* mean, float* rstd, int64_t T, int d, float eps, cudaStream_t stream);

// Number of blocks of the LayerNorm backward (and rows of its dw/db partial sums).
int add_ln_bwd_grid(int64_t T, int device);

// Residual add + LayerNorm backward: dx [T, d] out; dw_part, db_part: [grid, d] float32 out.
cudaError_t launch_add_ln_bwd(DType dt, const void* dout, const void* x, const void* res, const void* w,
                              const float* mean, const float* rstd, void* dx, float* dw_part, float* db_part,
                              int64_t T, int d, int grid, cudaStream_t stream);

}  // namespace afkern
