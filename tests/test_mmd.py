"""MMD^2 against a direct numpy computation."""

import jax
import numpy as np
import pytest

from train.mmd import mmd2


def _numpy_mmd2(x, y, bandwidths):
    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(np.exp(-d2 / s) for s in bandwidths)
    return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()


def test_matches_numpy_with_median_free_base():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 5))
    y = rng.standard_normal((9, 5)) + 0.7
    joint = np.concatenate([x, y])
    d2 = ((joint[:, None] - joint[None]) ** 2).sum(-1)
    n = len(joint)
    base = d2.sum() / (n * n - n)
    mults = (0.5, 1.0, 2.0)
    want = _numpy_mmd2(x, y, [base * m for m in mults])
    got = float(mmd2(x.astype(np.float32), y.astype(np.float32), multipliers=mults))
    assert got == pytest.approx(want, rel=1e-4)
    fixed = float(mmd2(x.astype(np.float32), y.astype(np.float32), multipliers=(1.0,), base=3.0))
    assert fixed == pytest.approx(_numpy_mmd2(x, y, [3.0]), rel=1e-4)


def test_near_zero_for_one_distribution_and_grows_with_shift():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    assert abs(float(mmd2(x, x))) < 1e-6
    same = float(mmd2(x, rng.standard_normal((256, 8)).astype(np.float32)))
    shifted = float(mmd2(x, rng.standard_normal((256, 8)).astype(np.float32) + 1.0))
    # The biased estimate is O(1/n) above 0 for two samples of one distribution.
    assert 0 <= same < 0.05 and shifted > 10 * same


def test_differentiable_towards_target():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 3)).astype(np.float32)
    y = rng.standard_normal((16, 3)).astype(np.float32) + 2.0
    loss = jax.jit(lambda a: mmd2(a, y))
    g = jax.jit(jax.grad(lambda a: mmd2(a, y)))(x)
    # Moving the source along -grad reduces the discrepancy.
    assert float(loss(x - 0.1 * np.asarray(g))) < float(loss(x))
