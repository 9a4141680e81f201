// Fused dropout's random stream, shared by every kernel.
//
// Element e of a layer's output is kept when the top 32 bits of SplitMix64 at position e of the
// stream seeded by `seed` are >= p * 2^32. The seed is drawn from torch's generator once per layer
// and call, so masks are reproducible under torch.manual_seed, and any element can be computed on
// its own: the mask does not depend on thread count or on how rows are split between threads.
#pragma once

#include <cmath>
#include <cstdint>

#include "activations.h"  // PYFASTNN_HOST_DEVICE

namespace pyfastnn {

struct DropoutStream {
  uint64_t seed;
  uint64_t threshold;  // keep when the 32-bit draw is >= threshold; p * 2^32, rounded

  static DropoutStream make(uint64_t seed, double p) {
    const double scaled = std::nearbyint(p * 4294967296.0);
    return {seed, scaled >= 4294967295.0 ? uint64_t{4294967295u} : static_cast<uint64_t>(scaled)};
  }

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

}  // namespace pyfastnn
