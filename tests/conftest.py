import torch

# Tests compare against PyTorch on the same 2-thread budget the benchmarks use; determinism of our
# own kernels does not depend on it.
torch.manual_seed(0)
