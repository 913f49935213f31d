"""The parity harness's own comparisons (porting/parity.py): what they report and when they fail."""

import numpy as np
import pytest

from porting.parity import compare_arrays


def _pair(shape=(300, 700), seed=0):
    rng = np.random.default_rng(seed)
    want = rng.standard_normal(shape)
    return want.astype(np.float32), want


def test_errors_of_transposed_views_equal_a_plain_numpy_computation():
    # jax kernels are compared as transposed views of torch's layout, in slabs.
    got32, want = _pair()
    got = np.ascontiguousarray(got32.T).T  # a view with the jax-side strides
    assert not got.flags.c_contiguous
    want[17, 400] += 0.5
    q = compare_arrays("g", {"w": got, "b": got32[0]}, {"w": want, "b": want[0]},
                       tol=1e-4, on="rel")
    err = np.abs(got.astype(np.float64) - want)
    assert q.max_abs == pytest.approx(err.max(), rel=0, abs=0)
    assert q.max_rel == pytest.approx(err.max() / np.abs(want).max(), rel=1e-15)
    assert q.worst == "w" and not q.passed
    # Small enough errors pass; the float32 rounding is all there is.
    _, want = _pair()
    assert compare_arrays("g", {"w": got}, {"w": want}, tol=1e-6, on="rel").passed


@pytest.mark.parametrize("side", ["got", "want"])
def test_a_nan_on_either_side_fails(side):
    got, want = _pair((40, 50))
    (got if side == "got" else want)[3, 4] = np.nan
    for on in ("abs", "rel"):
        q = compare_arrays("y", {"y": got, "z": np.zeros(3)}, {"y": want, "z": np.zeros(3)},
                           tol=1e9, on=on)
        assert not q.passed, (side, on, q)


def test_scale_floor_keeps_rounding_noise_of_zero_gradients_from_failing():
    got, want = _pair((64, 64))
    noise_want = np.full(8, 1e-13)
    noise_got = np.full(8, -1e-13)
    q = compare_arrays("g", {"w": got, "bias": noise_got}, {"w": want, "bias": noise_want},
                       tol=1e-4, on="rel")
    assert not q.passed and q.worst == "bias"  # 200% of its own 1e-13 scale
    q = compare_arrays("g", {"w": got, "bias": noise_got}, {"w": want, "bias": noise_want},
                       tol=1e-4, on="rel", scale_floor=1e-6)
    assert q.passed


def test_keys_and_shapes_must_match():
    got, want = _pair((4, 5))
    with pytest.raises(KeyError, match="keys differ"):
        compare_arrays("g", {"a": got}, {"b": want}, tol=1, on="abs")
    with pytest.raises(ValueError, match="shape"):
        compare_arrays("g", {"a": got}, {"a": want.T}, tol=1, on="abs")
