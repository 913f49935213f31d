"""The path a GPU or TPU runs, checked against torch on this CPU.

On CPU, ``jaxnets.layers`` computes convolutions, dense layers, attention and
max-pools in forms XLA:CPU runs faster (its CPU detours), and the rest of the
suite's parity tests run those forms. A GPU or TPU runs ``lax``'s and
``jax.nn``'s own operations instead. ``jaxnets.layers.cpu_detours(False)``
traces those on CPU, so they are compared with torch here: one model per
family, and the switch itself.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxnets import layers
from porting import parity
from porting.parity import run_parity
from porting.verify import main as verify_main


def _primitives(fn, *args) -> set[str]:
    """Names of the primitives in ``fn``'s jaxpr, nested ones included."""
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def _conv1x1(x, w):
    return layers.conv_general_dilated(
        x, w, (1, 1), ((0, 0), (0, 0)),
        dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, w.shape,
                                                         ("NHWC", "HWIO", "NHWC")))


X = jnp.ones((2, 9, 9, 4))
Q = jnp.ones((2, 5, 2, 4))
# (what, function, args, a primitive only the CPU detour has, one only the accelerator
# form has)
FORMS = [
    ("1x1 convolution", _conv1x1, (X, jnp.ones((1, 1, 4, 3))), "dot_general",
     "conv_general_dilated"),
    ("overlapping max-pool", lambda x: layers.max_pool2d(x, 3, 2, 1), (X,), "custom_jvp_call",
     "reduce_window_max"),
    ("fusion barrier", lambda x: layers.fusion_barrier(x), (X,), "cond", None),
    ("dense layer on tokens", lambda a, b: layers.dot_general(a, b, (((2,), (0,)), ((), ()))),
     (jnp.ones((2, 5, 4)), jnp.ones((4, 3))), "reshape", None),
    ("attention", layers.dot_product_attention, (Q, Q, Q), None, "reshape"),
]


@pytest.mark.parametrize("what,fn,args,cpu_only,accelerator_only", FORMS,
                         ids=[f[0] for f in FORMS])
def test_the_switch_traces_the_accelerator_form(what, fn, args, cpu_only, accelerator_only):
    assert jax.default_backend() == "cpu"
    detour = _primitives(fn, *args)
    with layers.cpu_detours(False):
        plain = _primitives(fn, *args)
        values = jax.jit(fn)(*args)
    assert detour != plain, what
    if cpu_only:
        assert cpu_only in detour and cpu_only not in plain, (what, detour, plain)
    if accelerator_only:
        assert accelerator_only in plain and accelerator_only not in detour, (what, plain)
    # Both forms compute the same values.
    np.testing.assert_allclose(np.asarray(values), np.asarray(jax.jit(fn)(*args)), rtol=1e-6)


def test_the_switch_is_restored_after_an_error():
    with pytest.raises(RuntimeError), layers.cpu_detours(False):
        assert not layers._cpu()
        raise RuntimeError
    assert layers._cpu()
    with layers.cpu_detours(False), layers.cpu_detours(True):
        assert layers._cpu()


# (arch, size, batch, gradient modes, overrides): every kind of operation that has a
# CPU detour: 1x1, 3x3, strided and stem convolutions, 3x3 convolutions over 2x2 maps,
# the overlapping stem pool and BatchNorm (ResNet-50 at 64 px), LeNet's one- and
# few-channel 5x5 convolutions and tiling pools,
# GoogLeNet's ceil-mode pools and auxiliary heads at an odd size, the ViT's attention,
# dense layers and residual stream (no fusion barrier off CPU). AlexNet and VGG add
# no other kind (checked by hand with porting.verify --no-cpu-detours: both PASS).
CASES = [
    ("lenet5", None, 2, ("eval", "train"), {}),
    ("resnet18_cifar", (32, 32), 2, ("eval", "train"), {}),
    ("resnet50", (64, 64), 2, ("train",), {}),
    ("googlenet", (225, 231), 1, ("train",), {}),
    ("vit_b_32", None, 1, (), {}),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch,size,batch,modes,overrides", CASES, ids=[c[0] for c in CASES])
def test_parity_along_the_accelerator_path(arch, size, batch, modes, overrides):
    result = run_parity(arch, size=size, batch=batch, grads=modes, overrides=overrides,
                        cpu_detours=False)
    print(result.table())
    assert result.passed, f"\n{result.table()}"
    names = [q.name for q in result.quantities]
    assert len([n for n in names if n.startswith("grads fp64")]) == len(modes), names


def test_parity_computes_in_full_fp32_whatever_the_caller_set(monkeypatch):
    """run_parity's jax side runs at "highest" matmul precision, torch with TF32 off,
    and the caller's settings come back afterwards (on a GPU, "default" is TF32)."""
    seen = []
    jax_side = parity._jax_side

    def spy(*args, **kwargs):
        seen.append((jax.config.jax_default_matmul_precision,
                     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                     layers._cpu()))
        return jax_side(*args, **kwargs)

    monkeypatch.setattr(parity, "_jax_side", spy)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with jax.default_matmul_precision("default"):
            assert run_parity("lenet5", grads=False, cpu_detours=False).passed
            assert jax.config.jax_default_matmul_precision == "default"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert seen == [("highest", False, False, False)]
    assert layers._cpu()


def test_verify_cli_says_which_path(capsys):
    assert verify_main(["--arch", "lenet5", "--no-cpu-detours", "--no-grads"]) == 0
    out = capsys.readouterr().out
    assert "jax on cpu (CPU detours off: the accelerator path)" in out
    assert "TF32 off" in out and "PASS: lenet5" in out
    assert verify_main(["--arch", "lenet5", "--no-grads"]) == 0
    assert "jaxnets' CPU forms" in capsys.readouterr().out


@pytest.mark.parametrize("arch, size", [("lenet5", 32), ("resnet18_cifar", 32),
                                        ("resnet18_cifar", 12)])
def test_jax_export_with_a_symbolic_batch(arch, size):
    # Serialising a model for any batch size (jax.export, "b, H, W, C"): the CPU
    # detours' shape tests cannot decide a symbolic batch ("1024*b >= 2048" raised),
    # so lax's operations are traced, and give the model's results. At 12 px the last
    # stages' maps (3x3, 2x2) are shorter than or as short as the kernels, the case of
    # the patches detour.
    from flax import nnx

    import jaxnets

    model = jaxnets.create_model(arch)
    model.eval()
    graphdef, state = nnx.split(model)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    channels = jaxnets.get_spec(arch).in_channels
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {size}, {size}, {channels}"),
                                jnp.float32)
    exported = jax.export.export(jax.jit(forward))(state, spec)
    assert str(exported.out_avals[0].shape[0]) == "b"
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, size, size, channels)),
                    jnp.float32)
    np.testing.assert_allclose(np.asarray(exported.call(state, x)),
                               np.asarray(jax.jit(forward)(state, x)), atol=1e-4, rtol=0)
