"""pyfastnn: fused Linear+activation kernels for PyTorch (CPU and CUDA), as drop-in layers.

>>> import torch, pyfastnn
>>> layer = pyfastnn.FusedLinear(4, 3, activation="tanh")
>>> layer(torch.randn(2, 4)).shape
torch.Size([2, 3])
"""

from ._ops import ACTIVATIONS
from ._version import __version__
from .cuda_graph import CUDAGraphStep, cuda_graph_step
from .cuda_options import cuda_relu_epilogue
from .decompositions import decompositions
from .denormals import flush_denormals
from .functional import fused_linear, fused_mlp
from .fuse import SAFE_GLOBALS, FusedRun, fuse
from .info import info
from .nn import FusedLinear, FusedMLP, activation_module

__all__ = [
    "ACTIVATIONS", "FusedLinear", "FusedMLP", "FusedRun", "activation_module", "decompositions", "flush_denormals",
    "fuse", "fused_linear", "fused_mlp", "info", "SAFE_GLOBALS", "__version__",
    "CUDAGraphStep", "cuda_graph_step", "cuda_relu_epilogue",
]
