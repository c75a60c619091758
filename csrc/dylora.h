// What csrc/dylora.cpp offers the other translation units: the ATen composition of the forward and backward
// (the CPU kernels, and on CUDA the executor's "cublas" plan). dropout_p > 0: adapter dropout with the mask of
// dropout.h regenerated from dropout_seed (the low-rank term sees dropout(x); u is (x ⊙ keep)·A[:b]ᵀ, 1/(1 − p)
// folded into α: the backward must get the same p and seed). Rank on the host (a CPU tensor: slices) or on the
// device (masks and 1/b_m on the device, no sync); see dylora.cpp for the math and the NaN rules.
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <optional>
#include <tuple>

namespace dylora {

std::tuple<at::Tensor, at::Tensor> forward_aten(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& base, const at::Tensor& lora_A,
                                                const at::Tensor& lora_B, const at::Tensor& rank, double alpha,
                                                bool need_u, double dropout_p = 0.0,
                                                const std::optional<at::Tensor>& dropout_seed = std::nullopt);

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_aten(const at::Tensor& grad, const at::Tensor& x,
                                                             const std::optional<at::Tensor>& weight,
                                                             const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                             const at::Tensor& u, const at::Tensor& rank,
                                                             double alpha, bool frozen_prefix, bool compute_dx,
                                                             bool compute_lora, double dropout_p = 0.0,
                                                             const std::optional<at::Tensor>& dropout_seed =
                                                                 std::nullopt);

// The autograd kernels of dylora::linear and dylora::conv (x, weight?, bias?, base?, lora_A, lora_B, ...):
// whether any input needs a gradient, and which ones the backward must compute.
inline bool needs_grad(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& base,
                       const at::Tensor& lora_A, const at::Tensor& lora_B) {
  const auto wants = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); };
  return at::GradMode::is_enabled() && (x.requires_grad() || lora_A.requires_grad() || lora_B.requires_grad() ||
                                        wants(weight) || wants(bias) || wants(base));
}

struct InputGrads {
  bool x, weight, bias, base, lora_A, lora_B;
};

// needs_input_grad counts the forward's tensor arguments that were given (None ones have no edge).
inline InputGrads input_grads(torch::autograd::AutogradContext* ctx, bool has_weight) {
  size_t edge = 0;
  InputGrads g{};
  g.x = ctx->needs_input_grad(edge++);
  g.weight = has_weight && ctx->needs_input_grad(edge++);
  g.bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(edge++);
  g.base = ctx->saved_data["has_base"].toBool() && ctx->needs_input_grad(edge++);
  g.lora_A = ctx->needs_input_grad(edge++);
  g.lora_B = ctx->needs_input_grad(edge++);
  return g;
}

}  // namespace dylora
