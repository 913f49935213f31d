"""Parameter groups, layered learning rates, weight-decay masks and schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnets
from jaxnets.resnet import BasicBlock, ResNet
from flax import nnx
from train import optim, steps


def _lenet():
    parts, params, stats = steps.split_model(jaxnets.create_model("lenet5", num_classes=10))
    return parts, params, stats


def _update(tx, grads, params):
    # One jitted call: eager optax runs hundreds of tiny ops per parameter.
    return jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)


def _random_like(params, seed=0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(v.shape).astype(np.float32))
            for k, v in params.items()}


def test_first_sgd_update_is_exactly_minus_lr_mult_grad():
    parts, params, _ = _lenet()
    lr = 0.03
    groups = optim.param_groups(list(params), model_or_class=parts.model_class,
                                freeze=[r"^conv1\."], lr_mult=[("fc3", 10.0), (r"conv2\.weight", 0.1)])
    assert groups.labels["conv1.kernel"] == "frozen" and groups.labels["conv1.bias"] == "frozen"
    # "conv2.weight" is a torch key: it selects the flax kernel only.
    mults = {k: groups.multipliers.get(v) for k, v in groups.labels.items()}
    assert mults["conv2.kernel"] == 0.1 and mults["conv2.bias"] == 1.0
    assert mults["fc3.kernel"] == mults["fc3.bias"] == 10.0 and mults["fc1.kernel"] == 1.0
    tx = optim.make_optimizer(params, groups, name="sgd", lr=lr, momentum=0.0, weight_decay=0.0,
                              total_steps=100, warmup_steps=0, schedule="cosine")
    grads = _random_like(params)
    updates = _update(tx, grads, params)
    for key, g in grads.items():
        got = np.asarray(updates[key])
        if mults[key] is None:
            assert np.all(got == 0), key
        else:
            want = np.asarray(g) * np.float32(-(lr * mults[key]))
            np.testing.assert_array_equal(got, want, err_msg=key)


def test_weight_decay_skips_biases_and_clipping_ignores_frozen():
    parts, params, _ = _lenet()
    groups = optim.param_groups(list(params), model_or_class=parts.model_class,
                                freeze=["fc1"])
    tx = optim.make_optimizer(params, groups, name="sgd", lr=1.0, momentum=0.0,
                              weight_decay=0.5, total_steps=10)
    zeros = {k: jnp.zeros_like(v) for k, v in params.items()}
    updates = _update(tx, zeros, params)
    np.testing.assert_allclose(updates["conv2.kernel"], -0.5 * params["conv2.kernel"], rtol=1e-6)
    assert np.all(np.asarray(updates["conv2.bias"]) == 0)
    assert np.all(np.asarray(updates["fc1.kernel"]) == 0)  # frozen: no decay either
    # A huge frozen gradient must not shrink the clipped trainable ones.
    tx = optim.make_optimizer(params, groups, name="sgd", lr=1.0, momentum=0.0,
                              weight_decay=0.0, total_steps=10, clip_norm=1e9)
    grads = _random_like(params)
    grads["fc1.kernel"] = grads["fc1.kernel"] * 1e12
    updates = _update(tx, grads, params)
    np.testing.assert_allclose(updates["conv2.kernel"], -grads["conv2.kernel"], rtol=1e-6)


def test_adamw_groups_and_bn_stat_freezing():
    model = ResNet(BasicBlock, (1, 1, 1, 1), num_classes=4, rngs=nnx.Rngs(0))
    parts, params, stats = steps.split_model(model, r"^fc\.")
    groups = optim.param_groups(list(params), list(stats), model_or_class=ResNet,
                                freeze=[r"^(conv1|bn1)\.", r"^layer1\."])
    assert "bn1.mean" in groups.frozen_stats and "layer1.0.bn2.var" in groups.frozen_stats
    assert "layer1.0.bn1.num_batches_tracked" in groups.frozen_stats
    assert not any(k.startswith("layer2") for k in groups.frozen_stats)
    loose = optim.param_groups(list(params), list(stats), model_or_class=ResNet,
                               freeze=[r"^layer1\."], freeze_bn_stats=False)
    assert not loose.frozen_stats and "layer1.0.bn1.scale" in loose.frozen
    tx = optim.make_optimizer(params, groups, name="adamw", lr=1e-3, total_steps=10)
    updates = _update(tx, _random_like(params), params)
    assert np.all(np.asarray(updates["layer1.0.conv1.kernel"]) == 0)
    assert np.any(np.asarray(updates["layer2.0.conv1.kernel"]) != 0)


def test_bad_regexes_are_named():
    parts, params, _ = _lenet()
    with pytest.raises(ValueError, match="matches no parameter") as e:
        optim.param_groups(list(params), model_or_class=parts.model_class, freeze=["layer9"])
    # The modules a regex can name; an example key once where both namings agree.
    assert "its top-level modules: conv1, conv2, fc1, fc2, fc3)" in str(e.value)
    assert str(e.value).count("conv1.") == 1, str(e.value)
    with pytest.raises(ValueError, match="not a valid regex"):
        optim.param_groups(list(params), model_or_class=parts.model_class, freeze=["fc(("])
    with pytest.raises(ValueError, match="REGEX=FACTOR"):
        optim.parse_lr_mult("layer4")
    with pytest.raises(ValueError, match="not a number"):
        optim.parse_lr_mult("layer4=fast")
    assert optim.parse_lr_mult("a=b=0.5") == ("a=b", 0.5)


def test_schedule_warmup_then_cosine():
    sched = optim.make_schedule(1.0, total_steps=110, warmup_steps=10)
    values = np.asarray(sched(jnp.arange(111)))
    np.testing.assert_allclose(values[:10], (np.arange(10) + 1) / 10, rtol=1e-6)
    assert values[10] == 1.0 and values[110] == pytest.approx(0.0, abs=1e-7)
    assert values[60] == pytest.approx(0.5, abs=1e-6)
    assert np.all(np.diff(values[10:]) <= 0)
    const = optim.make_schedule(0.5, total_steps=10, kind="constant")
    np.testing.assert_array_equal(const(jnp.arange(10)), np.full(10, 0.5, np.float32))
