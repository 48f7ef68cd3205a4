// The fusion row op (afkern/ops/rowop.py is the contract and the test oracle).
//
// Per token t, adapters n = 1..N, bottleneck r, W = N r, G_n = act(Z_n):
//
//   forward   s_n  = sum_r A_nr G_nr + sb_n              (score against the pulled-back query)
//             p    = softmax(s * M * inv_temperature + b)  (M: score-dropout scale, 1 if absent;
//                                                           b: the prior of controls / routing)
//             Y_n  = p_n G_n
//   backward  g_n  = sum_r dY_nr G_nr + dp_n
//             ds_n = p_n (g_n - sum_m p_m g_m) inv_temperature M_n       (== dsb_n)
//             dZ_n = (p_n dY_n + ds_n A_n) act'(Z_n),     dA_n = ds_n G_n
//
// One block per token row. Each thread owns 16-byte chunks of the row (V = 4 float32 or
// 8 bf16/fp16 elements); a chunk may straddle adapters when r is not a multiple of V, so a
// thread adds its partial dot product into the shared per-adapter sum whenever its running
// adapter index changes. Warp 0 then does the N-wide softmax (or its backward) from shared
// memory, two adapters per lane (N <= 64), and a second sweep writes the row. The second
// sweep re-reads Z (and A, dY) instead of caching them: the row was just read by this block,
// so the re-read hits L1/L2 and DRAM traffic stays at one read per input.

#include "common.cuh"
#include "launchers.h"

namespace afkern {
namespace {

// Adds sum_i u[i] act(z[i]) over one V-wide chunk starting at column j0 into acc_sh[adapter of
// the column]: the chunk is split where it crosses into the next adapter's r columns (r >= 1, so
// at most one boundary per column step).
template <int V>
__device__ __forceinline__ void add_segmented_dot(const float (&u)[V], const float (&zv)[V], int j0, int W, int r,
                                                  int act, float* acc_sh) {
  int n = j0 / r, bnd = (n + 1) * r;
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if (j0 + i < W) {
      if (j0 + i >= bnd) {
        atomicAdd(&acc_sh[n], acc);
        acc = 0.f;
        ++n;
        bnd += r;
      }
      acc = fmaf(u[i], act_fwd(act, zv[i]), acc);
    }
  }
  atomicAdd(&acc_sh[n], acc);
}

template <typename T>
__global__ void rowop_fwd_kernel(
    const T* __restrict__ Z, int64_t z_stride,          // [T, W] pre-activations, row stride
    const T* __restrict__ A, int64_t a_stride,          // [T, W] q' Wu_cat^T, row stride
    const T* __restrict__ sb, int64_t sb_stride,        // [T, N] q' . bu, or nullptr
    const float* __restrict__ ss, int64_t ss_stride,    // [T, N] score-dropout scale, or nullptr
    const float* __restrict__ pr, int64_t pr_stride,    // [T, N] prior (row stride 0: one row), or nullptr
    T* __restrict__ Y,                                  // [T, W] out, contiguous
    float* __restrict__ P,                              // [T, N] out (float32), contiguous
    int W, int N, int r, int act, float inv_temp) {
  constexpr int V = Vec<T>::kN;
  __shared__ float s_sh[kMaxAdapters];  // scores, then probabilities
  const int64_t t = blockIdx.x;
  const T* z = Z + t * z_stride;
  const T* a = A + t * a_stride;
  for (int n = threadIdx.x; n < N; n += blockDim.x) s_sh[n] = 0.f;
  __syncthreads();

  const bool vz = aligned16(z), va = aligned16(a);
  for (int j0 = threadIdx.x * V; j0 < W; j0 += blockDim.x * V) {
    float zv[V], av[V];
    load_chunk<T, V>(z, j0, W, vz, zv);
    load_chunk<T, V>(a, j0, W, va, av);
    add_segmented_dot<V>(av, zv, j0, W, r, act, s_sh);
  }
  __syncthreads();

  if (threadIdx.x < 32) {  // softmax over the N adapters, two per lane
    const int lane = threadIdx.x;
    float v[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int n = lane + 32 * k;
      if (n < N) {
        float s = s_sh[n];
        if (sb) s += to_float(sb[t * sb_stride + n]);
        if (ss) s *= ss[t * ss_stride + n];
        v[k] = s * inv_temp;
        if (pr) v[k] += pr[t * pr_stride + n];
      } else {
        v[k] = -INFINITY;
      }
    }
    const float m = warp_max(fmaxf(v[0], v[1]));
    float e[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) e[k] = (lane + 32 * k < N) ? __expf(v[k] - m) : 0.f;
    const float inv = 1.f / warp_sum(e[0] + e[1]);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int n = lane + 32 * k;
      if (n < N) {
        const float p = e[k] * inv;
        s_sh[n] = p;
        P[t * N + n] = p;
      }
    }
  }
  __syncthreads();

  T* y = Y + t * static_cast<int64_t>(W);
  const bool vy = aligned16(y);
  for (int j0 = threadIdx.x * V; j0 < W; j0 += blockDim.x * V) {
    float zv[V], out[V];
    load_chunk<T, V>(z, j0, W, vz, zv);
    int n = j0 / r, bnd = (n + 1) * r;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (j0 + i >= bnd) { ++n; bnd += r; }
      out[i] = (j0 + i < W) ? s_sh[n] * act_fwd(act, zv[i]) : 0.f;
    }
    store_chunk<T, V>(y, j0, W, vy, out);
  }
}

template <typename T>
__global__ void rowop_bwd_kernel(
    const T* __restrict__ dY, int64_t dy_stride,        // [T, W] upstream gradient of Y
    const float* __restrict__ dp, int64_t dp_stride,    // [T, N] upstream gradient of p, or nullptr
    const T* __restrict__ Z, int64_t z_stride,          // [T, W] forward input
    const T* __restrict__ A, int64_t a_stride,          // [T, W] forward input
    const float* __restrict__ P, int64_t p_stride,      // [T, N] forward probabilities
    const float* __restrict__ ss, int64_t ss_stride,    // [T, N] score-dropout scale, or nullptr
    T* __restrict__ dZ, T* __restrict__ dA,             // [T, W] out, contiguous
    float* __restrict__ dsb,                            // [T, N] out (float32), contiguous
    int W, int N, int r, int act, float inv_temp) {
  constexpr int V = Vec<T>::kN;
  __shared__ float g_sh[kMaxAdapters];   // g_n, then ds_n
  __shared__ float p_sh[kMaxAdapters];
  const int64_t t = blockIdx.x;
  const T* dy = dY + t * dy_stride;
  const T* z = Z + t * z_stride;
  const T* a = A + t * a_stride;
  for (int n = threadIdx.x; n < N; n += blockDim.x) g_sh[n] = 0.f;
  __syncthreads();

  const bool vdy = aligned16(dy), vz = aligned16(z), va = aligned16(a);
  for (int j0 = threadIdx.x * V; j0 < W; j0 += blockDim.x * V) {
    float dyv[V], zv[V];
    load_chunk<T, V>(dy, j0, W, vdy, dyv);
    load_chunk<T, V>(z, j0, W, vz, zv);
    add_segmented_dot<V>(dyv, zv, j0, W, r, act, g_sh);
  }
  __syncthreads();

  if (threadIdx.x < 32) {  // softmax backward over the N adapters, two per lane
    const int lane = threadIdx.x;
    float g[2], p[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int n = lane + 32 * k;
      g[k] = 0.f;
      p[k] = 0.f;
      if (n < N) {
        g[k] = g_sh[n] + (dp ? dp[t * dp_stride + n] : 0.f);
        p[k] = P[t * p_stride + n];
      }
    }
    const float pg = warp_sum(p[0] * g[0] + p[1] * g[1]);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int n = lane + 32 * k;
      if (n < N) {
        float ds = p[k] * (g[k] - pg) * inv_temp;
        if (ss) ds *= ss[t * ss_stride + n];
        g_sh[n] = ds;
        p_sh[n] = p[k];
        dsb[t * N + n] = ds;
      }
    }
  }
  __syncthreads();

  T* dz = dZ + t * static_cast<int64_t>(W);
  T* da = dA + t * static_cast<int64_t>(W);
  const bool vdz = aligned16(dz), vda = aligned16(da);
  for (int j0 = threadIdx.x * V; j0 < W; j0 += blockDim.x * V) {
    float dyv[V], zv[V], av[V], dzv[V], dav[V];
    load_chunk<T, V>(dy, j0, W, vdy, dyv);
    load_chunk<T, V>(z, j0, W, vz, zv);
    load_chunk<T, V>(a, j0, W, va, av);
    int n = j0 / r, bnd = (n + 1) * r;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (j0 + i >= bnd) { ++n; bnd += r; }
      dzv[i] = 0.f;
      dav[i] = 0.f;
      if (j0 + i < W) {
        float g, dg;
        act_fwd_grad(act, zv[i], g, dg);
        const float ds = g_sh[n];
        dzv[i] = fmaf(p_sh[n], dyv[i], ds * av[i]) * dg;
        dav[i] = ds * g;
      }
    }
    store_chunk<T, V>(dz, j0, W, vdz, dzv);
    store_chunk<T, V>(da, j0, W, vda, dav);
  }
}

// ---- launchers (called by ops.cpp, which owns the checks and the allocations) ----------

}  // namespace

cudaError_t launch_rowop_fwd(DType dt, const void* Z, int64_t z_stride, const void* A, int64_t a_stride,
                             const void* sb, int64_t sb_stride, const float* ss, int64_t ss_stride, const float* pr,
                             int64_t pr_stride, void* Y, float* P, int64_t T, int W, int N, int act, float inv_temp,
                             cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  dispatch_dtype(dt, [&](auto tag) {
    using Tt = decltype(tag);
    const int threads = threads_for(W, Vec<Tt>::kN, 256);
    rowop_fwd_kernel<Tt><<<static_cast<unsigned>(T), threads, 0, stream>>>(
        static_cast<const Tt*>(Z), z_stride, static_cast<const Tt*>(A), a_stride, static_cast<const Tt*>(sb),
        sb_stride, ss, ss_stride, pr, pr_stride, static_cast<Tt*>(Y), P, W, N, W / N, act, inv_temp);
  });
  return cudaGetLastError();
}

cudaError_t launch_rowop_bwd(DType dt, const void* dY, int64_t dy_stride, const float* dp, int64_t dp_stride,
                             const void* Z, int64_t z_stride, const void* A, int64_t a_stride, const float* P,
                             int64_t p_stride, const float* ss, int64_t ss_stride, void* dZ, void* dA, float* dsb,
                             int64_t T, int W, int N, int act, float inv_temp, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  dispatch_dtype(dt, [&](auto tag) {
    using Tt = decltype(tag);
    const int threads = threads_for(W, Vec<Tt>::kN, 256);
    rowop_bwd_kernel<Tt><<<static_cast<unsigned>(T), threads, 0, stream>>>(
        static_cast<const Tt*>(dY), dy_stride, dp, dp_stride, static_cast<const Tt*>(Z), z_stride,
        static_cast<const Tt*>(A), a_stride, P, p_stride, ss, ss_stride, static_cast<Tt*>(dZ),
        static_cast<Tt*>(dA), dsb, W, N, W / N, act, inv_temp);
  });
  return cudaGetLastError();
}

}  // namespace afkern
