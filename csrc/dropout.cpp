// Adapter dropout's mask on CPU tensors (dropout.h); CUDA tensors go to csrc/cuda/dropout.cu.
#include "dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace dylora::dropout {

at::Tensor select_kept(const at::Tensor& t, const at::Tensor& seed, double p) {
  TORCH_CHECK(t.dim() == 2, "dylora dropout: expected a 2-D tensor, got ", t.dim(), "-D");
  TORCH_CHECK(seed.dim() == 0 && !at::isFloatingType(seed.scalar_type()),
              "dylora dropout: the seed must be a 0-d integer tensor");
#ifdef WITH_CUDA
  if (t.is_cuda()) return select_kept_cuda(t, seed, p);
#endif
  TORCH_CHECK(t.is_cpu(), "dylora dropout: no kernel for ", t.device().type(), " tensors");
  const uint64_t key = static_cast<uint64_t>(seed.to(at::kLong).item<int64_t>());
  const uint64_t limit = threshold(p);
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t M = t.size(0), K = t.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "dylora_dropout", [&] {
    const auto in = t.accessor<scalar_t, 2>();
    scalar_t* res = out.data_ptr<scalar_t>();
    // Rows in parallel; within a row one Philox call serves 4 consecutive elements.
    at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        uint64_t e = static_cast<uint64_t>(m) * static_cast<uint64_t>(K);
        uint64_t counter = e >> 2;
        Draws draws = philox4x32_10(counter, key);
        for (int64_t k = 0; k < K; ++k, ++e) {
          if ((e >> 2) != counter) {
            counter = e >> 2;
            draws = philox4x32_10(counter, key);
          }
          res[m * K + k] = draws.r[e & 3] >= limit ? in[m][k] : scalar_t(0);
        }
      }
    });
  });
  return out;
}

}  // namespace dylora::dropout
