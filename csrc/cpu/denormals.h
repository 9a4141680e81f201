// Flush-to-zero on every CPU thread that runs torch's kernels.
//
// NOTE [Denormals on every thread]
// torch.set_flush_denormal sets the flush-to-zero / denormals-are-zero mode in the calling thread's
// floating-point control register only; the threads of ATen's intra-op pool keep their own, and they
// run most of the arithmetic (the halves of every parallel_for, fused Adam's chunks). Denormals are
// not rare in training: Adam's first moment of a unit whose gradient stays zero (a dead relu unit)
// shrinks by beta1 each step and is denormal after about 800 steps, and from then on every vector
// instruction touching it takes a microcode assist. The lesson's MNIST run slows by 16-23 % from
// its second epoch for that alone (benchmarks/RESULTS.md); flushing them on every thread keeps each
// epoch as fast as the first. Values below 2^-126 (float) become zero; nothing else changes.
//
// The pool's threads are reached by a parallel_for with one index per thread, which ATen's OpenMP
// backend hands out one per thread of the team (ATen's native pool queues its tasks, so there the
// reach is best effort, and counted). libgomp parks the threads of a larger team while no parallel
// region runs (torch.set_num_threads(1) runs none), and a later larger team takes them back: callers
// pass the largest team they have used.
#pragma once

#include <cstdint>

namespace pyfastnn::cpu {

// Sets (or clears) flush-to-zero and denormals-are-zero on the calling thread and on the threads of a
// parallel_for team of at::get_num_threads() threads, or min_threads where that is more (with OpenMP:
// the calling thread's team size is raised for this call alone). Returns how many distinct threads
// were set, the caller included: fewer than the team where parallel_for does not run one index per
// thread (a build without OpenMP runs it all on the caller); 0, changing nothing, where the CPU has
// no such mode.
int64_t set_flush_denormal_on_threads(bool on, int64_t min_threads);

// Whether the calling thread flushes denormals (flush-to-zero and denormals-are-zero both set).
bool flush_denormal_enabled();

}  // namespace pyfastnn::cpu
