"""Options of the CUDA backend that trade an exact match with PyTorch for speed; off by default.

Like ``torch.backends.cuda.matmul.allow_tf32``, they are process-wide and read at each op call (a
CUDA graph keeps what was in force when it was captured).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from ._ops import check_flag, native

__all__ = ["cuda_relu_epilogue"]


@contextlib.contextmanager
def cuda_relu_epilogue(enabled: bool = True) -> Iterator[None]:
    """Within the block, CUDA relu layers (float32, float16, bfloat16, no dropout) may apply relu
    inside cuBLASLt's GEMM epilogue instead of a separate pass over the output: one pass over
    memory less per layer, at the price of NaN. cuBLASLt's relu epilogue is reported to write 0
    where the pre-activation is NaN, where ``torch.relu`` keeps NaN; a network whose weights turned
    NaN would then give finite outputs and losses, which is why this is off by default. The bit mask
    a hidden relu layer of ``fused_mlp`` keeps for backward is then cuBLASLt's too, which is reported
    to mark an exactly-zero pre-activation as positive: there the gradient may pass (slope 1 at 0,
    where ``torch.relu`` uses 0; both are subgradients). On exit the
    setting from before returns. CPU layers are unaffected. The setting is process-wide, like torch's
    backend flags: blocks nest within a thread, but blocks entered and left from several threads at
    once restore each other's settings in the order they end.

    Example:
        >>> import torch, pyfastnn
        >>> device = "cuda" if torch.cuda.is_available() else "cpu"
        >>> x, w = torch.randn(4, 8, device=device), torch.randn(16, 8, device=device)
        >>> with pyfastnn.cuda_relu_epilogue():
        ...     y = pyfastnn.fused_linear(x, w, None, "relu")  # on a GPU: relu inside the GEMM
        >>> torch.allclose(y, pyfastnn.fused_linear(x, w, None, "relu"))  # only NaN would differ
        True
    """
    check_flag("cuda_relu_epilogue", "enabled", enabled)
    before = native.relu_epilogue_allowed()
    native.set_relu_epilogue_allowed(enabled)
    try:
        yield
    finally:
        native.set_relu_epilogue_allowed(before)
