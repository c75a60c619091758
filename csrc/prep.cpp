// The prep pass of the lean composition (prep.h) on CPU tensors: a plain loop over the same element rules the
// CUDA kernel (cuda/prep.cu) applies. It serves the tests (the composition's logic checked without a GPU); CUDA
// tensors go to the kernel.
#include "prep.h"

#include <ATen/Dispatch.h>

#include <algorithm>

namespace dylora::prep {
namespace {

using at::Tensor;

// The largest valid rank (0 when there is none): slots at or beyond it are zeroed in the adapters.
int64_t max_valid_rank(const Tensor& rank, int64_t r_max) {
  const auto* b = rank.const_data_ptr<int64_t>();
  int64_t best = 0;
  for (int64_t m = 0; m < rank.numel(); ++m) {
    if (valid_rank(b[m], r_max)) best = std::max(best, b[m]);
  }
  return best;
}

int64_t rank_of_row(const int64_t* b, bool per_row, int64_t m) { return b[per_row ? m : 0]; }

// out (rows, R) = rule(in[m, j], j, b_m) for every row m and slot j.
template <typename Rule>
Tensor per_slot(const Tensor& in, const Tensor& rank, at::ScalarType dtype, Rule rule) {
  Tensor out = at::empty(in.sizes(), in.options().dtype(dtype));
  const bool per_row = rank.dim() == 1;
  const auto* b = rank.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "dylora_prep_in", [&] {
    using acc_t = scalar_t;
    const auto src = in.accessor<acc_t, 2>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dylora_prep_out", [&] {
      auto dst = out.accessor<scalar_t, 2>();
      for (int64_t m = 0; m < src.size(0); ++m) {
        const int64_t bm = rank_of_row(b, per_row, m);
        for (int64_t j = 0; j < src.size(1); ++j) dst[m][j] = static_cast<scalar_t>(rule(src[m][j], j, bm));
      }
    });
  });
  return out;
}

// The adapter with the slots at or beyond `width` zeroed (a select: NaN there never comes through), in `dtype`.
// slot_dim: 1 for B (N, R), 0 for A (R, K).
Tensor kept_slots(const Tensor& adapter, int64_t width, int64_t slot_dim, at::ScalarType dtype) {
  const Tensor slots = at::arange(adapter.size(slot_dim), adapter.options().dtype(at::kLong));
  const Tensor kept = slot_dim == 1 ? slots.lt(width).unsqueeze(0) : slots.lt(width).unsqueeze(1);
  return at::where(kept, adapter, 0).to(dtype);
}

}  // namespace

ForwardPrep forward(const Tensor& raw, const Tensor& rank, const Tensor& lora_B, at::ScalarType dtype, bool need_u) {
#ifdef WITH_CUDA
  if (raw.is_cuda()) return forward_cuda(raw, rank, lora_B, dtype, need_u);
#endif
  TORCH_CHECK(raw.is_cpu(), "dylora: the prep pass runs on CPU or (GPU build) CUDA tensors, got ", raw.device());
  const int64_t R = raw.size(1);
  ForwardPrep out;
  if (need_u) out.u = per_slot(raw, rank, raw.scalar_type(), [](auto v, int64_t j, int64_t b) { return used_slot(v, j, b); });
  out.p = per_slot(raw, rank, dtype, [R](auto v, int64_t j, int64_t b) { return scaled_slot(v, j, b, R, false); });
  out.z = kept_slots(lora_B, max_valid_rank(rank, R), 1, dtype);
  return out;
}

BackwardPrep backward(const Tensor& v, const Tensor& u, const Tensor& rank, const Tensor& lora_A,
                      at::ScalarType dtype, bool frozen_prefix, bool compute_dx, bool compute_lora) {
#ifdef WITH_CUDA
  if (v.is_cuda()) return backward_cuda(v, u, rank, lora_A, dtype, frozen_prefix, compute_dx, compute_lora);
#endif
  TORCH_CHECK(v.is_cpu(), "dylora: the prep pass runs on CPU or (GPU build) CUDA tensors, got ", v.device());
  const int64_t R = v.size(1);
  BackwardPrep out;
  if (compute_dx) {
    out.p_dx = per_slot(v, rank, dtype, [R](auto x, int64_t j, int64_t b) { return scaled_slot(x, j, b, R, false); });
    out.a = kept_slots(lora_A, max_valid_rank(rank, R), 0, dtype);
  }
  if (compute_lora) {
    const auto trained = [R, frozen_prefix](auto x, int64_t j, int64_t b) {
      return scaled_slot(x, j, b, R, frozen_prefix);
    };
    out.p_a = per_slot(v, rank, dtype, trained);
    out.q_b = per_slot(u, rank, dtype, trained);
  }
  return out;
}

}  // namespace dylora::prep
