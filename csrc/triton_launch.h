// Triton binaries launched from C++: the GPU build's Triton plans (the host logic builds in every build).
//
// A plan is made once per dispatch key by Python (dylora_kernels/triton/cplan.py: describe()) after that key's
// first call ran through the Python path (so triton has autotuned and compiled): the variant ("pointer", "tma",
// "decode"), each kernel's runtime parameters and specialisation flags, and a callback, binary_for, that hands
// over the binary the Python path compiled for one launch. Per call, forward()/backward() below allocate and
// compute every kernel argument in C++ exactly as the Python launch wrappers of dylora_kernels/triton do
// (kernels.py, hopper.py), specialise each argument as triton's JIT does (16-byte pointers, ints equal to 1 or
// divisible by 16, i32 vs i64), pick the binary kept for that specialisation (asking binary_for once per new
// one), pack the parameters as triton 3.6's launcher packs them and launch with cuLaunchKernelEx on the current
// stream. Without a CUDA driver (the CPU build, and tests) launches go to a recording stub.
//
// "Not handled" (std::nullopt): the call must go through Python this time. That happens when the Python path has
// not yet run one of the call's launches (binary_for answered None: e.g. a new shape bucket; the next call may be
// handled), or for good when a binary needs what this launcher does not do (num_ctas != 1, cooperative or PDL
// launches, global or profile scratch, TMA descriptors without metadata). Nothing has been launched then.
//
// How a caller (csrc/cuda/plan.cpp) uses it, per dispatch key:
//   miss:  run the call through Python (dylora_kernels.triton.forward/backward with the planner's variant), then
//          py::object d = py::module_::import("dylora_kernels.triton.cplan").attr("describe")(op, variant, <the
//          kernel-contract args>); keep make_plan(d) in the key's plan (with the GIL held);
//   hit:   if (auto r = triton_launch::forward(*plan, ...)) return *r; else run the Python path for this call
//          (the plan stays: a later call may be handled).
#pragma once

#include <ATen/ATen.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <optional>
#include <tuple>

namespace dylora::triton_launch {

// Hidden like pybind11's own types (a Plan holds a py::object).
class __attribute__((visibility("hidden"))) Plan;

// The plan described by Python (see dylora_kernels/triton/cplan.py for the description's format). Throws
// std::invalid_argument on a malformed description. Call with the GIL held.
std::shared_ptr<Plan> make_plan(pybind11::handle description);

// The kernel contract of dylora_kernels/triton/__init__.py (rank: an integer tensor on x's device; inputs
// validated by the caller). The GIL need not be held (it is taken to ask binary_for).
std::optional<std::tuple<at::Tensor, at::Tensor>> forward(Plan& plan, const at::Tensor& x,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const std::optional<at::Tensor>& base,
                                                          const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                          const at::Tensor& rank, double alpha, bool need_u,
                                                          double dropout_p = 0.0,
                                                          const std::optional<at::Tensor>& dropout_seed = std::nullopt);

std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> backward(
    Plan& plan, const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& u, const at::Tensor& rank, double alpha,
    bool frozen_prefix, bool compute_dx, bool compute_lora, double dropout_p = 0.0,
    const std::optional<at::Tensor>& dropout_seed = std::nullopt);

// Test hooks, the recording stub and the ABI helpers as Python functions (_C.triton_*): call from the
// extension's PYBIND11_MODULE.
void register_bindings(pybind11::module& m);

}  // namespace dylora::triton_launch
