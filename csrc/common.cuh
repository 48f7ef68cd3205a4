// Device helpers shared by afkern's CUDA kernels: dtype conversion, 16-byte chunk loads and
// stores with a scalar fallback, warp/block reductions, and the adapter activations.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace afkern {

// ---- float32 math whatever the storage dtype ----------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Elements per 16-byte vector: 4 float32, 8 bf16/fp16.
template <typename T> struct Vec { static constexpr int kN = 16 / sizeof(T); };

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Load elements [j0, j0 + V) of a row into float registers. One 16-byte load when the row
// pointer is 16-byte aligned and the chunk is whole (j0 is always a multiple of V, so the row
// alignment decides); scalar loads with zero fill for the tail or an unaligned row (a column
// slice of a wider matrix, an odd width).
template <typename T, int V>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int j0, int n, bool vec, float (&out)[V]) {
  if (vec && j0 + V <= n) {
    uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + j0));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = (j0 + i < n) ? to_float(row[j0 + i]) : 0.f;
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_chunk(T* __restrict__ row, int j0, int n, bool vec, const float (&in)[V]) {
  if (vec && j0 + V <= n) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < V; ++i) e[i] = from_float<T>(in[i]);
    *reinterpret_cast<uint4*>(row + j0) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (j0 + i < n) row[j0 + i] = from_float<T>(in[i]);
  }
}

// ---- reductions ---------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum of two values over the whole block (blockDim.x a multiple of 32, at most 1024).
// `scratch` holds 64 floats; the leading barrier makes back-to-back calls safe.
__device__ __forceinline__ float2 block_sum2(float a, float b, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();
  if (lane == 0) {
    scratch[warp] = a;
    scratch[32 + warp] = b;
  }
  __syncthreads();
  a = lane < nwarps ? scratch[lane] : 0.f;
  b = lane < nwarps ? scratch[32 + lane] : 0.f;
  return make_float2(warp_sum(a), warp_sum(b));
}

// ---- activations: codes of afkern.ops.limits.KERNEL_ACTIVATIONS -------------------------
enum Act : int {
  kLinear = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4,
  kTanh = 5, kSigmoid = 6, kLeakyRelu = 7, kQuickGelu = 8,
};

constexpr float kSqrt1_2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;

__device__ __forceinline__ float sigmoidf_(float z) { return 1.f / (1.f + __expf(-z)); }

// act(z). The code is uniform over the grid, so the switch never diverges.
__device__ __forceinline__ float act_fwd(int code, float z) {
  switch (code) {
    case kRelu: return z > 0.f ? z : 0.f;
    case kGelu: return 0.5f * z * (1.f + erff(z * kSqrt1_2));
    case kGeluTanh: return 0.5f * z * (1.f + tanhf(kSqrt2OverPi * (z + 0.044715f * z * z * z)));
    case kSilu: return z * sigmoidf_(z);
    case kTanh: return tanhf(z);
    case kSigmoid: return sigmoidf_(z);
    case kLeakyRelu: return z > 0.f ? z : 0.01f * z;
    case kQuickGelu: return z * sigmoidf_(1.702f * z);
    default: return z;  // kLinear
  }
}

// act(z) and act'(z) together (the closed forms of afkern.activations.activation_grad).
__device__ __forceinline__ void act_fwd_grad(int code, float z, float& g, float& dg) {
  switch (code) {
    case kRelu: g = z > 0.f ? z : 0.f; dg = z > 0.f ? 1.f : 0.f; return;
    case kGelu: {
      const float cdf = 0.5f * (1.f + erff(z * kSqrt1_2));
      g = z * cdf;
      dg = cdf + z * kInvSqrt2Pi * __expf(-0.5f * z * z);
      return;
    }
    case kGeluTanh: {
      const float t = tanhf(kSqrt2OverPi * (z + 0.044715f * z * z * z));
      g = 0.5f * z * (1.f + t);
      dg = 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * 0.044715f * z * z);
      return;
    }
    case kSilu: { const float s = sigmoidf_(z); g = z * s; dg = s * (1.f + z * (1.f - s)); return; }
    case kTanh: { const float t = tanhf(z); g = t; dg = 1.f - t * t; return; }
    case kSigmoid: { const float s = sigmoidf_(z); g = s; dg = s * (1.f - s); return; }
    case kLeakyRelu: g = z > 0.f ? z : 0.01f * z; dg = z > 0.f ? 1.f : 0.01f; return;
    case kQuickGelu: {
      const float s = sigmoidf_(1.702f * z);
      g = z * s;
      dg = s + 1.702f * z * s * (1.f - s);
      return;
    }
    default: g = z; dg = 1.f; return;  // kLinear
  }
}

// Threads per block for a row of `n` elements handled V at a time: one chunk per thread up
// to `cap` threads, a whole number of warps, at least one warp.
inline int threads_for(int64_t n, int V, int cap) {
  int64_t chunks = (n + V - 1) / V;
  int64_t t = ((chunks + 31) / 32) * 32;
  if (t < 32) t = 32;
  if (t > cap) t = cap;
  return static_cast<int>(t);
}

// Calls f(tag) with a value of the storage type that `dt` names (float, bf16, half).
template <typename F>
void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(float{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat16: f(__half{}); break;
  }
}

}  // namespace afkern
