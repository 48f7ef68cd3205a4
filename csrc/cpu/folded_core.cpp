// afkern._cpu: the folded fusion core of an inference forward on CPU, in one call.
//
// Math (docs/DESIGN.md section 3; afkern/ops/rowop.py is the contract), per token t, adapters
// n = 1..N, bottleneck r, with the folded maps of afkern/ops/fold.py (w_in [d, 2 N r + N] maps x
// to [Z | A | sb], w_out = [Wu; bu]):
//
//     [Z | A | sb] = x @ w_in + b_in                       (MKL / the CPU BLAS: at::addmm)
//     G_n  = act(Z_n)                                      (written over Z)
//     s_n  = (sum_r A_nr G_nr + sb_n) * inv_temperature + prior_n
//     p    = softmax(s) over n                             (max-subtracted)
//     Y_n  = p_n G_n                                       (written over G)
//     mix  = base + Y @ Wu + p @ bu                        (at::addmm, then addmm_)
//
// Returns (mix [T, d], p [T, N]), both in x's dtype (float32 or float64: the accumulation dtype
// of the row op for those storages). The N-wide row work is a few hundred flops per token; what
// this op saves is the dozen torch calls (slices, views, activation, product, sum, softmax,
// scaling, the bias GEMM) that a decoding step's single token pays one by one, each costing more
// than its arithmetic. No autograd: afkern calls it only with gradients off (FoldedCall at
// inference); training runs the torch row op.
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <tuple>

namespace {

// codes of afkern.ops.limits.KERNEL_ACTIVATIONS (the same table as csrc/common.cuh and the
// Triton kernels), in the closed forms of afkern/ops/activations.py
enum Act : int64_t {
  kLinear = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4,
  kTanh = 5, kSigmoid = 6, kLeakyRelu = 7, kQuickGelu = 8,
};

template <typename T>
inline T sigmoid(T z) { return T(1) / (T(1) + std::exp(-z)); }

template <typename T>
inline T act(int64_t code, T z) {
  switch (code) {
    case kRelu: return z > T(0) ? z : T(0);
    case kGelu: return T(0.5) * z * (T(1) + std::erf(z * T(0.70710678118654752440)));
    case kGeluTanh:
      return T(0.5) * z * (T(1) + std::tanh(T(0.79788456080286535588) * (z + T(0.044715) * z * z * z)));
    case kSilu: return z * sigmoid(z);
    case kTanh: return std::tanh(z);
    case kSigmoid: return sigmoid(z);
    case kLeakyRelu: return z > T(0) ? z : T(0.01) * z;
    case kQuickGelu: return z * sigmoid(T(1.702) * z);
    default: return z;  // kLinear
  }
}

// The row op over every token, in place on zab = [Z | A | sb] (row stride C): Z becomes Y.
template <typename T>
void row_op(T* zab, T* p, const T* prior, int64_t prior_stride, int64_t tokens, int64_t C, int64_t N,
            int64_t r, int64_t code, T inv_t) {
  const int64_t NR = N * r;
  for (int64_t t = 0; t < tokens; ++t) {
    T* Z = zab + t * C;
    const T* A = Z + NR;
    const T* sb = Z + 2 * NR;
    T* pt = p + t * N;
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t n = 0; n < N; ++n) {
      T s = T(0);
      for (int64_t j = n * r; j < (n + 1) * r; ++j) {
        const T g = act<T>(code, Z[j]);
        Z[j] = g;
        s += A[j] * g;
      }
      s = (s + sb[n]) * inv_t;
      if (prior != nullptr) s += prior[t * prior_stride + n];
      pt[n] = s;
      m = s > m ? s : m;
    }
    T sum = T(0);
    for (int64_t n = 0; n < N; ++n) {
      pt[n] = std::exp(pt[n] - m);
      sum += pt[n];
    }
    for (int64_t n = 0; n < N; ++n) {
      pt[n] /= sum;
      for (int64_t j = n * r; j < (n + 1) * r; ++j) Z[j] *= pt[n];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> folded_core(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                                               const at::Tensor& wu, const at::Tensor& bu,
                                               const c10::optional<at::Tensor>& base,
                                               const c10::optional<at::Tensor>& prior, int64_t N, int64_t r,
                                               int64_t code, double inv_temperature) {
  TORCH_CHECK(N >= 1 && r >= 1, "folded_core: expected N >= 1 adapters and bottleneck r >= 1, got N=", N, " r=", r);
  TORCH_CHECK(code >= kLinear && code <= kQuickGelu, "folded_core: unknown activation code ", code,
              " (expected a code of afkern.ops.limits.KERNEL_ACTIVATIONS, 0..8)");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "folded_core: expected float32 or float64 tokens, got ", dt);
  TORCH_CHECK(x.device().is_cpu(), "folded_core: expected CPU tensors, got x on ", x.device());
  TORCH_CHECK(x.dim() == 2, "folded_core: expected x [T, d], got ", x.sizes());
  const int64_t T = x.size(0), d = x.size(1), NR = N * r, C = 2 * NR + N;
  auto expect = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(t.scalar_type() == dt && t.device().is_cpu(), "folded_core: expected ", name, " in ", dt,
                " on CPU like x, got ", t.scalar_type(), " on ", t.device());
    TORCH_CHECK(t.sizes() == shape, "folded_core: expected ", name, " of shape ", shape, " for x ", x.sizes(),
                ", N=", N, ", r=", r, "; got ", t.sizes());
  };
  expect(w_in, "w_in", {d, C});
  expect(b_in, "b_in", {C});
  expect(wu, "Wu", {NR, d});
  expect(bu, "bu", {N, d});
  if (base.has_value()) expect(*base, "base", {T, d});
  at::Tensor pr;
  int64_t prior_stride = 0;
  if (prior.has_value()) {
    pr = prior->to(dt).contiguous();
    TORCH_CHECK((pr.dim() == 1 && pr.size(0) == N) || (pr.dim() == 2 && pr.size(0) == T && pr.size(1) == N),
                "folded_core: expected a prior of shape [N] or [T, N] = [", T, ", ", N, "], got ", prior->sizes());
    prior_stride = pr.dim() == 2 ? N : 0;
  }

  at::Tensor zab = at::addmm(b_in, x, w_in);  // [T, C], contiguous
  at::Tensor p = at::empty({T, N}, zab.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "folded_core", [&] {
    row_op<scalar_t>(zab.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(),
                     prior.has_value() ? pr.data_ptr<scalar_t>() : nullptr, prior_stride, T, C, N, r, code,
                     static_cast<scalar_t>(inv_temperature));
  });
  at::Tensor Y = zab.narrow(1, 0, NR);
  at::Tensor mix = base.has_value() ? at::addmm(*base, Y, wu) : at::mm(Y, wu);
  mix.addmm_(p, bu);
  return {mix, p};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "afkern's CPU ops (csrc/cpu): the folded fusion core of an inference forward";
  // the GIL is released while it runs: a model served from several threads runs their cores at once
  m.def("folded_core", &folded_core, py::call_guard<py::gil_scoped_release>(),
        "(x, w_in, b_in, Wu, bu, base, prior, N, r, activation_code, inv_temperature) -> (mix, p)");
}
