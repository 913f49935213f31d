"""The porting walker: strict loads, clear errors, exact round trips."""

import numpy as np
import pytest
import torch

import jaxnets
from porting import PortingError, load_torch_state_dict, to_torch_state_dict
from porting.reference import build_torch_model
from porting.rules import flatten_linear


@pytest.fixture(scope="module")
def lenet_pair():
    torch.manual_seed(0)
    return build_torch_model("lenet5"), jaxnets.create_model("lenet5")


def test_loads_torch_tensors_and_numpy_arrays(lenet_pair):
    tmodel, model = lenet_pair
    sd = tmodel.state_dict()
    report = load_torch_state_dict(model, sd)
    assert report.ok and sorted(report.loaded) == sorted(sd)
    np.testing.assert_array_equal(model.conv1.kernel[...], sd["conv1.weight"].numpy()
                                  .transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.fc1.kernel[...], sd["fc1.weight"].numpy().T)
    numpy_sd = {k: v.numpy() * 2 for k, v in sd.items()}
    load_torch_state_dict(model, numpy_sd)
    np.testing.assert_array_equal(model.fc3.bias[...], numpy_sd["fc3.bias"])


def test_loaded_model_does_not_share_memory_with_the_state_dict():
    """The model is independent of the tensors it was loaded from: a torch
    train-mode forward after the load (which updates BatchNorm buffers in
    place) must not change the jax model. jax.device_put(may_alias=False) was
    seen to read the buffer after such a change, so the walker copies on the host.
    """
    torch.manual_seed(0)
    tmodel = build_torch_model("resnet18_cifar")
    sd = tmodel.state_dict()
    model = jaxnets.create_model("resnet18_cifar")
    load_torch_state_dict(model, sd)
    before = {k: np.array(v) for k, v in to_torch_state_dict(model).items()}
    with torch.no_grad():
        for v in sd.values():
            v.add_(1)  # in place, as a BatchNorm update or an optimizer step would
    after = to_torch_state_dict(model)
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)
    # A consumed (handed-over) numpy state_dict is emptied as it is loaded.
    owned = {k: v.numpy().copy() for k, v in tmodel.state_dict().items()}
    n = len(owned)
    report = load_torch_state_dict(model, owned, consume=True)
    assert len(report.loaded) == n and owned == {}


def test_fp16_checkpoint_is_cast_and_reported(lenet_pair):
    tmodel, model = lenet_pair
    sd = {k: v.half() for k, v in tmodel.state_dict().items()}
    report = load_torch_state_dict(model, sd)
    assert model.fc1.kernel[...].dtype == np.float32
    assert any("float16->float32" in n for n in report.notes)


def test_missing_key_is_named_and_model_untouched(lenet_pair):
    tmodel, model = lenet_pair
    sd = dict(tmodel.state_dict())
    load_torch_state_dict(model, sd)
    before = np.asarray(model.fc2.kernel[...]).copy()
    del sd["fc3.bias"]
    sd["fc2.weight"] = sd["fc2.weight"] + 1
    with pytest.raises(PortingError, match=r"1 missing: fc3\.bias"):
        load_torch_state_dict(model, sd)
    np.testing.assert_array_equal(model.fc2.kernel[...], before)  # nothing half-loaded
    report = load_torch_state_dict(model, sd, strict=False)
    assert report.missing == ["fc3.bias"] and not report.ok


def test_unexpected_key_is_named(lenet_pair):
    tmodel, model = lenet_pair
    sd = dict(tmodel.state_dict(), **{"fc4.weight": torch.zeros(3, 3)})
    with pytest.raises(PortingError, match=r"1 unexpected: fc4\.weight"):
        load_torch_state_dict(model, sd)
    assert load_torch_state_dict(model, sd, strict=False).unexpected == ["fc4.weight"]


def test_shape_mismatch_names_key_and_shapes_even_when_not_strict(lenet_pair):
    tmodel, model = lenet_pair
    sd = dict(tmodel.state_dict())
    sd["fc2.weight"] = torch.zeros(84, 121)
    for strict in (True, False):
        with pytest.raises(PortingError, match=r"fc2\.weight expected \[84, 120\] got \[84, 121\]"):
            load_torch_state_dict(model, sd, strict=strict)
    # An input width differs, not an output count: no class-count hint.
    with pytest.raises(PortingError) as e:
        load_torch_state_dict(model, sd)
    assert "num_classes" not in str(e.value)


def test_wrong_num_classes_suggests_the_fix():
    torch.manual_seed(0)
    sd = build_torch_model("lenet5", num_classes=5).state_dict()
    model = jaxnets.create_model("lenet5", num_classes=10)
    with pytest.raises(PortingError, match=r"fc3\.weight expected \[10, 84\] got \[5, 84\]"
                                           r"(.|\n)*num_classes"):
        load_torch_state_dict(model, sd)
    report = load_torch_state_dict(model, sd, ignore=(jaxnets.get_spec("lenet5").head,))
    assert sorted(report.ignored) == ["fc3.bias", "fc3.weight"]


def test_state_dict_of_another_architecture():
    sd = build_torch_model("mlp").state_dict()
    model = jaxnets.create_model("lenet5")
    with pytest.raises(PortingError, match="another architecture"):
        load_torch_state_dict(model, sd)


def test_not_a_mapping():
    with pytest.raises(PortingError, match="mapping"):
        load_torch_state_dict(jaxnets.create_model("mlp"), [1, 2])


def test_flatten_linear_layout_is_an_exact_inverse():
    rng = np.random.default_rng(0)
    c, h, w, o = 3, 4, 5, 7
    layout = flatten_linear(c, h, w)
    t = rng.standard_normal((o, c * h * w)).astype(np.float32)
    k = layout.from_torch(t)
    np.testing.assert_array_equal(layout.to_torch(k), t)
    assert layout.torch_shape(k.shape) == t.shape
    # The flax kernel applied to NHWC-flattened features equals torch's on NCHW-flattened ones.
    feats = rng.standard_normal((2, c, h, w)).astype(np.float32)
    np.testing.assert_allclose(feats.transpose(0, 2, 3, 1).reshape(2, -1) @ k,
                               feats.reshape(2, -1) @ t.T, rtol=1e-5, atol=1e-5)


def test_exported_state_dict_loads_strictly_into_torch_and_counts_batches():
    torch.manual_seed(0)
    tmodel = build_torch_model("resnet18_cifar")
    model = jaxnets.create_model("resnet18_cifar")
    model(np.zeros((2, 8, 8, 3), np.float32))  # one train-mode step: num_batches_tracked = 1
    sd = to_torch_state_dict(model)
    assert sd["bn1.num_batches_tracked"].dtype == np.int64
    result = tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert int(tmodel.bn1.num_batches_tracked) == 1


@pytest.mark.parametrize("shape,perm", [
    ((300, 700), (1, 0)),  # a Linear kernel: slabs along the source's outer axis
    ((70, 33, 3, 5), (2, 3, 1, 0)),  # OIHW -> HWIO
    ((5, 3, 600, 40), (0, 2, 1, 3)),
    ((7,), (0,)),
    ((), ()),  # num_batches_tracked stays 0-d
])
@pytest.mark.parametrize("dtype", [None, np.float64])
def test_as_contiguous_equals_numpy_for_transposed_views(shape, perm, dtype):
    from porting.state_dict import _SLAB_MIN, as_contiguous

    src = np.random.default_rng(0).standard_normal(shape).astype(np.float32).transpose(perm)
    got = as_contiguous(src, dtype)
    want = np.array(src, dtype=dtype or src.dtype, order="C")
    assert got.flags.c_contiguous and got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    if src.size >= _SLAB_MIN and not src.flags.c_contiguous:
        assert not np.shares_memory(got, src)
    if dtype is None and src.flags.c_contiguous:
        assert got is src  # nothing to do


def test_round_trip_check_is_bitwise():
    from porting.parity import _same_bits

    a = np.array([0.0, 1.5, np.nan], np.float32)
    assert _same_bits(a, a.copy())
    assert not _same_bits(a, np.array([-0.0, 1.5, np.nan], np.float32))  # sign of zero
    other_nan = a.copy()
    other_nan.view(np.uint32)[2] ^= 1  # another NaN payload
    assert np.isnan(other_nan[2]) and not _same_bits(a, other_nan)
    big = np.random.default_rng(0).standard_normal((300, 700)).astype(np.float32)
    assert _same_bits(big.T, np.ascontiguousarray(big.T))  # views compare by value
    assert _same_bits(np.array(3, np.int64), np.array(3, np.int64))


def test_flax_to_torch_takes_nnx_grad_state_and_checks_paths(lenet_pair):
    import jax.numpy as jnp
    from flax import nnx

    from porting import flax_to_torch
    from porting.state_dict import flax_variables

    _, model = lenet_pair
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 1)).astype(np.float32)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    assert isinstance(grads, nnx.State)
    got = flax_to_torch(model, grads)
    flat = {".".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(grads)}
    want = flax_to_torch(model, flat)
    assert sorted(got) == sorted(to_torch_state_dict(model)) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert got["fc1.weight"].shape == (120, 400) and np.abs(got["fc1.weight"]).max() > 0
    # Paths the model does not have, wrong shapes and non-arrays are refused, named.
    with pytest.raises(PortingError, match=r"no parameter or statistic at 1 of the paths "
                                           r"given: nope\.kernel \(its paths look like conv1"):
        flax_to_torch(model, {"nope.kernel": np.zeros((2, 3)), **flat})
    with pytest.raises(PortingError, match=r"fc3\.bias expected \[10\] got \[3\]"):
        flax_to_torch(model, {"fc3.bias": np.zeros(3, np.float32)})
    with pytest.raises(PortingError, match=r"not numeric: conv1 \(dict\), fc3\.bias \(str\)"):
        flax_to_torch(model, {"conv1": {"kernel": flat["conv1.kernel"]}, "fc3.bias": "x"})
    # Given only the class, the rule table still applies (paths cannot be checked).
    assert flax_to_torch(type(model), {"fc1.kernel": flat["fc1.kernel"]})["fc1.weight"].shape \
        == (120, 400)
    with pytest.raises(TypeError, match="flax_to_torch takes an nnx.Module or its class"):
        flax_to_torch(None, flat)
    assert set(flat) <= set(flax_variables(model))


@pytest.mark.parametrize(("wrap", "notes"), [
    (lambda sd: {f"module.{k}": v for k, v in sd.items()},
     ["stripped 'module.' prefix from 10 keys"]),
    (lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
     ["stripped '_orig_mod.' prefix from 10 keys"]),
    (lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
     ["stripped 'module.' prefix from 10 keys", "stripped '_orig_mod.' prefix from 10 keys"]),
    (lambda sd: {"epoch": 3, "state_dict": sd}, ["unwrapped 'state_dict'"]),
    (lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}},
     ["unwrapped 'model'", "stripped 'module.' prefix from 10 keys"]),
    (lambda sd: {**sd, "epoch": 3}, ["dropped 1 non-tensor entries (epoch)"]),
])
def test_in_memory_state_dict_is_unwrapped_like_a_file(lenet_pair, wrap, notes):
    tmodel, model = lenet_pair
    sd = tmodel.state_dict()
    report = load_torch_state_dict(model, wrap(sd))
    assert report.ok and report.notes == notes and sorted(report.loaded) == sorted(sd)
    np.testing.assert_array_equal(model.fc3.bias[...], sd["fc3.bias"].numpy())


def test_state_dicts_under_other_keys_are_named(lenet_pair):
    tmodel, model = lenet_pair
    sd = tmodel.state_dict()
    with pytest.raises(PortingError, match=r"state_dicts under 'net', 'ema': pick one and load "
                                           r"it with porting\.load_torch_state_dict\(model, "
                                           r"state_dict\['net'\]\)"):
        load_torch_state_dict(model, {"net": sd, "ema": sd, "epoch": 3})
    with pytest.raises(PortingError, match="no tensors found in the state_dict"):
        load_torch_state_dict(model, {"epoch": 3})


def test_not_a_model_is_a_type_error():
    with pytest.raises(TypeError, match="load_torch_state_dict takes an nnx.Module .* NoneType"):
        load_torch_state_dict(None, {})
    with pytest.raises(TypeError, match="to_torch_state_dict takes an nnx.Module .* dict"):
        to_torch_state_dict({"conv1.kernel": np.zeros(3)})


def test_vit_at_another_image_size_names_adapt_torch_state_dict():
    from flax import nnx

    from jaxnets.vit import VisionTransformer

    sd = to_torch_state_dict(VisionTransformer(64, 8, 2, 4, 16, 24, rngs=nnx.Rngs(0)))
    small = VisionTransformer(32, 8, 2, 4, 16, 24, rngs=nnx.Rngs(1))
    with pytest.raises(PortingError) as e:
        load_torch_state_dict(small, sd)
    msg = str(e.value)
    assert "encoder.pos_embedding expected [1, 17, 16] got [1, 65, 16]" in msg
    assert "model.adapt_torch_state_dict(state_dict)" in msg and "load_torchvision" in msg
    assert "interpolated encoder.pos_embedding [1, 65, 16] -> [1, 17, 16]" in msg
    adapted, notes = small.adapt_torch_state_dict(sd)
    assert load_torch_state_dict(small, adapted).ok and notes
    # No hint where the hook would change nothing, or for a family without one.
    del adapted["encoder.ln.bias"]
    with pytest.raises(PortingError, match=r"1 missing: encoder\.ln\.bias$"):
        load_torch_state_dict(small, adapted)
    with pytest.raises(PortingError) as e:
        load_torch_state_dict(jaxnets.create_model("lenet5"), {"fc3.bias": np.zeros(3)},
                              strict=False)
    assert "adapt_torch_state_dict" not in str(e.value)


def test_bf16_model_exports_to_torch_bit_for_bit(tmp_path):
    import jax.numpy as jnp
    import ml_dtypes

    from porting import to_torch_tensor
    from porting.state_dict import flax_variables

    torch.manual_seed(0)
    tmodel = build_torch_model("lenet5").to(torch.bfloat16)
    model = jaxnets.create_model("lenet5")
    for var in flax_variables(model).values():
        var.set_value(var.get_value().astype(jnp.bfloat16))
    sd = to_torch_state_dict(model)
    assert sd["fc1.weight"].dtype == ml_dtypes.bfloat16  # as documented: numpy has no bf16
    tensors = {k: to_torch_tensor(v) for k, v in sd.items()}
    assert tensors["fc1.weight"].dtype == torch.bfloat16
    tmodel.load_state_dict(tensors, strict=True)
    for k, v in tmodel.state_dict().items():
        np.testing.assert_array_equal(v.view(torch.int16).numpy(), sd[k].view(np.int16),
                                      err_msg=k)
    # ...and saved, read back by torch.
    torch.save(tensors, tmp_path / "bf16.pth")
    back = torch.load(tmp_path / "bf16.pth", weights_only=True)
    assert torch.equal(back["conv1.weight"], tmodel.conv1.weight)
    assert to_torch_tensor(np.ones(3, np.float32)).dtype == torch.float32
    f8 = to_torch_tensor(np.array([1.5, -2.0], ml_dtypes.float8_e4m3fn))
    assert f8.dtype == torch.float8_e4m3fn and f8.float().tolist() == [1.5, -2.0]


def test_to_torch_tensor_takes_every_floating_ml_dtype_and_refuses_sub_byte_ones():
    import ml_dtypes
    import torch

    from porting import to_torch_tensor

    for name in ("bfloat16", "float8_e5m2", "float8_e4m3fn"):
        a = np.array([1.5, -2.0, 0.25], dtype=getattr(ml_dtypes, name))
        t = to_torch_tensor(a)
        assert t.dtype == getattr(torch, name) and t.float().tolist() == [1.5, -2.0, 0.25]
    with pytest.raises(TypeError, match="no floating int4 dtype"):
        to_torch_tensor(np.array([1, 2], dtype=ml_dtypes.int4))
