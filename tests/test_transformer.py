"""jaxnets.transformer against torch.nn.Transformer: outputs, masks, gradients, state_dicts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxnets
from jaxnets.transformer import (Transformer, TransformerEncoder, TransformerEncoderLayer,
                                 generate_square_subsequent_mask)
from porting.reference import build_torch_model
from porting.state_dict import (PortingError, flax_to_torch, load_torch_state_dict,
                                to_torch_state_dict)

D, NHEAD, S, T, N = 16, 4, 5, 4, 2
SMALL = dict(d_model=D, nhead=NHEAD, num_encoder_layers=2, num_decoder_layers=2,
             dim_feedforward=32)
OUT_ATOL = 1e-4
GRAD_RTOL = 1e-4


@pytest.fixture(autouse=True)
def _torch_slow_path():
    # torch's eval fast path (nested tensors) zeroes padded positions; the slow
    # path computes them, so every position can be compared.
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(was)


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    t = build_torch_model("transformer", **kw)
    with torch.no_grad():
        for p in t.parameters():  # LayerNorm affine terms and biases too
            p.add_(0.2 * torch.randn_like(p))
    f = jaxnets.create_model("transformer", **kw)
    report = load_torch_state_dict(f, t.state_dict(), strict=True)
    assert report.ok and len(report.loaded) == len(t.state_dict())
    return t, f


def _data(batch_first, seed=0, three_d=False):
    rng = np.random.default_rng(seed)

    def seq(length):
        shape = (N, length, D) if batch_first else (length, N, D)
        return rng.standard_normal(shape).astype(np.float32)

    src_kpm = np.zeros((N, S), bool)
    src_kpm[1, 3:] = True
    tgt_kpm = np.zeros((N, T), bool)
    tgt_kpm[1, 3:] = True
    src_mask = rng.random((N * NHEAD, S, S) if three_d else (S, S)) < 0.3
    src_mask[..., 0] = False
    memory_mask = rng.standard_normal((T, S)).astype(np.float32)
    masks = dict(src_mask=src_mask, tgt_mask=np.asarray(generate_square_subsequent_mask(T)),
                 memory_mask=memory_mask, src_key_padding_mask=src_kpm,
                 tgt_key_padding_mask=tgt_kpm, memory_key_padding_mask=src_kpm)
    return seq(S), seq(T), masks


def _torch_forward(t, src, tgt, masks, grad_seed=None):
    tm = {k: torch.from_numpy(np.array(v)) for k, v in masks.items()}
    if grad_seed is None:
        t.eval()
        with torch.no_grad():
            return t(torch.from_numpy(src), torch.from_numpy(tgt), **tm).numpy()
    t.train()
    out = t(torch.from_numpy(src), torch.from_numpy(tgt), **tm)
    r = np.random.default_rng(grad_seed).standard_normal(out.shape).astype(np.float32)
    (out * torch.from_numpy(r)).sum().backward()
    grads = {k: p.grad.numpy().copy() for k, p in t.named_parameters()}
    t.zero_grad(set_to_none=True)
    return grads, r


def _jax_grads(f, src, tgt, masks, r):
    graphdef, state = nnx.split(f)
    jm = {k: jnp.asarray(v) for k, v in masks.items()}

    @jax.jit
    def grads(state):
        def loss(m):
            return jnp.sum(m(jnp.asarray(src), jnp.asarray(tgt), **jm) * r)

        return nnx.grad(loss)(nnx.merge(graphdef, state))

    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(grads(state))}
    return flax_to_torch(f, flat)


CONFIGS = {
    "post-norm relu": dict(norm_first=False, activation="relu"),
    "pre-norm gelu batch_first": dict(norm_first=True, activation="gelu", batch_first=True),
    "post-norm gelu batch_first no-bias 3D masks": dict(norm_first=False, activation="gelu",
                                                        batch_first=True, bias=False),
    "pre-norm relu eps": dict(norm_first=True, activation="relu", layer_norm_eps=1e-3),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_torch(name):
    """Eval outputs with every mask (all positions), then train-mode gradients (dropout 0)."""
    kw = {**SMALL, **CONFIGS[name]}
    t, f = _pair(**kw)
    bf = kw.get("batch_first", False)
    src, tgt, masks = _data(bf, three_d="3D" in name)
    want = _torch_forward(t, src, tgt, masks)
    f.eval()
    got = f(jnp.asarray(src), jnp.asarray(tgt), **{k: jnp.asarray(v) for k, v in masks.items()})
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=OUT_ATOL, rtol=0)

    for m in t.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = 0.0  # a float attribute, not a Dropout module
    for _, m in nnx.iter_graph(f):
        if isinstance(m, nnx.Dropout):
            m.rate = 0.0
    f.train()
    want_g, r = _torch_forward(t, src, tgt, masks, grad_seed=1)
    got_g = _jax_grads(f, src, tgt, masks, r)
    assert set(got_g) == set(want_g)
    rel = {k: float(np.max(np.abs(got_g[k] - want_g[k])) / np.max(np.abs(want_g[k])))
           for k in want_g}
    bad = {k: v for k, v in rel.items() if not v <= GRAD_RTOL}
    assert not bad, f"gradients differ (relative, fp32): {bad}"


def test_torch_fast_path_non_padded_positions():
    """torch's eval fast path (nested tensors) agrees wherever it is not padding."""
    torch.backends.mha.set_fastpath_enabled(True)
    threads = torch.get_num_threads()
    # One run of this test took minutes on the loaded CI machine (torch's thread pool
    # contending with XLA's in the nested-tensor kernels); one thread is plenty here.
    torch.set_num_threads(1)
    try:
        _fast_path_check()
    finally:
        torch.set_num_threads(threads)


def _fast_path_check():
    kw = {**SMALL, "batch_first": True}
    t, f = _pair(seed=3, **kw)
    src, _, masks = _data(True, seed=3)
    kpm = masks["src_key_padding_mask"]
    t.eval()
    with torch.no_grad():
        want = t.encoder(torch.from_numpy(src),
                         src_key_padding_mask=torch.from_numpy(kpm)).numpy()
    f.eval()
    got = np.asarray(f.encode(jnp.asarray(src), src_key_padding_mask=jnp.asarray(kpm)))
    keep = ~kpm
    # The fast path did run: padding came back as zeros, which the final norm maps to its bias.
    np.testing.assert_allclose(want[~keep], np.broadcast_to(
        t.encoder.norm.bias.detach().numpy(), want[~keep].shape), atol=1e-6)
    np.testing.assert_allclose(got[keep], want[keep], atol=OUT_ATOL, rtol=0)
    assert np.isfinite(got).all()


def test_causal_flags_build_the_causal_mask():
    kw = {**SMALL, "batch_first": True}
    _, f = _pair(seed=4, **kw)
    f.eval()
    src, tgt, _ = _data(True, seed=4)
    src, tgt = jnp.asarray(src), jnp.asarray(tgt)
    with_mask = f(src, tgt, tgt_mask=generate_square_subsequent_mask(T))
    with_flag = f(src, tgt, tgt_is_causal=True)
    np.testing.assert_allclose(np.asarray(with_flag), np.asarray(with_mask), atol=1e-6)
    # Without any mask the decoder sees the future: the flag must matter.
    assert np.abs(np.asarray(f(src, tgt)) - np.asarray(with_mask)).max() > 1e-3
    np.testing.assert_allclose(
        np.asarray(f(src, tgt, src_is_causal=True)),
        np.asarray(f(src, tgt, src_mask=generate_square_subsequent_mask(S))), atol=1e-6)


def test_generate_square_subsequent_mask_matches_torch():
    for sz in (1, 5):
        want = torch.nn.Transformer.generate_square_subsequent_mask(sz).numpy()
        np.testing.assert_array_equal(np.asarray(generate_square_subsequent_mask(sz)), want)
        np.testing.assert_array_equal(np.asarray(Transformer.generate_square_subsequent_mask(sz)),
                                      want)


def test_state_dict_round_trip_default_transformer():
    """torch -> flax -> torch is bit-exact for the registered model (torch's defaults)."""
    torch.manual_seed(0)
    t = build_torch_model("transformer")
    assert (t.d_model, t.nhead, len(t.encoder.layers), len(t.decoder.layers)) == (512, 8, 6, 6)
    f = jaxnets.create_model("transformer")
    assert jaxnets.get_spec("transformer").kind == "sequence"
    sd = t.state_dict()
    load_torch_state_dict(f, sd, strict=True)
    back = to_torch_state_dict(f)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.numpy().dtype and np.array_equal(back[k], v.numpy()), k
    t2 = build_torch_model("transformer")
    t2.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_init_follows_torch_and_layers_differ():
    f = jaxnets.create_model("transformer", **SMALL)
    sd = to_torch_state_dict(f)
    w0, w1 = sd["encoder.layers.0.linear1.weight"], sd["encoder.layers.1.linear1.weight"]
    assert not np.array_equal(w0, w1)
    bound = np.sqrt(6 / (D + 32))  # xavier_uniform_ as nn.Transformer._reset_parameters
    assert np.abs(w0).max() <= bound and np.abs(w0).max() > 0.8 * bound
    assert np.array_equal(sd["decoder.norm.weight"], np.ones(D, np.float32))
    assert f.encoder.layers[0].norm1.epsilon == 1e-5


def test_strict_load_names_the_keys():
    t, f = _pair(seed=5, **SMALL)
    sd = dict(t.state_dict())
    sd.pop("decoder.layers.1.norm3.bias")
    sd["encoder.layers.0.extra"] = torch.zeros(1)
    with pytest.raises(PortingError) as err:
        load_torch_state_dict(f, sd, strict=True)
    assert "decoder.layers.1.norm3.bias" in str(err.value)
    assert "encoder.layers.0.extra" in str(err.value)
    bad = dict(t.state_dict())
    bad["encoder.layers.0.linear1.weight"] = torch.zeros(3, 3)
    with pytest.raises(PortingError, match=r"encoder.layers.0.linear1.weight expected \[32, 16\]"):
        load_torch_state_dict(f, bad)


def test_dropout_train_mode_and_jit():
    kw = {**SMALL, "num_encoder_layers": 1, "num_decoder_layers": 1}
    f = jaxnets.create_model("transformer", **kw, dropout=0.3, batch_first=True)
    src, tgt, _ = _data(True, seed=6)
    graphdef, state = nnx.split(f)

    @jax.jit
    def run(state, src, tgt):
        m = nnx.merge(graphdef, state)
        return m(src, tgt), nnx.state(m)

    a, state = run(state, jnp.asarray(src), jnp.asarray(tgt))
    b, state = run(state, jnp.asarray(src), jnp.asarray(tgt))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3  # fresh masks each call
    nnx.update(f, state)
    f.eval()
    graphdef_eval, state_eval = nnx.split(f)
    evaluate = jax.jit(lambda s: nnx.merge(graphdef_eval, s)(jnp.asarray(src), jnp.asarray(tgt)))
    e1, e2 = evaluate(state_eval), evaluate(state_eval)
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
    assert np.abs(np.asarray(e1) - np.asarray(a)).max() > 1e-3


def test_encoder_stack_alone_matches_torch():
    torch.manual_seed(7)
    tl = torch.nn.TransformerEncoderLayer(D, NHEAD, 32, dropout=0.0, activation="gelu",
                                          batch_first=True)
    tenc = torch.nn.TransformerEncoder(tl, 2, norm=torch.nn.LayerNorm(D),
                                       enable_nested_tensor=False)
    with torch.no_grad():
        for p in tenc.parameters():
            p.add_(0.2 * torch.randn_like(p))
    rngs = nnx.Rngs(0)
    fenc = TransformerEncoder(
        TransformerEncoderLayer(D, NHEAD, 32, dropout=0.0, activation="gelu", batch_first=True,
                                rngs=rngs), 2, nnx.LayerNorm(D, epsilon=1e-5, rngs=rngs),
        rngs=rngs)
    load_torch_state_dict(fenc, tenc.state_dict(), strict=True)
    src, _, masks = _data(True, seed=7)
    kpm = masks["src_key_padding_mask"]
    tenc.eval()
    with torch.no_grad():
        want = tenc(torch.from_numpy(src), src_key_padding_mask=torch.from_numpy(kpm)).numpy()
    fenc.eval()
    got = fenc(jnp.asarray(src), src_key_padding_mask=jnp.asarray(kpm))
    np.testing.assert_allclose(np.asarray(got), want, atol=OUT_ATOL, rtol=0)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(norm_first=True, activation="gelu", batch_first=True),
])
def test_parity_harness_runs_the_transformer(kw):
    """porting.parity's run (what porting.verify and bench.device_check run): masks,
    train mode, fp32 outputs, float64 gradients of every parameter in both modes."""
    from porting.parity import run_parity

    result = run_parity("transformer", batch=3, overrides={**SMALL, **kw}, fp32_grads=True)
    assert result.passed, result.table()
    names = [q.name.split(" [")[0] for q in result.quantities]
    assert names == ["round trip torch->jax->torch", "eval outputs", "train outputs",
                     "grads fp64 (eval mode)", "grads fp32 (eval mode)",
                     "grads fp64 (train mode)", "grads fp32 (train mode)"]
    # float64 all the way on both sides (jax's dot_product_attention takes its softmax
    # in float32, which left ~1e-7 here).
    assert all(q.max_rel < 1e-12 for q in result.quantities if "fp64" in q.name), result.table()
    length = lambda n: (3, n, D) if kw.get("batch_first") else (n, 3, D)  # noqa: E731
    assert (result.input_shape, result.target_shape) == (length(10), length(9))
    assert result.input_label.startswith(f"src {'x'.join(map(str, length(10)))}, tgt")
