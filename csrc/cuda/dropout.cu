// Adapter dropout's mask on CUDA tensors (dropout.h): one thread per Philox call (4 consecutive elements of t).
// The seed is read on the device when it lives there (no sync: a seed drawn on the GPU, CUDA-graph safe).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "dropout.h"

namespace dylora::dropout {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void select_kept_kernel(const scalar_t* in, int64_t stride_m, int64_t stride_k, int64_t M, int64_t K,
                                   const int64_t* seed_ptr, int64_t seed_value, uint64_t limit, scalar_t* out) {
  const uint64_t total = static_cast<uint64_t>(M) * static_cast<uint64_t>(K);
  const uint64_t key = static_cast<uint64_t>(seed_ptr != nullptr ? *seed_ptr : seed_value);
  for (uint64_t counter = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; counter * 4 < total;
       counter += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const Draws draws = philox4x32_10(counter, key);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const uint64_t e = counter * 4 + lane;
      if (e < total) {
        const int64_t m = static_cast<int64_t>(e / K), k = static_cast<int64_t>(e % K);
        out[e] = draws.r[lane] >= limit ? in[m * stride_m + k * stride_k] : scalar_t(0);
      }
    }
  }
}

}  // namespace

at::Tensor select_kept_cuda(const at::Tensor& t, const at::Tensor& seed, double p) {
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t M = t.size(0), K = t.size(1);
  if (out.numel() == 0) return out;
  at::Tensor seed_dev;
  int64_t seed_value = 0;
  if (seed.is_cpu()) {
    seed_value = seed.to(at::kLong).item<int64_t>();
  } else {
    seed_dev = seed.to(at::kLong);
  }
  const uint64_t calls = (static_cast<uint64_t>(M) * static_cast<uint64_t>(K) + 3) / 4;
  const int blocks = static_cast<int>(std::min<uint64_t>((calls + kThreads - 1) / kThreads, 65535));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "dylora_dropout_cuda", [&] {
    select_kept_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1), M, K,
        seed_dev.defined() ? seed_dev.const_data_ptr<int64_t>() : nullptr, seed_value, threshold(p),
        out.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace dylora::dropout
