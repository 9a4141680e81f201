// Portable build of the epilogue kernels (ATen's generic Vectorized): the fallback on any CPU.
#define CPU_CAPABILITY DEFAULT
#include "epilogue_impl.h"
