// Residual add + LayerNorm over the last dim (d), float32 statistics whatever the dtype.
//
//   forward   v = x + residual,  mu = mean(v),  rstd = 1 / sqrt(mean((v - mu)^2) + eps)
//             xhat = (v - mu) rstd,  out = xhat w + b
//   backward  wdy = dout w,  c1 = mean(xhat wdy),  c2 = mean(wdy)
//             dx = dresidual = (wdy - xhat c1 - c2) rstd
//             dw = sum_t dout xhat,  db = sum_t dout
//
// Forward: one block per row; the variance is a second pass over (v - mu) (not E[v^2] - mu^2,
// which cancels badly when |mu| >> std), the passes re-read the row from L1/L2.
// Backward: a grid of G blocks, each striding over rows and keeping its dw/db partial sums in
// shared memory (each column belongs to one thread, so no atomics); the G partial rows are
// summed by one torch reduction at the end.

#include "common.cuh"
#include "launchers.h"

namespace afkern {
namespace {

template <typename T>
__global__ void add_ln_fwd_kernel(
    const T* __restrict__ X, const T* __restrict__ R,   // [T, d] input and residual, contiguous
    const T* __restrict__ w, const T* __restrict__ b,   // [d] affine weight and bias
    T* __restrict__ out,                                // [T, d] out
    float* __restrict__ mean, float* __restrict__ rstd, // [T] out: statistics for the backward
    int d, float eps) {
  constexpr int V = Vec<T>::kN;
  __shared__ float scratch[64];
  const int64_t t = blockIdx.x;
  const T* x = X + t * d;
  const T* res = R + t * d;
  T* o = out + t * d;
  const bool vx = aligned16(x), vr = aligned16(res), vo = aligned16(o), vw = aligned16(w), vb = aligned16(b);

  float sum = 0.f;
  for (int j0 = threadIdx.x * V; j0 < d; j0 += blockDim.x * V) {
    float xv[V], rv[V];
    load_chunk<T, V>(x, j0, d, vx, xv);
    load_chunk<T, V>(res, j0, d, vr, rv);
#pragma unroll
    for (int i = 0; i < V; ++i) sum += xv[i] + rv[i];  // zero-filled past d
  }
  const float mu = block_sum2(sum, 0.f, scratch).x / d;

  float sq = 0.f;
  for (int j0 = threadIdx.x * V; j0 < d; j0 += blockDim.x * V) {
    float xv[V], rv[V];
    load_chunk<T, V>(x, j0, d, vx, xv);
    load_chunk<T, V>(res, j0, d, vr, rv);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float c = (j0 + i < d) ? xv[i] + rv[i] - mu : 0.f;
      sq = fmaf(c, c, sq);
    }
  }
  const float rs = rsqrtf(block_sum2(sq, 0.f, scratch).x / d + eps);
  if (threadIdx.x == 0) {
    mean[t] = mu;
    rstd[t] = rs;
  }

  for (int j0 = threadIdx.x * V; j0 < d; j0 += blockDim.x * V) {
    float xv[V], rv[V], wv[V], bv[V], ov[V];
    load_chunk<T, V>(x, j0, d, vx, xv);
    load_chunk<T, V>(res, j0, d, vr, rv);
    load_chunk<T, V>(w, j0, d, vw, wv);
    load_chunk<T, V>(b, j0, d, vb, bv);
#pragma unroll
    for (int i = 0; i < V; ++i) ov[i] = fmaf((xv[i] + rv[i] - mu) * rs, wv[i], bv[i]);
    store_chunk<T, V>(o, j0, d, vo, ov);
  }
}

template <typename T>
__global__ void add_ln_bwd_kernel(
    const T* __restrict__ dOut,                          // [T, d] upstream gradient, contiguous
    const T* __restrict__ X, const T* __restrict__ R,    // [T, d] forward inputs
    const T* __restrict__ w,                             // [d] affine weight
    const float* __restrict__ mean, const float* __restrict__ rstd,  // [T] forward statistics
    T* __restrict__ dX,                                  // [T, d] out: d x == d residual
    float* __restrict__ dw_part, float* __restrict__ db_part,  // [gridDim.x, d] out: partial sums
    int64_t rows, int d) {
  constexpr int V = Vec<T>::kN;
  extern __shared__ float acc_sh[];  // [2 d]: dw then db partial sums of this block's rows
  __shared__ float scratch[64];
  float* dw_sh = acc_sh;
  float* db_sh = acc_sh + d;
  for (int j = threadIdx.x; j < 2 * d; j += blockDim.x) acc_sh[j] = 0.f;
  __syncthreads();
  const bool vw = aligned16(w);

  for (int64_t t = blockIdx.x; t < rows; t += gridDim.x) {
    const T* dout = dOut + t * d;
    const T* x = X + t * d;
    const T* res = R + t * d;
    const bool vd = aligned16(dout), vx = aligned16(x), vr = aligned16(res);
    const float mu = mean[t], rs = rstd[t];
    float c1 = 0.f, c2 = 0.f;
    for (int j0 = threadIdx.x * V; j0 < d; j0 += blockDim.x * V) {
      float dv[V], xv[V], rv[V], wv[V];
      load_chunk<T, V>(dout, j0, d, vd, dv);
      load_chunk<T, V>(x, j0, d, vx, xv);
      load_chunk<T, V>(res, j0, d, vr, rv);
      load_chunk<T, V>(w, j0, d, vw, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        if (j0 + i < d) {
          const float xhat = (xv[i] + rv[i] - mu) * rs;
          const float wdy = dv[i] * wv[i];
          c1 = fmaf(xhat, wdy, c1);
          c2 += wdy;
          dw_sh[j0 + i] = fmaf(dv[i], xhat, dw_sh[j0 + i]);  // column j0+i: this thread only
          db_sh[j0 + i] += dv[i];
        }
      }
    }
    const float2 c = block_sum2(c1, c2, scratch);
    const float m1 = c.x / d, m2 = c.y / d;
    T* dx = dX + t * d;
    const bool vdx = aligned16(dx);
    for (int j0 = threadIdx.x * V; j0 < d; j0 += blockDim.x * V) {
      float dv[V], xv[V], rv[V], wv[V], ov[V];
      load_chunk<T, V>(dout, j0, d, vd, dv);
      load_chunk<T, V>(x, j0, d, vx, xv);
      load_chunk<T, V>(res, j0, d, vr, rv);
      load_chunk<T, V>(w, j0, d, vw, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float xhat = (xv[i] + rv[i] - mu) * rs;
        ov[i] = (dv[i] * wv[i] - fmaf(xhat, m1, m2)) * rs;
      }
      store_chunk<T, V>(dx, j0, d, vdx, ov);
    }
  }
  __syncthreads();
  float* dwp = dw_part + static_cast<int64_t>(blockIdx.x) * d;
  float* dbp = db_part + static_cast<int64_t>(blockIdx.x) * d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    dwp[j] = dw_sh[j];
    dbp[j] = db_sh[j];
  }
}

}  // namespace

cudaError_t launch_add_ln_fwd(DType dt, const void* x, const void* res, const void* w, const void* b, void* out,
                              float* mean, float* rstd, int64_t T, int d, float eps, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  dispatch_dtype(dt, [&](auto tag) {
    using Tt = decltype(tag);
    const int threads = threads_for(d, Vec<Tt>::kN, 512);
    add_ln_fwd_kernel<Tt><<<static_cast<unsigned>(T), threads, 0, stream>>>(
        static_cast<const Tt*>(x), static_cast<const Tt*>(res), static_cast<const Tt*>(w),
        static_cast<const Tt*>(b), static_cast<Tt*>(out), mean, rstd, d, eps);
  });
  return cudaGetLastError();
}

int add_ln_bwd_grid(int64_t T, int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1) sms = 1;
  const int64_t g = T < 2 * static_cast<int64_t>(sms) ? T : 2 * static_cast<int64_t>(sms);
  return static_cast<int>(g < 1 ? 1 : g);
}

cudaError_t launch_add_ln_bwd(DType dt, const void* dout, const void* x, const void* res, const void* w,
                              const float* mean, const float* rstd, void* dx, float* dw_part, float* db_part,
                              int64_t T, int d, int grid, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  const size_t smem = 2 * static_cast<size_t>(d) * sizeof(float);
  cudaError_t err = cudaSuccess;
  dispatch_dtype(dt, [&](auto tag) {
    using Tt = decltype(tag);
    if (smem > 48 * 1024) {  // beyond the default: opt in (up to 227 KiB on H100, 163 KiB on A100)
      err = cudaFuncSetAttribute(add_ln_bwd_kernel<Tt>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(smem));
      if (err != cudaSuccess) return;
    }
    const int threads = threads_for(d, Vec<Tt>::kN, 512);
    add_ln_bwd_kernel<Tt><<<static_cast<unsigned>(grid), threads, smem, stream>>>(
        static_cast<const Tt*>(dout), static_cast<const Tt*>(x), static_cast<const Tt*>(res),
        static_cast<const Tt*>(w), mean, rstd, static_cast<Tt*>(dx), dw_part, db_part, T, d);
  });
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace afkern
