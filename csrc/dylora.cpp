// The dylora ops: schemas, the C++ (ATen) kernels, autograd and autocast, declared once.
//
//   dylora::linear    y = x·Wᵀ + bias + base + (α/b_m)·(x·A[:b_m]ᵀ)·B[:, :b_m]ᵀ  (x is (..., K))
//                     the op users call; its autograd kernel below saves u and calls:
//   dylora::forward   (y, u) for a 2-D x; u = x·A[:b_m]ᵀ (M, r_max), fp32, exactly zero beyond b_m
//   dylora::backward  (dx, dA, dB); frozen-prefix mode trains slot b_m − 1 only
//
// weight, bias and base are optional: without a weight the op is the low-rank term alone
// (dylora_delta), and base is a given base-layer output the term is added to.
//
// Kernels: CPU (here), CUDA (registered from Python: dylora_kernels/ops.py routes to Triton or to the
// ATen composition below, which then runs on cuBLAS). Python validates every input once before the
// op; nothing here re-validates shapes or dtypes. The rank is read where it is used: on the host
// when it is a CPU tensor (checked here, ValueError when out of range), on the device otherwise (no
// host sync: rows whose rank is out of range come out NaN).
//
// The ATen composition, for one rank b (the rank a CPU tensor):   [slices: nothing is copied]
//     u = x·A[:b]ᵀ                 y = (α/b)·u·B[:, :b]ᵀ  then  y += x·Wᵀ  (the big GEMM, beta = 1)
//     v = g·B[:, :b]               dx = (α/b)·v·A[:b]     then  dx += g·W
//     full: dA[:b] = (α/b)·vᵀ·x, dB[:, :b] = (α/b)·gᵀ·u;   frozen: only row / column b − 1
// Per-row ranks b_m replace the slices by the first max_m b_m slots and `where` masks per row. A rank
// tensor on an accelerator cannot be read without a sync, so there the products run r_max wide with
// the masks and 1/b_m computed on the device (the extra FLOPs are ≤ r_max(K+N)/(KN) of the GEMM).
// No slot at or beyond the largest rank is ever read, and masks select (`where`) rather than
// multiply, so NaN/Inf in unused slots of A or B never reach an output (0·NaN = NaN).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "dylora.h"
#include "dropout.h"
#include "prep.h"
#include "triton_launch.h"

#include <algorithm>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

namespace dylora {
namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

// The dtype of the rank-b intermediates u and v: float64 when x or the adapters are float64, else fp32.
at::ScalarType intermediate_dtype(const Tensor& x, const Tensor& lora_A) {
  return (x.scalar_type() == at::kDouble || lora_A.scalar_type() == at::kDouble) ? at::kDouble
                                                                                  : at::kFloat;
}

// a · b accumulated and written in `acc` (fp32 or float64). a is the large operand (x or g, (M, K)), b the adapter's
// (K, r). On CUDA a 16-bit `a` goes to cuBLAS as it is, with b in a's dtype and an fp32 output (mm.dtype:
// fp32 accumulation, as every 16-bit cuBLAS GEMM): casting a to fp32 first would copy it (read M·K·2 bytes,
// write M·K·4) and run the product as an fp32 GEMM: predicted at 8192×4096, r = 32 on an H200, ~40 µs of copy
// (192 MB at 4.8 TB/s) and ~64 µs of non-tensor-core fp32 FLOPs (4.3 GFLOP at ~67 TFLOP/s), 0.3× the 349 µs
// GEMM, on every call with a host (Python int) rank. Elsewhere (CPU, float64): both operands cast to `acc`.
bool is_16bit(const Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

// torch 2.13's CPU GEMM in bf16 (oneDNN, seen on an AVX-512-bf16 Xeon, not on every CPU) reads past the end of
// the rows of an operand whose rows are not packed (a row-strided or column-padded view, K = 11): NaN in the
// memory the view skips reaches the product (issue #22). Decided from the layout and dtype alone, never the
// CPU: a 16-bit CPU operand that is neither row- nor column-major packed is copied before it enters a GEMM
// (every other operand, fp32 included, is passed as it is).
Tensor gemm_operand(const Tensor& t) {
  const bool packed = t.is_contiguous() || t.t().is_contiguous();
  return t.is_cpu() && is_16bit(t) && !packed ? t.contiguous() : t;
}

Tensor mm_in(const Tensor& a, const Tensor& b, at::ScalarType acc) {
  if (a.is_cuda() && acc == at::kFloat && is_16bit(a)) return at::mm(a, b.to(a.scalar_type()), acc);
  return at::mm(a.to(acc), b.to(acc));
}

// out = seed + alpha · a · b in one GEMM: seed (M, N), (N,) broadcast, or none (out only written).
Tensor scaled_mm(const Tensor& a, const Tensor& b, double alpha, const optional<Tensor>& seed) {
  if (seed.has_value()) return at::addmm(*seed, gemm_operand(a), gemm_operand(b), 1.0, alpha);
  Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  return at::addmm_out(out, out, gemm_operand(a), gemm_operand(b), 0.0, alpha);  // beta = 0: `out` is never read
}

// y = x·Wᵀ + bias + base + alpha·lhs·rhs (weight, bias, base optional) in two GEMMs, no elementwise pass
// over y. On the CPU the skinny low-rank GEMM writes y (seeded with base or bias) and MKL's big GEMM
// accumulates onto it (beta = 1): measured faster there. On CUDA the big GEMM runs first, as cuBLAS runs
// it best (beta = 0, bias in its epilogue), and the low-rank GEMM accumulates onto it, the order of the
// addmm peer (H200, 8192×4096×4096 bf16: the peer 1.22–1.31× F.linear; this path 1.32× the other way
// round, 1.30–1.31× this way: within that machine's run-to-run spread).
Tensor linear_plus_low_rank(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                            const optional<Tensor>& base, const Tensor& lhs, const Tensor& rhs, double alpha) {
  if (x.is_cuda() && weight.has_value()) {
    Tensor y = bias.has_value() ? at::addmm(*bias, x, weight->t()) : at::mm(x, weight->t());
    if (base.has_value()) y.add_(*base);
    return y.addmm_(lhs, rhs, 1.0, alpha);
  }
  Tensor y = scaled_mm(lhs, rhs, alpha, base.has_value() ? base : bias);
  if (base.has_value() && bias.has_value()) y.add_(*bias);
  if (weight.has_value()) y.addmm_(gemm_operand(x), gemm_operand(weight->t()));
  return y;
}

// dx = g·W + alpha·lhs·rhs: the same composition, with Wᵀ as the "weight" (a view, nothing copied). With adapter
// dropout the low-rank part (the gradient of dropout(x)) is masked first: dx = g·W + keep ⊙ (alpha·lhs·rhs).
Tensor grad_input(const Tensor& grad, const optional<Tensor>& weight, const Tensor& lhs, const Tensor& rhs,
                  double alpha, const dropout::Args& drop) {
  if (drop.on()) {
    Tensor dx = drop.kept(scaled_mm(lhs, rhs, alpha, std::nullopt));
    return weight.has_value() ? dx.addmm_(gemm_operand(grad), gemm_operand(*weight)) : dx;
  }
  const optional<Tensor> weight_t = weight.has_value() ? optional<Tensor>(weight->t()) : std::nullopt;
  return linear_plus_low_rank(grad, weight_t, std::nullopt, std::nullopt, lhs, rhs, alpha);
}

// out = s · a · b written into `out` (a view of a gradient buffer): in place when the dtypes agree,
// else through a temporary cast into out's dtype (adapters in another dtype than x). A one-row
// product runs as a (1, M)·(M, cols) GEMM: MKL threads it, 1.8–3.2× faster than addmv_ (measured:
// s·gᵀ·u[:, b-1] at 2048×4096, 2.7 vs 6.5 ms).
void write_scaled_mm(Tensor out, const Tensor& a, const Tensor& b, double s) {
  if (out.scalar_type() == a.scalar_type()) {
    out.addmm_(gemm_operand(a), gemm_operand(b), 0.0, s);  // beta = 0: the buffer's zeros are not read
  } else {
    out.copy_(scaled_mm(a, b, s, std::nullopt));
  }
}

// MKL's sgemm is several times slower for a product with fewer than 16 output columns than with 16
// (measured, 2048×1024×4096: g·B[:, :8] 12.4 ms vs g·B[:, :16] 3.9 ms). On the CPU the skinny
// backward product g·B[:, :b] therefore runs at least this wide and the extra columns are dropped.
constexpr int64_t kMinCpuGemmWidth = 16;

// (dx, dA, dB) as the empty tensors the backward returns for what it is not asked to compute.
std::tuple<Tensor, Tensor, Tensor> not_computed(const Tensor& x, const Tensor& lora_A, const Tensor& lora_B) {
  return {at::empty({0}, x.options()), at::empty({0}, lora_A.options()), at::empty({0}, lora_B.options())};
}

// ---------------------------------------------------------------------------------------------
// Ranks read on the host (CPU rank tensors), checked without building temporaries
// ---------------------------------------------------------------------------------------------
struct HostRank {
  bool per_row;
  int64_t lo, hi;  // the single rank (lo == hi), or min and max over the rows (0, 0 for no rows)
};

HostRank read_host_rank(const Tensor& rank, int64_t r_max) {
  HostRank r{rank.dim() == 1, 0, 0};
  AT_DISPATCH_INTEGRAL_TYPES(rank.scalar_type(), "dylora_rank", [&] {
    // Compared as int64: a narrow rank dtype never wraps r_max (uint8 rank 100 with r_max 300 is valid).
    if (rank.dim() == 0) {
      r.lo = r.hi = static_cast<int64_t>(*rank.const_data_ptr<scalar_t>());
    } else if (rank.size(0) > 0) {
      const auto values = rank.accessor<scalar_t, 1>();
      r.lo = std::numeric_limits<int64_t>::max();
      r.hi = std::numeric_limits<int64_t>::min();
      for (int64_t m = 0; m < values.size(0); ++m) {
        const auto b = static_cast<int64_t>(values[m]);
        r.lo = std::min(r.lo, b);
        r.hi = std::max(r.hi, b);
      }
    } else {
      r.lo = 1;  // no rows: nothing to check
    }
  });
  if (r.per_row) {
    TORCH_CHECK_VALUE(r.lo >= 1 && r.hi <= r_max, "rank values must be in [1, r_max] = [1, ", r_max,
                      "], got min ", r.lo, ", max ", r.hi);
  } else {
    TORCH_CHECK_VALUE(r.lo >= 1 && r.lo <= r_max, "rank values must be in [1, r_max] = [1, ", r_max,
                      "], got ", r.lo);
  }
  return r;
}

// The slots a row selects: those it uses (j < b_m), or the one frozen-prefix mode trains (j == b_m − 1).
enum class Slots { kUsed, kTrained };

// out[m, j] = t[m, j] · scale_m where row m selects slot j, else exactly 0 (a select, not a product:
// whatever t holds elsewhere, NaN included, never comes through); scale_m = alpha / b_m, or 1 when
// `alpha` is not given. One pass over t (M, width) with CPU ranks: no mask tensors are built.
Tensor select_rows(const Tensor& t, const Tensor& rank, Slots slots, optional<double> alpha) {
  Tensor out = at::empty(t.sizes(), t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "dylora_select_rows", [&] {
    using value_t = scalar_t;
    const auto in = t.accessor<value_t, 2>();
    auto res = out.accessor<value_t, 2>();
    AT_DISPATCH_INTEGRAL_TYPES(rank.scalar_type(), "dylora_select_rows_rank", [&] {
      const auto b = rank.accessor<scalar_t, 1>();
      for (int64_t m = 0; m < in.size(0); ++m) {
        const auto bm = static_cast<int64_t>(b[m]);
        const auto scale = static_cast<value_t>(alpha.has_value() ? *alpha / bm : 1.0);
        for (int64_t j = 0; j < in.size(1); ++j) {
          const bool selected = slots == Slots::kUsed ? j < bm : j == bm - 1;
          res[m][j] = selected ? in[m][j] * scale : value_t(0);
        }
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// The ATen composition, rank on the host: single rank → slices; per-row → first max b_m slots + masks
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> forward_host_rank(const Tensor& x, const optional<Tensor>& weight,
                                             const optional<Tensor>& bias,
                                             const optional<Tensor>& base, const Tensor& lora_A,
                                             const Tensor& lora_B, const Tensor& rank, double alpha,
                                             bool need_u, const dropout::Args& drop) {
  const auto dtype = x.scalar_type();
  const auto acc = intermediate_dtype(x, lora_A);
  const int64_t r_max = lora_A.size(0);
  const HostRank r = read_host_rank(rank, r_max);
  const int64_t width = r.hi;  // slots at or beyond the largest rank are never read
  const Tensor B_w = lora_B.narrow(1, 0, width).to(dtype);
  alpha = drop.alpha(alpha);
  Tensor u = mm_in(drop.kept(x), lora_A.narrow(0, 0, width).t(), acc);  // (M, width)
  Tensor y;
  if (!r.per_row) {  // α/b rides in the GEMM's alpha, applied to the fp32 product
    y = linear_plus_low_rank(x, weight, bias, base, u.to(dtype), B_w.t(), alpha / r.lo);
  } else {
    const Tensor p = select_rows(u, rank, Slots::kUsed, alpha).to(dtype);  // (alpha/b_m)·u, masked
    y = linear_plus_low_rank(x, weight, bias, base, p, B_w.t(), 1.0);
    if (need_u) u = select_rows(u, rank, Slots::kUsed, std::nullopt);  // exactly zero beyond b_m
  }
  if (!need_u) return {y, at::empty({0}, x.options().dtype(acc))};
  return {y, at::constant_pad_nd(u, {0, r_max - width})};
}

std::tuple<Tensor, Tensor, Tensor> backward_host_rank(
    const Tensor& grad, const Tensor& x, const optional<Tensor>& weight, const Tensor& lora_A,
    const Tensor& lora_B, const Tensor& u, const Tensor& rank, double alpha, bool frozen_prefix,
    bool compute_dx, bool compute_lora, const dropout::Args& drop) {
  const auto dtype = x.scalar_type();
  const auto acc = intermediate_dtype(x, lora_A);
  const int64_t r_max = lora_A.size(0);
  const HostRank r = read_host_rank(rank, r_max);
  auto [dx, dA, dB] = not_computed(x, lora_A, lora_B);
  alpha = drop.alpha(alpha);
  const Tensor x_lr = compute_lora ? drop.kept(x) : x;  // what the adapter saw: dA = s·vᵀ·dropout(x)
  if (compute_lora) {
    dA = at::zeros_like(lora_A, at::MemoryFormat::Contiguous);
    dB = at::zeros_like(lora_B, at::MemoryFormat::Contiguous);
  }
  if (!r.per_row) {
    const int64_t b = r.lo;
    const double s = alpha / b;
    const int64_t gemm_width = x.is_cpu() ? std::min(r_max, std::max(b, kMinCpuGemmWidth)) : b;
    const Tensor v = mm_in(grad, lora_B.narrow(1, 0, gemm_width), acc).narrow(1, 0, b).to(dtype);
    if (compute_dx) dx = grad_input(grad, weight, v, lora_A.narrow(0, 0, b).to(dtype), s, drop);
    if (compute_lora && frozen_prefix) {  // row b-1 of dA and column b-1 of dB: two one-row GEMMs
      write_scaled_mm(dA.narrow(0, b - 1, 1), v.narrow(1, b - 1, 1).t(), x_lr, s);
      write_scaled_mm(dB.narrow(1, b - 1, 1).t(), u.narrow(1, b - 1, 1).to(dtype).t(), grad, s);
    } else if (compute_lora) {
      // u is exactly zero beyond b: dB's extra gemm_width − b columns come out zero.
      write_scaled_mm(dA.narrow(0, 0, b), v.t(), x_lr, s);
      write_scaled_mm(dB.narrow(1, 0, gemm_width), grad.t(), u.narrow(1, 0, gemm_width).to(dtype), s);
    }
    return {dx, dA, dB};
  }
  const int64_t width = r.hi;
  const Tensor v = mm_in(grad, lora_B.narrow(1, 0, width), acc);  // (M, width)
  if (compute_dx) {
    const Tensor p = select_rows(v, rank, Slots::kUsed, alpha).to(dtype);
    dx = grad_input(grad, weight, p, lora_A.narrow(0, 0, width).to(dtype), 1.0, drop);
  }
  if (compute_lora) {
    const Slots trained = frozen_prefix ? Slots::kTrained : Slots::kUsed;
    const Tensor p = select_rows(v, rank, trained, alpha).to(dtype);
    const Tensor q = select_rows(u.narrow(1, 0, width), rank, trained, alpha).to(dtype);
    write_scaled_mm(dA.narrow(0, 0, width), p.t(), x_lr, 1.0);
    write_scaled_mm(dB.narrow(1, 0, width), grad.t(), q, 1.0);
  }
  return {dx, dA, dB};
}

// ---------------------------------------------------------------------------------------------
// The ATen composition, rank on the device: r_max-wide products, masks and 1/b_m on the device
// ---------------------------------------------------------------------------------------------
// Small per-(r_max, device, dtype) constants, made once: the slot indices 0..r_max-1 and the table
// 1/b for b in 0..r_max+1 with NaN at both ends, so 1/b_m with NaN for a rank out of range is one
// clamp and one lookup on the device instead of five elementwise launches.
struct SlotConstants {
  Tensor slots;  // (1, r_max) int64
  Tensor inv;    // (r_max + 2,) in the intermediate dtype
};

const SlotConstants& slot_constants(int64_t r_max, const at::Device& device, at::ScalarType acc) {
  static std::mutex mutex;
  static std::map<std::tuple<int64_t, std::string, at::ScalarType>, SlotConstants> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_tuple(r_max, device.str(), acc);
  auto found = cache.find(key);
  if (found == cache.end()) {
    const auto nan = std::numeric_limits<double>::quiet_NaN();
    Tensor inv = at::arange(r_max + 2, at::TensorOptions().dtype(at::kDouble)).reciprocal_();
    inv.index_put_({0}, nan);
    inv.index_put_({r_max + 1}, nan);
    found = cache.emplace(key, SlotConstants{at::arange(r_max, at::TensorOptions().dtype(at::kLong).device(device))
                                                 .unsqueeze(0),
                                             inv.to(device, acc)}).first;
  }
  return found->second;
}

// What a device rank tensor decides, computed on the device (no host read): per row (or shared)
// 1/b_m (NaN when b_m is outside [1, r_max]), the used slots [j < b_m], and the slots kept at all
// (j < max_m b_m), whose complement is never multiplied (NaN there cannot leak).
struct DeviceRank {
  Tensor inv_b;  // (M or 1, 1), intermediate dtype
  Tensor used;   // (M or 1, r_max) bool
  Tensor kept;   // (1, r_max) bool
};

DeviceRank device_rank(const Tensor& rank, int64_t r_max, at::ScalarType acc) {
  const SlotConstants& c = slot_constants(r_max, rank.device(), acc);
  const Tensor b = rank.reshape({-1, 1});
  DeviceRank d;
  d.inv_b = c.inv.index_select(0, b.clamp(0, r_max + 1).reshape(-1).to(at::kLong)).reshape({-1, 1});
  d.used = c.slots.lt(b);
  if (rank.dim() == 0) {
    d.kept = d.used;
  } else {  // no rows: nothing is kept
    d.kept = b.numel() ? c.slots.lt(b.amax()) : c.slots.lt(0);
  }
  return d;
}

}  // namespace

// The lean composition (prep.h): the device-rank path in 4 launches forward (x·Aᵀ, prep, x·Wᵀ + bias, y += α·p·zᵀ)
// and 6 backward (g·B, prep, g·W, dx += α·p_dx·a, α·p_aᵀ·x, α·gᵀ·q_b), instead of ~10 and ~18–24 ATen launches:
// what the GPU build runs for CUDA tensors (CPU tensors run it in tests). The prep's NaN rules are those above.
std::tuple<Tensor, Tensor> forward_lean(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                                        const optional<Tensor>& base, const Tensor& lora_A, const Tensor& lora_B,
                                        const Tensor& rank, double alpha, bool need_u, const dropout::Args& drop) {
  const auto acc = intermediate_dtype(x, lora_A);
  const auto prepped = prep::forward(mm_in(drop.kept(x), lora_A.t(), acc), rank.to(at::kLong).contiguous(), lora_B,
                                     x.scalar_type(), need_u);
  Tensor y = linear_plus_low_rank(x, weight, bias, base, prepped.p, prepped.z.t(), drop.alpha(alpha));
  return {y, need_u ? prepped.u : at::empty({0}, x.options().dtype(acc))};
}

std::tuple<Tensor, Tensor, Tensor> backward_lean(const Tensor& grad, const Tensor& x, const optional<Tensor>& weight,
                                                 const Tensor& lora_A, const Tensor& lora_B, const Tensor& u,
                                                 const Tensor& rank, double alpha, bool frozen_prefix, bool compute_dx,
                                                 bool compute_lora, const dropout::Args& drop) {
  auto [dx, dA, dB] = not_computed(x, lora_A, lora_B);
  if (!(compute_dx || compute_lora)) return {dx, dA, dB};
  alpha = drop.alpha(alpha);
  const auto prepped = prep::backward(mm_in(grad, lora_B, intermediate_dtype(x, lora_A)), u,
                                      rank.to(at::kLong).contiguous(), lora_A, x.scalar_type(), frozen_prefix,
                                      compute_dx, compute_lora);
  if (compute_dx) dx = grad_input(grad, weight, prepped.p_dx, prepped.a, alpha, drop);
  if (compute_lora) {
    dA = scaled_mm(prepped.p_a.t(), drop.kept(x), alpha, std::nullopt).to(lora_A.scalar_type());
    dB = scaled_mm(grad.t(), prepped.q_b, alpha, std::nullopt).to(lora_B.scalar_type());
  }
  return {dx, dA, dB};
}

// Whether the lean composition's prep kernel exists for x's device: CUDA in the GPU build. (A CPU build used with
// CUDA tensors, through the Python router, runs the same math in ATen ops: forward_device_rank below.)
bool lean_on(const Tensor& x) {
#ifdef WITH_CUDA
  return x.is_cuda();
#else
  (void)x;
  return false;
#endif
}

// The entry points of the ATen composition (declared in dylora.h: the CUDA executor runs them as its "cublas" plan).
std::tuple<Tensor, Tensor> forward_device_rank(const Tensor& x, const optional<Tensor>& weight,
                                               const optional<Tensor>& bias,
                                               const optional<Tensor>& base,
                                               const Tensor& lora_A, const Tensor& lora_B,
                                               const Tensor& rank, double alpha, bool need_u,
                                               const dropout::Args& drop) {
  const auto dtype = x.scalar_type();
  const auto acc = intermediate_dtype(x, lora_A);
  const DeviceRank d = device_rank(rank, lora_A.size(0), acc);
  alpha = drop.alpha(alpha);
  // u from a GEMM in x's dtype (fp32 accumulation inside); its unused columns are selected away, and
  // B's columns no row uses are zeroed, so NaN in unused slots of A or B never reaches y.
  const Tensor u = at::where(d.used, at::mm(drop.kept(x), lora_A.to(dtype).t()), 0);
  const Tensor B_kept = at::where(d.kept, lora_B, 0);
  Tensor y;
  if (rank.dim() == 0) {  // 1/b into B's columns (it only shrinks them: no fp16 overflow), α into the GEMM
    y = linear_plus_low_rank(x, weight, bias, base, u, B_kept.mul_(d.inv_b).to(dtype).t(), alpha);
  } else {  // 1/b_m per row, on u in the intermediate dtype
    y = linear_plus_low_rank(x, weight, bias, base, u.to(acc).mul(d.inv_b).to(dtype), B_kept.to(dtype).t(),
                             alpha);
  }
  return {y, need_u ? u.to(acc) : at::empty({0}, x.options().dtype(acc))};
}

std::tuple<Tensor, Tensor, Tensor> backward_device_rank(
    const Tensor& grad, const Tensor& x, const optional<Tensor>& weight, const Tensor& lora_A,
    const Tensor& lora_B, const Tensor& u, const Tensor& rank, double alpha, bool frozen_prefix,
    bool compute_dx, bool compute_lora, const dropout::Args& drop) {
  const auto dtype = x.scalar_type();
  const auto acc = intermediate_dtype(x, lora_A);
  const int64_t r_max = lora_A.size(0);
  const DeviceRank d = device_rank(rank, r_max, acc);
  alpha = drop.alpha(alpha);
  // v = g·B in x's dtype; a NaN in an unused column of B only reaches v's unused columns, selected away.
  const Tensor v = at::mm(grad, lora_B.to(dtype));
  auto [dx, dA, dB] = not_computed(x, lora_A, lora_B);
  if (compute_dx) {
    const Tensor A_kept = at::where(d.kept.t(), lora_A, 0);  // rows no row uses: zero (NaN cannot leak)
    if (rank.dim() == 0) {
      dx = grad_input(grad, weight, at::where(d.used, v, 0), A_kept.mul_(d.inv_b).to(dtype), alpha, drop);
    } else {
      const Tensor p = at::where(d.used, v, 0).to(acc).mul_(d.inv_b).to(dtype);
      dx = grad_input(grad, weight, p, A_kept.to(dtype), alpha, drop);
    }
  }
  if (!compute_lora) return {dx, dA, dB};
  const Tensor x_lr = drop.kept(x);  // what the adapter saw
  if (frozen_prefix && rank.dim() == 0) {  // one slot: a GEMV for dA's row, one for dB's column
    const Tensor slot = (rank.reshape({1}).to(at::kLong) - 1).clamp_(0, r_max - 1);
    const Tensor p = v.index_select(1, slot).to(acc).mul_(d.inv_b).to(dtype);  // (M, 1), NaN if invalid
    const Tensor q = u.index_select(1, slot).mul(d.inv_b).to(dtype);
    dA = at::zeros_like(lora_A, at::MemoryFormat::Contiguous)
             .index_copy_(0, slot, scaled_mm(p.t(), x_lr, alpha, std::nullopt).to(lora_A.scalar_type()));
    dB = at::zeros_like(lora_B, at::MemoryFormat::Contiguous)
             .index_copy_(1, slot, scaled_mm(grad.t(), q, alpha, std::nullopt).to(lora_B.scalar_type()));
    return {dx, dA, dB};
  }
  // 1/b_m multiplies after the select: a row with an invalid rank (NaN) poisons the sums it enters.
  const Tensor trained =
      frozen_prefix ? slot_constants(r_max, x.device(), acc).slots.eq(rank.reshape({-1, 1}) - 1) : d.used;
  const Tensor p = at::where(trained, v, 0).to(acc).mul_(d.inv_b).to(dtype);
  const Tensor q = at::where(trained, u, 0).mul_(d.inv_b).to(dtype);
  dA = scaled_mm(p.t(), x_lr, alpha, std::nullopt).to(lora_A.scalar_type());
  dB = scaled_mm(grad.t(), q, alpha, std::nullopt).to(lora_B.scalar_type());
  return {dx, dA, dB};
}

// ---------------------------------------------------------------------------------------------
// The kernels of dylora::forward / dylora::backward for CPU tensors (and, from Python, for the
// cuBLAS composition on CUDA tensors): host-rank path when the rank is a CPU tensor.
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> forward_aten(const Tensor& x, const optional<Tensor>& weight,
                                        const optional<Tensor>& bias, const optional<Tensor>& base,
                                        const Tensor& lora_A, const Tensor& lora_B,
                                        const Tensor& rank, double alpha, bool need_u, double dropout_p,
                                        const optional<Tensor>& dropout_seed) {
  const dropout::Args drop{dropout_p, dropout_seed};
  if (rank.is_cpu()) return forward_host_rank(x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, drop);
  return lean_on(x) ? forward_lean(x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, drop)
                    : forward_device_rank(x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, drop);
}

std::tuple<Tensor, Tensor, Tensor> backward_aten(const Tensor& grad, const Tensor& x,
                                                 const optional<Tensor>& weight,
                                                 const Tensor& lora_A, const Tensor& lora_B,
                                                 const Tensor& u, const Tensor& rank, double alpha,
                                                 bool frozen_prefix, bool compute_dx,
                                                 bool compute_lora, double dropout_p,
                                                 const optional<Tensor>& dropout_seed) {
  const dropout::Args drop{dropout_p, dropout_seed};
  if (rank.is_cpu()) {
    return backward_host_rank(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx,
                              compute_lora, drop);
  }
  return lean_on(x) ? backward_lean(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx,
                                    compute_lora, drop)
                    : backward_device_rank(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix,
                                           compute_dx, compute_lora, drop);
}

namespace {

// Backends other than the C++ one on CPU tensors are Triton kernels under TRITON_INTERPRET=1 (how
// CI tests them): those go to the CUDA kernel, which is Python and accepts CPU tensors there.
bool is_python_backend(c10::string_view backend) { return backend != "cpp" && backend != "auto"; }

std::tuple<Tensor, Tensor> forward_cpu(const Tensor& x, const optional<Tensor>& weight,
                                       const optional<Tensor>& bias, const optional<Tensor>& base,
                                       const Tensor& lora_A, const Tensor& lora_B,
                                       const Tensor& rank, double alpha, bool need_u,
                                       c10::string_view backend, double dropout_p,
                                       const optional<Tensor>& dropout_seed) {
  if (is_python_backend(backend)) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dylora::forward", "")
                         .typed<decltype(forward_cpu)>();
    return op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CUDA), x, weight, bias, base, lora_A,
                         lora_B, rank, alpha, need_u, backend, dropout_p, dropout_seed);
  }
  return forward_aten(x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, dropout_p, dropout_seed);
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& grad, const Tensor& x,
                                                const optional<Tensor>& weight,
                                                const Tensor& lora_A, const Tensor& lora_B,
                                                const Tensor& u, const Tensor& rank, double alpha,
                                                bool frozen_prefix, bool compute_dx,
                                                bool compute_lora, c10::string_view backend, double dropout_p,
                                                const optional<Tensor>& dropout_seed) {
  if (is_python_backend(backend)) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dylora::backward", "")
                         .typed<decltype(backward_cpu)>();
    return op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CUDA), grad, x, weight, lora_A,
                         lora_B, u, rank, alpha, frozen_prefix, compute_dx, compute_lora, backend, dropout_p,
                         dropout_seed);
  }
  return backward_aten(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx,
                       compute_lora, dropout_p, dropout_seed);
}

// ---------------------------------------------------------------------------------------------
// dylora::linear: reshape, autograd, autocast
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> call_forward(const Tensor& x, const optional<Tensor>& weight,
                                        const optional<Tensor>& bias, const optional<Tensor>& base,
                                        const Tensor& lora_A, const Tensor& lora_B,
                                        const Tensor& rank, double alpha, bool need_u,
                                        c10::string_view backend, double dropout_p,
                                        const optional<Tensor>& dropout_seed) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dylora::forward", "")
                       .typed<decltype(forward_cpu)>();
  return op.call(x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, backend, dropout_p, dropout_seed);
}

std::tuple<Tensor, Tensor, Tensor> call_backward(const Tensor& grad, const Tensor& x,
                                                 const optional<Tensor>& weight,
                                                 const Tensor& lora_A, const Tensor& lora_B,
                                                 const Tensor& u, const Tensor& rank, double alpha,
                                                 bool frozen_prefix, bool compute_dx,
                                                 bool compute_lora, c10::string_view backend, double dropout_p,
                                                 const optional<Tensor>& dropout_seed) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dylora::backward", "")
                       .typed<decltype(backward_cpu)>();
  return op.call(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx,
                 compute_lora, backend, dropout_p, dropout_seed);
}

// (..., K) -> (M, K) and (..., N) -> (M, N): views whenever the layout allows (K = 0 included).
Tensor rows(const Tensor& t) {
  if (t.dim() == 2) return t;
  return t.dim() == 1 ? t.unsqueeze(0) : t.flatten(0, -2);
}

optional<Tensor> rows(const optional<Tensor>& t) {
  return t.has_value() ? optional<Tensor>(rows(*t)) : std::nullopt;
}

std::vector<int64_t> out_shape(const Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

int64_t out_features(const optional<Tensor>& weight, const Tensor& lora_B) {
  return weight.has_value() ? weight->size(0) : lora_B.size(0);
}

// No autograd (inference mode, or nothing requires grad): the forward without u.
Tensor linear_no_grad(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                      const optional<Tensor>& base, const Tensor& lora_A, const Tensor& lora_B,
                      const Tensor& rank, double alpha, bool frozen_prefix,
                      c10::string_view backend, double dropout_p, const optional<Tensor>& dropout_seed) {
  const Tensor y = std::get<0>(call_forward(rows(x), weight, bias, rows(base), lora_A, lora_B, rank,
                                            alpha, /*need_u=*/false, backend, dropout_p, dropout_seed));
  return x.dim() == 2 ? y : at::_unsafe_view(y, out_shape(x, out_features(weight, lora_B)));
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const optional<Tensor>& weight,
                        const optional<Tensor>& bias, const optional<Tensor>& base,
                        const Tensor& lora_A, const Tensor& lora_B, const Tensor& rank,
                        double alpha, bool frozen_prefix, const std::string& backend, double dropout_p,
                        const optional<Tensor>& dropout_seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Tensor x2 = rows(x);
    auto [y, u] = call_forward(x2, weight, bias, rows(base), lora_A, lora_B, rank, alpha,
                               /*need_u=*/true, backend, dropout_p, dropout_seed);
    // The rank is copied (a few integers): setting a new rank before backward() is harmless. The dropout seed
    // is kept, not the mask: the backward regenerates it.
    ctx->save_for_backward({x2, weight.value_or(Tensor()), lora_A, lora_B, u, rank.clone(),
                            dropout_seed.value_or(Tensor())});
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["frozen_prefix"] = frozen_prefix;
    ctx->saved_data["backend"] = backend;
    ctx->saved_data["x_shape"] = x.sizes();
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["has_base"] = base.has_value();
    // _unsafe_view: the (..., N) result is not a view of an intermediate (as at::matmul returns it).
    return x.dim() == 2 ? y : at::_unsafe_view(y, out_shape(x, y.size(1)));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &lora_A = saved[2], &lora_B = saved[3];
    const Tensor &u = saved[4], &rank = saved[5], &seed = saved[6];
    const Tensor g = rows(grad_outputs[0]);
    const bool has_weight = weight.defined();
    const auto [need_x, need_w, need_bias, need_base, need_A, need_B] = input_grads(ctx, has_weight);
    Tensor dx, dW, dbias, dbase, dA, dB;
    if (need_x || need_A || need_B) {
      std::tie(dx, dA, dB) = call_backward(
          g, x, has_weight ? optional<Tensor>(weight) : std::nullopt, lora_A, lora_B, u, rank,
          ctx->saved_data["alpha"].toDouble(), ctx->saved_data["frozen_prefix"].toBool(), need_x,
          need_A || need_B, ctx->saved_data["backend"].toStringRef(), ctx->saved_data["dropout_p"].toDouble(),
          seed.defined() ? optional<Tensor>(seed) : std::nullopt);
      if (need_x) dx = dx.view(ctx->saved_data["x_shape"].toIntVector());
    }
    // The base layer is normally frozen; when it is not, its gradients are plain GEMMs.
    if (need_w) dW = at::mm(gemm_operand(g.t()), gemm_operand(x));
    if (need_bias) dbias = g.sum(0);
    if (need_base) dbase = grad_outputs[0];  // base enters y with coefficient 1
    return {need_x ? dx : Tensor(), dW, dbias, dbase, need_A ? dA : Tensor(), need_B ? dB : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor linear_autograd(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                       const optional<Tensor>& base, const Tensor& lora_A, const Tensor& lora_B,
                       const Tensor& rank, double alpha, bool frozen_prefix,
                       c10::string_view backend, double dropout_p, const optional<Tensor>& dropout_seed) {
  if (!needs_grad(x, weight, bias, base, lora_A, lora_B)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_no_grad(x, weight, bias, base, lora_A, lora_B, rank, alpha, frozen_prefix, backend, dropout_p,
                          dropout_seed);
  }
  return LinearFunction::apply(x, weight, bias, base, lora_A, lora_B, rank, alpha, frozen_prefix,
                               std::string(backend), dropout_p, dropout_seed);
}

// Under torch.autocast the op computes like the plain-PyTorch peer (F.linear + two matmuls): every
// floating input cast to the autocast dtype (float64 stays, as autocast leaves it).
template <c10::DeviceType device_type>
Tensor linear_autocast(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                       const optional<Tensor>& base, const Tensor& lora_A, const Tensor& lora_B,
                       const Tensor& rank, double alpha, bool frozen_prefix,
                       c10::string_view backend, double dropout_p, const optional<Tensor>& dropout_seed) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  const auto dtype = at::autocast::get_autocast_dtype(device_type);
  const auto cast = [&](const Tensor& t) { return at::autocast::cached_cast(dtype, t, device_type); };
  const auto cast_opt = [&](const optional<Tensor>& t) {
    return t.has_value() ? optional<Tensor>(cast(*t)) : std::nullopt;
  };
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dylora::linear", "")
                       .typed<decltype(linear_no_grad)>();
  return op.call(cast(x), cast_opt(weight), cast_opt(bias), cast_opt(base), cast(lora_A),
                 cast(lora_B), rank, alpha, frozen_prefix, backend, dropout_p, dropout_seed);
}

}  // namespace

TORCH_LIBRARY(dylora, m) {
  m.set_python_module("dylora_kernels.ops");  // the fake (meta) implementations live there
  // dropout_p, dropout_seed: adapter dropout (PEFT's lora_dropout), the mask regenerated from the seed (dropout.h).
  m.def("linear(Tensor x, Tensor? weight, Tensor? bias, Tensor? base, Tensor lora_A, Tensor lora_B, "
        "Tensor rank, float alpha, bool frozen_prefix, str backend, float dropout_p=0., "
        "Tensor? dropout_seed=None) -> Tensor");
  m.def("forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? base, Tensor lora_A, Tensor lora_B, "
        "Tensor rank, float alpha, bool need_u, str backend, float dropout_p=0., "
        "Tensor? dropout_seed=None) -> (Tensor, Tensor)");
  m.def("backward(Tensor grad, Tensor x, Tensor? weight, Tensor lora_A, Tensor lora_B, Tensor u, "
        "Tensor rank, float alpha, bool frozen_prefix, bool compute_dx, bool compute_lora, "
        "str backend, float dropout_p=0., Tensor? dropout_seed=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dylora, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}

TORCH_LIBRARY_IMPL(dylora, CompositeExplicitAutograd, m) { m.impl("linear", &linear_no_grad); }
TORCH_LIBRARY_IMPL(dylora, Autograd, m) { m.impl("linear", &linear_autograd); }
TORCH_LIBRARY_IMPL(dylora, AutocastCPU, m) { m.impl("linear", &linear_autocast<c10::DeviceType::CPU>); }
TORCH_LIBRARY_IMPL(dylora, AutocastCUDA, m) {
  m.impl("linear", &linear_autocast<c10::DeviceType::CUDA>);
}

}  // namespace dylora

namespace dylora {
void add_conv_functions(pybind11::module_& m);  // csrc/conv.cpp
namespace executor {
void register_bindings(pybind11::module& m);  // csrc/plan.cpp
}
}  // namespace dylora

// The ATen composition as plain functions, for the Python CUDA router (the "cublas" backend) and for
// tests that run the device-rank path on CPU tensors.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dylora C++ kernels; call them through torch.ops.dylora (see dylora_kernels/ops.py)";
  // The forward functions take (x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u[, dropout_p,
  // dropout_seed]); the backward ones (grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx,
  // compute_lora[, dropout_p, dropout_seed]).
  using namespace pybind11::literals;
  using dylora::dropout::Args;
  using OptTensor = std::optional<at::Tensor>;
  const auto fwd_args = [](auto fn) {
    return [fn](const at::Tensor& x, const OptTensor& w, const OptTensor& bias, const OptTensor& base,
                const at::Tensor& A, const at::Tensor& B, const at::Tensor& rank, double alpha, bool need_u,
                double p, const OptTensor& seed) { return fn(x, w, bias, base, A, B, rank, alpha, need_u, Args{p, seed}); };
  };
  const auto bwd_args = [](auto fn) {
    return [fn](const at::Tensor& g, const at::Tensor& x, const OptTensor& w, const at::Tensor& A, const at::Tensor& B,
                const at::Tensor& u, const at::Tensor& rank, double alpha, bool frozen, bool dx, bool lora, double p,
                const OptTensor& seed) { return fn(g, x, w, A, B, u, rank, alpha, frozen, dx, lora, Args{p, seed}); };
  };
#define DYLORA_FWD_ARGS "x"_a, "weight"_a, "bias"_a, "base"_a, "lora_A"_a, "lora_B"_a, "rank"_a, "alpha"_a, \
    "need_u"_a, "dropout_p"_a = 0.0, "dropout_seed"_a = pybind11::none()
#define DYLORA_BWD_ARGS "grad"_a, "x"_a, "weight"_a, "lora_A"_a, "lora_B"_a, "u"_a, "rank"_a, "alpha"_a, \
    "frozen_prefix"_a, "compute_dx"_a, "compute_lora"_a, "dropout_p"_a = 0.0, "dropout_seed"_a = pybind11::none()
  m.def("forward", &dylora::forward_aten, "(y, u) through ATen: host-rank or device-rank path", DYLORA_FWD_ARGS);
  m.def("backward", &dylora::backward_aten, "(dx, dA, dB) through ATen", DYLORA_BWD_ARGS);
  m.def("forward_device_rank", fwd_args(&dylora::forward_device_rank), "the device-rank path (tests)",
        DYLORA_FWD_ARGS);
  m.def("backward_device_rank", bwd_args(&dylora::backward_device_rank), "the device-rank path (tests)",
        DYLORA_BWD_ARGS);
  m.def("forward_lean", fwd_args(&dylora::forward_lean),
        "the lean composition: device-rank path of the GPU build (tests)", DYLORA_FWD_ARGS);
  m.def("backward_lean", bwd_args(&dylora::backward_lean), "the lean composition (tests)", DYLORA_BWD_ARGS);
  m.def("dropout_keep", &dylora::dropout::select_kept,
        "t (M, K) with the elements adapter dropout drops zeroed (the mask of dropout.h; tests)", "t"_a, "seed"_a,
        "p"_a);
#undef DYLORA_FWD_ARGS
#undef DYLORA_BWD_ARGS
  dylora::executor::register_bindings(m);
  dylora::add_conv_functions(m);
  dylora::triton_launch::register_bindings(m);
}
