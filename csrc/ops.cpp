// The torch side of afkern's CUDA kernels: input checks, allocation, device guard, stream, and
// registration as the CUDA implementations of the afkern:: custom ops.
//
// The schemas, the fake (meta) implementations, the CPU reference implementations and the
// autograd formulas live in Python (afkern/backends/cuda_ops.py), so they exist and are testable without
// this library; loading it only adds the CUDA dispatch key. The dispatcher accepts an impl
// before or after its def, so import order does not matter.

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "launchers.h"

namespace afkern {
namespace {

DType kernel_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK(false, op, ": expected ", name, " of dtype float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return DType::kFloat32;  // not reached
}

// A [rows, cols] matrix on `device` whose last dim is contiguous (a row-major matrix or a
// column slice of one); the row stride goes to the kernel.
void check_rows(const at::Tensor& t, const char* op, const char* name, int64_t rows, int64_t cols,
                const at::Device& device) {
  TORCH_CHECK(t.device() == device, op, ": expected ", name, " on ", device, " (the device of the first input), got ",
              t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": expected ", name, " of shape [", rows,
              ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 || cols <= 1, op, ": expected ", name,
              " with unit stride in its last dim (row-major, or a column slice of a row-major matrix), got strides ",
              t.strides());
}

int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                      const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " of ", ref_name, "'s dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
}

void check_float32_rows(const std::optional<at::Tensor>& t, const char* op, const char* name, int64_t rows,
                        int64_t cols, const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": expected ", name, " of dtype float32, got ", t->scalar_type());
  check_rows(*t, op, name, rows, cols, device);
}

DType check_rowop_common(const char* op, const at::Tensor& Z, const at::Tensor& A, int64_t n_adapters,
                         int64_t activation) {
  TORCH_CHECK(Z.is_cuda(), op, ": expected Z on a CUDA device, got ", Z.device());
  TORCH_CHECK(Z.dim() == 2, op, ": expected Z of shape [T, N*r], got ", Z.sizes());
  const DType dt = kernel_dtype(Z, op, "Z");
  check_same_dtype(A, Z, op, "A", "Z");
  TORCH_CHECK(n_adapters >= 1 && n_adapters <= kMaxAdapters, op, ": expected 1 <= n_adapters <= ", kMaxAdapters,
              ", got ", n_adapters);
  TORCH_CHECK(Z.size(1) > 0 && Z.size(1) % n_adapters == 0, op, ": expected Z's width ", Z.size(1),
              " to be a positive multiple of n_adapters = ", n_adapters);
  TORCH_CHECK(Z.size(1) <= (int64_t{1} << 30), op, ": row width ", Z.size(1), " too large");
  TORCH_CHECK(Z.size(0) < (int64_t{1} << 31), op, ": too many rows (", Z.size(0), ")");
  TORCH_CHECK(activation >= 0 && activation < kNumActs, op, ": expected an activation code in [0, ", kNumActs,
              ") (afkern.ops.limits.KERNEL_ACTIVATIONS), got ", activation);
  check_rows(Z, op, "Z", Z.size(0), Z.size(1), Z.device());
  check_rows(A, op, "A", Z.size(0), Z.size(1), Z.device());
  return dt;
}

const float* fptr(const std::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }
int64_t fstride(const std::optional<at::Tensor>& t) { return t ? row_stride(*t) : 0; }

// afkern::rowop_fwd(Tensor Z, Tensor A, Tensor? sb, Tensor? score_scale, Tensor? prior, int n_adapters,
//                   int activation, float inv_temperature) -> (Tensor Y, Tensor p)
std::tuple<at::Tensor, at::Tensor> rowop_fwd_cuda(const at::Tensor& Z, const at::Tensor& A,
                                                  const std::optional<at::Tensor>& sb,
                                                  const std::optional<at::Tensor>& score_scale,
                                                  const std::optional<at::Tensor>& prior, int64_t n_adapters,
                                                  int64_t activation, double inv_temperature) {
  const char* op = "afkern::rowop_fwd";
  const DType dt = check_rowop_common(op, Z, A, n_adapters, activation);
  const int64_t T = Z.size(0), W = Z.size(1), N = n_adapters;
  if (sb.has_value()) {
    check_same_dtype(*sb, Z, op, "sb", "Z");
    check_rows(*sb, op, "sb", T, N, Z.device());
  }
  check_float32_rows(score_scale, op, "score_scale", T, N, Z.device());
  check_float32_rows(prior, op, "prior", T, N, Z.device());
  c10::cuda::CUDAGuard guard(Z.device());
  at::Tensor Y = at::empty({T, W}, Z.options());
  at::Tensor P = at::empty({T, N}, Z.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_rowop_fwd(dt, Z.data_ptr(), row_stride(Z), A.data_ptr(), row_stride(A),
                                  sb ? sb->data_ptr() : nullptr, sb ? row_stride(*sb) : 0, fptr(score_scale),
                                  fstride(score_scale), fptr(prior), fstride(prior), Y.data_ptr(),
                                  P.data_ptr<float>(), T, static_cast<int>(W),
                                  static_cast<int>(N), static_cast<int>(activation),
                                  static_cast<float>(inv_temperature), c10::cuda::getCurrentCUDAStream()));
  return {Y, P};
}

// afkern::rowop_bwd(Tensor dY, Tensor? dp, Tensor Z, Tensor A, Tensor p, Tensor? score_scale,
//                   int n_adapters, int activation, float inv_temperature) -> (Tensor dZ, Tensor dA, Tensor dsb)
std::tuple<at::Tensor, at::Tensor, at::Tensor> rowop_bwd_cuda(
    const at::Tensor& dY, const std::optional<at::Tensor>& dp, const at::Tensor& Z, const at::Tensor& A,
    const at::Tensor& p, const std::optional<at::Tensor>& score_scale, int64_t n_adapters, int64_t activation,
    double inv_temperature) {
  const char* op = "afkern::rowop_bwd";
  const DType dt = check_rowop_common(op, Z, A, n_adapters, activation);
  const int64_t T = Z.size(0), W = Z.size(1), N = n_adapters;
  check_same_dtype(dY, Z, op, "dY", "Z");
  check_rows(dY, op, "dY", T, W, Z.device());
  TORCH_CHECK(p.scalar_type() == at::kFloat, op, ": expected p of dtype float32, got ", p.scalar_type());
  check_rows(p, op, "p", T, N, Z.device());
  check_float32_rows(dp, op, "dp", T, N, Z.device());
  check_float32_rows(score_scale, op, "score_scale", T, N, Z.device());
  c10::cuda::CUDAGuard guard(Z.device());
  at::Tensor dZ = at::empty({T, W}, Z.options());
  at::Tensor dA = at::empty({T, W}, Z.options());
  at::Tensor dsb = at::empty({T, N}, Z.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_rowop_bwd(dt, dY.data_ptr(), row_stride(dY), fptr(dp), fstride(dp), Z.data_ptr(),
                                  row_stride(Z), A.data_ptr(), row_stride(A), p.data_ptr<float>(), row_stride(p),
                                  fptr(score_scale), fstride(score_scale), dZ.data_ptr(), dA.data_ptr(),
                                  dsb.data_ptr<float>(), T, static_cast<int>(W), static_cast<int>(N),
                                  static_cast<int>(activation), static_cast<float>(inv_temperature),
                                  c10::cuda::getCurrentCUDAStream()));
  return {dZ, dA, dsb};
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": expected ", name, " on ", x.device(), " (the device of x), got ",
              t.device());
  check_same_dtype(t, x, op, name, "x");
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": expected ", name, " of x's shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous, got strides ", t.strides());
}

void check_vec(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": expected ", name, " on ", x.device(), " (the device of x), got ",
              t.device());
  check_same_dtype(t, x, op, name, "x");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": expected ", name, " of shape [", x.size(1), "], got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " to be contiguous, got strides ", t.strides());
}

DType check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": expected x on a CUDA device, got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, op, ": expected x of shape [T, d] with d > 0, got ", x.sizes());
  const DType dt = kernel_dtype(x, op, "x");
  TORCH_CHECK(x.is_contiguous(), op, ": expected x to be contiguous, got strides ", x.strides());
  TORCH_CHECK(x.size(0) < (int64_t{1} << 31), op, ": too many rows (", x.size(0), ")");
  TORCH_CHECK(x.size(1) <= (int64_t{1} << 30), op, ": row width ", x.size(1), " too large");
  return dt;
}

// afkern::add_layernorm_fwd(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps)
//   -> (Tensor out, Tensor mean, Tensor rstd)
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_fwd_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                                      const at::Tensor& weight, const at::Tensor& bias,
                                                                      double eps) {
  const char* op = "afkern::add_layernorm_fwd";
  const DType dt = check_x(x, op);
  check_like(residual, x, op, "residual");
  check_vec(weight, x, op, "weight");
  check_vec(bias, x, op, "bias");
  const int64_t T = x.size(0), d = x.size(1);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({T, d}, x.options());
  at::Tensor mean = at::empty({T}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({T}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_add_ln_fwd(dt, x.data_ptr(), residual.data_ptr(), weight.data_ptr(), bias.data_ptr(),
                                   out.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), T,
                                   static_cast<int>(d), static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()));
  return {out, mean, rstd};
}

// afkern::add_layernorm_bwd(Tensor dout, Tensor x, Tensor residual, Tensor weight, Tensor mean,
//                           Tensor rstd) -> (Tensor dx, Tensor dweight, Tensor dbias)
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_bwd_cuda(const at::Tensor& dout, const at::Tensor& x,
                                                                      const at::Tensor& residual,
                                                                      const at::Tensor& weight, const at::Tensor& mean,
                                                                      const at::Tensor& rstd) {
  const char* op = "afkern::add_layernorm_bwd";
  const DType dt = check_x(x, op);
  check_like(dout, x, op, "dout");
  check_like(residual, x, op, "residual");
  check_vec(weight, x, op, "weight");
  const int64_t T = x.size(0), d = x.size(1);
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->device() == x.device() && s->scalar_type() == at::kFloat && s->dim() == 1 && s->size(0) == T &&
                    s->is_contiguous(),
                op, ": expected ", (s == &mean ? "mean" : "rstd"), " as a contiguous float32 [", T, "] tensor on ",
                x.device(), ", got ", s->scalar_type(), " ", s->sizes(), " on ", s->device());
  }
  TORCH_CHECK(d <= kMaxLnWidth, op, ": expected a row width d <= ", kMaxLnWidth,
              " (dweight/dbias partials live in shared memory), got ", d);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty({T, d}, x.options());
  if (T == 0) return {dx, at::zeros({d}, weight.options()), at::zeros({d}, weight.options())};
  const int grid = add_ln_bwd_grid(T, x.device().index());
  at::Tensor dw_part = at::empty({grid, d}, x.options().dtype(at::kFloat));
  at::Tensor db_part = at::empty({grid, d}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_add_ln_bwd(dt, dout.data_ptr(), x.data_ptr(), residual.data_ptr(), weight.data_ptr(),
                                   mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr(),
                                   dw_part.data_ptr<float>(), db_part.data_ptr<float>(), T, static_cast<int>(d), grid,
                                   c10::cuda::getCurrentCUDAStream()));
  return {dx, dw_part.sum(0).to(weight.scalar_type()), db_part.sum(0).to(weight.scalar_type())};
}

}  // namespace
}  // namespace afkern

TORCH_LIBRARY_IMPL(afkern, CUDA, m) {
  m.impl("rowop_fwd", &afkern::rowop_fwd_cuda);
  m.impl("rowop_bwd", &afkern::rowop_bwd_cuda);
  m.impl("add_layernorm_fwd", &afkern::add_layernorm_fwd_cuda);
  m.impl("add_layernorm_bwd", &afkern::add_layernorm_bwd_cuda);
}

// A Python module with no attributes: `import afkern._C` runs the static registration above.
#define AFKERN_CONCAT_(a, b) a##b
#define AFKERN_CONCAT(a, b) AFKERN_CONCAT_(a, b)
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PyMODINIT_FUNC AFKERN_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "afkern._C",
                                   "afkern CUDA kernels (registered as torch.ops.afkern.*)", -1, nullptr};
  return PyModule_Create(&def);
}
