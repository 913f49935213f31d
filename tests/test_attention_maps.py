"""Attention maps: per-layer weights against torch's nn.MultiheadAttention, attention
rollout against a plain reference, and the command line."""

import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from torchvision.models.vision_transformer import VisionTransformer as TorchViT

from jaxnets.attention_maps import (attention_rollout, attention_weights, class_token_attention,
                                    main)
from jaxnets.vit import VisionTransformer
from porting import load_torch_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(image_size=48, patch_size=8, num_layers=3, num_heads=4, hidden_dim=32, mlp_dim=40)


def random_pair(seed=0):
    """A small torchvision ViT with every tensor random (LayerNorms included) and its port."""
    torch.manual_seed(seed)
    tmodel = TorchViT(**CFG).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tmodel.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if ".ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]) if p.ndim == 2 else noise * 0.3)
    fmodel = VisionTransformer(**CFG, rngs=nnx.Rngs(seed))
    load_torch_state_dict(fmodel, tmodel.state_dict())
    return tmodel, fmodel


def images(n=2, size=48, seed=0):
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


# ---------------------------------------------------------------- attention weights


def test_attention_weights_equal_torch_multihead_attention():
    tmodel, fmodel = random_pair()
    x = images()
    inputs = []
    hooks = [blk.self_attention.register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append(args[0]), with_kwargs=True)
        for blk in tmodel.encoder.layers]
    with torch.no_grad():
        tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        want = [blk.self_attention(q, q, q, need_weights=True, average_attn_weights=False)[1]
                for blk, q in zip(tmodel.encoder.layers, inputs)]
    for h in hooks:
        h.remove()
    fmodel.train()  # dropout rates are 0 but the mode must not matter either
    got = attention_weights(fmodel, x)
    n_tokens = (48 // 8) ** 2 + 1
    assert len(got) == CFG["num_layers"] == len(want)
    for layer, (g, w) in enumerate(zip(got, want)):
        assert g.shape == (2, CFG["num_heads"], n_tokens, n_tokens)
        np.testing.assert_allclose(np.asarray(g).sum(-1), 1.0, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(g), w.numpy(), rtol=0, atol=1e-5,
                                   err_msg=f"layer {layer}")
    # The maps differ per head and per example: nothing is broadcast by mistake.
    g = np.asarray(got[-1])
    assert np.abs(g[:, 0] - g[:, 1]).max() > 1e-3 and np.abs(g[0] - g[1]).max() > 1e-3


def test_weights_path_gives_the_same_tokens_as_the_fast_path():
    _, fmodel = random_pair(seed=1)
    fmodel.eval()
    x = jnp.asarray(images(seed=1))
    fast = fmodel.tokens(x)
    slow, _ = fmodel.tokens(x, need_weights=True)
    np.testing.assert_allclose(np.asarray(slow), np.asarray(fast), rtol=0, atol=1e-5)


def test_attention_weights_bad_inputs():
    _, fmodel = random_pair()
    with pytest.raises(ValueError, match="built for 48x48 images; got 32x32"):
        attention_weights(fmodel, images(size=32))
    with pytest.raises(TypeError, match="needs a jaxnets VisionTransformer"):
        attention_weights(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), images())


# ---------------------------------------------------------------- rollout


def rollout_reference(weights, head_fusion, discard_ratio):
    """Abnar & Zuidema's rollout written out per example with numpy loops."""
    weights = [np.asarray(w, np.float64) for w in weights]
    b, _, n, _ = weights[0].shape
    out = []
    for i in range(b):
        result = np.eye(n)
        for w in weights:
            a = {"mean": w[i].mean(0), "max": w[i].max(0), "min": w[i].min(0)}[head_fusion]
            flat = a.reshape(-1).copy()
            k = int(flat.size * discard_ratio)
            for idx in np.argsort(flat, kind="stable")[:k]:
                if idx != 0:
                    flat[idx] = 0.0
            a = flat.reshape(n, n)
            a = (a + np.eye(n)) / 2
            a = a / a.sum(-1, keepdims=True)
            result = a @ result
        g = math.isqrt(n - 1)
        out.append(result[0, 1:].reshape(g, g))
    return np.stack(out)


def random_weights(layers=3, b=2, h=4, n=17, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        logits = rng.standard_normal((b, h, n, n)) * 2
        w = np.exp(logits)
        out.append((w / w.sum(-1, keepdims=True)).astype(np.float32))
    return out


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.6])
def test_rollout_matches_reference(head_fusion, discard_ratio):
    w = random_weights()
    got = attention_rollout(w, head_fusion, discard_ratio)
    assert got.shape == (2, 4, 4)
    np.testing.assert_allclose(np.asarray(got), rollout_reference(w, head_fusion, discard_ratio),
                               rtol=1e-5, atol=1e-6)


def test_rollout_closed_forms():
    n = 10
    identity = [np.broadcast_to(np.eye(n), (1, 2, n, n))] * 4
    np.testing.assert_allclose(np.asarray(attention_rollout(identity)), 0.0, atol=1e-7)
    # One layer where every token attends to patch 5 only: 0.5 * W + 0.5 * I puts half the
    # class token's mass on it.
    w = np.zeros((1, 2, n, n), np.float32)
    w[..., 5] = 1.0
    got = np.asarray(attention_rollout([w], grid=(3, 3)))
    want = np.zeros((1, 9))
    want[0, 4] = 0.5
    np.testing.assert_allclose(got.reshape(1, 9), want, atol=1e-7)
    # Real weights: the class row of the rollout is a distribution over all tokens.
    r = np.asarray(attention_rollout(random_weights()))
    assert (r > 0).all() and (r.sum(axis=(1, 2)) < 1).all()


def test_rollout_and_maps_bad_arguments():
    w = random_weights()
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(w, "median")
    with pytest.raises(ValueError, match="discard_ratio"):
        attention_rollout(w, discard_ratio=1.0)
    with pytest.raises(ValueError, match="16 patch tokens do not fill a 3x5 grid"):
        attention_rollout(w, grid=(3, 5))
    with pytest.raises(ValueError, match="at least one layer"):
        attention_rollout([])
    maps = class_token_attention(jnp.asarray(w[0]))
    assert maps.shape == (2, 4, 4, 4)
    np.testing.assert_array_equal(np.asarray(maps)[1, 2].ravel(), w[0][1, 2, 0, 1:])
    # Stacked layers are the same layers; one 4-D array is one layer.
    np.testing.assert_array_equal(np.asarray(attention_rollout(np.stack(w))),
                                  np.asarray(attention_rollout(w)))
    np.testing.assert_array_equal(np.asarray(attention_rollout(w[0])),
                                  np.asarray(attention_rollout(w[:1])))
    with pytest.raises(ValueError, match=r"each layer's attention weights as a \(batch, heads"):
        attention_rollout([w[0][0]])
    with pytest.raises(ValueError, match="one layer's attention weights"):
        class_token_attention(w)
    with pytest.raises(ValueError, match="16 patch tokens do not fill a 3x3 grid"):
        class_token_attention(w[0], grid=(3, 3))


# ---------------------------------------------------------------- command line


def png_size(path):
    with Image.open(path) as im:
        return im.size


def expected_size(panels):
    cols = min(4, panels)
    rows = -(-panels // cols)
    return (cols * 250, rows * 250)


@pytest.mark.slow
def test_cli_module_on_the_bundled_sample(tmp_path):
    out = tmp_path / "maps.png"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxnets.attention_maps", "--arch", "vit_b_32", "--out",
         str(out), "--rollout"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "bundled sample image" in proc.stdout
    assert "untrained model are noise" in proc.stdout
    assert png_size(out) == expected_size(1 + 12 + 1)  # input, 12 heads, rollout


@pytest.mark.slow
def test_cli_with_a_checkpoint_with_old_keys_and_an_image(tmp_path, capsys):
    # A 10-class vit_b_32 checkpoint for 64-pixel images in torchvision's old MLP naming.
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in
                  TorchViT(64, 32, 12, 12, 768, 3072, num_classes=10).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2."):
          torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    weights = tmp_path / "vit_b_32_small.pth"
    torch.save({"epoch": 3, "model": sd}, weights)
    del sd
    img = tmp_path / "wide.png"
    Image.fromarray((np.random.default_rng(0).random((90, 150, 3)) * 255).astype(np.uint8)
                    ).save(img)
    out = tmp_path / "maps.png"
    code = main(["--arch", "vit_b_32", "--weights", str(weights), "--image", str(img),
                 "--out", str(out), "--layer", "0"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "noise" not in stdout and "bundled" not in stdout
    assert "renamed 48 old MLP keys" in stdout and "loaded 152 tensors" in stdout
    assert "12 heads of layer 0" in stdout
    assert png_size(out) == expected_size(1 + 12)


@pytest.mark.slow
def test_cli_with_a_finetune_run(tmp_path, capsys, monkeypatch):
    """A train.finetune run of a ViT (made here: a checkpoint and the run's model.json and
    config.json): its weights, its arch and its evaluation preprocessing (host resize and
    crop, its mean/std) give the maps."""
    import json

    import jaxnets
    from jaxnets import attention_maps
    from train import steps
    from train.augment import AugmentConfig, eval_transform
    from train.checkpoint import Checkpointer, write_model_info
    from train.data import HostTransform, decode_image

    model = jaxnets.create_model("vit_b_32", num_classes=3, image_size=64, seed=1)
    _, params, stats = steps.split_model(model)
    run = tmp_path / "run"
    ck = Checkpointer(str(run / "checkpoints"))
    ck.save(4, {"params": params, "batch_stats": stats}, {"epoch": 0})
    ck.close()
    del params
    write_model_info(str(run), "vit_b_32", 3, {"image_size": 64}, classes=["a", "b", "c"])
    mean, std = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
    (run / "config.json").write_text(json.dumps({
        "arch": "vit_b_32", "dataset": "folder:x", "image_size": 64, "resize_size": 80,
        "interpolation": "bicubic", "mean": mean, "std": std}))
    img = tmp_path / "wide.png"
    Image.fromarray((np.random.default_rng(1).random((90, 150, 3)) * 255).astype(np.uint8)
                    ).save(img)
    drawn = {}
    monkeypatch.setattr(attention_maps, "_draw", lambda out, image, heads, layer, rollout,
                        caption: drawn.update(image=image, heads=heads, caption=caption))
    out = str(tmp_path / "maps.png")
    assert main(["--weights", str(run), "--image", str(img), "--out", out, "--layer", "1"]) == 0
    assert f"weights vit_b_32: step 4 of the run {run}" in capsys.readouterr().out
    cfg = AugmentConfig(crop_size=64, resize_size=80, interpolation="bicubic", mean=tuple(mean),
                        std=tuple(std), eval_prepared=True)
    pixels = decode_image(str(img), HostTransform("eval", 64, 80, "bicubic"))
    x = eval_transform(jnp.asarray(pixels)[None], cfg)
    want = class_token_attention(attention_weights(model, x)[1], model.grid_size)[0]
    np.testing.assert_allclose(drawn["heads"], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(drawn["image"], pixels / 255, atol=1e-6)
    assert drawn["caption"].startswith("vit_b_32 class-token attention")
    capsys.readouterr()
    assert main(["--weights", str(run), "--arch", "vit_b_16", "--out", out]) == 1
    assert "a run of vit_b_32, not --arch vit_b_16" in capsys.readouterr().err
    # Its checkpoints folder alone (no model.json): --arch and the size it was built for;
    # a converted directory says its own arch and size.
    import shutil

    from porting import pretrained

    bare = tmp_path / "bare" / "checkpoints"
    shutil.copytree(run / "checkpoints", bare)
    converted = tmp_path / "converted"
    pretrained.write_converted(converted, pretrained.model_flat(model), {
        "arch": "vit_b_32", "num_classes": 3, "model_overrides": {"image_size": 64}})
    imagenet = AugmentConfig(crop_size=64, resize_size=73, eval_prepared=True)
    x = eval_transform(jnp.asarray(decode_image(str(img), HostTransform("eval", 64, 73)))[None],
                       imagenet)
    want = class_token_attention(attention_weights(model, x)[1], model.grid_size)[0]
    for given in (["--weights", str(bare), "--arch", "vit_b_32", "--model-arg", "image_size=64"],
                  ["--weights", str(converted)]):
        drawn.clear()
        assert main(given + ["--image", str(img), "--out", out, "--layer", "1"]) == 0
        assert "weights vit_b_32: " in capsys.readouterr().out
        np.testing.assert_allclose(drawn["heads"], want, rtol=1e-5, atol=1e-7)
    assert main(["--weights", str(bare), "--arch", "vit_b_32", "--out", out]) == 1
    assert "encoder.pos_embedding" in capsys.readouterr().err
    write_model_info(str(run), "resnet18", 3, {})
    assert main(["--weights", str(run), "--out", out]) == 1
    assert "a run of resnet18, not of a Vision Transformer" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--image", "/no/such/image.jpg"], "image not found: /no/such/image.jpg"),
    (["--arch", "vit_b_61"], "unknown model 'vit_b_61'"),
    (["--arch", "resnet18"], "--arch resnet18 is not a Vision Transformer"),
    (["--layer", "12"], "--layer 12 is out of range: vit_b_16 has 12 layers"),
    (["--weights", "/no/such/weights.pth"], "weights file not found: /no/such/weights.pth"),
    (["--weights", "NOT_A_WEIGHTS_NAME"], "--weights NOT_A_WEIGHTS_NAME:"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    code = main(args + ["--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()


def test_cli_rejects_a_non_image_file_and_a_missing_out_dir(tmp_path, capsys):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    assert main(["--image", str(bad), "--out", str(tmp_path / "x.png")]) == 1
    assert "error: cannot read image" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "nowhere" / "x.png")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "dir.png").mkdir()
    assert main(["--out", str(tmp_path / "dir.png")]) == 1
    assert "it is a directory" in capsys.readouterr().err
    assert main(["--out", str(bad / "x.png")]) == 1
    assert f"{bad} is a file" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["jaxnets.attention", "jaxnets.attention_maps"])
def test_cli_module_fails_cleanly_on_a_bad_path(tmp_path, module):
    # The documented name too: exactly one line (no runpy warning about a module
    # imported with the package before it ran as __main__).
    proc = subprocess.run(
        [sys.executable, "-m", module, "--image", "/no/such.jpg", "--out",
         str(tmp_path / "x.png")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: image not found: /no/such.jpg"]
