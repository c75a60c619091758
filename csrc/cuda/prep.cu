// The prep pass of the lean composition (csrc/prep.h) on CUDA tensors: one launch. Blocks below `row_blocks`
// write the per-row operands (M × R elements, rules from prep.h); the others zero the adapter's slots at or beyond
// the largest valid rank (each first finds it: a block-wide max over the per-row ranks, no host read).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <type_traits>

#include "prep.h"

namespace dylora::prep {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int64_t kRowChunk = kThreads * 4;       // per-row elements per block
constexpr int64_t kAdapterChunk = kThreads * 16;  // adapter elements per block (each block reads every rank once)

template <typename out_t, typename acc_t>
__device__ __forceinline__ out_t to_out(acc_t value) {
  if constexpr (std::is_same_v<out_t, float> || std::is_same_v<out_t, double>) {
    return static_cast<out_t>(value);
  } else {
    return out_t(static_cast<float>(value));
  }
}

// The largest valid rank (0 if none): one rank for a shared rank, else a block-wide max over `count` ranks.
__device__ int64_t kept_width(const int64_t* rank, bool per_row, int64_t count, int64_t r_max) {
  if (!per_row) return valid_rank(rank[0], r_max) ? rank[0] : 0;
  __shared__ int64_t partial[kThreads];
  int64_t best = 0;
  for (int64_t m = threadIdx.x; m < count; m += blockDim.x) {
    if (valid_rank(rank[m], r_max) && rank[m] > best) best = rank[m];
  }
  partial[threadIdx.x] = best;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s && partial[threadIdx.x + s] > partial[threadIdx.x]) partial[threadIdx.x] = partial[threadIdx.x + s];
    __syncthreads();
  }
  return partial[0];
}

// out[i] = adapter element i (rows × cols, strided) where its slot is below `width`, else 0. slot_dim: 1 for B (N, R),
// 0 for A (R, K).
template <typename out_t>
__device__ void keep_slots(const out_t* adapter, int64_t rows, int64_t cols, int64_t stride_0, int64_t stride_1,
                           int slot_dim, int64_t width, out_t* out, int64_t block) {
  const int64_t end = min((block + 1) * kAdapterChunk, rows * cols);
  for (int64_t i = block * kAdapterChunk + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    const int64_t slot = slot_dim == 1 ? c : r;
    out[i] = slot < width ? adapter[r * stride_0 + c * stride_1] : to_out<out_t>(0.0f);
  }
}

template <typename acc_t, typename out_t>
__global__ void forward_kernel(const acc_t* raw, int64_t M, int64_t R, const int64_t* rank, bool per_row, acc_t* u,
                               out_t* p, const out_t* B, int64_t N, int64_t stride_bn, int64_t stride_br, out_t* z,
                               int64_t row_blocks) {
  if (blockIdx.x < row_blocks) {
    const int64_t end = min((blockIdx.x + 1) * kRowChunk, M * R);
    for (int64_t i = blockIdx.x * kRowChunk + threadIdx.x; i < end; i += blockDim.x) {
      const int64_t m = i / R, j = i % R;
      const int64_t b = rank[per_row ? m : 0];
      const acc_t value = raw[i];
      if (u != nullptr) u[i] = used_slot(value, j, b);
      p[i] = to_out<out_t>(scaled_slot(value, j, b, R, false));
    }
    return;
  }
  const int64_t width = kept_width(rank, per_row, M, R);
  keep_slots(B, N, R, stride_bn, stride_br, 1, width, z, blockIdx.x - row_blocks);
}

template <typename acc_t, typename out_t>
__global__ void backward_kernel(const acc_t* v, const acc_t* u, int64_t M, int64_t R, const int64_t* rank,
                                bool per_row, bool frozen_prefix, out_t* p_dx, out_t* p_a, out_t* q_b, const out_t* A,
                                int64_t K, int64_t stride_ar, int64_t stride_ak, out_t* a, int64_t row_blocks) {
  if (blockIdx.x < row_blocks) {
    const int64_t end = min((blockIdx.x + 1) * kRowChunk, M * R);
    for (int64_t i = blockIdx.x * kRowChunk + threadIdx.x; i < end; i += blockDim.x) {
      const int64_t m = i / R, j = i % R;
      const int64_t b = rank[per_row ? m : 0];
      if (p_dx != nullptr) p_dx[i] = to_out<out_t>(scaled_slot(v[i], j, b, R, false));
      if (p_a != nullptr) {
        p_a[i] = to_out<out_t>(scaled_slot(v[i], j, b, R, frozen_prefix));
        q_b[i] = to_out<out_t>(scaled_slot(u[i], j, b, R, frozen_prefix));
      }
    }
    return;
  }
  const int64_t width = kept_width(rank, per_row, M, R);
  keep_slots(A, R, K, stride_ar, stride_ak, 0, width, a, blockIdx.x - row_blocks);
}

int64_t blocks(int64_t elements, int64_t chunk) { return (elements + chunk - 1) / chunk; }

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

ForwardPrep forward_cuda(const Tensor& raw, const Tensor& rank, const Tensor& lora_B, at::ScalarType dtype,
                         bool need_u) {
  const int64_t M = raw.size(0), R = raw.size(1), N = lora_B.size(0);
  const Tensor B = lora_B.to(dtype);
  ForwardPrep out;
  if (need_u) out.u = at::empty_like(raw);
  out.p = at::empty({M, R}, raw.options().dtype(dtype));
  out.z = at::empty({N, R}, raw.options().dtype(dtype));
  const int64_t row_blocks = blocks(M * R, kRowChunk), total = row_blocks + blocks(N * R, kAdapterChunk);
  if (total == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "dylora_prep_forward_acc", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dylora_prep_forward", [&] {
      forward_kernel<acc_t, scalar_t><<<total, kThreads, 0, stream>>>(
          raw.data_ptr<acc_t>(), M, R, rank.data_ptr<int64_t>(), rank.dim() == 1, ptr_or_null<acc_t>(out.u),
          out.p.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(), N, B.stride(0), B.stride(1),
          out.z.data_ptr<scalar_t>(), row_blocks);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

BackwardPrep backward_cuda(const Tensor& v, const Tensor& u, const Tensor& rank, const Tensor& lora_A,
                           at::ScalarType dtype, bool frozen_prefix, bool compute_dx, bool compute_lora) {
  const int64_t M = v.size(0), R = v.size(1), K = lora_A.size(1);
  BackwardPrep out;
  Tensor A;
  if (compute_dx) {
    A = lora_A.to(dtype);
    out.p_dx = at::empty({M, R}, v.options().dtype(dtype));
    out.a = at::empty({R, K}, v.options().dtype(dtype));
  }
  if (compute_lora) {
    out.p_a = at::empty({M, R}, v.options().dtype(dtype));
    out.q_b = at::empty({M, R}, v.options().dtype(dtype));
  }
  const int64_t row_blocks = blocks(M * R, kRowChunk);
  const int64_t total = row_blocks + (compute_dx ? blocks(R * K, kAdapterChunk) : 0);
  if (total == 0 || !(compute_dx || compute_lora)) return out;
  const Tensor u_c = compute_lora ? u.contiguous() : u;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "dylora_prep_backward_acc", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dylora_prep_backward", [&] {
      backward_kernel<acc_t, scalar_t><<<total, kThreads, 0, stream>>>(
          v.data_ptr<acc_t>(), compute_lora ? u_c.data_ptr<acc_t>() : nullptr, M, R, rank.data_ptr<int64_t>(),
          rank.dim() == 1, frozen_prefix, ptr_or_null<scalar_t>(out.p_dx), ptr_or_null<scalar_t>(out.p_a),
          ptr_or_null<scalar_t>(out.q_b), compute_dx ? A.data_ptr<scalar_t>() : nullptr, K,
          compute_dx ? A.stride(0) : 0, compute_dx ? A.stride(1) : 0, ptr_or_null<scalar_t>(out.a), row_blocks);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace dylora::prep
