"""Property-based fuzzing of fused_linear against PyTorch (bounded to stay fast; the 10,000-case
run is scripts/fuzz_fused_linear.py)."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from fuzzing import check, random_case


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.integers(min_value=0, max_value=2**31 - 1))
def test_random_cases_match_pytorch(seed):
    mismatch = check(random_case(random.Random(seed)))
    assert mismatch is None, mismatch
