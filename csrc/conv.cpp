// The dylora convolution ops (Conv1d/2d/3d with groups = 1): schemas, the ATen kernels, autograd, autocast.
//
//   dylora::conv           y = conv(x, W) + bias + base + (α/b_n)·conv1x1(conv(x, A[:b_n]), B[:, :b_n])
//                          x (N, C_in, *spatial), W (C_out, C_in, *k), A (r_max, C_in, *k), B (C_out, r_max);
//                          the op users call (dylora_kernels/conv.py validates); its autograd saves u and calls:
//   dylora::conv_forward   (y, u); u = conv(x, A[:b_n]) (N, r_max, *out) in x's dtype, exactly zero beyond b_n
//   dylora::conv_backward  (dx, dA, dB); frozen-prefix mode trains slot b_n − 1 only
//
// The rank is 0-d (every sample) or 1-D with one rank b_n per sample (batch element). W, bias and base
// are optional (no W: the low-rank term alone, added to base). The kernels are ATen convolutions
// (oneDNN on the CPU, cuDNN on CUDA) on views of A and B: nothing is copied but the cast of the
// adapters to x's dtype when they differ (a few KB). Registered for CPU and CUDA: the code is device
// generic. Rank handling follows csrc/dylora.cpp:
//   a single rank in a CPU tensor (host value)   slices A[:b], B[:, :b]; α/b folded into B's slice
//   per-sample ranks in a CPU tensor             the first max_n b_n slots, per-sample masks (`where`)
//   a rank tensor on the device                  r_max slots, masks and α/b_n computed on the device:
//                                                no host read, no sync; a rank out of range gives NaN
// Masks select (`where`) rather than multiply and slots no sample uses are zeroed in A and B, so
// NaN/Inf in unused slots never reach an output.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "dylora.h"

namespace dylora {
namespace {

using at::IntArrayRef;
using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// stride, padding, dilation of the base convolution (the adapter's A conv uses the same; B is 1×1).
struct Geometry {
  std::vector<int64_t> stride, padding, dilation;
  int64_t dims() const { return static_cast<int64_t>(stride.size()); }
};

Geometry unit_geometry(int64_t dims) {
  return {std::vector<int64_t>(dims, 1), std::vector<int64_t>(dims, 0), std::vector<int64_t>(dims, 1)};
}

Tensor conv(const Tensor& x, const Tensor& w, const optional<Tensor>& bias, const Geometry& geo) {
  return at::convolution(x, w, bias, geo.stride, geo.padding, geo.dilation, /*transposed=*/false,
                         std::vector<int64_t>(geo.dims(), 0), /*groups=*/1);
}

// The gradient of conv(x, w) with respect to x (which = 0) or to w (which = 1), for the given g.
Tensor conv_grad(const Tensor& g, const Tensor& x, const Tensor& w, const Geometry& geo, int which) {
  auto grads = at::convolution_backward(g, x, w, std::nullopt, geo.stride, geo.padding, geo.dilation,
                                        /*transposed=*/false, std::vector<int64_t>(geo.dims(), 0), 1,
                                        {which == 0, which == 1, false});
  return which == 0 ? std::get<0>(grads) : std::get<1>(grads);
}

// (C_out, width) columns of B as the weight of a 1×1 convolution (C_out, width, 1, ...): a view.
Tensor as_1x1(Tensor t, int64_t dims) {
  for (int64_t i = 0; i < dims; ++i) t = t.unsqueeze(-1);
  return t;
}

// A (n, c) per-sample tensor (mask or scale) shaped to broadcast over (n, c, *spatial).
Tensor per_channel(const Tensor& t, int64_t dims) { return as_1x1(t, dims); }

// ---------------------------------------------------------------------------------------------
// What the rank decides
// ---------------------------------------------------------------------------------------------
// single: one host rank b (slices, scale = α/b a number). Otherwise the masked path over `width` slots:
// used[n, j] = j < b_n, scale[n] = α/b_n (NaN for a device rank out of range), and, for a device rank,
// kept[j] = j < max_n b_n (the slots some sample uses; the others are zeroed in A and B).
struct Ranks {
  bool single = false;
  int64_t b = 0;       // single
  int64_t width = 0;   // slots read
  Tensor used, scale;  // (N or 1, width) bool, (N or 1, 1) in x's dtype's accumulator
  optional<Tensor> kept;
  Tensor slots;        // (1, width) int64: 0 .. width − 1
};

at::ScalarType accumulator(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

Ranks read_ranks(const Tensor& rank, int64_t r_max, double alpha, const Tensor& x, bool device_path) {
  Ranks r;
  const auto acc = accumulator(x);
  const Tensor b = rank.reshape({-1, 1}).to(at::kLong);
  if (!device_path) {  // a host value: read and checked here
    int64_t lo = 1, hi = 1;
    if (b.numel()) {
      auto [mn, mx] = at::aminmax(b);
      lo = mn.item<int64_t>();
      hi = mx.item<int64_t>();
    }
    TORCH_CHECK_VALUE(lo >= 1 && hi <= r_max, "rank values must be in [1, r_max] = [1, ", r_max, "], got min ",
                      lo, ", max ", hi);
    if (rank.dim() == 0) {
      r.single = true;
      r.b = r.width = lo;
      return r;
    }
    r.width = hi;
    r.slots = at::arange(r.width, b.options()).unsqueeze(0);
    r.used = r.slots.lt(b);
    r.scale = b.to(acc).reciprocal().mul_(alpha);
    if (x.device() != rank.device()) {  // not reached through the Python API (a 1-D rank is on x's device)
      r.used = r.used.to(x.device());
      r.scale = r.scale.to(x.device());
    }
    return r;
  }
  r.width = r_max;  // on the device: every slot, masks computed there
  r.slots = at::arange(r_max, b.options()).unsqueeze(0);
  r.used = r.slots.lt(b);
  const Tensor valid = b.ge(1).logical_and_(b.le(r_max));
  r.scale = at::where(valid, b.to(acc).reciprocal().mul_(alpha), std::numeric_limits<double>::quiet_NaN());
  r.kept = rank.dim() == 0 ? r.used : (b.numel() ? r.slots.lt(b.amax()) : r.slots.lt(0));
  return r;
}

// The slots whose gradient a sample feeds: those it uses (full mode) or slot b_n − 1 (frozen prefix).
Tensor trained(const Ranks& r, const Tensor& rank, bool frozen_prefix) {
  if (!frozen_prefix) return r.used;
  return r.slots.eq(rank.reshape({-1, 1}).to(at::kLong).to(r.slots.device()) - 1);
}

// where(mask, t, 0) · scale over (N, width, *spatial), in t's dtype (the product in the accumulator).
Tensor select_scaled(const Tensor& t, const Tensor& mask, const Tensor& scale, int64_t dims) {
  const Tensor kept = at::where(per_channel(mask, dims), t, 0);
  if (kept.scalar_type() == scale.scalar_type()) return kept.mul_(per_channel(scale, dims));
  return kept.to(scale.scalar_type()).mul_(per_channel(scale, dims)).to(t.scalar_type());
}

// A[:width] (rows along dim 0) and B[:, :width] (columns along dim 1) in x's dtype, slots no sample
// uses zeroed (device rank).
Tensor adapter_slots(const Tensor& t, int64_t dim, const Ranks& r, at::ScalarType dtype) {
  Tensor s = t.narrow(dim, 0, r.width);
  if (r.kept.has_value()) {
    Tensor keep = dim == 0 ? r.kept->t() : *r.kept;
    for (int64_t i = keep.dim(); i < s.dim(); ++i) keep = keep.unsqueeze(-1);
    s = at::where(keep, s, 0);
  }
  return s.to(dtype);
}

// (conv(x, W) + bias, conv(x, A_s)) in ONE convolution over cat(W, A_s) (C_out + r output channels) when W is
// given, as views of its output: the adapter's few channels ride along the big convolution instead of running
// as a narrow convolution of their own (2-core CPU, 320→320 3×3, 2×320×64×64 fp32, r = 16: a separate conv
// cost 21 % of the base conv's time, riding along 10 %). Without W: (undefined, conv(x, A_s)).
std::pair<Tensor, Tensor> base_and_u(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                                     const Tensor& A_s, const Geometry& geo) {
  if (!weight.has_value()) return {Tensor(), conv(x, A_s, std::nullopt, geo)};
  const int64_t n = weight->size(0), r = A_s.size(0);
  optional<Tensor> bias_r = std::nullopt;
  if (bias.has_value()) bias_r = at::cat({*bias, at::zeros({r}, bias->options())});
  const Tensor out = conv(x, at::cat({*weight, A_s}), bias_r, geo);
  return {out.narrow(1, 0, n), out.narrow(1, n, r)};
}

// dx = conv_gradᵀ(g, W) + conv_gradᵀ(p, A_s) (p = the scaled v), likewise in one transposed convolution over
// the concatenated channels when W is given.
Tensor grad_input(const Tensor& grad, const Tensor& p, const Tensor& x, const optional<Tensor>& weight,
                  const Tensor& A_s, const Geometry& geo) {
  if (!weight.has_value()) return conv_grad(p, x, A_s, geo, 0);
  return conv_grad(at::cat({grad, p}, 1), x, at::cat({*weight, A_s}), geo, 0);
}

// y = y_base + bias + base + low: low is the 1×1 term (already scaled); y_base (conv(x, W) + bias, a view) may be
// undefined (no W: then bias is added here), base optional.
Tensor assemble(const Tensor& y_base, const optional<Tensor>& bias, const optional<Tensor>& base, Tensor low,
                int64_t dims) {
  if (y_base.defined()) {
    Tensor y = at::add(y_base, low);  // a new, contiguous y
    if (base.has_value()) y.add_(*base);
    return y;
  }
  if (bias.has_value()) low.add_(per_channel(bias->unsqueeze(0), dims));
  if (base.has_value()) low.add_(*base);
  return low;
}

// (n·pixels, channels) of a channels-last t (n, channels, *pixels) — a convolution of a channels-last x keeps that
// layout: a view of t (reshape copies only where no view exists), or nullopt when t's channels are not contiguous.
optional<Tensor> pixel_rows(const Tensor& t) {
  const Tensor last = t.movedim(1, -1);  // (n, *pixels, channels)
  if (last.stride(-1) != 1) return std::nullopt;
  return last.reshape({-1, t.size(1)});
}

// y_base + p·B_matᵀ as ONE GEMM over the pixels, for channels-last y_base and p (B_mat (C_out, r) scaled):
// (n·pixels, C_out) = (n·pixels, C_out) + (n·pixels, r)·(r, C_out), written once into a new channels-last y. The
// 1×1 convolution it replaces is the same GEMM, but writes its output for `assemble` to read and add: this saves
// a write and a read of a y-sized tensor. nullopt (the caller convolves) when either is not channels-last.
optional<Tensor> channels_last_expand(const Tensor& y_base, const Tensor& p, const Tensor& B_mat) {
  const auto y_rows = pixel_rows(y_base), p_rows = pixel_rows(p);
  if (!y_rows.has_value() || !p_rows.has_value() || y_base.numel() == 0) return std::nullopt;
  const Tensor y = at::addmm(*y_rows, *p_rows, B_mat.t());  // (n·pixels, C_out), contiguous
  std::vector<int64_t> shape{y_base.size(0)};
  for (int64_t i = 2; i < y_base.dim(); ++i) shape.push_back(y_base.size(i));
  shape.push_back(y_base.size(1));
  return y.view(shape).movedim(-1, 1);
}

// Pads u (N, width, *) with zero channels to (N, r_max, *): the saved u has a shape the rank does not decide
// (and is never a view of the forward's wide output, which would stay alive with it).
Tensor pad_slots(const Tensor& u, int64_t r_max) {
  if (u.size(1) == r_max) return u.contiguous();
  std::vector<int64_t> pad(2 * (u.dim() - 2), 0);
  pad.push_back(0);
  pad.push_back(r_max - u.size(1));
  return at::constant_pad_nd(u, pad);
}

// ---------------------------------------------------------------------------------------------
// The kernels of dylora::conv_forward / dylora::conv_backward (CPU and CUDA)
// ---------------------------------------------------------------------------------------------
// device_path: the rank is read on the device (masks over r_max slots, no host read). The registered
// kernels take it for a rank tensor that is not on the CPU; tests call these functions with it forced
// (dylora_kernels._C.conv_forward / conv_backward) to run that path on CPU tensors.
std::tuple<Tensor, Tensor> conv_forward_path(const Tensor& x, const optional<Tensor>& weight,
                                             const optional<Tensor>& bias, const optional<Tensor>& base,
                                             const Tensor& lora_A, const Tensor& lora_B, const Tensor& rank,
                                             double alpha, IntArrayRef stride, IntArrayRef padding,
                                             IntArrayRef dilation, bool need_u, bool device_path) {
  const Geometry geo{stride.vec(), padding.vec(), dilation.vec()};
  const auto dtype = x.scalar_type();
  const int64_t r_max = lora_A.size(0), dims = geo.dims();
  const Ranks r = read_ranks(rank, r_max, alpha, x, device_path);
  Tensor y_base, u, p, B_mat;
  if (r.single) {  // slices; α/b rides on B's slice (C_out × b elements, it only shrinks them)
    std::tie(y_base, u) = base_and_u(x, weight, bias, lora_A.narrow(0, 0, r.b).to(dtype), geo);
    p = u;
    B_mat = lora_B.narrow(1, 0, r.b).to(accumulator(x)).mul(alpha / r.b).to(dtype);
  } else {
    std::tie(y_base, u) = base_and_u(x, weight, bias, adapter_slots(lora_A, 0, r, dtype), geo);
    u = at::where(per_channel(r.used, dims), u, 0);
    p = select_scaled(u, r.used, r.scale, dims);
    B_mat = adapter_slots(lora_B, 1, r, dtype);
  }
  Tensor y;
  if (auto expanded = y_base.defined() ? channels_last_expand(y_base, p, B_mat) : std::nullopt) {
    y = *expanded;
    if (base.has_value()) y.add_(*base);
  } else {
    y = assemble(y_base, bias, base, conv(p, as_1x1(B_mat, dims), std::nullopt, unit_geometry(dims)), dims);
  }
  return {y, need_u ? pad_slots(u, r_max) : at::empty({0}, x.options())};
}

std::tuple<Tensor, Tensor, Tensor> conv_backward_path(const Tensor& grad, const Tensor& x,
                                                      const optional<Tensor>& weight, const Tensor& lora_A,
                                                      const Tensor& lora_B, const Tensor& u, const Tensor& rank,
                                                      double alpha, IntArrayRef stride, IntArrayRef padding,
                                                      IntArrayRef dilation, bool frozen_prefix, bool compute_dx,
                                                      bool compute_lora, bool device_path) {
  const Geometry geo{stride.vec(), padding.vec(), dilation.vec()};
  const Geometry unit = unit_geometry(geo.dims());
  const auto dtype = x.scalar_type();
  const int64_t r_max = lora_A.size(0), dims = geo.dims();
  const Ranks r = read_ranks(rank, r_max, alpha, x, device_path);
  Tensor dx = at::empty({0}, x.options()), dA = at::empty({0}, lora_A.options()),
         dB = at::empty({0}, lora_B.options());
  if (compute_lora) {
    dA = at::zeros_like(lora_A, at::MemoryFormat::Contiguous);
    dB = at::zeros_like(lora_B, at::MemoryFormat::Contiguous);
  }
  // dB's slots as a 1×1 weight gradient: Σ_{n, pixels} g[n, o] · q[n, j]  →  (C_out, cols)
  const auto dB_of = [&](const Tensor& q) {
    const Tensor w = at::empty({grad.size(1), q.size(1)}, x.options());  // only its shape is read
    return conv_grad(grad, q, as_1x1(w, dims), unit, 1).flatten(1);
  };
  if (r.single) {
    const int64_t b = r.b;
    const double s = alpha / b;
    const Tensor A_b = lora_A.narrow(0, 0, b).to(dtype);
    if (compute_dx) {  // v = s · g · B[:, :b] (a 1×1 conv with Bᵀ); dx = conv_gradᵀ(g, W) + conv_gradᵀ(v, A[:b])
      const Tensor v = conv(grad, as_1x1(lora_B.narrow(1, 0, b).t().mul(s).to(dtype), dims), std::nullopt, unit);
      dx = grad_input(grad, v, x, weight, A_b, geo);
      if (compute_lora && !frozen_prefix) {
        dA.narrow(0, 0, b).copy_(conv_grad(v, x, A_b, geo, 1));
      } else if (compute_lora) {
        dA.narrow(0, b - 1, 1).copy_(conv_grad(v.narrow(1, b - 1, 1), x, A_b.narrow(0, b - 1, 1), geo, 1));
      }
    } else if (compute_lora) {  // only the columns of v the trained rows need
      const int64_t first = frozen_prefix ? b - 1 : 0;
      const Tensor B_t = lora_B.narrow(1, first, b - first).t().mul(s).to(dtype);
      const Tensor v = conv(grad, as_1x1(B_t, dims), std::nullopt, unit);
      dA.narrow(0, first, b - first).copy_(conv_grad(v, x, A_b.narrow(0, first, b - first), geo, 1));
    }
    if (compute_lora) {
      const int64_t first = frozen_prefix ? b - 1 : 0;
      dB.narrow(1, first, b - first).copy_(dB_of(u.narrow(1, first, b - first).mul(s)));
    }
    return {dx, dA, dB};
  }
  const int64_t width = r.width;
  const Tensor B_w = adapter_slots(lora_B, 1, r, dtype);
  // A 0-d rank on the device in frozen-prefix mode trains one slot, picked on the device: only that
  // channel of v (unless dx needs all of v), one channel of dA and one column of dB are computed.
  const bool one_slot = compute_lora && frozen_prefix && rank.dim() == 0;
  Tensor v;
  if (compute_dx || !one_slot) v = conv(grad, as_1x1(B_w.t(), dims), std::nullopt, unit);  // (N, width, *out)
  if (compute_dx) {
    const Tensor A_w = adapter_slots(lora_A, 0, r, dtype);
    dx = grad_input(grad, select_scaled(v, r.used, r.scale, dims), x, weight, A_w, geo);
  }
  if (one_slot) {  // a rank out of range: its scale is NaN, so are these gradients (never garbage)
    const Tensor slot = (rank.reshape({1}).to(at::kLong) - 1).clamp_(0, r_max - 1).to(x.device());
    const Tensor all = at::ones({1, 1}, slot.options().dtype(at::kBool));
    const Tensor v_slot = v.defined() ? v.index_select(1, slot)
                                      : conv(grad, as_1x1(B_w.index_select(1, slot).t(), dims), std::nullopt, unit);
    const Tensor p = select_scaled(v_slot, all, r.scale, dims);
    dA.index_copy_(0, slot, conv_grad(p, x, lora_A.index_select(0, slot).to(dtype), geo, 1).to(dA.scalar_type()));
    dB.index_copy_(1, slot, dB_of(select_scaled(u.index_select(1, slot), all, r.scale, dims)).to(dB.scalar_type()));
    return {dx, dA, dB};
  }
  if (compute_lora) {
    const Tensor mask = trained(r, rank, frozen_prefix);
    const Tensor A_shape = lora_A.narrow(0, 0, width).to(dtype);
    dA.narrow(0, 0, width).copy_(conv_grad(select_scaled(v, mask, r.scale, dims), x, A_shape, geo, 1));
    dB.narrow(1, 0, width).copy_(dB_of(select_scaled(u.narrow(1, 0, width), mask, r.scale, dims)));
  }
  return {dx, dA, dB};
}

std::tuple<Tensor, Tensor> conv_forward(const Tensor& x, const optional<Tensor>& weight,
                                        const optional<Tensor>& bias, const optional<Tensor>& base,
                                        const Tensor& lora_A, const Tensor& lora_B, const Tensor& rank,
                                        double alpha, IntArrayRef stride, IntArrayRef padding,
                                        IntArrayRef dilation, bool need_u) {
  return conv_forward_path(x, weight, bias, base, lora_A, lora_B, rank, alpha, stride, padding, dilation, need_u,
                           !rank.is_cpu());
}

std::tuple<Tensor, Tensor, Tensor> conv_backward(const Tensor& grad, const Tensor& x, const optional<Tensor>& weight,
                                                 const Tensor& lora_A, const Tensor& lora_B, const Tensor& u,
                                                 const Tensor& rank, double alpha, IntArrayRef stride,
                                                 IntArrayRef padding, IntArrayRef dilation, bool frozen_prefix,
                                                 bool compute_dx, bool compute_lora) {
  return conv_backward_path(grad, x, weight, lora_A, lora_B, u, rank, alpha, stride, padding, dilation,
                            frozen_prefix, compute_dx, compute_lora, !rank.is_cpu());
}

// ---------------------------------------------------------------------------------------------
// dylora::conv: autograd, no-grad path, autocast
// ---------------------------------------------------------------------------------------------
using ForwardSig = decltype(conv_forward);
using BackwardSig = decltype(conv_backward);

std::tuple<Tensor, Tensor> call_forward(const Tensor& x, const optional<Tensor>& weight,
                                        const optional<Tensor>& bias, const optional<Tensor>& base,
                                        const Tensor& lora_A, const Tensor& lora_B, const Tensor& rank,
                                        double alpha, IntArrayRef stride, IntArrayRef padding,
                                        IntArrayRef dilation, bool need_u) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dylora::conv_forward", "").typed<ForwardSig>();
  return op.call(x, weight, bias, base, lora_A, lora_B, rank, alpha, stride, padding, dilation, need_u);
}

Tensor conv_no_grad(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                    const optional<Tensor>& base, const Tensor& lora_A, const Tensor& lora_B, const Tensor& rank,
                    double alpha, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                    bool frozen_prefix) {
  return std::get<0>(call_forward(x, weight, bias, base, lora_A, lora_B, rank, alpha, stride, padding, dilation,
                                  /*need_u=*/false));
}

class ConvFunction : public torch::autograd::Function<ConvFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const optional<Tensor>& weight,
                        const optional<Tensor>& bias, const optional<Tensor>& base, const Tensor& lora_A,
                        const Tensor& lora_B, const Tensor& rank, double alpha, std::vector<int64_t> stride,
                        std::vector<int64_t> padding, std::vector<int64_t> dilation, bool frozen_prefix) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, u] = call_forward(x, weight, bias, base, lora_A, lora_B, rank, alpha, stride, padding, dilation,
                               /*need_u=*/true);
    // The rank is copied (a few integers): setting a new rank before backward() is harmless.
    ctx->save_for_backward({x, weight.value_or(Tensor()), lora_A, lora_B, u, rank.clone()});
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["frozen_prefix"] = frozen_prefix;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["has_base"] = base.has_value();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &lora_A = saved[2], &lora_B = saved[3];
    const Tensor &u = saved[4], &rank = saved[5];
    const Tensor& g = grad_outputs[0];
    const Geometry geo{ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
                       ctx->saved_data["dilation"].toIntVector()};
    const bool has_weight = weight.defined();
    const auto [need_x, need_w, need_bias, need_base, need_A, need_B] = input_grads(ctx, has_weight);
    Tensor dx, dW, dbias, dbase, dA, dB;
    if (need_x || need_A || need_B) {
      static auto op =
          c10::Dispatcher::singleton().findSchemaOrThrow("dylora::conv_backward", "").typed<BackwardSig>();
      std::tie(dx, dA, dB) = op.call(g, x, has_weight ? optional<Tensor>(weight) : std::nullopt, lora_A, lora_B, u,
                                     rank, ctx->saved_data["alpha"].toDouble(), geo.stride, geo.padding,
                                     geo.dilation, ctx->saved_data["frozen_prefix"].toBool(), need_x,
                                     need_A || need_B);
    }
    // The base layer is normally frozen; when it is not, its gradients are the convolution's own.
    if (need_w) dW = conv_grad(g, x, weight, geo, 1);
    if (need_bias) {
      std::vector<int64_t> reduce{0};
      for (int64_t i = 2; i < g.dim(); ++i) reduce.push_back(i);
      dbias = g.sum(reduce);
    }
    if (need_base) dbase = g;  // base enters y with coefficient 1
    return {need_x ? dx : Tensor(), dW, dbias, dbase, need_A ? dA : Tensor(), need_B ? dB : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor conv_autograd(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                     const optional<Tensor>& base, const Tensor& lora_A, const Tensor& lora_B, const Tensor& rank,
                     double alpha, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                     bool frozen_prefix) {
  if (!needs_grad(x, weight, bias, base, lora_A, lora_B)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return conv_no_grad(x, weight, bias, base, lora_A, lora_B, rank, alpha, stride, padding, dilation,
                        frozen_prefix);
  }
  return ConvFunction::apply(x, weight, bias, base, lora_A, lora_B, rank, alpha, stride.vec(), padding.vec(),
                             dilation.vec(), frozen_prefix);
}

// Under torch.autocast every floating input is cast to the autocast dtype (float64 stays), as F.conv2d's.
template <c10::DeviceType device_type>
Tensor conv_autocast(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                     const optional<Tensor>& base, const Tensor& lora_A, const Tensor& lora_B, const Tensor& rank,
                     double alpha, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                     bool frozen_prefix) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  const auto dtype = at::autocast::get_autocast_dtype(device_type);
  const auto cast = [&](const Tensor& t) { return at::autocast::cached_cast(dtype, t, device_type); };
  const auto cast_opt = [&](const optional<Tensor>& t) { return t.has_value() ? optional<Tensor>(cast(*t)) : std::nullopt; };
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dylora::conv", "").typed<decltype(conv_no_grad)>();
  return op.call(cast(x), cast_opt(weight), cast_opt(bias), cast_opt(base), cast(lora_A), cast(lora_B), rank, alpha,
                 stride, padding, dilation, frozen_prefix);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dylora, m) {
  m.set_python_module("dylora_kernels.conv");  // the fake (meta) implementations live there
  m.def("conv(Tensor x, Tensor? weight, Tensor? bias, Tensor? base, Tensor lora_A, Tensor lora_B, Tensor rank, "
        "float alpha, int[] stride, int[] padding, int[] dilation, bool frozen_prefix) -> Tensor");
  m.def("conv_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? base, Tensor lora_A, Tensor lora_B, "
        "Tensor rank, float alpha, int[] stride, int[] padding, int[] dilation, bool need_u) -> (Tensor, Tensor)");
  m.def("conv_backward(Tensor grad, Tensor x, Tensor? weight, Tensor lora_A, Tensor lora_B, Tensor u, "
        "Tensor rank, float alpha, int[] stride, int[] padding, int[] dilation, bool frozen_prefix, "
        "bool compute_dx, bool compute_lora) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dylora, CPU, m) {
  m.impl("conv_forward", &conv_forward);
  m.impl("conv_backward", &conv_backward);
}
TORCH_LIBRARY_IMPL(dylora, CUDA, m) {  // the same ATen composition: cuDNN convolutions, device masks
  m.impl("conv_forward", &conv_forward);
  m.impl("conv_backward", &conv_backward);
}
TORCH_LIBRARY_IMPL(dylora, CompositeExplicitAutograd, m) { m.impl("conv", &conv_no_grad); }
TORCH_LIBRARY_IMPL(dylora, Autograd, m) { m.impl("conv", &conv_autograd); }
TORCH_LIBRARY_IMPL(dylora, AutocastCPU, m) { m.impl("conv", &conv_autocast<c10::DeviceType::CPU>); }
TORCH_LIBRARY_IMPL(dylora, AutocastCUDA, m) { m.impl("conv", &conv_autocast<c10::DeviceType::CUDA>); }

// The kernels with the rank path chosen by the caller, for tests (added to dylora.cpp's Python module).
void add_conv_functions(pybind11::module_& m) {
  m.def("conv_forward", &conv_forward_path, "(y, u) of dylora::conv_forward; last argument: device_path");
  m.def("conv_backward", &conv_backward_path, "(dx, dA, dB) of dylora::conv_backward; last argument: device_path");
}

}  // namespace dylora
