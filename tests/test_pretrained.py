"""Tests for porting.pretrained: hub cache -> download -> load, and the converted cache.

Nothing is downloaded from the internet: a torch-made resnet18 checkpoint is
served from 127.0.0.1 and a registry entry is pointed at it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import shutil
import socket
import threading

import jax
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx

import jaxnets
from porting import hub, pretrained
from porting.pretrained import read_converted
from porting.pth import PthError
from porting.state_dict import PortingError, flax_variables, to_torch_state_dict
from porting.parity import randomize_torch_model
from porting.weights import UnknownWeightsError, get_weights


def _torch_resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    # Non-trivial BN statistics and affine terms, or BN porting bugs hide.
    randomize_torch_model(model, seed=0)
    return model.eval()


def _save_hub_named(model: torch.nn.Module, directory, arch: str) -> str:
    """Saves ``model``'s state_dict in ``directory`` under torch.hub's file name for it
    (``ARCH-HASH8.pth``, the hash prefix its download check expects); returns the name."""
    tmp = directory / "tmp.pth"
    torch.save(model.state_dict(), tmp)
    name = f"{arch}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(directory / name)
    return name


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(torch model, served directory, file name) of a random resnet18 checkpoint."""
    root = tmp_path_factory.mktemp("served")
    model = _torch_resnet18()
    return model, root, _save_hub_named(model, root, "resnet18")


@pytest.fixture(scope="module")
def server(ckpt):
    _, root, _ = ckpt

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(ckpt, base_url):
    _, _, name = ckpt
    return dataclasses.replace(get_weights("resnet18"), url=f"{base_url}/{name}",
                               hash_prefix=name.split("-")[1].split(".")[0])


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Empty torch hub and converted caches, set through the environment."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("JAXNETS_CACHE", str(tmp_path / "jaxnets"))
    return hub.hub_checkpoints_dir(), tmp_path / "jaxnets"


def _logits(model, torch_model, x):
    model.eval()
    graphdef, state = nnx.split(model)
    # One compiled forward is several times faster than op-by-op dispatch here.
    ours = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    return ours, ref


def test_download_then_converted_cache(ckpt, server, dirs, monkeypatch):
    torch_model, _, name = ckpt
    hub_dir, cache_root = dirs
    w = _weights(ckpt, server)
    model, report = pretrained.load_torchvision("resnet18", w, progress=False)
    assert (hub_dir / name).is_file() and sorted(p.name for p in hub_dir.iterdir()) == [name]
    assert report.ok and len(report.loaded) == 122 and not report.ignored
    assert any(str(hub_dir / name) in n for n in report.notes)
    x = np.random.default_rng(0).standard_normal((1, 64, 64, 3), np.float32)
    ours, ref = _logits(model, torch_model, x)
    assert np.abs(ours - ref).max() <= 1e-4
    entry = cache_root / "resnet18.IMAGENET1K_V1"
    assert pretrained.is_converted(entry)

    # Second load: neither the .pth nor its reader may be touched.
    (hub_dir / name).unlink()

    def refuse(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(pretrained, "load_state_dict_file", refuse)
    again, report2 = pretrained.load_torchvision("resnet18", w, progress=False)
    assert any("converted cache" in n for n in report2.notes)
    first, second = pretrained.model_flat(model), pretrained.model_flat(again)
    assert first.keys() == second.keys()
    for k in first:
        np.testing.assert_array_equal(first[k], second[k], err_msg=k)


def test_hub_cache_hit_without_network_rebuilds_damaged_converted_cache(ckpt, dirs):
    torch_model, root, name = ckpt
    hub_dir, cache_root = dirs
    hub_dir.mkdir(parents=True)
    shutil.copy(root / name, hub_dir / name)
    w = _weights(ckpt, f"http://127.0.0.1:{_closed_port()}")
    entry = cache_root / "resnet18.IMAGENET1K_V1"
    pretrained.write_converted(entry, {"conv1.kernel": np.zeros(3, np.float32)},
                               {"arch": "resnet18", "weights": w.spec, "url": w.url})
    model = pretrained.from_torchvision("resnet18", w, progress=False)
    assert read_converted(entry)[0]["conv1.kernel"].shape == (7, 7, 3, 64)
    ref = torch_model.state_dict()
    ported = to_torch_state_dict(model)
    for k in ("conv1.weight", "layer4.1.bn2.running_var", "fc.weight"):
        np.testing.assert_array_equal(ported[k], ref[k].numpy(), err_msg=k)


def test_googlenet_weights_drop_the_aux_heads_as_torchvision_does(dirs, monkeypatch):
    # torchvision's googlenet(weights=...) loads the checkpoint, aux1/aux2 included,
    # and drops them unless aux_logits=True is asked for (they are not trained).
    hub_dir, cache_root = dirs
    torch.manual_seed(0)
    tm = torchvision.models.googlenet(aux_logits=True, transform_input=True,
                                      init_weights=False)
    hub_dir.mkdir(parents=True)
    name = _save_hub_named(tm, hub_dir, "googlenet")
    w = dataclasses.replace(get_weights("googlenet"), hash_prefix=name.split("-")[1].split(".")[0],
                            url=f"http://127.0.0.1:{_closed_port()}/{name}")
    model, report = pretrained.load_torchvision("googlenet", w, progress=False)
    assert model.aux1 is None and model.aux2 is None and model.transform_input
    assert report.ignored and all(k.startswith(("aux1.", "aux2.")) for k in report.ignored)
    ref = tm.state_dict()
    assert len(report.loaded) == sum(not k.startswith(("aux", "num_batches")) for k in ref)
    # Complete: dropout's RNG state is seeded, not listed as variables left out.
    assert any(n.startswith("dropout RNG state seeded") for n in report.notes), report.notes
    assert not any("freshly initialised" in n for n in report.notes), report.notes
    # The converted cache keeps the heads: a later load that asks for them gets the
    # checkpoint's, without reading the .pth again.
    (hub_dir / name).unlink()

    def refuse(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(pretrained, "load_state_dict_file", refuse)
    with_aux, report2 = pretrained.load_torchvision("googlenet", w, progress=False,
                                                    aux_logits=True)
    assert any("converted cache" in n for n in report2.notes) and not report2.ignored
    ported = to_torch_state_dict(with_aux)
    for k in ("aux1.conv.conv.weight", "aux2.fc2.weight", "aux2.conv.bn.running_var",
              "inception5b.branch4.1.conv.weight"):
        np.testing.assert_array_equal(ported[k], ref[k].numpy(), err_msg=k)


def test_offline_error_says_where_to_put_the_file(ckpt, dirs):
    hub_dir, cache_root = dirs
    w = _weights(ckpt, f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(hub.DownloadError) as e:
        pretrained.load_torchvision("resnet18", w, progress=False)
    msg = str(e.value)
    assert w.url in msg and str(hub_dir / w.file_name) in msg and "--weights PATH" in msg
    assert list(hub_dir.iterdir()) == [] and not cache_root.exists()


def test_other_class_count_gets_a_fresh_head(ckpt):
    torch_model, root, name = ckpt
    model, report = pretrained.load_torchvision("resnet18", root / name, num_classes=10)
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"] and len(report.loaded) == 120
    assert any("head" in n and "1000" in n for n in report.notes)
    ported, ref = to_torch_state_dict(model), torch_model.state_dict()
    assert ported["fc.weight"].shape == (10, 512)
    assert np.isfinite(ported["fc.weight"]).all() and ported["fc.weight"].std() > 0
    for k in ref:
        if not k.startswith("fc."):
            np.testing.assert_array_equal(ported[k], ref[k].numpy(), err_msg=k)


def test_bad_inputs_get_one_clear_error(ckpt, tmp_path):
    _, root, name = ckpt
    with pytest.raises(jaxnets.UnknownModelError, match="resnet18"):
        pretrained.load_torchvision("resnet81", "DEFAULT")
    with pytest.raises(UnknownWeightsError, match="available: IMAGENET1K_V1, DEFAULT"):
        pretrained.load_torchvision("resnet18", "IMAGENET1K_V2")
    with pytest.raises(UnknownWeightsError, match="resnet50.IMAGENET1K_V2 are for resnet50"):
        pretrained.load_torchvision("resnet18", "resnet50.IMAGENET1K_V2")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        pretrained.load_torchvision("resnet18", tmp_path / "nope.pth")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PthError, match="corrupt.pth"):
        pretrained.load_torchvision("resnet18", bad)
    with pytest.raises(PortingError) as e:
        pretrained.load_torchvision("resnet34", root / name)
    assert str(e.value).startswith(f"{name}: ") and "layer1.2.conv1.weight" in str(e.value)


def test_materialize_matches_create_model():
    model = pretrained.build_abstract("lenet5", 7)
    fresh = pretrained.materialize(model, "lenet5", 7, seed=3)
    assert "fc3.kernel" in fresh and not pretrained.materialize(model, "lenet5", 7, seed=3)

    # create_model's own initialisers run whole, as one program (eager init is slow to
    # start): materialize must pick out the same values, not a re-seeded stream.
    def reference():
        model = jaxnets.create_model("lenet5", num_classes=7, seed=3)
        return {p: v.get_value() for p, v in flax_variables(model).items()}

    compiled = jax.jit(reference).lower().compile(compiler_options=pretrained._FAST_COMPILE)
    ours, ref = pretrained.model_flat(model), compiled()
    assert ours.keys() == ref.keys()
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_abstract_builds_are_independent():
    """Filling one shape-only model must not fill the next one (a shared cache would
    hand out the previous load's arrays, e.g. a stale head)."""
    import jax
    import jax.numpy as jnp

    from porting.pretrained import build_abstract

    first = build_abstract("lenet5")
    first.fc3.bias.set_value(jnp.ones(10))
    second = build_abstract("lenet5")
    assert isinstance(second.fc3.bias.get_value(), jax.ShapeDtypeStruct)


def test_torchvision_weights_enum_members_are_accepted():
    from torchvision.models import ResNet50_Weights, ResNet18_Weights, ViT_B_16_Weights

    assert get_weights(ResNet18_Weights.DEFAULT) is get_weights("resnet18")
    assert pretrained.resolve_weights("resnet18", ResNet18_Weights.IMAGENET1K_V1) \
        is get_weights("resnet18.IMAGENET1K_V1")
    w = pretrained.resolve_weights("resnet50", ResNet50_Weights.IMAGENET1K_V2)
    assert w.spec == "resnet50.IMAGENET1K_V2" and w.url == ResNet50_Weights.IMAGENET1K_V2.url
    assert get_weights(ViT_B_16_Weights.DEFAULT).spec == "vit_b_16.IMAGENET1K_V1"
    # Another architecture's weights: the same error as for a name (before any download).
    with pytest.raises(UnknownWeightsError, match="resnet50.IMAGENET1K_V2 are for resnet50, "
                                                  "not resnet18"):
        pretrained.load_torchvision("resnet18", ResNet50_Weights.IMAGENET1K_V2)


def test_run_directory_points_to_train_checkpoint_load_model(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "4" / "state").mkdir(parents=True)
    for path in (run, run / "checkpoints"):
        with pytest.raises(PortingError, match=rf"{path} is a train.finetune run directory, not a "
                                               rf"weights file: load its model with "
                                               rf"train\.checkpoint\.load_model\('{path}'\)"):
            pretrained.from_torchvision("lenet5", path)
    # A weights folder is weights, whatever it is called and whatever lies beside.
    from porting.safetensors_io import save_safetensors

    source = jaxnets.create_model("lenet5", seed=3)
    weights = tmp_path / "sf" / "checkpoints"
    save_safetensors(to_torch_state_dict(source), weights)
    (weights / "checkpoints" / "7" / "state").mkdir(parents=True)
    model = pretrained.from_torchvision("lenet5", weights)
    np.testing.assert_array_equal(np.asarray(model.fc3.kernel[...]),
                                  np.asarray(source.fc3.kernel[...]))


def test_a_vit_of_another_image_size_leaves_the_converted_cache_as_it_was(dirs, caplog):
    # Loaded at image_size=64, the model holds the position embedding resized; that
    # was cached under the weights' name, and every later load, at either size,
    # found an entry that did not fit it (a warning, a new conversion, and an export
    # of the entry that failed).
    import logging

    hub_dir, cache_root = dirs
    torch.manual_seed(0)
    tm = torchvision.models.vit_b_32()
    hub_dir.mkdir(parents=True)
    name = _save_hub_named(tm, hub_dir, "vit_b_32")
    w = dataclasses.replace(get_weights("vit_b_32"), hash_prefix=name.split("-")[1].split(".")[0],
                            url=f"http://127.0.0.1:{_closed_port()}/{name}")
    entry = cache_root / "vit_b_32.IMAGENET1K_V1"
    caplog.set_level(logging.WARNING)
    small, report = pretrained.load_torchvision("vit_b_32", w, progress=False, image_size=64)
    assert small.encoder.pos_embedding.shape == (1, 5, 768) and not entry.exists()
    assert any(n.startswith("not cached") for n in report.notes), report.notes
    pretrained.load_torchvision("vit_b_32", w, progress=False)
    assert read_converted(entry)[0]["encoder.pos_embedding"].shape == (1, 50, 768)
    again, report = pretrained.load_torchvision("vit_b_32", w, progress=False, image_size=64)
    assert any(n == f"source: {hub_dir / name}" for n in report.notes), report.notes
    np.testing.assert_array_equal(again.encoder.pos_embedding.get_value(),
                                  small.encoder.pos_embedding.get_value())
    _, report = pretrained.load_torchvision("vit_b_32", w, progress=False)
    assert any("converted cache" in n for n in report.notes)
    assert not [r for r in caplog.records if "ignoring converted cache" in r.getMessage()]


def test_traced_init_skips_tracer_origins_and_puts_them_back():
    """``porting.pretrained._traced_init`` (around the traced model constructions of
    ``build_abstract`` and ``materialize``): jax's tracers skip the walk over the trace
    that names their origin, which flax's RNG counting triggers once per random draw
    (vit_h_14's abstract build: 4.1 s with it, 0.75 s without); the method is back
    afterwards, also after an error. Fails where jax no longer has the method, so that
    the workaround is not left in place doing nothing."""
    from jax._src.interpreters import partial_eval

    from porting.pretrained import _traced_init

    before = partial_eval.DynamicJaxprTracer._origin_msg
    with _traced_init():
        assert partial_eval.DynamicJaxprTracer._origin_msg is not before
        jax.eval_shape(lambda: jaxnets.create_model("lenet5"))
    assert partial_eval.DynamicJaxprTracer._origin_msg is before
    with pytest.raises(RuntimeError, match="inside"), _traced_init():
        raise RuntimeError("inside")
    assert partial_eval.DynamicJaxprTracer._origin_msg is before
