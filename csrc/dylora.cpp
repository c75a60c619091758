// C++ CPU kernels of the dylora ops (see dylora_kernels/ops.py for the contract they meet).
//
// Every product is one BLAS-backed ATen call on views of the caller's storage: A[:b] is a narrow of
// rows, B[:, :b] a narrow of columns, nothing is copied. The scale alpha/b rides in addmm's alpha,
// and the low-rank term and the frozen GEMM are summed by the GEMMs themselves (beta = 1): no
// elementwise pass over an (M, N) or (M, K) tensor. The rank-b intermediates u = x·A[:b]ᵀ and
// v = g·B[:, :b] are accumulated in float32 (float64 for float64 inputs).
//
// One rank for all rows (0-d rank tensor) slices; one rank per row (1-D) masks the r_max slots,
// with s_m = alpha / b_m:
//   y  += (s ⊙ u ⊙ [j < b_m]) · Bᵀ          dx += (s ⊙ v ⊙ [j < b_m]) · A
//   dA  = (s ⊙ v ⊙ trained)ᵀ · x            dB  = gᵀ · (s ⊙ u ⊙ trained)
// where trained = [j < b_m] in full mode and [j == b_m - 1] in frozen-prefix mode.
#include <torch/extension.h>

#include <algorithm>
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

// MKL's sgemm is several times slower for a product with fewer than 16 output columns than with
// 16 (measured, 2048×1024×4096: g·B[:, :8] 12.4 ms, g·B[:, :16] 3.9 ms; gᵀ·u[:, :8] 40 ms,
// gᵀ·u[:, :16] 7 ms). The skinny backward products therefore run at least this wide and the extra
// columns are ignored (v) or exactly zero (dB: u is zero beyond b).
constexpr int64_t kMinGemmWidth = 16;

// out = bias + alpha · a · b, one GEMM (bias broadcast over rows; no bias: out is only written).
Tensor low_rank(const Tensor& a, const Tensor& b, double alpha, const std::optional<Tensor>& bias) {
  if (bias.has_value()) return at::addmm(*bias, a, b, 1.0, alpha);
  Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  return at::addmm_out(out, out, a, b, 0.0, alpha);  // beta = 0: `out` is not read
}

// s · vecᵀ · mat, (cols,): one row of a GEMM (1 × M)·(M × cols). MKL runs this multithreaded and
// 1.8–3.2× faster than the equivalent addmv_ (measured: s·gᵀ·u[:, b-1] at 2048×4096, 2.7 vs 6.5 ms).
Tensor scaled_row(const Tensor& vec, const Tensor& mat, double s) {
  Tensor out = at::empty({1, mat.size(1)}, mat.options());
  return at::addmm_out(out, out, vec.unsqueeze(0), mat, 0.0, s).squeeze(0);
}

std::tuple<Tensor, Tensor> forward(const Tensor& x, const Tensor& weight,
                                   const std::optional<Tensor>& bias, const Tensor& lora_A,
                                   const Tensor& lora_B, const Tensor& rank, double alpha) {
  const auto dtype = x.scalar_type();
  const int64_t r_max = lora_A.size(0);
  // The skinny low-rank GEMM writes y first; the big GEMM then accumulates onto it (beta = 1),
  // reading y inside its blocked loop instead of in a second pass over y.
  Tensor y, u;
  if (rank.dim() == 0) {
    const int64_t b = rank.item<int64_t>();
    const Tensor u_b = mm_acc(x, lora_A.narrow(0, 0, b).t());                    // (M, b)
    y = low_rank(u_b.to(dtype), lora_B.narrow(1, 0, b).t(), alpha / b, bias);
    u = at::constant_pad_nd(u_b, {0, r_max - b});
  } else {
    const Tensor b = rank.reshape({-1, 1}).to(at::kLong);
    // u is stored unscaled and exactly zero beyond each row's rank.
    u = mm_acc(x, lora_A.t()).mul_(slot_mask(b, r_max, false, acc_dtype(x)));   // (M, r_max)
    y = low_rank(u.div(b).mul_(alpha).to(dtype), lora_B.t(), 1.0, bias);
  }
  y.addmm_(x, weight.t());
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
  Tensor dx = at::empty({0}, x.options());
  if (rank.dim() == 0) {
    const int64_t b = rank.item<int64_t>();
    const double s = alpha / b;
    const int64_t width = std::min(r_max, std::max(b, kMinGemmWidth));
    const Tensor A_b = lora_A.narrow(0, 0, b);
    const Tensor v = mm_acc(grad, lora_B.narrow(1, 0, width)).to(dtype).narrow(1, 0, b);  // (M, b)
    if (compute_dx) dx = low_rank(v, A_b, s, std::nullopt).addmm_(grad, weight);
    if (frozen_prefix) {  // two vector-matrix products: row b-1 of dA, column b-1 of dB
      dA.select(0, b - 1).copy_(scaled_row(v.select(1, b - 1), x, s));
      dB.select(1, b - 1).copy_(scaled_row(u.select(1, b - 1).to(dtype), grad, s));
    } else {
      dA.narrow(0, 0, b).addmm_(v.t(), x, 0.0, s);
      dB.narrow(1, 0, width).addmm_(grad.t(), u.narrow(1, 0, width).to(dtype), 0.0, s);
    }
    return {dx, dA, dB};
  }
  const auto acc = acc_dtype(x);
  const Tensor b = rank.reshape({-1, 1}).to(at::kLong);
  const Tensor scale = b.to(acc).reciprocal_().mul_(alpha);                       // (M, 1)
  const Tensor v = mm_acc(grad, lora_B).mul_(scale);                              // (M, r_max), scaled
  if (compute_dx) {
    const Tensor v_used = v.mul(slot_mask(b, r_max, false, acc)).to(dtype);
    dx = low_rank(v_used, lora_A, 1.0, std::nullopt).addmm_(grad, weight);
  }
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
