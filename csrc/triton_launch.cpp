// Placeholder until the C++ Triton launcher lands: every Triton plan runs through Python (make_plan: not handled).
#include "triton_launch.h"

#include <c10/util/Exception.h>

namespace dylora::triton_launch {

class Plan {};

std::shared_ptr<Plan> make_plan(pybind11::handle) { return nullptr; }

std::tuple<at::Tensor, at::Tensor> forward(Plan&, const at::Tensor&, const std::optional<at::Tensor>&,
                                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                           const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool) {
  TORCH_CHECK(false, "dylora: no C++ Triton launcher in this build");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(Plan&, const at::Tensor&, const at::Tensor&,
                                                        const std::optional<at::Tensor>&, const at::Tensor&,
                                                        const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        double, bool, bool, bool) {
  TORCH_CHECK(false, "dylora: no C++ Triton launcher in this build");
}

}  // namespace dylora::triton_launch
