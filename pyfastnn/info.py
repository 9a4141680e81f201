"""What this build of pyfastnn can do on this machine."""

from __future__ import annotations

import platform
from typing import Any, Dict

import torch

from ._ops import native
from ._version import __version__
from .extension import build_record


def info() -> Dict[str, Any]:
    """Versions, compiled backends and the CPU code path in use.

    Example:
        >>> import pyfastnn
        >>> sorted(pyfastnn.info())[:3]
        ['backends', 'cpu_isa', 'cpu_isas_compiled']
    """
    cuda_archs = [a for a in native.cuda_archs.replace(";", " ").split() if a]
    record = build_record() or {}
    return {
        "pyfastnn": __version__,
        "torch": torch.__version__,
        "torch_built_against": record.get("torch"),
        "python": platform.python_version(),
        "backends": {"cpu": True, "cuda": bool(native.with_cuda)},
        "cuda_archs": cuda_archs,
        "cuda_available": bool(native.with_cuda) and torch.cuda.is_available(),
        # pyfastnn.cuda_relu_epilogue(): relu inside cuBLASLt's GEMM, NaN pre-activations may become 0
        "cuda_relu_epilogue": native.relu_epilogue_allowed(),
        "cpu_isa": native.cpu_isa(),
        "cpu_isas_compiled": native.compiled_cpu_isas().split(),
        # "openmp": on torch's threads; "native": ATen's own pool; "serial": the calling thread
        "cpu_parallel_loops": native.parallel_loops,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
