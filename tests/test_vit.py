"""Vision Transformers against torchvision: parity, positional-embedding interpolation,
old checkpoint keys, options."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx
from torchvision.models.vision_transformer import VisionTransformer as TorchViT
from torchvision.models.vision_transformer import interpolate_embeddings

import jaxnets
from jaxnets.vit import VIT_VARIANTS, VisionTransformer, interpolate_pos_embedding, \
    interpolation_matrix
from porting import load_torch_state_dict, to_torch_state_dict
from porting.parity import run_parity
from porting.pretrained import build_abstract, materialize
from porting.rules import rules_for, torch_key
from porting.state_dict import flax_variables


def random_state_dict(shapes: dict, seed: int = 0, dtype=torch.float32) -> dict:
    """Random values for every tensor of a ViT state_dict, at scales that keep
    activations O(1); unlike torchvision's init, no tensor is zero or one (its
    head, class token and biases start at zero, which would hide their bugs).
    In bfloat16 it takes half the memory and both models still load identical
    float32 values."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith(("ln_1.weight", "ln_2.weight", "ln.weight")):
            t = torch.rand(shape, generator=g) * 0.5 + 0.75
        elif len(shape) >= 2 and k.endswith("weight"):
            t = torch.randn(shape, generator=g) / float(np.prod(shape[1:])) ** 0.5
        elif k in ("class_token", "encoder.pos_embedding"):
            t = torch.randn(shape, generator=g) * 0.5
        else:
            t = torch.randn(shape, generator=g) * 0.1
        sd[k] = t.to(dtype)
    return sd


def torchvision_shapes(arch: str, **overrides) -> dict:
    with torch.device("meta"):
        m = torchvision.models.get_model(arch, weights=None, **overrides)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def tiny_pair(seed=0, **kw):
    """A small torchvision ViT with random weights and the same model here, loaded."""
    cfg = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=16,
               mlp_dim=24)
    cfg.update(kw)
    torch.manual_seed(seed)
    tmodel = TorchViT(**cfg).eval()
    sd = random_state_dict({k: tuple(v.shape) for k, v in tmodel.state_dict().items()}, seed)
    tmodel.load_state_dict(sd)
    fmodel = VisionTransformer(**cfg, rngs=nnx.Rngs(seed))
    load_torch_state_dict(fmodel, sd)
    fmodel.eval()
    return tmodel, fmodel, sd


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


# ---------------------------------------------------------------- interpolation


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("n_in,n_out", [(14, 24), (14, 7), (7, 12), (16, 37), (3, 1), (1, 4),
                                        (5, 5)])
def test_interpolation_matrix_is_torch_interpolate(mode, align_corners, n_in, n_out):
    x = torch.randn(1, 2, n_in, 3, dtype=torch.float64)
    want = torch.nn.functional.interpolate(x, size=(n_out, 3), mode=mode,
                                           align_corners=align_corners)
    m = interpolation_matrix(n_in, n_out, mode, align_corners)
    got = np.einsum("oi,bciw->bcow", m, x.numpy())
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("old,new,patch", [(224, 384, 16), (384, 224, 16), (224, 448, 32),
                                           (224, 518, 14), (224, 240, 16)])
def test_interpolate_pos_embedding_matches_torchvision(old, new, patch):
    g = old // patch
    pos = torch.randn(1, g * g + 1, 24)
    want = interpolate_embeddings(new, patch, {"encoder.pos_embedding": pos.clone()})
    want = want["encoder.pos_embedding"].numpy()
    got = interpolate_pos_embedding(pos.numpy(), new, patch)
    assert isinstance(got, np.ndarray) and got.shape == want.shape == (1, (new // patch) ** 2 + 1,
                                                                      24)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got[:, 0], pos[:, 0].numpy())  # class token kept
    got_jax = interpolate_pos_embedding(jnp.asarray(pos.numpy()), new, patch)
    assert isinstance(got_jax, jax.Array)
    np.testing.assert_allclose(np.asarray(got_jax), want, rtol=0, atol=1e-5)
    # In float64 both compute the same sums: any kernel or edge difference would show.
    want64 = interpolate_embeddings(new, patch, {"encoder.pos_embedding": pos.double()})
    got64 = interpolate_pos_embedding(pos.double().numpy(), new, patch)
    np.testing.assert_allclose(got64, want64["encoder.pos_embedding"].numpy(), rtol=0,
                               atol=1e-12)


def test_interpolate_pos_embedding_same_size_and_errors():
    pos = np.random.default_rng(0).standard_normal((1, 197, 8)).astype(np.float32)
    assert interpolate_pos_embedding(pos, 224, 16) is pos
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_pos_embedding(pos[:, :-1], 384, 16)
    with pytest.raises(ValueError, match=r"expected \(1, L, E\)"):
        interpolate_pos_embedding(np.zeros((2, 197, 8)), 384, 16)


# ---------------------------------------------------------------- parity


# The float64 gradient pass compiles the encoder block once for all its copies
# (jit64="blocks"), where jit compiles the unrolled network and op by op runs each op
# on its own (one run each, whole case: vit_b_32 23.8 s op by op, 18.1 s so; vit_b_16
# 24.6 / 22.0 s). The fp32 passes are faster under jit (1.5 s against 2.2 s op by op).


GRAD_CASES = [("vit_b_16", 1), ("vit_b_32", 2)]
LARGE_ARCHS = ["vit_l_16", "vit_l_32", "vit_h_14"]
PARITY_ARCHS = [arch for arch, _ in GRAD_CASES] + LARGE_ARCHS


@pytest.mark.slow
@pytest.mark.parametrize("arch,batch", GRAD_CASES)
def test_parity_with_float64_gradients(arch, batch):
    sd = random_state_dict(torchvision_shapes(arch), seed=1)
    result = run_parity(arch, batch=batch, state_dict=sd, grads=True, jit64="blocks")
    print(result.table())
    assert result.passed, result.table()
    names = {q.name for q in result.quantities}
    assert {"eval logits", "train logits", "grads fp64 (eval mode)",
            "grads fp64 (train mode)"} <= names


_LARGE_PARITY = """
import sys
sys.path.insert(0, {tests!r})
import conftest, torch
from test_vit import random_state_dict, torchvision_shapes
from porting.parity import run_parity
sd = random_state_dict(torchvision_shapes({arch!r}), seed=2, dtype=torch.bfloat16)
result = run_parity({arch!r}, batch=1, state_dict=sd, grads=False, jit=False)
print(result.table())
sys.exit(0 if result.passed else 3)
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", LARGE_ARCHS)
def test_parity_large_outputs(arch):
    # A fresh process per model: vit_h_14 needs ~9 GB at its peak (bf16 checkpoint,
    # torch and jax fp32 models, run_parity's exported copy), on top of nothing that
    # earlier tests left in this process's heap.
    code = _LARGE_PARITY.format(tests=os.path.dirname(os.path.abspath(__file__)), arch=arch)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=1200, cwd=os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__))))
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "eval logits" in proc.stdout and "FAIL" not in proc.stdout
    assert "round trip torch->jax->torch" in proc.stdout and "tensors bit-exact" in proc.stdout


@pytest.mark.slow
def test_vit_b_16_at_384_and_a_224_checkpoint_loaded_into_it():
    sd224 = random_state_dict(torchvision_shapes("vit_b_16"), seed=3)
    sd384 = interpolate_embeddings(384, 16, dict(sd224))
    assert tuple(sd384["encoder.pos_embedding"].shape) == (1, 577, 768)
    # The 384 model itself, on torchvision's interpolation of the checkpoint.
    result = run_parity("vit_b_16", batch=1, size=(384, 384), state_dict=sd384, grads=False,
                        jit=False, overrides={"image_size": 384})
    print(result.table())
    assert result.passed, result.table()
    # The 224 checkpoint loaded here through our own interpolation, against torch on
    # torchvision's. Both models are built without a random init (meta device /
    # eval_shape) since every value comes from the checkpoint.
    with torch.device("meta"):
        tmodel = torchvision.models.vit_b_16(image_size=384)
    tmodel.load_state_dict(sd384, assign=True)
    tmodel.eval()
    fmodel = build_abstract("vit_b_16", image_size=384)
    adapted, notes = fmodel.adapt_torch_state_dict(sd224)
    assert any("interpolated encoder.pos_embedding" in n for n in notes)
    assert load_torch_state_dict(fmodel, adapted).ok
    materialize(fmodel, "vit_b_16", image_size=384)  # the dropout RNG state
    fmodel.eval()
    x = np.random.default_rng(4).standard_normal((1, 384, 384, 3)).astype(np.float32)
    with torch.no_grad():
        want = tmodel(nchw(x)).numpy()
    got = np.asarray(fmodel(jnp.asarray(x)))
    assert np.abs(want).max() > 0.1  # a real signal, not a zero head
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- checkpoints


def test_old_mlp_key_names_load_like_torchvision():
    tmodel, fmodel, sd = tiny_pair(seed=5)
    old = {}
    for k, v in sd.items():
        k = k.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2.")
        old[k] = v
    assert sum(".linear_" in k for k in old) == 8  # 2 layers x 2 linears x weight/bias
    # torchvision renames them in MLPBlock._load_from_state_dict...
    fresh_torch = TorchViT(32, 8, 2, 4, 16, 24).eval()
    fresh_torch.load_state_dict(old)
    # ...and here adapt_torch_state_dict does.
    fresh = VisionTransformer(32, 8, 2, 4, 16, 24, rngs=nnx.Rngs(9))
    with pytest.raises(ValueError, match="mlp.0.weight"):
        load_torch_state_dict(fresh, old)
    adapted, notes = fresh.adapt_torch_state_dict(old)
    assert notes == ["renamed 8 old MLP keys mlp.linear_1/2 -> mlp.0/3"]
    assert load_torch_state_dict(fresh, adapted).ok
    fresh.eval()
    back = to_torch_state_dict(fresh)
    for k, v in fresh_torch.state_dict().items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = fresh_torch(nchw(x)).numpy()
    np.testing.assert_allclose(np.asarray(fresh(jnp.asarray(x))), want, rtol=0, atol=1e-5)
    # A current checkpoint passes through untouched.
    same, notes = fresh.adapt_torch_state_dict(sd)
    assert notes == [] and all(same[k] is sd[k] for k in sd)


# ---------------------------------------------------------------- options


def test_representation_size_head_matches_torchvision():
    tmodel, fmodel, sd = tiny_pair(seed=6, representation_size=12, num_classes=5)
    assert {"heads.pre_logits.weight", "heads.pre_logits.bias", "heads.head.weight"} <= set(sd)
    x = np.random.default_rng(1).standard_normal((3, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = tmodel(nchw(x)).numpy()
    np.testing.assert_allclose(np.asarray(fmodel(jnp.asarray(x))), want, rtol=0, atol=1e-5)


def test_dropout_options_act_in_training_only():
    _, fmodel, _ = tiny_pair(seed=7, dropout=0.3, attention_dropout=0.3)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 32, 32, 3)), jnp.float32)
    fmodel.eval()
    y_eval = np.asarray(fmodel(x))
    np.testing.assert_array_equal(np.asarray(fmodel(x)), y_eval)
    fmodel.train()
    y1, y2 = np.asarray(fmodel(x)), np.asarray(fmodel(x))
    assert not np.allclose(y1, y_eval) and not np.allclose(y1, y2)
    # Attention dropout alone also changes the output (it takes the explicit path).
    _, m, _ = tiny_pair(seed=7, attention_dropout=0.5)
    m.eval()
    ref, ref_features = np.asarray(m(x)), np.asarray(m.features(x))
    m.train()
    assert not np.allclose(np.asarray(m(x)), ref)
    # deterministic=True turns dropout off whatever the mode.
    np.testing.assert_allclose(np.asarray(m.tokens(x, deterministic=True)[:, 0]), ref_features,
                               rtol=0, atol=1e-6)


def test_wrong_input_size_is_one_clear_error():
    _, fmodel, _ = tiny_pair()
    with pytest.raises(ValueError, match=r"built for 32x32 images; got 40x40"):
        fmodel(jnp.zeros((1, 40, 40, 3)))
    with pytest.raises(ValueError, match="NCHW"):
        fmodel(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        VisionTransformer(30, 8, 1, 2, 8, 8, rngs=nnx.Rngs(0))


def test_registered_with_image_size_and_class_overrides():
    """Keys and shapes of a 448-pixel, 10-class model are torchvision's (every
    registered ViT's default build is checked by tests/test_models_roundtrip.py)."""
    assert set(jaxnets.list_models("vit_*")) == set(VIT_VARIANTS)
    spec = jaxnets.get_spec("vit_b_32")
    assert spec.head == r"^heads\.head\." and spec.input_size == (224, 224)
    model = nnx.eval_shape(lambda: jaxnets.create_model("vit_b_32", image_size=448,
                                                        num_classes=10))
    rules = rules_for(model)
    ours = {}
    for path, var in flax_variables(model).items():
        key, layout = torch_key(path, rules)
        ours[key] = layout.torch_shape(tuple(var.get_value().shape))
    assert ours == torchvision_shapes("vit_b_32", image_size=448, num_classes=10)
    assert ours["encoder.pos_embedding"] == (1, 14 * 14 + 1, 768)


def _largest_fusion(hlo_text: str) -> int:
    """Operands of the largest fusion in a compiled XLA program's text."""
    return max(m.group(1).count("%")
               for m in re.finditer(r"= \S+ fusion\((.*?)\), kind", hlo_text))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU fusion pathology")
def test_gradient_fusions_do_not_grow_with_depth():
    """On CPU, XLA fuses the residual stream's gradient (each block's LayerNorm
    backward terms, added up) into every consumer instead of storing it, so a block's
    fusions recompute every block above it: without ``EncoderBlock``'s
    ``fusion_barrier`` the largest fusion of this tiny ViT's gradient program had 47,
    84 and 120 operands at 2, 4 and 6 blocks (ViT-B/16: 171, a third of its train
    step). With it, it stays the same size at any depth."""
    x = jnp.ones((2, 32, 32, 3))

    def largest(depth):
        model = VisionTransformer(image_size=32, patch_size=8, num_layers=depth, num_heads=2,
                                  hidden_dim=32, mlp_dim=64, num_classes=5, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2)  # noqa: E731
        return _largest_fusion(jax.jit(jax.grad(loss)).lower(params).compile().as_text())

    shallow, deep = largest(2), largest(6)
    assert deep <= shallow < 40, (shallow, deep)
