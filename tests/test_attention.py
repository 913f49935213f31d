"""MultiheadAttention against torch.nn.MultiheadAttention: outputs, weights, gradients, masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxnets.attention import MultiheadAttention
from jaxnets.layers import cpu_detours
from porting.state_dict import (PortingError, flax_to_torch, load_torch_state_dict,
                                to_torch_state_dict)

E, H, L, S, N = 8, 2, 3, 4, 2
OUT_ATOL = 1e-4
GRAD_RTOL = 1e-4


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(b)), 1e-12))


def _pair(seed=0, **kw):
    """A torch MHA with random (non-default) parameters and its port."""
    torch.manual_seed(seed)
    t = torch.nn.MultiheadAttention(E, H, **kw)
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0.0, 0.5)
    f = MultiheadAttention(E, H, **kw, rngs=nnx.Rngs(seed))
    report = load_torch_state_dict(f, t.state_dict(), strict=True)
    assert report.ok and len(report.loaded) == len(t.state_dict())
    return t, f


def _masks(name: str, rng: np.random.Generator, tgt_len=L, src_len=S) -> dict:
    """Named mask setups; no query row is fully blocked (col 0 stays open)."""
    def bool_(shape):
        m = rng.random(shape) < 0.4
        m[..., 0] = False
        return m

    def float_(shape):
        m = rng.standard_normal(shape).astype(np.float32)
        m[..., 1:][rng.random(m[..., 1:].shape) < 0.3] = -np.inf
        return m

    kpm_bool = np.zeros((N, src_len), bool)
    kpm_bool[0, 2:] = True
    kpm_bool[1, -1] = True
    table = {
        "none": {},
        "bool_attn2d": {"attn_mask": bool_((tgt_len, src_len))},
        "float_attn2d": {"attn_mask": float_((tgt_len, src_len))},
        "bool_attn3d": {"attn_mask": bool_((N * H, tgt_len, src_len))},
        "float_attn3d": {"attn_mask": float_((N * H, tgt_len, src_len))},
        "bool_kpm": {"key_padding_mask": kpm_bool},
        "float_kpm": {"key_padding_mask": float_((N, src_len))},
        "bool_attn+bool_kpm": {"attn_mask": bool_((tgt_len, src_len)),
                               "key_padding_mask": kpm_bool},
        "float_attn3d+float_kpm": {"attn_mask": float_((N * H, tgt_len, src_len)),
                                   "key_padding_mask": float_((N, src_len))},
        # With is_causal, query 0 of item 0 then has no key left at all.
        "kpm_first_blocked": {"key_padding_mask": np.eye(N, src_len, dtype=bool)},
    }
    return table[name]


def _inputs(kw, rng, unbatched=False, self_attn=False, tgt_len=L, src_len=S):
    kdim, vdim = kw.get("kdim", E), kw.get("vdim", E)
    bf = kw.get("batch_first", False)

    def shape(length, d):
        if unbatched:
            return (length, d)
        return (N, length, d) if bf else (length, N, d)

    q = rng.standard_normal(shape(tgt_len, E)).astype(np.float32)
    if self_attn:
        return q, q, q
    k = rng.standard_normal(shape(src_len, kdim)).astype(np.float32)
    v = rng.standard_normal(shape(src_len, vdim)).astype(np.float32)
    return q, k, v


def _torch_run(t, q, k, v, masks, need_weights, average, is_causal=False):
    tq, tk, tv = (torch.from_numpy(a).requires_grad_(True) for a in (q, k, v))
    tm = {n: torch.from_numpy(m) for n, m in masks.items()}
    t.train()  # the slow path (no fused kernel), as autograd would take anyway
    out, w = t(tq, tk, tv, need_weights=need_weights, average_attn_weights=average,
               is_causal=is_causal, **tm)
    rng = np.random.default_rng(7)
    r_out = rng.standard_normal(out.shape).astype(np.float32)
    loss = (out * torch.from_numpy(r_out)).sum()
    r_w = None
    if w is not None:
        r_w = rng.standard_normal(w.shape).astype(np.float32)
        loss = loss + (w * torch.from_numpy(r_w)).sum()
    loss.backward()
    grads = {k_: p.grad.numpy().copy() for k_, p in t.named_parameters()}
    grads.update({"input.q": tq.grad.numpy(), "input.k": tk.grad.numpy(),
                  "input.v": tv.grad.numpy()})
    t.zero_grad(set_to_none=True)
    return (out.detach().numpy(), None if w is None else w.detach().numpy(), grads, r_out, r_w)


def _jax_run(f, q, k, v, masks, need_weights, average, r_out, r_w, is_causal=False):
    jm = {n: jnp.asarray(m) for n, m in masks.items()}

    def loss(model, q_, k_, v_):
        out, w = model(q_, k_, v_, need_weights=need_weights, average_attn_weights=average,
                       is_causal=is_causal, **jm)
        total = jnp.sum(out * r_out)
        if w is not None:
            total = total + jnp.sum(w * r_w)
        return total, (out, w)

    # One compiled program per case: op by op, the backward pass compiles each of its
    # many small operations on its own (this file: 64 -> 47 s).
    (_, (out, w)), (g, gq, gk, gv) = nnx.jit(nnx.value_and_grad(
        loss, argnums=(0, 1, 2, 3), has_aux=True))(f, jnp.asarray(q), jnp.asarray(k),
                                                    jnp.asarray(v))
    flat = {".".join(map(str, p)): x for p, x in nnx.to_flat_state(g)}
    grads = flax_to_torch(f, flat)
    grads.update({"input.q": np.asarray(gq), "input.k": np.asarray(gk),
                  "input.v": np.asarray(gv)})
    return np.asarray(out), None if w is None else np.asarray(w), grads


def _check(t, f, q, k, v, masks, is_causal_torch=False, is_causal_jax=False, jax_masks=None):
    for need_weights, average in ((False, True), (True, True), (True, False)):
        want_out, want_w, want_g, r_out, r_w = _torch_run(t, q, k, v, masks, need_weights,
                                                          average, is_causal_torch)
        got_out, got_w, got_g = _jax_run(f, q, k, v, masks if jax_masks is None else jax_masks,
                                         need_weights, average, r_out, r_w, is_causal_jax)
        tag = f"need_weights={need_weights} average={average}"
        assert got_out.shape == want_out.shape, tag
        np.testing.assert_allclose(got_out, want_out, atol=OUT_ATOL, rtol=0, err_msg=tag)
        if need_weights:
            assert got_w.shape == want_w.shape, tag
            np.testing.assert_allclose(got_w, want_w, atol=OUT_ATOL, rtol=0, err_msg=tag)
        else:
            assert got_w is None
        assert set(got_g) == set(want_g), tag
        bad = {n: _rel(got_g[n], want_g[n]) for n in want_g
               if _rel(got_g[n], want_g[n]) > GRAD_RTOL}
        assert not bad, f"{tag}: gradients differ (relative): {bad}"


OPTIONS = {
    "default": {},
    "kdim_vdim": {"kdim": 6, "vdim": 5},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "bias_kv+zero_attn+kdim": {"add_bias_kv": True, "add_zero_attn": True, "kdim": 3},
    "batch_first": {"batch_first": True},
}
MASKS = ["none", "bool_attn2d", "float_attn2d", "bool_attn3d", "float_attn3d", "bool_kpm",
         "float_kpm", "bool_attn+bool_kpm", "float_attn3d+float_kpm"]
# Every option and every mask kind at least once (pairing them keeps the run short).
CASES = [("default", "none"), ("kdim_vdim", "bool_attn2d"), ("no_bias", "float_attn2d"),
         ("bias_kv", "bool_attn3d"), ("zero_attn", "float_attn3d"),
         ("bias_kv+zero_attn+kdim", "float_attn3d+float_kpm"),
         ("batch_first", "bool_attn+bool_kpm"), ("default", "bool_kpm"),
         ("batch_first", "float_kpm"), ("default", "bool_attn+bool_kpm")]


@pytest.mark.parametrize("option,mask", CASES, ids=[f"{o}-{m}" for o, m in CASES])
def test_parity_with_torch(option, mask):
    kw = OPTIONS[option]
    t, f = _pair(**kw)
    rng = np.random.default_rng(0)
    q, k, v = _inputs(kw, rng)
    _check(t, f, q, k, v, _masks(mask, rng))


@pytest.mark.parametrize("option,mask", [("default", "none"), ("batch_first", "none"),
                                         ("default", "bool_kpm")])
def test_parity_along_the_accelerator_path(option, mask):
    """The same comparison with jaxnets.layers' CPU detours off: mask-free attention by
    ``jax.nn.dot_product_attention``, as on a GPU or TPU (tests/test_accelerator_path.py)."""
    with cpu_detours(False):
        test_parity_with_torch(option, mask)


@pytest.mark.parametrize("shared", [3, 2])
def test_self_and_cross_attention_take_packed_projections(shared):
    """Self-attention (``mha(x, x, x)``) and a shared key/value (``mha(q, m, m)``, the
    decoder's cross-attention) equal torch's, gradients included, and project with one
    matmul by the packed weight's rows (no weight slice for self-attention, one for
    the cross-attention's query)."""
    t, f = _pair(3)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((L, N, E)).astype(np.float32)
    m = rng.standard_normal((S, N, E)).astype(np.float32) if shared == 2 else x
    r = rng.standard_normal((L, N, E)).astype(np.float32)
    tx, tm = torch.from_numpy(x).requires_grad_(), torch.from_numpy(m).requires_grad_()
    t.train()
    out = t(tx, tx, tx, need_weights=False)[0] if shared == 3 else t(tx, tm, tm,
                                                                     need_weights=False)[0]
    (out * torch.from_numpy(r)).sum().backward()

    def loss(model, x, m):
        y = model(x, x, x, need_weights=False)[0] if shared == 3 else model(
            x, m, m, need_weights=False)[0]
        return jnp.sum(y * r), y

    (_, y), (g, gx, gm) = nnx.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        f, jnp.asarray(x), jnp.asarray(m))
    np.testing.assert_allclose(np.asarray(y), out.detach().numpy(), atol=OUT_ATOL, rtol=0)
    grads = flax_to_torch(f, {".".join(map(str, p)): v for p, v in nnx.to_flat_state(g)})
    want = {k: p.grad.numpy() for k, p in t.named_parameters()}
    want["x"] = tx.grad.numpy()
    grads["x"] = np.asarray(gx) + (np.asarray(gm) if shared == 3 else 0)
    if shared == 2:
        want["m"], grads["m"] = tm.grad.numpy(), np.asarray(gm)
    bad = {k: _rel(grads[k], want[k]) for k in want if _rel(grads[k], want[k]) > GRAD_RTOL}
    assert not bad, bad
    jaxpr = jax.make_jaxpr(lambda x, m: loss(f, x, m)[0])(jnp.asarray(x), jnp.asarray(m))
    packed = sorted(e.invars[1].aval.shape for e in jaxpr.eqns
                    if e.primitive.name == "dot_general"
                    and e.invars[1].aval.shape in ((2 * E, E), (3 * E, E)))
    assert packed == [(3 * E, E) if shared == 3 else (2 * E, E)], packed


def test_unbatched_parity():
    t, f = _pair(add_bias_kv=True)
    rng = np.random.default_rng(1)
    q, k, v = _inputs({}, rng, unbatched=True)
    kpm = np.array([False, False, True, False])
    am = rng.standard_normal((L, S)).astype(np.float32)
    _check(t, f, q, k, v, {"key_padding_mask": kpm, "attn_mask": am})


@pytest.mark.parametrize("with_kpm", [False, True])
def test_is_causal(with_kpm):
    t, f = _pair(batch_first=True)
    rng = np.random.default_rng(2)
    q, k, v = _inputs({"batch_first": True}, rng, self_attn=True, tgt_len=S)
    causal = np.asarray(torch.nn.Transformer.generate_square_subsequent_mask(S))
    masks = {"attn_mask": causal}
    extra = {}
    if with_kpm:
        extra["key_padding_mask"] = np.array([[False, False, True, True],
                                              [False, False, False, False]])
    # torch needs the mask with the hint; here the hint alone builds it (and a
    # given mask is used as is).
    _check(t, f, q, k, v, {**masks, **extra}, is_causal_torch=True, is_causal_jax=True,
           jax_masks=extra if not with_kpm else None)


def test_fused_and_explicit_paths_agree():
    """need_weights=False (dot_product_attention) and True (softmax) give the same output
    and gradients, fully blocked rows included."""
    _, f = _pair()
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(a) for a in _inputs({}, rng))
    for name, causal in (("none", True), ("bool_kpm", True), ("bool_attn+bool_kpm", False),
                         ("float_attn3d+float_kpm", False), ("kpm_first_blocked", True)):
        masks = {n: jnp.asarray(m) for n, m in _masks(name, rng).items()}

        def loss(model, need_weights):
            return jnp.sum(model(q, k, v, need_weights=need_weights, is_causal=causal,
                                 **masks)[0] ** 2)

        (l0, g0), (l1, g1) = (nnx.value_and_grad(loss)(f, nw) for nw in (False, True))
        assert abs(float(l0) - float(l1)) <= 1e-5 * abs(float(l1)), (name, causal)
        for (p, a), (_, b) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
            assert _rel(a, b) <= 1e-5, (name, causal, p)


def test_fully_blocked_rows_give_zero_attention():
    """A query with every key blocked: torch's SDPA path gives 0 attention; so do both paths.

    torch's need_weights=True path returns NaN for such rows; here the weights
    are 0 and the output is out_proj.bias, and nothing NaN reaches the gradients.
    """
    t, f = _pair()
    rng = np.random.default_rng(4)
    q, k, v = _inputs({}, rng)
    kpm = np.zeros((N, S), bool)
    kpm[0] = True  # batch item 0 has no key at all
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    with torch.no_grad():
        want, _ = t(tq, tk, tv, key_padding_mask=torch.from_numpy(kpm), need_weights=False)
        _, torch_w = t(tq, tk, tv, key_padding_mask=torch.from_numpy(kpm), need_weights=True)
    assert torch.isnan(torch_w[0]).all()  # the behaviour documented as not followed
    for need_weights in (False, True):
        out, w = f(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                   key_padding_mask=jnp.asarray(kpm), need_weights=need_weights)
        np.testing.assert_allclose(np.asarray(out), want.numpy(), atol=OUT_ATOL, rtol=0)
        np.testing.assert_allclose(np.asarray(out)[:, 0],
                                   np.broadcast_to(f.out_proj.bias[...], (L, E)), atol=1e-6)
        if need_weights:
            assert np.all(np.asarray(w)[0] == 0) and np.isfinite(np.asarray(w)).all()
        g = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                         key_padding_mask=jnp.asarray(kpm),
                                         need_weights=need_weights)[0] ** 2))(f)
        assert all(np.isfinite(np.asarray(x)).all() for _, x in nnx.to_flat_state(g))


def test_attention_dropout():
    """Train-mode dropout acts on the weights (returned after dropout, as torch)."""
    p = 0.5
    _, f = _pair(dropout=p)
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(a) for a in _inputs({}, rng))
    f.eval()
    out_eval, w_eval = f(q, k, v, average_attn_weights=False)
    out_eval2, _ = f(q, k, v, need_weights=False)
    np.testing.assert_allclose(np.asarray(out_eval2), np.asarray(out_eval), atol=1e-6)
    f.train()
    _, w_a = f(q, k, v, average_attn_weights=False)
    _, w_b = f(q, k, v, average_attn_weights=False)
    w_a, w_b, w_eval = np.asarray(w_a), np.asarray(w_b), np.asarray(w_eval)
    kept = w_a != 0
    assert 0.2 < kept.mean() < 0.8
    np.testing.assert_allclose(w_a[kept], w_eval[kept] / (1 - p), rtol=1e-5)
    assert not np.array_equal(w_a, w_b)  # the stream advances
    # need_weights=False in train mode draws the same masks as the weights path.
    _, f1 = _pair(dropout=p, seed=9)
    _, f2 = _pair(dropout=p, seed=9)
    o1, _ = f1(q, k, v, need_weights=False)
    o2, _ = f2(q, k, v, need_weights=True)
    np.testing.assert_allclose(np.asarray(o1), np.asarray(o2), atol=1e-6)
    assert np.abs(np.asarray(o1) - np.asarray(out_eval)).max() > 1e-3


def test_jit_and_state_dict_keys_match_torch():
    for kw in OPTIONS.values():
        t, f = _pair(**kw)
        sd = to_torch_state_dict(f)
        assert {k: tuple(v.shape) for k, v in sd.items()} == {
            k: tuple(v.shape) for k, v in t.state_dict().items()}
    graphdef, state = nnx.split(f)
    rng = np.random.default_rng(6)
    q, k, v = (jnp.asarray(a) for a in _inputs(OPTIONS["batch_first"], rng))
    jitted = jax.jit(lambda s, q, k, v: nnx.merge(graphdef, s)(q, k, v)[0])
    np.testing.assert_allclose(np.asarray(jitted(state, q, k, v)), np.asarray(f(q, k, v)[0]),
                               atol=1e-6)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="not divisible"):
        MultiheadAttention(10, 3, rngs=nnx.Rngs(0))
    _, f = _pair()
    q, k, v = (jnp.asarray(a) for a in _inputs({}, np.random.default_rng(0)))
    with pytest.raises(ValueError, match=r"2D attn_mask has shape \(4, 4\)"):
        f(q, k, v, attn_mask=jnp.zeros((S, S), bool))
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        f(q, k, v, key_padding_mask=jnp.zeros((N, S + 1), bool))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        f(q, k, v, attn_mask=jnp.zeros((L, S), jnp.int32))
    with pytest.raises(ValueError, match="expects 8"):
        f(q[..., :4], k, v)
    t, fb = _pair(add_bias_kv=True)
    sd = dict(t.state_dict())
    sd.pop("bias_k")
    with pytest.raises(PortingError, match="1 missing: bias_k"):
        load_torch_state_dict(fb, sd)
