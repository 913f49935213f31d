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


def test_repeated_blocks_compile_once_and_compute_what_the_model_computes(monkeypatch):
    import jax.numpy as jnp
    from flax import nnx

    from jaxnets.layers import BatchNorm
    from porting import parity

    class Block(nnx.Module):
        def __init__(self, n, rngs):
            self.fc = nnx.Linear(n, n, use_bias=False, rngs=rngs)  # a bias before BN: 0 grad
            self.bn = BatchNorm(n)

        def __call__(self, x):
            return x + jnp.tanh(self.bn(self.fc(x)))

    class Net(nnx.Module):
        def __init__(self, rngs):
            # Two block structures: three identical blocks of width 4, one of width 6.
            self.blocks = nnx.List([Block(4, rngs) for _ in range(3)])
            self.widen = nnx.Linear(4, 6, rngs=rngs)
            self.last = Block(6, rngs)

        def __call__(self, x):
            for b in self.blocks:
                x = b(x)
            return self.last(self.widen(x))

    traced = []
    call = Block.__call__

    def counted(self, x):
        traced.append(x.shape)
        return call(self, x)

    monkeypatch.setattr(Block, "__call__", counted)
    plain, blocks = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
    assert Block in parity.repeated_block_types(blocks)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 4)), jnp.float32)

    def loss(m, x):
        return jnp.sum(m(x) ** 2)

    want_loss, want = nnx.value_and_grad(loss)(plain, x)
    assert len(traced) == 4
    with parity.jit_repeated_blocks(blocks):
        assert Block.__call__ is not counted
        got_loss, got = nnx.value_and_grad(loss)(blocks, x)
        # One trace per distinct block: the three identical ones share theirs.
        assert len(traced) == 4 + 2, traced
        # BatchNorm statistics come out of the compiled blocks.
        for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(blocks, nnx.BatchStat)),
                                     nnx.to_flat_state(nnx.state(plain, nnx.BatchStat))):
            np.testing.assert_allclose(a[...], b[...], rtol=1e-5, atol=1e-7, err_msg=str(path))
        nnx.value_and_grad(loss)(blocks, x)
        assert len(traced) == 6  # compiled: no new trace
        assert int(blocks.last.bn.num_batches_tracked[...]) == 2
    assert Block.__call__ is counted  # restored
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for (path, g), (_, w) in zip(nnx.to_flat_state(got), nnx.to_flat_state(want)):
        w = np.asarray(w[...])  # fp32 rounding: relative to the tensor's largest entry
        assert np.max(np.abs(np.asarray(g[...]) - w)) <= 1e-5 * np.max(np.abs(w)), path
    # An exception inside restores the classes too.
    with pytest.raises(RuntimeError), parity.jit_repeated_blocks(blocks):
        raise RuntimeError("boom")
    assert Block.__call__ is counted


@pytest.mark.parametrize("kw", [{"jit": "block"}, {"jit64": "yes"}, {"jit": None}])
def test_an_unknown_jit_mode_is_one_clear_error(kw):
    from porting.parity import run_parity

    name, value = next(iter(kw.items()))
    with pytest.raises(ValueError, match=f"{name}: True, False or 'blocks', got {value!r}"):
        run_parity("mlp", **kw)


@pytest.mark.parametrize("batch", [0, -1, 1.5])
def test_a_bad_batch_size_is_one_clear_error(batch):
    from porting.parity import run_parity, run_parity_inputs

    with pytest.raises(ValueError, match=f"batch sizes must be integers >= 1, got {batch!r}"):
        run_parity("mlp", batch=batch)
    with pytest.raises(ValueError, match="batch sizes must be integers >= 1"):
        run_parity_inputs("mlp", [(None, 2), (None, batch)])


@pytest.mark.parametrize("grads_at", [[0], [1], []])
def test_gradients_at_some_inputs_only(grads_at):
    # The float64 gradient pass runs at the inputs named; every input still compares
    # outputs and statistics, from the same weights (the float64 copies are dropped
    # after the last input that uses them).
    from porting.parity import run_parity_inputs

    results = run_parity_inputs("resnet18_cifar", [((32, 32), 2), ((40, 24), 2)],
                                grads=("train",), grads_at=grads_at)
    assert [r.input_shape for r in results] == [(2, 32, 32, 3), (2, 40, 24, 3)]
    for i, result in enumerate(results):
        assert result.passed, result.table()
        names = [q.name for q in result.quantities]
        assert "eval logits" in names and "BN running stats" in names
        assert any(n.startswith("grads fp64") for n in names) == (i in grads_at), names


def test_grads_at_an_input_that_is_not_there_is_one_clear_error():
    from porting.parity import run_parity_inputs

    with pytest.raises(ValueError, match=r"grads_at: indices of the 2 inputs, got \[2\]"):
        run_parity_inputs("mlp", [(None, 2), (None, 1)], grads_at=[2])


def test_given_weights_are_used_in_float32_and_left_as_they_were():
    # With a state_dict the torch reference is built on the meta device and adopts float32
    # copies of the values: its train-mode pass must not write BatchNorm statistics into
    # the caller's tensors, and a bfloat16 checkpoint runs in float32.
    import torch

    from porting.parity import randomize_torch_model, run_parity
    from porting.reference import build_torch_model

    torch.manual_seed(3)
    tmodel = build_torch_model("resnet18_cifar")
    randomize_torch_model(tmodel, seed=3)
    sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
          for k, v in tmodel.state_dict().items()}
    before = {k: v.clone() for k, v in sd.items()}
    result = run_parity("resnet18_cifar", size=(32, 32), batch=2, state_dict=sd, grads=False)
    assert result.passed, result.table()
    assert all(torch.equal(sd[k], before[k]) and sd[k].dtype == before[k].dtype for k in sd)


def test_given_weights_with_another_head_size_set_both_models_class_count():
    # A fine-tuned checkpoint (7 classes where the spec says 10): both models are built
    # with its head's size, without the caller passing num_classes (torch's strict load
    # failed on the head's shape before).
    import torch

    from porting.parity import randomize_torch_model, run_parity
    from porting.reference import build_torch_model

    torch.manual_seed(4)
    tmodel = build_torch_model("lenet5", num_classes=7)
    randomize_torch_model(tmodel, seed=4)
    result = run_parity("lenet5", batch=2, state_dict=tmodel.state_dict())
    assert result.passed, result.table()
    with pytest.raises(RuntimeError, match="size mismatch"):  # an explicit count is kept
        run_parity("lenet5", batch=2, state_dict=tmodel.state_dict(),
                   overrides={"num_classes": 10})


@pytest.mark.parametrize("arch, overrides", [
    ("vit_b_32", {}),
    ("vgg11", {}),
    ("transformer", dict(d_model=16, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                         dim_feedforward=32)),
])
def test_no_parameter_is_left_at_zero(arch, overrides):
    # torch initialises attention and VGG biases and ViT's class token to zero; left so,
    # a port that dropped them or took q's bias for k's would pass every comparison.
    import torch

    from porting.parity import randomize_torch_model
    from porting.reference import build_torch_model

    torch.manual_seed(0)
    tmodel = build_torch_model(arch, **overrides)
    zero = [k for k, p in tmodel.named_parameters() if not p.any()]
    assert zero, "torch's own init has zero parameters here (what this test is about)"
    randomize_torch_model(tmodel, seed=0)
    assert not [k for k, p in tmodel.named_parameters() if not p.any()]
