// C++ CPU kernels of the dylora ops (see dylora_kernels/ops.py for the contract they meet).
//
// Every product is one BLAS-backed ATen call on views of the caller's storage: A[:b] is a narrow of
// rows, B[:, :b] a narrow of columns, nothing is copied. The scale alpha/b rides in addmm's alpha,
// and the low-rank term is accumulated into y (and dx) by the GEMM itself (beta = 1): no
// elementwise pass over an (M, N) or (M, K) tensor. The rank-b intermediates u = x·A[:b]ᵀ and
// v = g·B[:, :b] are accumulated in float32 (float64 for float64 inputs).
//
// One rank for all rows (0-d rank tensor) slices; one rank per row (1-D) masks the r_max slots,
// with s_m = alpha / b_m:
//   y  += (s ⊙ u ⊙ [j < b_m]) · Bᵀ          dx += (s ⊙ v ⊙ [j < b_m]) · A
//   dA  = (s ⊙ v ⊙ trained)ᵀ · x            dB  = gᵀ · (s ⊙ u ⊙ trained)
// where trained = [j < b_m] in full mode and [j == b_m - 1] in frozen-prefix mode.
#include <torch/extension.h>

#include <tuple>

namespace {

using at::Tensor;

// The dtype the rank-b intermediates are kept in.
at::ScalarType acc_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// a · b with float32 accumulation written out in float32 (float64 for float64 inputs).
Tensor mm_acc(const Tensor& a, const Tensor& b) {
  const auto acc = acc_dtype(a);
  return at::mm(a.to(acc), b.to(acc));
}

// Per-row ranks: b (M, 1) and the 0/1 mask over the r_max slots, (M, r_max) in `dtype`: the slots
// j < b_m (prefix), or only j == b_m - 1 (last).
Tensor slot_mask(const Tensor& b, int64_t r_max, bool last_only, at::ScalarType dtype) {
  const auto slots = at::arange(r_max, b.options());
  return (last_only ? slots.eq(b - 1) : slots.lt(b)).to(dtype);
}

std::tuple<Tensor, Tensor> forward(const Tensor& x, const Tensor& weight,
                                   const std::optional<Tensor>& bias, const Tensor& lora_A,
                                   const Tensor& lora_B, const Tensor& rank, double alpha) {
  const int64_t r_max = lora_A.size(0);
  Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  if (rank.dim() == 0) {
    const int64_t b = rank.item<int64_t>();
    const Tensor u_b = mm_acc(x, lora_A.narrow(0, 0, b).t());                    // (M, b)
    y.addmm_(u_b.to(x.scalar_type()), lora_B.narrow(1, 0, b).t(), 1.0, alpha / b);
    return {y, at::constant_pad_nd(u_b, {0, r_max - b})};
  }
  const Tensor b = rank.reshape({-1, 1}).to(at::kLong);
  // u is stored unscaled and exactly zero beyond each row's rank.
  const Tensor u = mm_acc(x, lora_A.t()).mul_(slot_mask(b, r_max, false, acc_dtype(x)));
  y.addmm_(u.div(b).mul_(alpha).to(x.scalar_type()), lora_B.t());
  return {y, u};
}

std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad, const Tensor& x,
                                            const Tensor& weight, const Tensor& lora_A,
                                            const Tensor& lora_B, const Tensor& u,
                                            const Tensor& rank, double alpha, bool frozen_prefix,
                                            bool compute_dx) {
  const auto dtype = x.scalar_type();
  const int64_t r_max = lora_A.size(0);
  Tensor dA = at::zeros_like(lora_A, at::MemoryFormat::Contiguous);
  Tensor dB = at::zeros_like(lora_B, at::MemoryFormat::Contiguous);
  Tensor dx = compute_dx ? at::mm(grad, weight) : at::empty({0}, x.options());
  if (rank.dim() == 0) {
    const int64_t b = rank.item<int64_t>();
    const double s = alpha / b;
    const Tensor A_b = lora_A.narrow(0, 0, b);
    const Tensor v = mm_acc(grad, lora_B.narrow(1, 0, b)).to(dtype);              // (M, b)
    if (compute_dx) dx.addmm_(v, A_b, 1.0, s);
    if (frozen_prefix) {  // two matrix-vector products: row b-1 of dA, column b-1 of dB
      dA.select(0, b - 1).addmv_(x.t(), v.select(1, b - 1), 0.0, s);
      dB.select(1, b - 1).addmv_(grad.t(), u.select(1, b - 1).to(dtype), 0.0, s);
    } else {
      dA.narrow(0, 0, b).addmm_(v.t(), x, 0.0, s);
      dB.narrow(1, 0, b).addmm_(grad.t(), u.narrow(1, 0, b).to(dtype), 0.0, s);
    }
    return {dx, dA, dB};
  }
  const auto acc = acc_dtype(x);
  const Tensor b = rank.reshape({-1, 1}).to(at::kLong);
  const Tensor scale = b.to(acc).reciprocal_().mul_(alpha);                       // (M, 1)
  const Tensor v = mm_acc(grad, lora_B).mul_(scale);                              // (M, r_max), scaled
  if (compute_dx) dx.addmm_(v.mul(slot_mask(b, r_max, false, acc)).to(dtype), lora_A);
  const Tensor trained = slot_mask(b, r_max, frozen_prefix, acc);
  at::mm_out(dA, v.mul_(trained).to(dtype).t(), x);
  at::mm_out(dB, grad.t(), u.mul(scale).mul_(trained).to(dtype));
  return {dx, dA, dB};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dylora C++ CPU kernels; call them through torch.ops.dylora (dylora_kernels.ops)";
  m.def("forward", &forward, "y and u for one rank (0-d) or one rank per row (1-D)");
  m.def("backward", &backward, "dx, dA, dB in full or frozen-prefix mode");
}
