// Triton binaries launched from C++: the GPU build's Triton plans (the host logic builds in every build).
//
// A plan is made once per dispatch key by Python (dylora_kernels/triton/cplan.py) after that key's first call ran
// through the Python path (so triton has autotuned and compiled): the variant ("pointer", "tma", "decode") and,
// per kernel step, the config it runs with. Per call, forward()/backward() below compute every kernel argument
// in C++ exactly as the Python launch wrappers of dylora_kernels/triton do, pick the binary compiled for the
// arguments' specialisation (asking Python once per new specialisation) and launch it with cuLaunchKernelEx.
#pragma once

#include <ATen/ATen.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <optional>
#include <tuple>

namespace dylora::triton_launch {

class Plan;

// The plan described by Python (see dylora_kernels/triton/cplan.py for the description's format).
std::shared_ptr<Plan> make_plan(pybind11::handle description);

// The kernel contract of dylora_kernels/triton/__init__.py (rank: an integer tensor on x's device).
std::tuple<at::Tensor, at::Tensor> forward(Plan& plan, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& base, const at::Tensor& lora_A,
                                           const at::Tensor& lora_B, const at::Tensor& rank, double alpha,
                                           bool need_u);

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(Plan& plan, const at::Tensor& grad, const at::Tensor& x,
                                                        const std::optional<at::Tensor>& weight,
                                                        const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                        const at::Tensor& u, const at::Tensor& rank, double alpha,
                                                        bool frozen_prefix, bool compute_dx, bool compute_lora);

}  // namespace dylora::triton_launch
