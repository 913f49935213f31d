"""jaxnets vs torchvision, fp32: AlexNet, VGG, GoogLeNet, Inception v3.

Each parity case ports a randomly initialised torchvision model (BatchNorm
statistics and affine terms randomised), checks the export back bit for bit,
and compares eval and train-mode outputs (the auxiliary heads' too, in
training mode) and BatchNorm statistics (<= 1e-4) at 224x224 (Inception: 299x299)
and at a second size; every model also has every parameter's gradient compared,
with the model in training mode, in float64 (see porting/parity.py): at the
second size, whose corner cases reach the gradient too, and for AlexNet and
VGG-16-BN at 224x224 as well.

Sizes are chosen so that the pooling corner cases happen: AlexNet/VGG inputs
whose final feature map does not divide 6x6/7x7 (adaptive pooling with uneven,
overlapping windows, or upsampling from 1x1..3x3); GoogLeNet at odd sizes where
``ceil_mode`` keeps a partial window; Inception v3 above 299.
"""

import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnets
from porting.parity import run_parity_inputs
from porting.pretrained import build_abstract
from porting.rules import rules_for, torch_key
from porting.state_dict import PortingError, flax_variables, load_torch_state_dict

NO_AUX = {"aux_logits": False}

# (arch, [(size, batch), ...], grads, overrides): one build of the two models per row,
# compared at each input (porting.parity.run_parity_inputs); ``grads`` are the indices of
# the inputs at which every parameter's float64 gradient is compared too. That pass is
# most of a row's time (one process each: vgg16_bn 26 s with it at both inputs, 10 s at
# the second only; googlenet 39 / 27 s, inception_v3 46 / 33 s), so the other VGGs,
# GoogLeNet and Inception take it at their second size only. A VGG's float64 check
# holds ~7-8 GB at its peak (133M+ parameters in float64 on both sides, their
# gradients), so tests/conftest.py runs those rows one at a time.
BOTH, SECOND, NONE = (0, 1), (1,), ()
CASES = [
    ("alexnet", [((224, 224), 2), ((200, 240), 1)], BOTH, {}),  # 5x6 features -> 6x6
] + [
    (f"vgg{depth}{bn}", [((224, 224), 1), (second, 2)],
     BOTH if (depth, bn) == (16, "_bn") else SECOND, {})
    for depth, bn, second in (
        (11, "", (64, 80)),  # 2x2 features -> 7x7
        (11, "_bn", (200, 240)),  # 6x7 -> 7x7: uneven windows
        (13, "", (48, 112)),  # 1x3 -> 7x7
        (13, "_bn", (96, 64)),  # 3x2 -> 7x7
        (16, "", (32, 32)),  # 1x1 -> 7x7: replication
        (16, "_bn", (80, 144)),  # 2x4 -> 7x7
        (19, "", (160, 128)),  # 5x4 -> 7x7
        (19, "_bn", (112, 176)),  # 3x5 -> 7x7
    )
] + [
    # Default GoogLeNet and Inception v3 (torchvision's init, auxiliary heads): train mode
    # returns every head's logits, all compared, and every parameter's gradient; at the
    # odd size ceil_mode keeps partial windows (GoogLeNet) and Inception runs above 299.
    # (Batch 2 above 299: Inception's auxiliary head ends in a 1x1 map, where torch's
    # train-mode BatchNorm needs more than one value per channel.)
    ("googlenet", [((224, 224), 2), ((225, 231), 1)], SECOND, {}),
    ("inception_v3", [((299, 299), 2), ((300, 311), 2)], SECOND, {}),
    # transform_input as for the pretrained weights, no auxiliary heads: outputs.
    ("googlenet", [((225, 231), 2)], NONE, {**NO_AUX, "transform_input": True}),
    ("inception_v3", [((320, 341), 1)], NONE, {**NO_AUX, "transform_input": True}),
]


def _id(case):
    arch, inputs, grads, overrides = case
    extra = "".join(f"-{k}" for k, v in overrides.items() if v is True)
    extra += "-noaux" if overrides.get("aux_logits") is False else ""
    sizes = "+".join(f"{h}x{w}b{b}{'-grads' if i in grads else ''}"
                     for i, ((h, w), b) in enumerate(inputs))
    return f"{arch}-{sizes}{extra}"


@pytest.mark.slow
@pytest.mark.parametrize("arch,inputs,grads,overrides", CASES, ids=map(_id, CASES))
def test_parity_with_torchvision(arch, inputs, grads, overrides):
    # Gradients with the model in training mode: every parameter, the auxiliary heads'
    # too, gets one (AlexNet and VGG have no BatchNorm: there the two modes are the
    # same function; BatchNorm with running statistics is covered in test_parity_resnet).
    results = run_parity_inputs(arch, inputs, grads=("train",), grads_at=grads,
                                overrides=overrides)
    assert len(results) == len(inputs)
    for i, (result, ((h, w), batch)) in enumerate(zip(results, inputs)):
        print(result.table())  # shown with pytest -rA: the measured errors
        assert result.passed, f"\n{result.table()}"
        assert result.input_shape == (batch, h, w, 3)
        names = [q.name for q in result.quantities]
        aux = arch in ("googlenet", "inception_v3") and overrides.get("aux_logits", True)
        n_train = {"googlenet": 3, "inception_v3": 2}.get(arch, 1) if aux else 1
        # Training mode with auxiliary heads returns every head's logits, eval only the main.
        assert [n for n in names if n.startswith("train ")] == (
            ["train logits"] if n_train == 1 else [f"train output {i}" for i in range(n_train)])
        assert "eval logits" in names and names[0] == "round trip torch->jax->torch"
        assert any(n.startswith("grads fp64") for n in names) == (i in grads)


def test_every_classic_model_is_covered():
    classic = ["alexnet", "googlenet", "inception_v3"] + [
        f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")]
    assert set(classic) <= set(jaxnets.list_models())
    assert {arch for arch, *_ in CASES} == set(classic)
    # Every model has its outputs checked at 224 (299) and at another size, and its
    # float64 gradients at one size at least; two models' at 224 too.
    canonical = {(224, 224), (299, 299)}
    for arch in classic:
        rows = [(inputs, grads) for a, inputs, grads, _ in CASES if a == arch]
        sizes = {size for inputs, _ in rows for size, _ in inputs}
        grad_sizes = {inputs[i][0] for inputs, grads in rows for i in grads}
        assert len(sizes) >= 2 and sizes & canonical and grad_sizes, arch
    assert {a for a, inputs, grads, _ in CASES
            if any(inputs[i][0] in canonical for i in grads)} == {"alexnet", "vgg16_bn"}


def _abstract(name, **overrides):
    return nnx.eval_shape(lambda: jaxnets.create_model(name, **overrides))


def _torch_keys(model):
    rules = rules_for(model)
    return [torch_key(path, rules)[0] for path in flax_variables(model)]


@pytest.mark.parametrize("name,size,min_size,head", [
    ("alexnet", (224, 224), (63, 63), ["classifier.6.weight", "classifier.6.bias"]),
    ("vgg11", (224, 224), (32, 32), ["classifier.6.weight", "classifier.6.bias"]),
    ("vgg19_bn", (224, 224), (32, 32), ["classifier.6.weight", "classifier.6.bias"]),
    ("googlenet", (224, 224), (15, 15), ["fc.weight", "fc.bias"]),
    ("inception_v3", (299, 299), (75, 75), ["fc.weight", "fc.bias"]),
])
def test_spec(name, size, min_size, head):
    spec = jaxnets.get_spec(name)
    assert spec.input_size == size and spec.min_size == min_size
    keys = _torch_keys(_abstract(name))
    assert sorted(k for k in keys if re.search(spec.head, k)) == sorted(head)


def test_vgg_variants_are_torchvision_layouts():
    # `features` has torchvision's Sequential indices (conv, [bn,] relu, pool) for every row.
    from torchvision.models import vgg as tv_vgg

    for depth, cfg in ((11, "A"), (13, "B"), (16, "D"), (19, "E")):
        for bn in (False, True):
            keys = _torch_keys(_abstract(f"vgg{depth}{'_bn' if bn else ''}"))
            want = tv_vgg.make_layers(tv_vgg.cfgs[cfg], batch_norm=bn).state_dict()
            assert sorted(k for k in keys if k.startswith("features.")) == sorted(
                f"features.{k}" for k in want)


@pytest.mark.parametrize("arch,aux_re", [
    ("googlenet", (r"^aux1\.", r"^aux2\.")),
    ("inception_v3", (r"^AuxLogits\.",)),
])
def test_checkpoint_with_aux_heads_needs_explicit_ignore(arch, aux_re):
    from porting.reference import build_torch_model

    state = build_torch_model(arch, aux_logits=True, init_weights=False).state_dict()
    aux_keys = sorted(k for k in state if any(re.search(p, k) for p in aux_re))
    assert aux_keys, "the reference checkpoint should carry auxiliary heads"
    # Shape-only: the load below fills every variable (no slow eager initialisation).
    model = build_abstract(arch, aux_logits=False, init_weights=False)
    with pytest.raises(PortingError) as err:
        load_torch_state_dict(model, state)
    message = str(err.value)
    assert "unexpected" in message and all(k in message for k in aux_keys)
    report = load_torch_state_dict(model, state, ignore=aux_re)
    assert sorted(report.ignored) == aux_keys
    assert not report.missing and not report.unexpected
    assert len(report.loaded) == len(state) - len(aux_keys)
    fc = np.asarray(state["fc.weight"]).T
    np.testing.assert_array_equal(np.asarray(model.fc.kernel[...]), fc)


def test_dropout_follows_the_dropout_rng_stream():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 63, 63, 3)), jnp.float32)

    def run(dropout_seed, **kw):
        model = jaxnets.create_model("alexnet", num_classes=10,
                                     rngs=nnx.Rngs(params=0, dropout=dropout_seed), **kw)
        return model, np.asarray(model(x))

    m1, a = run(1)
    m2, b = run(2)
    _, a_again = run(1)
    # Same parameter stream: same weights; another dropout stream: other masks.
    np.testing.assert_array_equal(m1.classifier[1].kernel[...], m2.classifier[1].kernel[...])
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, a_again)
    # A second call draws new masks.
    assert not np.allclose(a, np.asarray(m1(x)))
    m1.eval()
    np.testing.assert_array_equal(np.asarray(m1(x)), np.asarray(m1(x)))
    # With rate 0 a training-mode pass is the eval pass (AlexNet has no BatchNorm).
    m0, train0 = run(3, dropout=0.0)
    m0.eval()
    np.testing.assert_allclose(train0, np.asarray(m0(x)), rtol=0, atol=0)
