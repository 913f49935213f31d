"""jaxnets.layers against torch: pooling, BatchNorm and Sequential.

Each pooling test runs a seeded loop over ~50 random configurations (plus the
corner cases named in PORTING_PITFALLS.md) in one test, comparing the forward
pass and the gradient of a random linear loss with torch's on small arrays.
Inputs are distinct values (a random permutation) so the max-pool gradient is
not decided by tie-breaking, which is implementation-defined.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from jaxnets.layers import (BatchNorm, Sequential, adaptive_avg_pool2d, avg_pool2d, conv2d,
                            max_pool2d)
from porting.state_dict import flax_variables, load_torch_state_dict, to_torch_state_dict


def _distinct_input(rng, n, h, w, c):
    # Distinct values, so every max is unique.
    x = rng.permutation(n * h * w * c).astype(np.float32).reshape(n, h, w, c)
    return x / x.size - 0.5


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _compare(jax_fn, torch_fn, x, rng, *, tol, what):
    """Forward and gradient (of sum(y * r)) of jax_fn on NHWC vs torch_fn on NCHW.

    Errors are bounded by ``tol * max(1, |torch value|)``.
    """
    xt = _nchw(x).requires_grad_(True)
    yt = torch_fn(xt)
    want_y = yt.detach().permute(0, 2, 3, 1).numpy()
    r = rng.standard_normal(want_y.shape).astype(np.float32)
    (yt * _nchw(r)).sum().backward()

    @jax.jit  # one compile per configuration instead of one per eager op
    def forward_backward(v, cotangent):
        y, vjp = jax.vjp(jax_fn, v)
        return y, vjp(cotangent)[0]

    y, gx = forward_backward(jnp.asarray(x), jnp.asarray(r))
    assert y.shape == want_y.shape, f"{what}: shape {y.shape} vs {want_y.shape}"
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=tol, atol=tol, err_msg=what)
    np.testing.assert_allclose(np.asarray(gx), xt.grad.permute(0, 2, 3, 1).numpy(), rtol=tol,
                               atol=tol, err_msg=f"{what} (gradient)")


def _entry_ops(fn, *args) -> list[str]:
    """The distinct opcodes of ``jax.jit(fn)``'s compiled entry computation."""
    import re

    hlo = jax.jit(fn).lower(*args).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):].splitlines()[1:]
    return sorted({m.group(1) for m in map(re.compile(r".* = \S+ ([a-z-]+)\(").match, entry)
                   if m})


def _pool_configs(rng, n):
    """Random valid pooling configs plus the named corner cases."""
    named = [
        # (h, w, kernel, stride, padding, ceil_mode)
        ((7, 7), (3, 3), (2, 2), (0, 0), True),    # ceil adds a partial last window
        ((7, 7), (3, 3), (2, 2), (0, 0), False),
        ((5, 5), (2, 2), (2, 2), (1, 1), True),    # torch drops the window starting in the pad
        ((6, 9), (3, 3), (2, 2), (1, 1), True),
        ((112, 112), (3, 3), (2, 2), (0, 0), True),  # GoogLeNet maxpool1 at 224
        ((113, 115), (3, 3), (2, 2), (0, 0), True),  # ... at an odd size
        ((14, 14), (3, 3), (1, 1), (1, 1), True),    # GoogLeNet branch4
        ((1, 1), (1, 1), (1, 1), (0, 0), False),
        ((4, 11), (2, 3), (1, 2), (1, 0), True),
        # Windows that tile the input (kernel == stride, no padding): max_pool2d's reshape path.
        ((32, 32), (2, 2), (2, 2), (0, 0), False),   # LeNet-5, VGG
        ((7, 9), (2, 2), (2, 2), (0, 0), False),     # floor mode drops the last row/column
        ((8, 9), (2, 3), (2, 3), (0, 0), True),      # ceil mode, nothing left over
        ((9, 9), (2, 2), (2, 2), (0, 0), True),      # ceil mode, partial windows: reduce_window
    ]
    configs = list(named)
    while len(configs) < n + len(named):
        k = tuple(int(v) for v in rng.integers(1, 5, 2))
        s = tuple(int(v) for v in rng.integers(1, 4, 2))
        p = tuple(int(rng.integers(0, kk // 2 + 1)) for kk in k)
        hw = tuple(int(v) for v in rng.integers(1, 20, 2))
        if any(hh + 2 * pp < kk for hh, pp, kk in zip(hw, p, k)):
            continue  # torch rejects an output size of 0
        configs.append((hw, k, s, p, bool(rng.integers(0, 2))))
    return configs


def test_max_pool2d_matches_torch():
    rng = np.random.default_rng(0)
    for hw, k, s, p, ceil in _pool_configs(rng, 41):
        x = _distinct_input(rng, int(rng.integers(1, 3)), *hw, int(rng.integers(1, 4)))
        _compare(lambda v: max_pool2d(v, k, s, p, ceil_mode=ceil),
                 lambda t: F.max_pool2d(t, k, s, p, ceil_mode=ceil),
                 x, rng, tol=0, what=f"max_pool2d {hw} k={k} s={s} p={p} ceil={ceil}")


@pytest.mark.parametrize("k", [2, 3])
def test_tiled_max_pool2d_gives_tied_maxima_gradient_to_the_first_like_torch(k):
    # Flat regions (a blank background after a conv with bias, ReLU zeros) give windows
    # of equal maxima; torch sends the whole gradient to the first of them.
    rng = np.random.default_rng(3)
    x = np.round(rng.standard_normal((2, 6 * k, 4 * k, 3)), 0).astype(np.float32)
    x[:, :k, :k] = 0.5  # whole windows tied
    _compare(lambda v: max_pool2d(v, k), lambda t: F.max_pool2d(t, k), x, rng, tol=0,
             what=f"tied maxima k={k}")
    # Forward mode works too (the rule is a custom JVP): the tangent of the first maximum.
    dx = np.zeros_like(x)
    dx[0, 0, 0, 0] = 1.0  # first element of a tied window
    dx[0, 0, 1, 0] = 10.0  # a later tied element: not the chosen one
    _, dy = jax.jvp(lambda v: max_pool2d(v, k), (jnp.asarray(x),), (jnp.asarray(dx),))
    assert float(dy[0, 0, 0, 0]) == 1.0 and float(jnp.sum(dy)) == 1.0


@pytest.mark.parametrize("k,s,p,ceil", [
    (3, 2, 1, False),  # ResNet's stem
    (3, 2, 0, True),   # GoogLeNet's, AlexNet's
    (3, 1, 1, True),   # GoogLeNet's pool branch: nine windows read each element
    (2, 3, 0, False),  # a stride above the kernel: elements no window reads
    ((3, 2), (1, 2), (1, 0), True),
])
def test_overlapping_max_pool2d_follows_torchs_choice_ties_nans_and_forward_mode(k, s, p, ceil):
    """Pools whose windows overlap (``_max_pool_taps`` on CPU): with tied maxima and
    NaNs, values and gradients equal torch's exactly (the first maximum, or the last
    NaN, gets a window's gradient; overlapping windows' sums round as torch's); the
    forward-mode tangent is the input tangent at torch's ``return_indices``; second
    derivatives check out; and on CPU the gradient is neither ``reduce_window`` nor
    ``select_and_scatter`` (100 ms, where the gather takes 17, for ResNet's stem pool in
    ``bench.conv_ops``)."""
    from jax.test_util import check_grads

    rng = np.random.default_rng(7)
    x = np.round(rng.standard_normal((2, 11, 10, 3)), 0).astype(np.float32)  # many ties
    x[0, 2:5, 3:6, 0] = 2.0
    x[1, 4, 4, 1] = x[1, 4, 6, 1] = x[1, 5, 5, 1] = np.nan
    _compare(lambda v: max_pool2d(v, k, s, p, ceil_mode=ceil),
             lambda t: F.max_pool2d(t, k, s, p, ceil_mode=ceil),
             x, rng, tol=0, what=f"ties and NaNs k={k} s={s} p={p}")
    dx = rng.standard_normal(x.shape).astype(np.float32)
    # Jitted: op by op, its derivative programs compile each of their many small ops.
    pool = jax.jit(lambda v: max_pool2d(v, k, s, p, ceil_mode=ceil))
    _, dy = jax.jvp(pool, (jnp.asarray(x),), (jnp.asarray(dx),))
    _, index = F.max_pool2d(_nchw(x), k, s, p, ceil_mode=ceil, return_indices=True)
    planes = _nchw(dx).flatten(2)
    want = torch.gather(planes, 2, index.flatten(2)).reshape(index.shape)
    np.testing.assert_array_equal(np.asarray(dy), want.permute(0, 2, 3, 1).numpy())
    check_grads(pool, (jnp.asarray(_distinct_input(rng, 1, 7, 8, 2)),), order=2,
                modes=("fwd", "rev"))
    if jax.default_backend() == "cpu":
        ops = _entry_ops(jax.grad(lambda v: max_pool2d(v, k, s, p, ceil_mode=ceil).sum()),
                         jnp.asarray(x))
        assert not {"reduce-window", "select-and-scatter", "scatter"} & set(ops), ops


def test_max_pool2d_stride_defaults_to_kernel():
    x = _distinct_input(np.random.default_rng(1), 1, 9, 9, 2)
    np.testing.assert_array_equal(np.asarray(max_pool2d(jnp.asarray(x), 3)),
                                  np.asarray(max_pool2d(jnp.asarray(x), 3, 3)))


def test_avg_pool2d_matches_torch():
    rng = np.random.default_rng(1)
    for i, (hw, k, s, p, ceil) in enumerate(_pool_configs(rng, 40)):
        # Named corner cases both ways, random ones either way.
        for include in (True, False) if i < 9 else (bool(rng.integers(0, 2)),):
            x = rng.standard_normal((int(rng.integers(1, 3)), *hw, 2)).astype(np.float32)
            _compare(lambda v: avg_pool2d(v, k, s, p, ceil_mode=ceil, count_include_pad=include),
                     lambda t: F.avg_pool2d(t, k, s, p, ceil_mode=ceil,
                                            count_include_pad=include),
                     x, rng, tol=1e-6,
                     what=f"avg_pool2d {hw} k={k} s={s} p={p} ceil={ceil} include={include}")


def test_inception_avg_pool_counts_padding():
    # Inception v3's F.avg_pool2d(x, 3, 1, 1): a corner output averages 4 values over 9.
    x = jnp.ones((1, 5, 5, 1))
    y = np.asarray(avg_pool2d(x, 3, 1, 1))
    assert y[0, 0, 0, 0] == pytest.approx(4 / 9) and y[0, 2, 2, 0] == pytest.approx(1.0)


def test_adaptive_avg_pool2d_matches_torch():
    rng = np.random.default_rng(2)
    named = [((10, 10), (3, 3)), ((13, 13), (6, 6)), ((7, 7), (7, 7)), ((5, 5), (7, 7)),
             ((1, 1), (7, 7)), ((14, 14), (7, 7)), ((12, 8), (4, 2)), ((6, 5), (6, 6)),
             ((5, 6), (6, 6)), ((9, 4), (1, 1)), ((13, 17), (4, 4)), ((3, 2), (5, 5))]
    configs = named + [(tuple(int(v) for v in rng.integers(1, 25, 2)),
                        tuple(int(v) for v in rng.integers(1, 9, 2))) for _ in range(38)]
    for hw, out in configs:
        x = rng.standard_normal((int(rng.integers(1, 3)), *hw, 3)).astype(np.float32)
        _compare(lambda v: adaptive_avg_pool2d(v, out),
                 lambda t: F.adaptive_avg_pool2d(t, out),
                 x, rng, tol=1e-6, what=f"adaptive_avg_pool2d {hw}->{out}")
    # An int output size means square, as in torch.
    x = rng.standard_normal((1, 10, 10, 1)).astype(np.float32)
    assert adaptive_avg_pool2d(jnp.asarray(x), 3).shape == (1, 3, 3, 1)


@pytest.mark.parametrize("momentum,eps,affine", [(0.1, 1e-5, True), (0.3, 1e-3, True),
                                                 (0.1, 1e-5, False)])
def test_batchnorm_matches_torch_over_steps(momentum, eps, affine):
    rng = np.random.default_rng(3)
    c = 5
    tbn = torch.nn.BatchNorm2d(c, eps=eps, momentum=momentum, affine=affine)
    with torch.no_grad():
        if affine:
            tbn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, c).astype(np.float32)))
            tbn.bias.copy_(torch.from_numpy(rng.standard_normal(c).astype(np.float32)))
        tbn.running_mean.copy_(torch.from_numpy(rng.standard_normal(c).astype(np.float32)))
        tbn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, c).astype(np.float32)))
    fbn = BatchNorm(c, eps=eps, momentum=momentum, affine=affine)
    state = {f"bn.{k}": v for k, v in tbn.state_dict().items()}

    class Holder(nnx.Module):
        def __init__(self):
            self.bn = fbn

    holder = Holder()
    load_torch_state_dict(holder, state)
    tbn.train()
    for step in range(4):
        shape = (int(rng.integers(2, 4)), int(rng.integers(1, 6)), int(rng.integers(1, 6)), c)
        x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
        r = rng.standard_normal(shape).astype(np.float32)
        def loss(m, v):
            y = m(v)
            return jnp.sum(y * r), y

        # nnx.value_and_grad carries the running-stat updates back to fbn.
        (_, y), gx = nnx.value_and_grad(loss, argnums=1, has_aux=True)(fbn, jnp.asarray(x))
        xt = _nchw(x).requires_grad_(True)
        yt = tbn(xt)
        (yt * _nchw(r)).sum().backward()
        np.testing.assert_allclose(np.asarray(y), yt.detach().permute(0, 2, 3, 1).numpy(),
                                   atol=2e-5, rtol=0, err_msg=f"train output, step {step}")
        np.testing.assert_allclose(np.asarray(gx), xt.grad.permute(0, 2, 3, 1).numpy(),
                                   atol=2e-5, rtol=0, err_msg=f"input gradient, step {step}")
        got = to_torch_state_dict(holder)
        for k, v in tbn.state_dict().items():
            np.testing.assert_allclose(got[f"bn.{k}"], v.numpy(), rtol=1e-6, atol=1e-7,
                                       err_msg=f"{k} after step {step}")
    assert got["bn.num_batches_tracked"].reshape(-1).tolist() == [4]
    assert got["bn.num_batches_tracked"].dtype == np.int64
    # Eval mode uses the running statistics and leaves them alone.
    fbn.use_running_average = True
    tbn.eval()
    x = rng.standard_normal((2, 3, 4, c)).astype(np.float32)
    with torch.no_grad():
        yt = tbn(_nchw(x)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(fbn(jnp.asarray(x))), yt, atol=1e-5, rtol=0)
    assert int(fbn.num_batches_tracked[...]) == 4


def test_batchnorm_derivative_rule_is_exact_in_both_modes():
    """The train-mode normalisation's custom JVP (``layers._normalize``) against
    autodiff of the plain formula, float64: all three outputs (normalised input,
    mean, biased variance), forward mode and reverse mode."""
    from jaxnets.layers import _normalize

    def plain(x, eps):
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
        return (x - mean) / jnp.sqrt(var + eps), mean, var

    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((3, 4, 5, 6)) * 2 + 1)
        t = jnp.asarray(rng.standard_normal(x.shape))
        cts = tuple(jnp.asarray(rng.standard_normal(s)) for s in (x.shape, (6,), (6,)))
        ours = jax.jvp(lambda v: _normalize(v, 1e-3), (x,), (t,))
        want = jax.jvp(lambda v: plain(v, 1e-3), (x,), (t,))
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
        (g,) = jax.vjp(lambda v: _normalize(v, 1e-3), x)[1](cts)
        (g_want,) = jax.vjp(lambda v: plain(v, 1e-3), x)[1](cts)
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_want), rtol=1e-10, atol=1e-12)
        assert float(jnp.abs(g).max()) > 0.1


def _plain_batch_norm(x, scale, bias, eps):
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias, mean, var


@pytest.mark.parametrize("wrt", [(0, 1, 2), (0,), (1, 2), (0, 2)])
def test_affine_batchnorm_derivative_rule_is_exact(wrt):
    """``layers._batch_norm`` (train-mode BatchNorm with its affine terms, own JVP
    rule) against autodiff of the plain formula, float64: forward mode, reverse
    mode with some arguments frozen (symbolic zero tangents), and second order."""
    from jaxnets.layers import _batch_norm

    rng = np.random.default_rng(6)
    with jax.enable_x64(True):
        args = [jnp.asarray(rng.standard_normal((3, 4, 5, 6)) * 2 + 1),
                jnp.asarray(rng.uniform(0.5, 1.5, 6)), jnp.asarray(rng.standard_normal(6))]
        tans = [jnp.asarray(rng.standard_normal(a.shape)) for a in args]
        cts = tuple(jnp.asarray(rng.standard_normal(s)) for s in ((3, 4, 5, 6), (6,), (6,)))

        def pick(f):
            def g(*free):
                full = list(args)
                for i, v in zip(wrt, free):
                    full[i] = v
                return f(*full, 1e-3)
            return g

        ours, want = pick(_batch_norm), pick(_plain_batch_norm)
        free = [args[i] for i in wrt]
        free_t = [tans[i] for i in wrt]
        for a, b in zip(jax.tree.leaves(jax.jvp(ours, free, free_t)),
                        jax.tree.leaves(jax.jvp(want, free, free_t))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
        got, expect = jax.vjp(ours, *free)[1](cts), jax.vjp(want, *free)[1](cts)
        for a, b in zip(got, expect):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
            assert float(jnp.abs(a).max()) > 0.1

        def second(f):  # forward over reverse: a Hessian-vector product
            grad = jax.grad(lambda *v: jnp.sum(jnp.tanh(f(*v)[0]) * cts[0]),
                            argnums=tuple(range(len(free))))
            return jax.jvp(grad, free, free_t)[1]

        for a, b in zip(second(ours), second(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-11)


def test_affine_batchnorm_gradient_reduces_twice_per_pass():
    """The gradient of a train-mode BatchNorm (with scale and bias) + ReLU needs four
    reductions over the batch: mean and variance forward, ``sum(g)`` and
    ``sum(g * xhat)`` backward, those two serving the input's, the scale's and the
    bias's gradients alike. Composing ``_normalize``'s rule with ``* scale + bias``
    compiled six."""
    bn = BatchNorm(8)
    graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)

    def loss(p, s, x):
        y = nnx.merge(graphdef, p, s, copy=True)(x)
        return jnp.sum(jax.nn.relu(y) ** 2)

    x = jnp.ones((4, 5, 5, 8))
    text = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(params, stats, x).compile().as_text()
    assert text.count(" reduce(") == 4, text


def test_sequential_paths_and_order():
    rngs = nnx.Rngs(0)

    class Net(nnx.Module):
        def __init__(self):
            # Parameter-free entries (functions) keep their index, as in torch.
            self.features = Sequential([conv2d(2, 4, 3, 1, 1, rngs=rngs), jax.nn.relu,
                                        BatchNorm(4), lambda v: v * 2.0,
                                        conv2d(4, 3, 1, rngs=rngs)])

        def __call__(self, x):
            return self.features(x)

    net = Net()
    assert sorted(flax_variables(net)) == [
        "features.0.bias", "features.0.kernel", "features.2.bias", "features.2.mean",
        "features.2.num_batches_tracked", "features.2.scale", "features.2.var",
        "features.4.bias", "features.4.kernel"]
    assert sorted(to_torch_state_dict(net)) == sorted([
        "features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias",
        "features.2.running_mean", "features.2.running_var", "features.2.num_batches_tracked",
        "features.4.weight", "features.4.bias"])
    tnet = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, 1, 1), torch.nn.ReLU(),
                               torch.nn.BatchNorm2d(4))
    sd = {f"features.{k}": v for k, v in tnet.state_dict().items()}
    tconv = torch.nn.Conv2d(4, 3, 1)
    sd.update({f"features.4.{k}": v for k, v in tconv.state_dict().items()})
    load_torch_state_dict(net, sd)
    net.eval()
    tnet.eval()
    x = np.random.default_rng(4).standard_normal((2, 5, 6, 2)).astype(np.float32)
    with torch.no_grad():
        want = tconv(tnet(_nchw(x)) * 2.0).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(net(jnp.asarray(x))), want, atol=1e-5, rtol=0)
    assert len(net.features) == 5 and net.features[1] is jax.nn.relu


@pytest.mark.parametrize("hw,k,stride,padding,dilation,groups", [
    ((2, 2), 3, 1, 1, 1, 1),      # ResNet's last stage at 64 px: the slow XLA:CPU case
    ((2, 3), 3, 2, 1, 1, 4),      # strided, grouped (ResNeXt)
    ((4, 2), 5, 1, 2, 1, 1),
    ((3, 3), 3, 1, 2, 2, 1),      # dilated: a 5x5 footprint over a 3x3 map
    ((2, 7), (3, 1), 1, (1, 0), 1, 2),  # only the height is short
    ((6, 7), 3, 1, 1, 1, 4),      # grouped, not short: taps forward, patches derivatives
    ((4, 4), 3, 2, 1, 1, 1),      # a short output: ResNet's last downsampling at 64 px
    ((4, 5), 3, 1, 0, 1, 1),      # a short output at stride 1 (2x3 from 4x5, no padding)
    ((5, 5), 3, 1, 1, 1, 1),      # not short: lax's convolution
    ((5, 6), 1, 1, 0, 1, 1),      # 1x1: a matmul (ResNet-50's bottlenecks)
    ((7, 6), 1, 2, 0, 1, 1),      # 1x1 stride 2: ResNet's downsampling shortcut
    ((3, 4), 1, 2, 1, 1, 4),      # 1x1, padded, strided, grouped
    ((8, 13), 4, 4, 0, 1, 1),     # non-overlapping patches (ViT's), the last column cut
    ((9, 8), 4, 4, 0, 1, 4),      # the same, grouped, the last row cut
])
def test_conv2d_detours_match_torch(hw, k, stride, padding, dilation, groups):
    from jaxnets import layers

    rng = np.random.default_rng(4)
    cin, cout = 8, 12
    conv = conv2d(cin, cout, k, stride, padding, dilation=dilation, groups=groups,
                  rngs=nnx.Rngs(0))
    tconv = torch.nn.Conv2d(cin, cout, k, stride, padding, dilation=dilation, groups=groups)
    conv.kernel.set_value(jnp.asarray(tconv.weight.detach().numpy().transpose(2, 3, 1, 0)))
    conv.bias.set_value(jnp.asarray(tconv.bias.detach().numpy()))
    x = rng.standard_normal((2, *hw, cin)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        _compare(conv, tconv, x, rng, tol=1e-5, what=f"conv2d {hw} k={k}")
        ops = str(jax.make_jaxpr(jax.grad(lambda v: conv(v).sum()))(jnp.asarray(x)))
    short = layers._spatial_kernel_exceeds_map(x.shape, conv.kernel.shape, conv.strides,
                                               conv.padding, conv.kernel_dilation)
    pointwise = k == 1
    assert short == (hw not in ((5, 5), (6, 7)) and not pointwise)
    # The detour (CPU only) has no convolution in its forward or backward pass, nor has
    # a grouped one with 2 channels per group (the taps' forward pass, the patches'
    # derivatives).
    detour = short or pointwise
    assert ("conv_general_dilated" in ops) == (
        not (detour or groups > 1) or jax.default_backend() != "cpu")
    patchify = stride == k and k > 1  # one transpose lays the patches out: nothing to save
    if patchify and jax.default_backend() == "cpu":
        # A reshape and a transpose, not one slice per tap (at most one crops the input).
        assert ops.count(" slice[") <= 1, ops
    if detour and groups == 1 and not patchify and jax.default_backend() == "cpu":
        # One matmul each way, no activation-sized transpose around it (the einsum this
        # replaced had ~8 per 1x1 convolution in a gradient program, each one more kernel
        # for XLA to compile and one more pass over memory).
        dn = jax.lax.conv_dimension_numbers(x.shape, conv.kernel.shape, ("NHWC", "HWIO", "NHWC"))

        def loss(v, w):
            return (layers.conv_general_dilated(
                v, w, conv.strides, conv.padding, rhs_dilation=conv.kernel_dilation,
                dimension_numbers=dn) ** 2).sum()

        jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(jnp.asarray(x), conv.kernel.get_value())
        moved = [e for e in jaxpr.eqns if e.primitive.name == "transpose"
                 and e.outvars[0].aval.size > conv.kernel.size]
        assert not moved, moved
        if pointwise and stride == 1 and padding == 0:
            # The kernel gradient of a 1x1 convolution is one 2-d matmul on the input
            # and the output gradient as they lie: bitcasts and a dot, no transposed
            # copy (lax's 4-d dot had one in front of its matmul).
            y = conv(jnp.asarray(x))
            ops = _entry_ops(lambda v, w, g: jax.vjp(lambda k: layers.conv_general_dilated(
                v, k, conv.strides, conv.padding, dimension_numbers=dn), w)[1](g)[0],
                jnp.asarray(x), conv.kernel.get_value(), y)
            assert ops == ["bitcast", "dot", "parameter"], ops


def test_conv2d_kernel_larger_than_padded_input_raises_like_torch():
    """A 5x5 kernel on a 3x3 map (Inception v3's auxiliary classifier below 299 px):
    torch raises; the CPU detour would have sliced empty taps into NaN or a shape error."""
    conv = conv2d(4, 6, 5, rngs=nnx.Rngs(0))
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        torch.nn.Conv2d(4, 6, 5)(torch.zeros(1, 4, 3, 3))
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match=r"kernel \(5, 5\).*larger than the padded input"):
            conv(jnp.zeros((1, 3, 3, 4)))
    assert conv(jnp.zeros((1, 5, 5, 4))).shape == (1, 1, 1, 6)
    assert conv2d(4, 6, 5, padding=1, rngs=nnx.Rngs(0))(jnp.zeros((1, 3, 3, 4))).shape == (
        1, 1, 1, 6)


# (n, h, w, cin, cout, kernel, stride, padding, dilation)
_WEIGHT_GRAD_CASES = [
    (2, 9, 11, 3, 5, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),   # ResNet's 3x3
    (2, 12, 10, 4, 6, (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)),  # strided
    (1, 15, 15, 3, 4, (7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1)),  # the 7x7/2 stem
    (2, 10, 13, 3, 2, (3, 3), (1, 1), ((2, 2), (2, 2)), (2, 2)),  # dilated
    (2, 9, 9, 2, 3, (5, 5), (3, 3), ((0, 0), (0, 0)), (1, 1)),    # rows left unread
    (2, 8, 9, 2, 3, (3, 2), (2, 1), ((1, 0), (2, 1)), (1, 2)),    # asymmetric everything
    (2, 11, 8, 2, 3, (1, 7), (1, 1), ((0, 0), (3, 3)), (1, 1)),   # Inception v3's 1x7
    (2, 11, 8, 2, 3, (7, 1), (1, 2), ((3, 3), (0, 0)), (1, 1)),   # ... and 7x1
]


@pytest.mark.parametrize("form", ["A", "B"])
def test_conv_weight_grad_is_lax_kernel_gradient(form):
    """``layers._conv_weight_grad`` (the kernel gradient of CPU convolutions) against
    the transpose of lax's convolution, float64, in both of its forms."""
    from jaxnets import layers

    rng = np.random.default_rng(6)
    with jax.enable_x64(True):
        for n, h, w, cin, cout, k, s, p, d in _WEIGHT_GRAD_CASES:
            x = jnp.asarray(rng.standard_normal((n, h, w, cin)))
            kernel = jnp.asarray(rng.standard_normal((*k, cin, cout)))
            y, vjp = jax.vjp(lambda v: jax.lax.conv_general_dilated(
                x, v, s, p, rhs_dilation=d, dimension_numbers=("NHWC", "HWIO", "NHWC")), kernel)
            dy = jnp.asarray(rng.standard_normal(y.shape))
            got = layers._conv_weight_grad(x, dy, kernel, s, p, d, None, None, form=form)
            np.testing.assert_allclose(np.asarray(got), np.asarray(vjp(dy)[0]), rtol=1e-10,
                                       atol=1e-10, err_msg=f"form {form}, case {k} {s} {p} {d}")


@pytest.mark.parametrize("form", ["A", "B"])
@pytest.mark.parametrize("channels", [3, 16])
def test_conv_weight_grad_lays_its_input_out_in_two_steps(form, channels):
    """From 16 channels on, both forms lay the input out channels-major by a stored
    batched 2-d transpose and a swap of ``w`` and ``c``, not XLA:CPU's slower one-step
    transpose (ResNet-50 step 2-7% shorter, bench/README.md); with fewer channels in one
    step, which is faster there."""
    from jaxnets import layers

    x = jnp.ones((2, 9, 11, channels))
    kernel = jnp.ones((3, 3, channels, 4))
    dy = jnp.ones((2, 9, 11, 4))
    jaxpr = jax.make_jaxpr(lambda a, g, k: layers._conv_weight_grad(
        a, g, k, (1, 1), ((1, 1), (1, 1)), (1, 1), None, None, form=form))(x, dy, kernel)
    perms = [tuple(e.params["permutation"]) for e in jaxpr.eqns
             if e.primitive.name == "transpose"]
    two_steps = (0, 2, 1) in perms and (0, 2, 1, 3) in perms
    assert two_steps == (channels >= 16), perms
    assert ((0, 3, 2, 1) in perms) == (channels < 16), perms
    stored = any(e.primitive.name == "cond" for e in jaxpr.eqns)
    assert stored == (channels >= 16 and jax.default_backend() == "cpu")


# (input shape, kernel shape, stride, padding, (2-d, 1-d) convolutions in the gradient
# program of (input and kernel, input alone, kernel alone)). 16 input channels: lax's
# forward pass and input gradient. Fewer: the input gradient by patches (no convolution).
# One: the forward pass by taps too (LeNet-5's first convolution).
_ROW_GRAD_CASES = [
    ((2, 32, 32, 16), (3, 3, 16, 4), 1, 1, ((2, 1), (2, 0), (1, 1))),
    ((2, 64, 64, 3), (3, 3, 3, 4), 2, 1, ((1, 1), (1, 0), (1, 1))),
    ((2, 36, 36, 6), (5, 5, 6, 16), 1, 0, ((1, 1), (1, 0), (1, 1))),
    ((2, 36, 36, 1), (5, 5, 1, 6), 1, 0, ((0, 1), (0, 0), (0, 1))),
    ((2, 63, 64, 1), (3, 3, 1, 8), 2, 1, ((0, 1), (0, 0), (0, 1))),
]


def _compare_conv_in_every_mode(ours, plain, x, w, r, tx, tw):
    """Assert that convolution ``ours`` agrees with ``plain`` to float32 round-off in
    value, gradients, forward mode, per-example gradients under vmap and a second
    derivative, on a loss ``sum(tanh(conv) * r)``; return that loss's maker."""
    def check(a, b, what):
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            scale = float(jnp.abs(v).max())
            assert scale > 0, what
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4,
                                       atol=1e-5 * scale, err_msg=what)

    def loss(conv):
        return lambda v, k: jnp.sum(jnp.tanh(conv(v, k)) * r)

    def modes(conv):  # one compiled program per convolution: eager dispatch compiles
        return jax.jit(lambda x, w, tx, tw: (  # each of its many small ops on its own
            conv(x, w),
            jax.grad(loss(conv), (0, 1))(x, w),
            jax.jvp(conv, (x, w), (tx, tw)),
            jax.vmap(jax.grad(loss(conv), 1), (0, None))(x[:, None], w),
            jax.grad(lambda k: jnp.sum(jax.grad(loss(conv), 1)(x, k) ** 2))(w)))(x, w, tx, tw)

    for what, a, b in zip(("value", "grad", "jvp", "vmap grad", "grad grad"), modes(ours),
                          modes(plain), strict=True):
        check(a, b, what)
    return loss


@pytest.mark.parametrize("shape,kernel,stride,pad,want", _ROW_GRAD_CASES,
                         ids=[f"{c[0][3]}ch-s{c[2]}" for c in _ROW_GRAD_CASES])
def test_conv_row_grad_route_matches_lax_in_every_mode(shape, kernel, stride, pad, want):
    """A float32 convolution with enough output positions to take ``_conv_row_grad`` on
    CPU (``_MIN_POSITIONS_FOR_WEIGHT_GRAD``: 2048 here): value, gradients, forward mode,
    per-example gradients under vmap and a second derivative agree with lax's to float32
    round-off; on CPU the kernel gradient is the 1-d convolution, a frozen kernel or a
    frozen input costs no convolution for it, and float64 stays with lax."""
    from jaxnets import layers

    rng = np.random.default_rng(7)
    dn = jax.lax.conv_dimension_numbers(shape, kernel, ("NHWC", "HWIO", "NHWC"))
    pads = ((pad, pad), (pad, pad))
    ours, plain = (functools.partial(f, window_strides=(stride, stride), padding=pads,
                                     dimension_numbers=dn)
                   for f in (layers.conv_general_dilated, jax.lax.conv_general_dilated))
    assert layers._output_positions(shape, kernel, (stride, stride), pads,
                                    (1, 1)) == layers._MIN_POSITIONS_FOR_WEIGHT_GRAD
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(kernel), jnp.float32)
    r = jnp.asarray(rng.standard_normal(plain(x, w).shape), jnp.float32)
    tx = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    tw = jnp.asarray(rng.standard_normal(w.shape), jnp.float32)

    loss = _compare_conv_in_every_mode(ours, plain, x, w, r, tx, tw)
    if jax.default_backend() != "cpu":
        return

    def convs(argnums, x=x, w=w):
        """(2-d, 1-d) convolutions in the gradient program for ``argnums``."""
        eqns = jax.make_jaxpr(jax.grad(loss(ours), argnums))(x, w).eqns
        nd = [e.invars[0].aval.ndim for e in eqns if e.primitive.name == "conv_general_dilated"]
        return nd.count(4), nd.count(3)

    # Input and kernel; a frozen kernel: no kernel gradient; a frozen input: no input
    # gradient.
    assert (convs((0, 1)), convs(0), convs(1)) == want
    with jax.enable_x64(True):      # float64 (parity's gradients): lax's own, 15-45x faster
        x64, w64 = x.astype(jnp.float64), w.astype(jnp.float64)
        assert convs((0, 1), x64, w64) == (3, 0)


@pytest.mark.parametrize("stride,channels,groups", [(1, 16, 4), (2, 16, 4), (1, 32, 2)])
def test_grouped_conv_matches_lax_in_every_mode(stride, channels, groups):
    """A grouped convolution (ResNeXt's 3x3) on CPU: lax's forward pass, or the taps'
    with few channels per group (4 here; 16 in the last case), with the derivatives of
    the convolution by patches (XLA:CPU's grouped kernel gradient took ResNeXt-50's
    train step to 54 s against torch's 1.4), the input's by taps at stride 1 with few
    output channels per group. Value, gradients, forward mode, per-example gradients
    under vmap and a second derivative agree with lax's; the gradient program holds one
    convolution (lax's forward pass) or none (the taps'), in float32 and float64, and
    the input gradient no matmul where it is the taps'."""
    from jaxnets import layers

    rng = np.random.default_rng(8)
    shape, kernel = (2, 9, 10, channels), (3, 3, channels // groups, 8)
    taps = channels // groups <= layers._TAPS_CHANNELS_PER_GROUP
    dn = jax.lax.conv_dimension_numbers(shape, kernel, ("NHWC", "HWIO", "NHWC"))
    ours, plain = (functools.partial(f, window_strides=(stride, stride),
                                     padding=((1, 1), (1, 1)), dimension_numbers=dn,
                                     feature_group_count=groups)
                   for f in (layers.conv_general_dilated, jax.lax.conv_general_dilated))
    x, w, tx, tw = (jnp.asarray(rng.standard_normal(a), jnp.float32)
                    for a in (shape, kernel, shape, kernel))
    r = jnp.asarray(rng.standard_normal(plain(x, w).shape), jnp.float32)

    with jax.default_matmul_precision("highest"):
        loss = _compare_conv_in_every_mode(ours, plain, x, w, r, tx, tw)
    if jax.default_backend() != "cpu":
        return

    def convs(argnums, x=x, w=w):
        eqns = jax.make_jaxpr(jax.grad(loss(ours), argnums))(x, w).eqns
        return sum(e.primitive.name == "conv_general_dilated" for e in eqns)

    want = 0 if taps else 1
    assert (convs((0, 1)), convs(0), convs(1)) == (want, want, want)
    with jax.enable_x64(True):
        assert convs((0, 1), x.astype(jnp.float64), w.astype(jnp.float64)) == want

    from jax.extend import core as jex_core

    def dots(jaxpr):  # dot_generals, sub-programs included (jnp.einsum nests one)
        subs = [v for e in jaxpr.eqns for v in e.params.values()
                if isinstance(v, (jex_core.Jaxpr, jex_core.ClosedJaxpr))]
        return (sum(e.primitive.name == "dot_general" for e in jaxpr.eqns)
                + sum(dots(getattr(v, "jaxpr", v)) for v in subs))

    # The input gradient: by taps (elementwise, no matmul) at stride 1 with up to 4
    # output channels per group (2 here), else the patches' matmul.
    by_taps = stride == 1 and kernel[3] // groups <= layers._TAPS_INPUT_GRAD_CHANNELS_PER_GROUP
    assert (dots(jax.make_jaxpr(jax.grad(loss(ours), 0))(x, w).jaxpr) == 0) == by_taps


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU route's compiled program")
def test_conv_row_grad_reads_its_input_as_stored():
    """The 1-d kernel gradient transposes the convolution's input as it was stored
    (a ``fusion_barrier``): XLA:CPU otherwise fused the elementwise chain that made it
    (here a ReLU of an affine map, as BatchNorm + ReLU) into those transposes, computing
    it twice. The chain's ``maximum`` is in the compiled gradient program once."""
    from jaxnets import layers

    shape, kernel = (2, 32, 32, 16), (3, 3, 16, 4)
    dn = jax.lax.conv_dimension_numbers(shape, kernel, ("NHWC", "HWIO", "NHWC"))
    rng = np.random.default_rng(3)
    x, w, s = (jnp.asarray(rng.standard_normal(a), jnp.float32) for a in (shape, kernel, 16))

    def loss(w, x, s):
        y = layers.conv_general_dilated(jnp.maximum(x * s + 1.0, 0.0), w, (1, 1),
                                        ((1, 1), (1, 1)), dimension_numbers=dn)
        return jnp.sum(y ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(w, x, s).compile().as_text()
    # Two stored values: the input, and its 2-d transpose (the kernel gradient's layout).
    assert hlo.count("maximum(") == 1 and hlo.count("conditional(") == 2


def test_fusion_barrier_is_the_identity_in_every_mode():
    """``fusion_barrier``'s values and derivatives (reverse, forward, second order,
    per-example under vmap) are the identity's, bit for bit, with or without an
    anchor and with a NaN in its predicate; integer and empty arrays come back
    untouched; on CPU the program and its gradient hold the conditional that XLA
    cannot fuse across."""
    from jaxnets.layers import fusion_barrier

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    t = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    anchor = jnp.asarray(rng.standard_normal(4), jnp.float32)

    def loss(barrier):
        return lambda v: jnp.sum(jnp.sin(barrier(v * 2.0) * v) ** 2)

    plain = loss(lambda v: v)
    nan_anchor = anchor.at[0].set(jnp.nan)
    for name, ours in [("no anchor", loss(fusion_barrier)),
                       ("anchor", loss(lambda v: fusion_barrier(v, anchor))),
                       ("NaN anchor", loss(lambda v: fusion_barrier(v, nan_anchor)))]:
        for what, a, b in [
                ("value", ours(x), plain(x)),
                ("grad", jax.grad(ours)(x), jax.grad(plain)(x)),
                ("jvp", jax.jvp(ours, (x,), (t,)), jax.jvp(plain, (x,), (t,))),
                ("vmap grad", jax.vmap(jax.grad(ours))(x), jax.vmap(jax.grad(plain))(x)),
                ("grad grad", jax.grad(lambda v: jnp.sum(jax.grad(ours)(v) ** 2))(x),
                 jax.grad(lambda v: jnp.sum(jax.grad(plain)(v) ** 2))(x))]:
            for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                np.testing.assert_array_equal(np.asarray(u), np.asarray(v),
                                              err_msg=f"{name}: {what}")
    nan = x.at[1, 2].set(jnp.nan)
    np.testing.assert_array_equal(np.asarray(fusion_barrier(nan)), np.asarray(nan))
    half = x.astype(jnp.bfloat16)
    assert fusion_barrier(half).dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(fusion_barrier(half), np.float32),
                                  np.asarray(half, np.float32))
    ints, empty = jnp.arange(6), jnp.zeros((0, 3))
    assert fusion_barrier(ints) is ints and fusion_barrier(empty) is empty
    if jax.default_backend() != "cpu":
        assert fusion_barrier(x) is x
        return
    ours = loss(fusion_barrier)
    assert jax.jit(ours).lower(x).compile().as_text().count("conditional(") == 1
    # The forward pass's, and the cotangent's in reverse mode.
    assert jax.jit(jax.grad(ours)).lower(x).compile().as_text().count("conditional(") == 2


def test_dot_general_merges_leading_axes_and_keeps_lax_values():
    """``layers.dot_general`` (``linear``'s, ViT's and attention's input projections):
    the values and both gradients are ``lax.dot_general``'s for a (K, N) and an (N, K)
    kernel; on CPU a (B, L, K) input's kernel gradient is one 2-d matmul on its operands
    as they lie (bitcasts, no transposed copy); other shapes go to ``lax`` unchanged."""
    from jaxnets.layers import dot_general, linear

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((4, 16, 32)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((4, 16, 64)), jnp.float32)
    for kernel_axis in (0, 1):
        w = jnp.asarray(rng.standard_normal((32, 64) if kernel_axis == 0 else (64, 32)),
                        jnp.float32)
        dn = (((2,), (kernel_axis,)), ((), ()))
        ours, vjp = jax.vjp(lambda a, b: dot_general(a, b, dn), x, w)
        ref, vjp_ref = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dn), x, w)
        assert ours.shape == ref.shape == (4, 16, 64)
        for u, v in zip((ours, *vjp(dy)), (ref, *vjp_ref(dy)), strict=True):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-5)
        if jax.default_backend() == "cpu":
            ops = _entry_ops(
                lambda a, b, g: jax.vjp(lambda v: dot_general(a, v, dn), b)[1](g)[0], x, w, dy)
            assert ops == ["bitcast", "dot", "parameter"], ops
    # Left to lax: a 2-d input, batch axes, more than one contracted axis, and no data.
    cases = [(jnp.ones((5, 32)), jnp.ones((32, 3)), (((1,), (0,)), ((), ()))),
             (jnp.ones((2, 5, 32)), jnp.ones((2, 32, 3)), (((2,), (1,)), ((0,), (0,)))),
             (jnp.ones((2, 5, 32)), jnp.ones((5, 32, 3)), (((1, 2), (0, 1)), ((), ())))]
    for a, b, dn in cases:
        assert (str(jax.make_jaxpr(lambda a, b: dot_general(a, b, dn))(a, b))
                == str(jax.make_jaxpr(lambda a, b: jax.lax.dot_general(a, b, dn))(a, b)))
    empty = dot_general(jnp.ones((0, 5, 32)), jnp.ones((32, 3)), (((2,), (0,)), ((), ())))
    assert empty.shape == (0, 5, 3)
    assert dot_general(jnp.ones((2, 5, 0)), jnp.ones((0, 3)),
                       (((2,), (0,)), ((), ()))).shape == (2, 5, 3)
    layer = linear(32, 64, rngs=nnx.Rngs(0))
    assert layer.dot_general is dot_general
    np.testing.assert_allclose(
        np.asarray(layer(x)), np.asarray(x @ layer.kernel[...] + layer.bias[...]),
        rtol=1e-5, atol=1e-5)


def _value_and_vjp(f, args, cotangent):
    """``(f(*args), *vjp(cotangent))`` as one compiled program (op by op, the backward
    pass compiles each of its many small operations on its own)."""
    @jax.jit
    def run(args, cotangent):
        value, vjp = jax.vjp(f, *args)
        return (value, *vjp(cotangent))

    return run(args, cotangent)


def test_dot_product_attention_is_jaxs_with_the_heads_first():
    """``layers.dot_product_attention`` gives ``jax.nn.dot_product_attention``'s values
    and gradients (float32, bfloat16; self- and cross-attention); on CPU each of its
    products, forward and backward, is batched over the leading (batch, heads) axes;
    other dtypes and grouped heads go to jax's unchanged."""
    from jaxnets.layers import dot_product_attention

    rng = np.random.default_rng(5)
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
        for s in (7, 5):
            q = jnp.asarray(rng.standard_normal((2, 7, 3, 8)), dtype)
            k, v = (jnp.asarray(rng.standard_normal((2, s, 3, 8)), dtype) for _ in range(2))
            g = jnp.asarray(rng.standard_normal((2, 7, 3, 8)), dtype)
            ours, ref = (_value_and_vjp(f, (q, k, v), g)
                         for f in (dot_product_attention, jax.nn.dot_product_attention))
            assert ours[0].dtype == ref[0].dtype == dtype and ours[0].shape == ref[0].shape
            for a, b in zip(ours, ref, strict=True):
                np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                           rtol=tol, atol=tol)
    q = jnp.asarray(rng.standard_normal((2, 7, 3, 8)), jnp.float32)
    if jax.default_backend() == "cpu":
        grad = jax.make_jaxpr(jax.grad(lambda q: jnp.sum(dot_product_attention(q, q, q) ** 2)))(q)
        dots = [e.params["dimension_numbers"] for e in grad.eqns
                if e.primitive.name == "dot_general"]
        assert len(dots) == 6 and all(batch == ((0, 1), (0, 1)) for _, batch in dots), dots
    half = q.astype(jnp.float16)
    kv_groups = jnp.ones((2, 5, 1, 8))
    for args in ((half, half, half), (q, kv_groups, kv_groups)):
        assert (str(jax.make_jaxpr(dot_product_attention)(*args))
                == str(jax.make_jaxpr(jax.nn.dot_product_attention)(*args)))


def _random_bits_shapes(fn, *args) -> list[tuple]:
    """The shapes of every ``random_bits`` in ``fn``'s program, sub-programs included."""
    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "random_bits":
                yield tuple(e.params["shape"])
            for v in e.params.values():
                inner = getattr(v, "jaxpr", None)
                if inner is not None:
                    yield from walk(getattr(inner, "jaxpr", inner))

    return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def test_initializers_draw_flat_and_equal_flax_and_jax():
    """The convolutions' initializers give the very numbers of nnx's / jax's (torch's
    default uniform, kaiming fan-out normal, normal, ViT's truncated normal) and draw
    them over one flat vector: XLA:CPU compiled jax's draw over a 3x3x8x12 kernel in 11 s
    on an AVX2 CPU (``jaxnets.layers.draw_flat``)."""
    from jaxnets import layers
    from jaxnets.vit import _trunc_normal

    bound = 1 / np.sqrt(37)
    pairs = [
        (layers.torch_default_init(37),
         lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound)),
        (layers.kaiming_normal_fan_out, nnx.initializers.variance_scaling(2.0, "fan_out",
                                                                          "normal")),
        (layers.normal_init(0.01), nnx.initializers.normal(0.01)),
        (_trunc_normal(0.05),
         lambda k, s: jax.random.truncated_normal(k, -40.0, 40.0, s, jnp.float32) * 0.05),
    ]
    key = jax.random.key(3)
    for ours, theirs in pairs:
        for shape in ((5, 5, 6, 16), (7, 40)):  # shapes XLA compiles quickly either way
            np.testing.assert_array_equal(np.asarray(ours(key, shape)),
                                          np.asarray(theirs(key, shape)))
        assert _random_bits_shapes(lambda k: ours(k, (3, 3, 8, 12)), key) == [(864,)]
        assert _random_bits_shapes(lambda k: theirs(k, (3, 3, 8, 12)), key) == [(3, 3, 8, 12)]
