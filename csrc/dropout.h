// Fused dropout's random streams: DropoutStream (SplitMix64) for the CPU kernels, Philox4x32 for CUDA.
//
// CPU: element e of a layer's output is kept when the top 32 bits of SplitMix64 at position e of the
// stream seeded by `seed` are >= p * 2^32. The seed is drawn from torch's generator once per layer
// and call, so masks are reproducible under torch.manual_seed, and any element can be computed on
// its own: the mask does not depend on thread count or on how rows are split between threads.
#pragma once

#include <cmath>
#include <cstdint>

#include "activations.h"  // PYFASTNN_HOST_DEVICE

namespace pyfastnn {

// Whether a layer's dropout draws a mask: in training, with p > 0 (the fake kernels' mask shapes,
// pyfastnn._ops.dropout_runs, follow the same rule).
inline bool dropout_runs(double p, bool training) { return training && p > 0.0; }

// The factor kept elements are multiplied by, as nn.Dropout's: 1 / (1 - p).
PYFASTNN_HOST_DEVICE double dropout_kept_scale(double p) { return 1.0 / (1.0 - p); }

// Both streams keep an element when its 32-bit draw is >= this threshold: p * 2^32, rounded, so the
// keep probability is 1 - p rounded to a multiple of 2^-32 (torch's CUDA dropout rounds it to 2^-24).
inline uint64_t dropout_threshold(double p) { return static_cast<uint64_t>(std::nearbyint(p * 4294967296.0)); }

// Whether p is a probability the streams draw as asked: in [0, 1) and more than 2^-33 below 1, since
// a keep probability of 2^-33 or less rounds to keeping nothing, while the kept scale 1 / (1 - p)
// would still promise an unchanged mean (check_dropout_probability refuses the rest).
inline bool dropout_drawable(double p) {
  return p >= 0.0 && p < 1.0 && dropout_threshold(p) < (uint64_t{1} << 32);  // false for NaN
}

struct DropoutStream {
  uint64_t seed;
  uint64_t threshold;  // dropout_threshold(p)

  static DropoutStream make(uint64_t seed, double p) { return {seed, dropout_threshold(p)}; }

  PYFASTNN_HOST_DEVICE bool keep(int64_t element) const {
    // SplitMix64 (Steele, Lea & Flood 2014): state = seed + (e + 1) * golden gamma, then the
    // variant-13 finalizer. Passes BigCrush; two multiplies per element, branch-free.
    uint64_t z = seed + (static_cast<uint64_t>(element) + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (z >> 32) >= threshold;
  }
};

// CUDA's dropout stream: Philox4x32-10 (Salmon et al., SC'11), the generator of PyTorch's own CUDA
// RNG, used the way curand_init(seed, subsequence, offset) uses it. Element e reads 32-bit word e % 4
// of Philox(counter = {offset / 4, e / 4}, key = seed), where (seed, offset) come from torch's CUDA
// generator once per layer and call. The low 64 counter bits are the offset, as for every torch
// kernel (thread t of a torch kernel draws counters {offset / 4 + k, t}): the 4 offset units this call
// reserves own counter {offset / 4, *} outright, so masks are fresh each call and each CUDA-graph
// replay, and never share random bits with any other torch random op. Like DropoutStream, any element
// is a pure function of its index: masks do not depend on the launch configuration.
struct Philox4x32 {
  uint32_t word[4];

  // The 128-bit counter is {low, high} (words c0..c3 from the least significant), the key is seed.
  PYFASTNN_HOST_DEVICE static Philox4x32 generate(uint64_t low, uint64_t high, uint64_t seed) {
    uint32_t c0 = static_cast<uint32_t>(low), c1 = static_cast<uint32_t>(low >> 32);
    uint32_t c2 = static_cast<uint32_t>(high), c3 = static_cast<uint32_t>(high >> 32);
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
      const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
      const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
      c0 = hi1 ^ c1 ^ k0;
      c1 = lo1;
      c2 = hi0 ^ c3 ^ k1;
      c3 = lo0;
      k0 += 0x9E3779B9u;  // the key schedule's Weyl constants
      k1 += 0xBB67AE85u;
    }
    return {{c0, c1, c2, c3}};
  }
};

// keep(e) for the CUDA stream: the 32-bit draw >= threshold (dropout_threshold, as DropoutStream's).
// One Philox call gives the draws of 4 elements, so the kernels call draws() once per block of 4
// and kept() for each element; keep() is the two together.
struct PhiloxDropout {
  uint64_t seed, offset, threshold;

  PYFASTNN_HOST_DEVICE Philox4x32 draws(uint64_t element) const {
    return Philox4x32::generate(offset / 4, element >> 2, seed);
  }
  PYFASTNN_HOST_DEVICE bool kept(const Philox4x32& block, uint64_t element) const {
    return block.word[element & 3] >= threshold;
  }
  PYFASTNN_HOST_DEVICE bool keep(int64_t element) const {
    const auto e = static_cast<uint64_t>(element);
    return kept(draws(e), e);
  }
};

}  // namespace pyfastnn
