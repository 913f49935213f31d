"""Per-op timings behind ``jaxnets.layers``' CPU detours: convolutions, BatchNorm, dense
layers and attention.

    python -m bench.conv_ops [--batch 8] [--size 56] [--repeat 5] [--dtype float32] [--short]

For each convolution shape (ResNet-50's at ``--size``, ``--size`` halved per
stage) it times the forward pass, the input gradient and the weight gradient
three ways: ``jax.lax.conv_general_dilated`` as XLA compiles it, the
convolution ``jaxnets.layers.conv2d`` computes (on CPU a 1x1 kernel is a
matmul there; a larger kernel's weight gradient a 1-d convolution where there
are enough output positions), and torch (channels-last, eager), plus that 1-d
convolution weight gradient (``jaxnets.layers._conv_weight_grad``) on its own for
every shape, and the output positions (batch x height x width) that decide
whether ``conv2d`` takes it; ResNeXt-50's grouped 3x3 convolutions the same three
ways (without the 1-d column). Then a train-mode
BatchNorm + ReLU gradient: autodiff of the plain formula, ``jaxnets.layers.BatchNorm``
(a closed-form derivative rule) and torch. Medians in ms; the gradients include
no forward pass on the jax side (XLA drops what the gradient does not need),
torch's do (its autograd needs the forward). Last, a dense layer on tokens
(ViT-B's widths; ``batch`` x (``size``/4)^2+1 tokens, 197 at the default
size, as ViT-B/16 at 224): forward, input and kernel gradients through
``jax.lax.dot_general``, through ``jaxnets.layers.dot_general`` (the leading
axes merged on CPU) and torch's ``linear``; and ViT-B's attention (12 heads of
64 over those tokens), forward and forward + backward, through
``jax.nn.dot_product_attention``, ``jaxnets.layers.dot_product_attention``
(heads moved before the tokens on CPU) and torch's
``scaled_dot_product_attention``. Last, max-pools at ResNet's and GoogLeNet's
shapes, forward and forward + backward: ``lax.reduce_window`` (the gradient
``select_and_scatter``), ``jaxnets.layers.max_pool2d`` (on CPU shifted slices and a
gather) and torch's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import train_step
from jaxnets.cli import ArgumentParser
from jaxnets.layers import (BatchNorm, _conv_weight_grad, _pool_pads, conv_general_dilated,
                            dot_general, dot_product_attention, max_pool2d)

__all__ = ["conv_rows", "grouped_rows", "batchnorm_rows", "dense_rows", "attention_rows",
           "pool_rows", "main"]

_DN = jax.lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))


def _median_ms(fn, *args, repeat: int) -> float:
    """``bench.train_step``'s timer: one warm-up call, then the median of ``repeat``."""
    return train_step._median_ms(lambda: fn(*args), jax.block_until_ready, repeat, 1)


def _jax_fwd_dx_dw(f, x, w, dy, repeat: int) -> list[float]:
    """Median ms of ``f(x, w)``, its input gradient and its weight gradient (jitted)."""
    fwd = jax.jit(f)
    dx = jax.jit(lambda x, w, dy: jax.vjp(lambda v: f(v, w), x)[1](dy)[0])
    dw = jax.jit(lambda x, w, dy: jax.vjp(lambda v: f(x, v), w)[1](dy)[0])
    return [_median_ms(fwd, x, w, repeat=repeat), _median_ms(dx, x, w, dy, repeat=repeat),
            _median_ms(dw, x, w, dy, repeat=repeat)]


def _torch_fwd_dx_dw(op, tx, tw, tdy, repeat: int) -> list[float]:
    """Median ms of torch's ``op(tx, tw)`` (no grad), and of its input and weight
    gradients (each with the forward autograd needs)."""
    import torch

    def t_fwd():
        with torch.no_grad():
            return op(tx, tw)

    def t_grad(wrt):
        return torch.autograd.grad(op(tx, tw), wrt, tdy)

    return [_median_ms(t_fwd, repeat=repeat), _median_ms(t_grad, tx, repeat=repeat),
            _median_ms(t_grad, tw, repeat=repeat)]


def _torch_conv_fwd_dx_dw(x, w, dy, repeat: int, **conv_args) -> list[float]:
    """``_torch_fwd_dx_dw`` of torch's ``conv2d`` on the NHWC / HWIO arrays' values
    (channels-last tensors)."""
    import torch

    def nchw(v):
        return torch.from_numpy(np.asarray(v).transpose(0, 3, 1, 2).copy()).contiguous(
            memory_format=torch.channels_last)

    tw = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy()).requires_grad_()
    return _torch_fwd_dx_dw(lambda a, b: torch.nn.functional.conv2d(a, b, **conv_args),
                            nchw(x).requires_grad_(), tw, nchw(dy), repeat)


def _shapes(size: int):
    """(map side, in, out, kernel, stride, padding): ResNet-50's convolutions by stage
    (the stem, then a 1x1 / 3x3 / strided 3x3 of each kind)."""
    s = size
    return [(s * 4, 3, 64, 7, 2, 3), (s, 64, 256, 1, 1, 0), (s, 256, 64, 1, 1, 0),
            (s, 64, 64, 3, 1, 1), (s, 128, 128, 3, 2, 1),
            (s, 256, 512, 1, 2, 0), (s // 2, 128, 128, 3, 1, 1), (s // 4, 1024, 256, 1, 1, 0),
            (s // 4, 256, 256, 3, 1, 1), (s // 8, 512, 512, 3, 1, 1)]


def conv_rows(batch: int, size: int, repeat: int, dtype: str = "float32") -> list[dict]:
    """Timings of each convolution shape (see the module docstring), in ``dtype``
    ("float64" needs ``jax.enable_x64``)."""
    rng = np.random.default_rng(0)
    rows = []
    for side, cin, cout, k, s, p in _shapes(size):
        x = jnp.asarray(rng.standard_normal((batch, side, side, cin)), dtype)
        w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) * 0.05, dtype)
        out = (side + 2 * p - k) // s + 1
        dy = jnp.asarray(rng.standard_normal((batch, out, out, cout)), dtype)
        row = {"shape": f"{side}x{side} {cin}->{cout} k{k} s{s}"}
        for name, conv in (("lax", jax.lax.conv_general_dilated),
                           ("jaxnets", conv_general_dilated)):
            row[name] = _jax_fwd_dx_dw(
                lambda x, w, conv=conv: conv(x, w, (s, s), ((p, p), (p, p)),
                                             dimension_numbers=_DN), x, w, dy, repeat)
        # The 1-d convolution weight gradient on its own, whether or not the shape has
        # the output positions for conv_general_dilated to take it (the threshold's basis).
        row["row_dw"] = (None if k == 1 else _median_ms(jax.jit(
            lambda x, dy: _conv_weight_grad(x, dy, w, (s, s), ((p, p), (p, p)), (1, 1),
                                            None, None)), x, dy, repeat=repeat))
        row["positions"] = batch * out * out
        row["torch"] = _torch_conv_fwd_dx_dw(x, w, dy, repeat, stride=s, padding=p)
        rows.append(row)
    return rows


def grouped_rows(batch: int, size: int, repeat: int, dtype: str = "float32") -> list[dict]:
    """ResNeXt-50 32x4d's grouped 3x3 convolutions, one per stage (32 groups, 4 to 32
    channels per group), timed as ``conv_rows`` times its shapes."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(4):
        side, c, groups = max(size >> i, 1), 128 << i, 32
        x = jnp.asarray(rng.standard_normal((batch, side, side, c)), dtype)
        w = jnp.asarray(rng.standard_normal((3, 3, c // groups, c)) * 0.05, dtype)
        dy = jnp.asarray(rng.standard_normal((batch, side, side, c)), dtype)
        row = {"shape": f"{side}x{side} {c}/{groups}g k3 s1"}
        for name, conv in (("lax", jax.lax.conv_general_dilated),
                           ("jaxnets", conv_general_dilated)):
            row[name] = _jax_fwd_dx_dw(
                lambda x, w, conv=conv: conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN,
                                             feature_group_count=groups), x, w, dy, repeat)
        row["torch"] = _torch_conv_fwd_dx_dw(x, w, dy, repeat, padding=1, groups=groups)
        rows.append(row)
    return rows


def batchnorm_rows(batch: int, size: int, repeat: int) -> list[dict]:
    """Train-mode BatchNorm + ReLU gradient (input and affine terms) per shape."""
    import torch

    def plain(x, scale, bias):
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias

    rows = []
    for side, c in ((size * 2, 64), (size, 256), (size // 2, 512), (size // 4, 1024)):
        x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, side, side, c)),
                        jnp.float32)
        ones, zeros = jnp.ones(c), jnp.zeros(c)
        g_plain = jax.jit(jax.grad(
            lambda x, s, b: jnp.sum(jax.nn.relu(plain(x, s, b)) ** 2), argnums=(0, 1, 2)))
        bn = BatchNorm(c)
        g_ours = nnx.jit(lambda m, x: nnx.grad(
            lambda m, x: jnp.sum(jax.nn.relu(m(x)) ** 2), argnums=(0, 1))(m, x))
        tbn = torch.nn.BatchNorm2d(c).train()
        tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_()

        def t_grad():
            tbn.zero_grad()
            (torch.relu(tbn(tx)) ** 2).sum().backward()

        rows.append({"shape": f"{batch}x{side}x{side}x{c}",
                     "autodiff": _median_ms(g_plain, x, ones, zeros, repeat=repeat),
                     "jaxnets": _median_ms(g_ours, bn, x, repeat=repeat),
                     "torch": _median_ms(t_grad, repeat=repeat)})
    return rows


def dense_rows(batch: int, size: int, repeat: int) -> list[dict]:
    """Forward, input gradient and kernel gradient of a dense layer on (batch, L, K)
    tokens: ViT-B's MLP (768->3072, 3072->768, a (K, N) kernel as ``nnx.Linear``
    keeps it) and attention input projection (768->2304, torch's (N, K) weight)."""
    import torch

    tokens = (size // 4) ** 2 + 1
    rng = np.random.default_rng(2)
    rows = []
    for k, n, torch_layout in ((768, 3072, False), (3072, 768, False), (768, 2304, True)):
        x = jnp.asarray(rng.standard_normal((batch, tokens, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((n, k) if torch_layout else (k, n)) * 0.03,
                        jnp.float32)
        dy = jnp.asarray(rng.standard_normal((batch, tokens, n)), jnp.float32)
        dn = (((2,), (1 if torch_layout else 0,)), ((), ()))
        row = {"shape": f"{batch}x{tokens}x{k} -> {n}" + (" (N, K)" if torch_layout else "")}
        for name, dot in (("lax", jax.lax.dot_general), ("jaxnets", dot_general)):
            row[name] = _jax_fwd_dx_dw(lambda x, w, dot=dot: dot(x, w, dn), x, w, dy, repeat)
        tx = torch.from_numpy(np.array(x)).requires_grad_()
        tw = torch.from_numpy(np.array(w if torch_layout else w.T)).requires_grad_()
        tdy = torch.from_numpy(np.array(dy))
        row["torch"] = _torch_fwd_dx_dw(torch.nn.functional.linear, tx, tw, tdy, repeat)
        rows.append(row)
    return rows


def attention_rows(batch: int, size: int, repeat: int) -> list[dict]:
    """ViT-B's attention over (batch, (size/4)^2+1 tokens, 12 heads, 64): forward and
    forward + backward, ms."""
    import torch

    shape = (batch, (size // 4) ** 2 + 1, 12, 64)
    rng = np.random.default_rng(3)
    q, k, v, g = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4))
    row = {"shape": "x".join(map(str, shape))}
    for name, attend in (("jax.nn", jax.nn.dot_product_attention),
                         ("jaxnets", dot_product_attention)):
        fwd = jax.jit(attend)
        both = jax.jit(lambda q, k, v, g, attend=attend: jax.vjp(attend, q, k, v)[1](g))
        row[name] = [_median_ms(fwd, q, k, v, repeat=repeat),
                     _median_ms(both, q, k, v, g, repeat=repeat)]
    tq, tk, tv = (torch.from_numpy(np.array(a)).transpose(1, 2).requires_grad_()
                  for a in (q, k, v))
    tg = torch.from_numpy(np.array(g)).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def t_fwd():
        with torch.no_grad():
            return sdpa(tq, tk, tv)

    row["torch"] = [_median_ms(t_fwd, repeat=repeat),
                    _median_ms(lambda: torch.autograd.grad(sdpa(tq, tk, tv), (tq, tk, tv), tg),
                               repeat=repeat)]
    return [row]


def pool_rows(batch: int, size: int, repeat: int) -> list[dict]:
    """Max-pools (ResNet's 3x3/2 stem pool, GoogLeNet's ceil-mode stem pool and its
    3x3/1 branch pool), forward and forward + backward, ms: ``lax.reduce_window``
    (its gradient ``select_and_scatter``), ``jaxnets.layers.max_pool2d`` and torch."""
    import torch

    rng = np.random.default_rng(4)
    rows = []
    for side, c, k, s, p, ceil in ((size * 2, 64, 3, 2, 1, False), (size * 2, 64, 3, 2, 0, True),
                                   (size // 2, 192, 3, 1, 1, True)):
        x = jnp.asarray(rng.standard_normal((batch, side, side, c)), jnp.float32)
        (oh, ow), pads = _pool_pads(x, (k, k), (s, s), (p, p), ceil)
        g = jnp.asarray(rng.standard_normal((batch, oh, ow, c)), jnp.float32)

        def lax_pool(x):
            y = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1), pads)
            return y[:, :oh, :ow]

        row = {"shape": f"{batch}x{side}x{side}x{c} k{k} s{s} p{p}" + (" ceil" if ceil else "")}
        for name, pool in (("lax", lax_pool),
                           ("jaxnets", lambda x: max_pool2d(x, k, s, p, ceil_mode=ceil))):
            both = jax.jit(lambda x, g, pool=pool: jax.vjp(pool, x)[1](g))
            row[name] = [_median_ms(jax.jit(pool), x, repeat=repeat),
                         _median_ms(both, x, g, repeat=repeat)]
        tx = torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)).contiguous(
            memory_format=torch.channels_last).requires_grad_()
        tg = torch.from_numpy(np.array(g).transpose(0, 3, 1, 2)).contiguous(
            memory_format=torch.channels_last)

        def t_pool(tx=tx, k=k, s=s, p=p, ceil=ceil):
            return torch.nn.functional.max_pool2d(tx, k, s, p, ceil_mode=ceil)

        def t_fwd():
            with torch.no_grad():
                return t_pool()

        row["torch"] = [_median_ms(t_fwd, repeat=repeat),
                        _median_ms(lambda: torch.autograd.grad(t_pool(), tx, tg), repeat=repeat)]
        rows.append(row)
    return rows


def _print_rows(title: str, rows: list[dict], keys: tuple[str, ...], what: str):
    """A table of timings: one column per key, its figures ``what`` joined by "/"."""
    print(f"{title:<26} " + " ".join(f"{k + ' ' + what:>22}" for k in keys))
    for r in rows:
        cells = ["/".join(f"{v:.1f}" for v in r[k]) for k in keys]
        print(f"{r['shape']:<26} " + " ".join(f"{c:>22}" for c in cells))


def main(argv=None) -> int:
    from jaxnets.xla_cpu import prepare_cpu

    prepare_cpu()  # before jax starts: jaxnets/hostmem.py, jaxnets/xla_cpu.py
    p = ArgumentParser(prog="python -m bench.conv_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=56, help="side of the first stage's maps")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per figure (median)")
    p.add_argument("--short", action="store_true", help="batch 1, 8x8 maps, 1 call: a smoke run")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="convolutions' dtype (float64: what parity's gradients use; the "
                        "BatchNorm, dense and attention rows are float32 only and are "
                        "left out)")
    args = p.parse_args(argv)
    if args.short:
        args.batch, args.size, args.repeat = 1, 8, 1
    if min(args.batch, args.size, args.repeat) < 1 or args.size % 8:
        p.error("--batch and --repeat must be >= 1, --size a positive multiple of 8")
    import torch

    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
          f"batch {args.batch}, {args.dtype}; ms, medians of {args.repeat}")
    print(f"{'convolution':<26} {'lax fwd/dx/dw':>22} {'jaxnets fwd/dx/dw':>22} "
          f"{'torch fwd/dx/dw':>22} {'1-d dw':>8} {'positions':>10}")
    with jax.enable_x64(args.dtype == "float64"):
        rows = conv_rows(args.batch, args.size, args.repeat, args.dtype)
    for r in rows:
        cells = ["/".join(f"{v:.1f}" for v in r[k]) for k in ("lax", "jaxnets", "torch")]
        row_dw = "-" if r["row_dw"] is None else f"{r['row_dw']:.1f}"
        print(f"{r['shape']:<26} {cells[0]:>22} {cells[1]:>22} {cells[2]:>22} {row_dw:>8} "
              f"{r['positions']:>10}")
    with jax.enable_x64(args.dtype == "float64"):
        grouped = grouped_rows(args.batch, args.size, args.repeat, args.dtype)
    _print_rows("grouped convolution", grouped, ("lax", "jaxnets", "torch"), "fwd/dx/dw")
    if args.dtype != "float32":
        return 0
    print(f"{'BatchNorm+ReLU gradient':<26} {'autodiff':>10} {'jaxnets':>10} {'torch':>10}")
    for r in batchnorm_rows(args.batch, args.size, args.repeat):
        print(f"{r['shape']:<26} {r['autodiff']:>10.1f} {r['jaxnets']:>10.1f} {r['torch']:>10.1f}")
    _print_rows("dense layer", dense_rows(args.batch, args.size, args.repeat),
                ("lax", "jaxnets", "torch"), "fwd/dx/dw")
    _print_rows("attention", attention_rows(args.batch, args.size, args.repeat),
                ("jax.nn", "jaxnets", "torch"), "fwd/fwd+bwd")
    _print_rows("max-pool", pool_rows(args.batch, args.size, args.repeat),
                ("lax", "jaxnets", "torch"), "fwd/fwd+bwd")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
