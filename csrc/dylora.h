// What csrc/dylora.cpp offers the other translation units: the ATen composition of the forward and backward
// (the CPU kernels, and on CUDA the executor's "cublas" plan). Rank on the host (a CPU tensor: slices) or on the
// device (masks and 1/b_m on the device, no sync); see dylora.cpp for the math and the NaN rules.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace dylora {

std::tuple<at::Tensor, at::Tensor> forward_aten(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& base, const at::Tensor& lora_A,
                                                const at::Tensor& lora_B, const at::Tensor& rank, double alpha,
                                                bool need_u);

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_aten(const at::Tensor& grad, const at::Tensor& x,
                                                             const std::optional<at::Tensor>& weight,
                                                             const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                             const at::Tensor& u, const at::Tensor& rank,
                                                             double alpha, bool frozen_prefix, bool compute_dx,
                                                             bool compute_lora);

}  // namespace dylora
