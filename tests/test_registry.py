"""The registry and the model conventions every family shares."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnets
from jaxnets.layers import BatchNorm


def test_list_models_has_the_foundation_models():
    names = jaxnets.list_models()
    for n in ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
              "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
              "resnet18_cifar", "lenet5", "mlp"]:
        assert n in names
    assert names == sorted(names)
    assert jaxnets.list_models("resnext*") == ["resnext101_32x8d", "resnext101_64x4d",
                                               "resnext50_32x4d"]


def test_unknown_model_lists_close_matches():
    with pytest.raises(jaxnets.UnknownModelError, match=r"'resnet5'.*did you mean.*resnet50"):
        jaxnets.create_model("resnet5")


def test_unknown_option_names_the_model():
    with pytest.raises(TypeError, match="resnet18"):
        jaxnets.create_model("resnet18", not_an_option=True)


def test_num_classes_and_default():
    m = jaxnets.create_model("resnet18_cifar", num_classes=7)
    assert m.fc.kernel.shape == (512, 7)
    assert jaxnets.create_model("lenet5").fc3.kernel.shape == (84, 10)


def test_train_eval_switch_batchnorm_like_torch():
    m = jaxnets.create_model("resnet18_cifar")
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3)) * 3 + 1
    assert not m.bn1.use_running_average  # new models train, as torch modules do
    before = np.asarray(m.bn1.mean[...])
    m(x)
    assert not np.allclose(before, m.bn1.mean[...])
    assert int(m.bn1.num_batches_tracked[...]) == 1
    m.eval()
    assert m.bn1.use_running_average
    frozen = np.asarray(m.bn1.mean[...])
    y1, y2 = m(x), m(x[:2])
    np.testing.assert_array_equal(frozen, m.bn1.mean[...])
    # eval mode: an example's output does not depend on the rest of the batch
    np.testing.assert_allclose(y1[:2], y2, atol=1e-5)


@pytest.mark.parametrize("shape,match", [((3, 32, 32), "4-D"), ((2, 3, 32, 32), "NCHW"),
                                         ((2, 32, 32, 1), "3 input channel")])
def test_bad_input_shape_is_one_clear_error(shape, match):
    m = jaxnets.create_model("resnet18_cifar")
    with pytest.raises(ValueError, match=match):
        m(jnp.zeros(shape))


def test_zero_init_residual_zeroes_last_bn_of_each_block():
    m = jaxnets.create_model("resnet50", zero_init_residual=True)
    assert float(jnp.abs(m.layer1[0].bn3.scale[...]).max()) == 0.0
    assert float(jnp.abs(m.layer1[0].bn2.scale[...]).min()) == 1.0
    m18 = jaxnets.create_model("resnet18", zero_init_residual=True)
    assert float(jnp.abs(m18.layer2[1].bn2.scale[...]).max()) == 0.0


def test_replace_stride_with_dilation_keeps_resolution():
    def layer4_shape(**kw):
        m = jaxnets.create_model("resnet50", **kw)
        m.eval()
        x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
        body = lambda x: m.layer4(m.layer3(m.layer2(m.layer1(m.conv1(x)))))  # noqa: E731
        return jax.eval_shape(body, x).shape

    assert layer4_shape() == (1, 4, 4, 2048)
    assert layer4_shape(replace_stride_with_dilation=[False, True, True]) == (1, 16, 16, 2048)
    with pytest.raises(ValueError, match="3-element"):
        jaxnets.create_model("resnet50", replace_stride_with_dilation=[True])
    with pytest.raises(ValueError, match="dilation"):
        jaxnets.create_model("resnet18", replace_stride_with_dilation=[False, False, True])


def test_basicblock_rejects_groups():
    with pytest.raises(ValueError, match="groups"):
        jaxnets.create_model("resnet18", groups=2)


def test_batchnorm_matches_torch_momentum_and_unbiased_running_var():
    torch = pytest.importorskip("torch")
    bn = BatchNorm(5)
    tbn = torch.nn.BatchNorm2d(5)
    x = np.random.default_rng(0).standard_normal((3, 4, 6, 5)).astype(np.float32) * 2 + 0.5
    for _ in range(3):
        y = bn(jnp.asarray(x))
        ty = tbn(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(y, ty.detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(bn.mean[...], tbn.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], tbn.running_var.numpy(), rtol=1e-6)
    assert int(bn.num_batches_tracked[...]) == int(tbn.num_batches_tracked) == 3


def test_models_are_nnx_modules_that_split_and_merge():
    m = jaxnets.create_model("lenet5")
    graphdef, state = nnx.split(m)
    m2 = nnx.merge(graphdef, state)
    x = jnp.ones((2, 32, 32, 1))
    m.eval()
    m2.eval()
    np.testing.assert_array_equal(m(x), m2(x))


@pytest.mark.parametrize("name", ["alexnet", "vgg11", "googlenet", "inception_v3"])
def test_inputs_below_the_minimum_size_are_refused_where_torch_refuses_them(name):
    # XLA would shrink a feature map to nothing and give NaN logits; torch raises.
    import torch

    from porting.reference import build_torch_model

    lo = jaxnets.get_spec(name).min_size[0]
    ref = build_torch_model(name, num_classes=3).eval()
    with torch.no_grad():
        assert torch.isfinite(ref(torch.randn(1, 3, lo, lo))).all()
        with pytest.raises(RuntimeError):
            ref(torch.randn(1, 3, lo - 1, lo))
    model = nnx.eval_shape(lambda: jaxnets.create_model(name, num_classes=3))
    model.eval()
    for shape in ((1, lo - 1, lo, 3), (1, lo, lo - 1, 3)):
        with pytest.raises(ValueError, match=f"at least {lo}x{lo}; got {shape[1]}x{shape[2]}"):
            model(jnp.zeros(shape))
    # At the minimum the values are finite (the one model checked here that runs fast).
    if name == "alexnet":
        model = jaxnets.create_model(name, num_classes=3)
        model.eval()
        assert jnp.isfinite(model(jnp.ones((1, lo, lo, 3)))).all()


def test_lenet_takes_32x32_only_and_images_must_be_float_arrays():
    model = nnx.eval_shape(lambda: jaxnets.create_model("lenet5"))
    with pytest.raises(ValueError, match="32x32 images only; got 28x28 .pad 28x28 MNIST"):
        model(jnp.zeros((1, 28, 28, 1)))
    with pytest.raises(ValueError, match="32x32 images only; got 36x36$"):
        model(jnp.zeros((1, 36, 36, 1)))
    with pytest.raises(TypeError, match="floating-point images; got uint8"):
        model(np.zeros((1, 32, 32, 1), np.uint8))
    with pytest.raises(TypeError, match="got list"):
        model([[0.0] * 32] * 32)
    import torch

    with pytest.raises(TypeError, match="got a torch tensor"):
        model(torch.zeros(1, 1, 32, 32))


def test_constructor_arguments_are_checked():
    import torch

    with pytest.raises(ValueError):  # torch's own check, which jaxnets follows
        torch.nn.Dropout(1.5)
    for name, kw in (("alexnet", {"dropout": 1.5}), ("vgg11", {"dropout": -0.5}),
                     ("googlenet", {"dropout_aux": 2.0}), ("inception_v3", {"dropout": -1}),
                     ("vit_b_32", {"attention_dropout": 1.01}),
                     ("transformer", {"dropout": 3.0})):
        with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
            nnx.eval_shape(lambda: jaxnets.create_model(name, **kw))  # noqa: B023
    # numpy and jax scalars are rates too, as torch takes them.
    assert nnx.eval_shape(lambda: jaxnets.create_model(
        "alexnet", dropout=np.float32(0.25))).classifier[0].rate == 0.25
    for bad in (2.5, 0, -1, True, "10"):
        with pytest.raises(ValueError, match="num_classes must be a positive integer"):
            jaxnets.create_model("lenet5", num_classes=bad)
    with pytest.raises(TypeError, match="rngs must be an nnx.Rngs"):
        jaxnets.create_model("lenet5", rngs=0)
    for bad in (None, 1.5, "0"):
        with pytest.raises(TypeError, match="seed must be an integer"):
            jaxnets.create_model("lenet5", seed=bad)
    one, other = (jaxnets.create_model("lenet5", seed=s) for s in (np.int64(3), 3))
    np.testing.assert_array_equal(one.conv1.kernel[...], other.conv1.kernel[...])
    with pytest.raises(TypeError, match="a model name is a string"):
        jaxnets.get_spec(None)
    with pytest.raises(ValueError, match="unknown model kind 'imgae'; kinds: image, sequence"):
        jaxnets.list_models(kind="imgae")
    assert jaxnets.list_models(kind="vector") == ["mlp"]


def test_train_mode_batchnorm_needs_more_than_one_value_per_channel_as_torch():
    import torch

    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        torch.nn.BatchNorm2d(4).train()(torch.ones(1, 4, 1, 1))
    bn = BatchNorm(4)
    with pytest.raises(ValueError, match="more than one value per channel; got input of shape"):
        bn(jnp.ones((1, 1, 1, 4)))
    assert int(bn.num_batches_tracked[...]) == 0
    bn.eval()
    assert bn(jnp.ones((1, 1, 1, 4))).shape == (1, 1, 1, 4)
    bn.train()
    y = bn(jnp.arange(8.0).reshape(2, 1, 1, 4))
    assert jnp.isfinite(y).all() and jnp.isfinite(bn.var[...]).all()
