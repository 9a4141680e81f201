"""Property-based fuzzing of fused_linear and fused_mlp against PyTorch (bounded to stay fast; the
long runs are scripts/fuzz_fused_linear.py [--mlp])."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pyfastnn.testing import check, check_mlp, random_case, random_mlp_case


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.integers(min_value=0, max_value=2**31 - 1))
def test_random_cases_match_pytorch(seed):
    mismatch = check(random_case(random.Random(seed)))
    assert mismatch is None, mismatch


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.integers(min_value=0, max_value=2**31 - 1))
def test_random_mlp_cases_match_pytorch(seed):
    mismatch = check_mlp(random_mlp_case(random.Random(seed)))
    assert mismatch is None, mismatch
