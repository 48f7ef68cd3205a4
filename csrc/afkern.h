// Host entry points of afkern's CUDA kernels. The schemas are defined in Python
// (afkern/_cuda.py, torch.library); ops.cpp registers these as their CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace afkern {

// afkern::rowop_fwd(Tensor Z, Tensor A, Tensor? sb, Tensor? score_scale, int n_adapters,
//                   int activation, float inv_temperature) -> (Tensor Y, Tensor p)
std::tuple<at::Tensor, at::Tensor> rowop_fwd_cuda(
    const at::Tensor& Z, const at::Tensor& A, const std::optional<at::Tensor>& sb,
    const std::optional<at::Tensor>& score_scale, int64_t n_adapters, int64_t activation,
    double inv_temperature);

// afkern::rowop_bwd(Tensor dY, Tensor? dp, Tensor Z, Tensor A, Tensor p, Tensor? score_scale,
//                   int n_adapters, int activation, float inv_temperature)
//   -> (Tensor dZ, Tensor dA, Tensor dsb)
std::tuple<at::Tensor, at::Tensor, at::Tensor> rowop_bwd_cuda(
    const at::Tensor& dY, const std::optional<at::Tensor>& dp, const at::Tensor& Z,
    const at::Tensor& A, const at::Tensor& p, const std::optional<at::Tensor>& score_scale,
    int64_t n_adapters, int64_t activation, double inv_temperature);

// afkern::add_layernorm_fwd(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps)
//   -> (Tensor out, Tensor mean, Tensor rstd)
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_fwd_cuda(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
    const at::Tensor& bias, double eps);

// afkern::add_layernorm_bwd(Tensor dout, Tensor x, Tensor residual, Tensor weight,
//                           Tensor mean, Tensor rstd) -> (Tensor dx, Tensor dweight, Tensor dbias)
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& residual,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd);

}  // namespace afkern
