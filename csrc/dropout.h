// Adapter dropout's mask, one definition for the C++ kernels (CPU loop, CUDA kernel): the rule of
// dylora_kernels/reference.py (``dropout_keep``), bit for bit what triton's tl.randint4x computes.
//
//   element (m, k) of t (M, K), e = m·K + k;  (r0, r1, r2, r3) = Philox4x32-10(counter e >> 2, key seed)
//   keep = r_{e mod 4} >= floor(p · 2³²)
//
// The kernels apply the 0/1 mask (a select: x is kept exactly, in any dtype) and fold 1/(1 − p) into α. The mask is
// never stored: the backward regenerates it from the same seed.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#if defined(__CUDACC__)
#define DYLORA_DROPOUT_HD __host__ __device__
#else
#define DYLORA_DROPOUT_HD
#endif

namespace dylora::dropout {

struct Draws {
  uint32_t r[4];
};

// Philox4x32-10 (Salmon et al., SC'11) of counter (lo, hi, 0, 0) under key (seed mod 2³², seed >> 32).
DYLORA_DROPOUT_HD inline Draws philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = uint64_t{0xCD9E8D57u} * c2, pa = uint64_t{0xD2511F53u} * c0;
    c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// An element is kept when its draw is at least this (keep probability 1 − p within 2⁻³²); p in [0, 1).
DYLORA_DROPOUT_HD inline uint64_t threshold(double p) { return static_cast<uint64_t>(p * 4294967296.0); }

// t (M, K) with the dropped elements set to exactly 0 (a new contiguous tensor in t's dtype); t unchanged in value
// where kept. seed: a 0-d integer tensor on the host or on t's device (read there: no sync).
at::Tensor select_kept(const at::Tensor& t, const at::Tensor& seed, double p);

#ifdef WITH_CUDA
at::Tensor select_kept_cuda(const at::Tensor& t, const at::Tensor& seed, double p);  // csrc/cuda/dropout.cu
#endif

// What the ops' kernels get: p and the seed (present iff p > 0).
struct Args {
  double p = 0.0;
  std::optional<at::Tensor> seed;
  bool on() const { return p > 0.0; }
  // α with the dropout's 1/(1 − p) folded in (the kernels then apply the 0/1 mask only).
  double alpha(double alpha) const { return on() ? alpha / (1.0 - p) : alpha; }
  // t with the dropped elements zeroed (t itself without dropout).
  at::Tensor kept(const at::Tensor& t) const { return on() ? select_kept(t, *seed, p) : t; }
};

}  // namespace dylora::dropout
