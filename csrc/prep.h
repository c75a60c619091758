// The lean cuBLAS composition's one elementwise pass ("prep"): everything between its GEMMs, in one launch.
//
// With the rank on the device the composition cannot slice (reading the rank would sync), so its GEMMs run r_max
// wide; the prep turns their fp32 results into the masked, 1/b_m-scaled operands of the next GEMMs, and masks the
// adapter's unused slots, in one kernel (instead of ~10 ATen launches):
//
//   forward   raw = x·A[:R]ᵀ (M, R) fp32          →  u   = raw on slots j < b_m, 0 elsewhere (autograd's u)
//                                                     p   = raw / b_m on slots j < b_m, 0 elsewhere   (x's dtype)
//                                                     z   = B with the slots no valid row uses zeroed  (x's dtype)
//             y = x·Wᵀ + bias [+ base]  then  y += α·p·zᵀ                  GEMMs: x·Aᵀ, x·Wᵀ, p·zᵀ (+ prep)
//   backward  v = g·B[:, :R] (M, R) fp32 and u    →  p_dx = v / b_m on used slots,  a = A with unused slots zeroed
//                                                     p_a  = v / b_m on trained slots, q_b = u / b_m on trained slots
//             dx = g·W + α·p_dx·a;  dA = α·p_aᵀ·x;  dB = α·gᵀ·q_b      GEMMs: g·B, g·W, p_dx·a, p_aᵀ·x, gᵀ·q_b
//
// "Trained" slots are j < b_m (full mode) or j == b_m − 1 (frozen prefix). A row whose rank is outside [1, R] gets
// NaN in p, p_dx, p_a and q_b (so NaN in its y and dx rows and in the gradients it enters): never garbage. Masks
// select rather than multiply, and the adapters' slots at or beyond the largest valid rank are zeroed, so NaN/Inf
// there never reach an output. The element rules below are shared by the CPU loop (tests) and the CUDA kernel.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define DYLORA_HD __host__ __device__
#else
#define DYLORA_HD
#endif

namespace dylora::prep {

DYLORA_HD inline bool valid_rank(int64_t b, int64_t r_max) { return b >= 1 && b <= r_max; }

// value / b on the selected slots (j < b, or j == b − 1 when one_hot), exactly 0 elsewhere, NaN for a bad rank.
template <typename acc_t>
DYLORA_HD inline acc_t scaled_slot(acc_t value, int64_t j, int64_t b, int64_t r_max, bool one_hot) {
  if (!valid_rank(b, r_max)) return std::numeric_limits<acc_t>::quiet_NaN();
  const bool selected = one_hot ? j == b - 1 : j < b;
  return selected ? value / static_cast<acc_t>(b) : acc_t(0);
}

// value on the used slots (j < b), exactly 0 elsewhere (autograd's u; a bad rank is caught by p).
template <typename acc_t>
DYLORA_HD inline acc_t used_slot(acc_t value, int64_t j, int64_t b) {
  return j < b ? value : acc_t(0);
}

struct ForwardPrep {
  at::Tensor u, p, z;  // u undefined unless asked for
};

struct BackwardPrep {
  at::Tensor p_dx, a, p_a, q_b;  // p_dx, a only for dx; p_a, q_b only for dA/dB
};

// raw (M, R) fp32 or float64; rank int64, 0-d or (M,), on raw's device; lora_B (N, R); outputs in `dtype`
// (u in raw's dtype). CPU tensors: a loop (tests); CUDA tensors: one kernel (GPU build).
ForwardPrep forward(const at::Tensor& raw, const at::Tensor& rank, const at::Tensor& lora_B, at::ScalarType dtype,
                    bool need_u);

// v, u (M, R) in the intermediate dtype; lora_A (R, K).
BackwardPrep backward(const at::Tensor& v, const at::Tensor& u, const at::Tensor& rank, const at::Tensor& lora_A,
                      at::ScalarType dtype, bool frozen_prefix, bool compute_dx, bool compute_lora);

#ifdef WITH_CUDA
ForwardPrep forward_cuda(const at::Tensor& raw, const at::Tensor& rank, const at::Tensor& lora_B,
                         at::ScalarType dtype, bool need_u);
BackwardPrep backward_cuda(const at::Tensor& v, const at::Tensor& u, const at::Tensor& rank,
                           const at::Tensor& lora_A, at::ScalarType dtype, bool frozen_prefix, bool compute_dx,
                           bool compute_lora);
#endif

}  // namespace dylora::prep
