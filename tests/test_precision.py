"""The bf16 policy: bfloat16 compute, float32 parameters, optimizer state and BN statistics."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxnets
from jaxnets.layers import BatchNorm, conv2d, linear
from train import distributed as dist
from train.data import load_dataset
from train.precision import cast_for_compute, get_policy


class SmallBNNet(nnx.Module):
    """conv-BN-ReLU x2, global average pool, linear: trains on 8x8 digits in seconds."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = conv2d(1, 16, 3, 1, 1, bias=False, rngs=rngs)
        self.bn1 = BatchNorm(16)
        self.conv2 = conv2d(16, 32, 3, 2, 1, bias=False, rngs=rngs)
        self.bn2 = BatchNorm(32)
        self.fc = linear(32 * 4 * 4, 10, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        return self.fc(x.reshape(x.shape[0], -1))


def _flat(state):
    return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(state)}


def test_unknown_precision_is_named():
    with pytest.raises(ValueError, match="unknown precision 'fp16'; choose one of fp32, bf16"):
        get_policy("fp16")


def test_cast_for_compute_touches_params_only():
    model = SmallBNNet(nnx.Rngs(0))
    cast = cast_for_compute(nnx.state(model), jnp.bfloat16)
    for (path, var), (_, orig) in zip(nnx.to_flat_state(cast),
                                      nnx.to_flat_state(nnx.state(model))):
        want = jnp.bfloat16 if isinstance(orig, nnx.Param) else orig.get_value().dtype
        assert var.get_value().dtype == want, path
        assert type(var) is type(orig), path
    assert get_policy("fp32").cast_params(nnx.state(model)) is not None


def test_bf16_step_computes_in_bf16_and_keeps_fp32_state():
    """Trace (not compile) a resnet18_cifar step: every conv/matmul is bf16, all state fp32."""
    model = jaxnets.create_model("resnet18_cifar", num_classes=10)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)
    step = dist.make_sharded_step(graphdef, tx, precision="bf16", donate=False)
    # 32x32: the last stage's maps are 4x4; at 16x16 they are 2x2, where the CPU build
    # computes the 3x3 convolutions as matmuls (jaxnets.layers.conv_general_dilated), as it
    # does the three 1x1 shortcut convolutions at any size.
    images = jnp.zeros((2, 32, 32, 3), jnp.float32)
    labels = jnp.zeros((2,), jnp.int32)
    jaxpr = jax.make_jaxpr(step)(params, rest, opt_state, images, labels)

    heavy = []

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
                heavy.append((eqn.primitive.name, [v.aval.dtype for v in eqn.invars]))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    # 17 3x3 convolutions: forward, weight gradient, input gradient (none for the stem);
    # on CPU the 3 1x1 ones are matmuls.
    n_conv = 17 if jax.default_backend() == "cpu" else 20
    assert sum(name == "conv_general_dilated" for name, _ in heavy) == 3 * n_conv - 1
    assert all(dt == jnp.bfloat16 for _, dts in heavy for dt in dts), heavy

    out = jax.eval_shape(step, params, rest, opt_state, images, labels)
    new_params, new_rest, new_opt, loss = out
    assert loss.dtype == jnp.float32
    for tree in (new_params, new_opt):
        for leaf in jax.tree.leaves(tree):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float32
    stats = {k: v for k, v in _flat(new_rest).items() if k.endswith((".mean", ".var"))}
    assert len(stats) == 40 and all(v.dtype == jnp.float32 for v in stats.values())

    predict = dist.make_predict_step(graphdef, precision="bf16")
    assert jax.eval_shape(predict, params, rest, images).dtype == jnp.float32


def _digits():
    train = load_dataset("digits", split="train", seed=0)
    val = load_dataset("digits", split="val", seed=0)
    f = lambda a: (a.images.astype(np.float32) / 255.0, a.labels)  # noqa: E731
    return f(train), f(val)


def train_and_evaluate(make_model, precision: str, *, steps: int, batch: int = 64,
                       lr: float = 0.05, seed: int = 0) -> tuple[float, dict]:
    """Train on digits with SGD-momentum and return (val accuracy, final state leaves).

    Args:
      make_model: ``() -> nnx.Module`` taking (N, 8, 8, 1) images.
      precision: ``"fp32"`` or ``"bf16"``.
      steps: optimizer steps.
      batch: batch size.
      lr: learning rate.
      seed: the batch order's seed (the model's init is ``make_model``'s).

    Returns:
      Validation accuracy in [0, 1] and the final parameters and statistics.
    """
    (x_tr, y_tr), (x_va, y_va) = _digits()
    graphdef, params, rest = nnx.split(make_model(), nnx.Param, ...)
    tx = optax.sgd(lr, momentum=0.9)
    opt_state = tx.init(params)
    step = dist.make_sharded_step(graphdef, tx, precision=precision)
    rng = np.random.default_rng(seed)
    order = np.empty(0, np.int64)
    for _ in range(steps):
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(len(y_tr))])
        idx, order = order[:batch], order[batch:]
        params, rest, opt_state, _ = step(params, rest, opt_state, x_tr[idx], y_tr[idx])
    logits = dist.make_predict_step(graphdef, precision=precision)(params, rest, x_va)
    accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == y_va))
    return accuracy, {**_flat(params), **_flat(rest)}


def test_bf16_training_reaches_fp32_accuracy():
    acc32, state32 = train_and_evaluate(lambda: SmallBNNet(nnx.Rngs(0)), "fp32", steps=300)
    acc16, state16 = train_and_evaluate(lambda: SmallBNNet(nnx.Rngs(0)), "bf16", steps=300)
    assert acc32 > 0.9, acc32  # it learned, so the comparison means something
    assert abs(acc16 - acc32) <= 0.01, (acc16, acc32)
    for k, v in state16.items():
        if jnp.issubdtype(v.dtype, jnp.floating):
            assert v.dtype == jnp.float32, k
    # bf16 really changed the computation (it is not fp32 in disguise).
    assert any(not np.array_equal(state16[k], state32[k]) for k in state32)


def test_cast_param_tree_for_flat_dicts():
    params = {"fc.kernel": jnp.ones((2, 2)), "step": jnp.zeros((), jnp.int32)}
    cast = get_policy("bf16").cast_param_tree(params)
    assert cast["fc.kernel"].dtype == jnp.bfloat16 and cast["step"].dtype == jnp.int32
    assert get_policy("fp32").cast_param_tree(params) is params
