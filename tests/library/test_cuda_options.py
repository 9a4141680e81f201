"""pyfastnn.cuda_relu_epilogue: the opt-in switch of NOTE [The relu epilogue and NaN]. Its effect on
the GPU is tested in test_cuda.py (the relu_epilogue path); here, that it sets and restores the
process-wide setting and leaves CPU layers alone."""

import pytest
import torch

import pyfastnn


def allowed() -> bool:
    return pyfastnn.info()["cuda_relu_epilogue"]


def test_the_relu_epilogue_is_off_by_default_and_the_block_restores_the_setting():
    assert allowed() is False
    with pyfastnn.cuda_relu_epilogue():
        assert allowed() is True
        with pyfastnn.cuda_relu_epilogue(False):
            assert allowed() is False
        assert allowed() is True
    assert allowed() is False
    with pytest.raises(ZeroDivisionError), pyfastnn.cuda_relu_epilogue():
        1 / 0
    assert allowed() is False


def test_a_non_bool_setting_is_refused():
    with pytest.raises(TypeError, match="enabled must be True or False, got 'yes'"):
        with pyfastnn.cuda_relu_epilogue("yes"):
            pass
    assert allowed() is False


def test_cpu_layers_keep_nan_either_way():
    x, w = torch.randn(4, 8), torch.randn(16, 8)
    x[1, 3] = float("nan")
    with pyfastnn.cuda_relu_epilogue():
        y = pyfastnn.fused_linear(x, w, None, "relu")
    assert y[1].isnan().all() and torch.equal(y.isnan(), torch.relu(x @ w.t()).isnan())
