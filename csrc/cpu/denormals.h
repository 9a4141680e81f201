// Flush-to-zero on every CPU thread that runs torch's kernels.
//
// NOTE [Denormals on every thread]
// torch.set_flush_denormal sets the flush-to-zero / denormals-are-zero mode in the calling thread's
// floating-point control register only; the threads of ATen's intra-op pool keep their own, and they
// run most of the arithmetic (the halves of every parallel_for, fused Adam's chunks). Denormals are
// not rare in training: Adam's first moment of a unit whose gradient stays zero (a dead relu unit)
// shrinks by beta1 each step and is denormal after about 800 steps, and from then on every vector
// instruction touching it takes a microcode assist. The lesson's MNIST run slows by about 15 % from
// its second epoch for that alone (benchmarks/RESULTS.md); flushing them on every thread keeps each
// epoch as fast as the first. Values below 2^-126 (float) become zero; nothing else changes.
#pragma once

namespace pyfastnn::cpu {

// Sets (or clears) flush-to-zero and denormals-are-zero on the calling thread and on each thread of
// ATen's intra-op pool as it is now (a pool grown later by torch.set_num_threads starts without it).
// Returns false, changing nothing, where the CPU has no such mode.
bool set_flush_denormal_on_all_threads(bool on);

// Whether the calling thread flushes denormals.
bool flush_denormal_enabled();

}  // namespace pyfastnn::cpu
