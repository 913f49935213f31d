"""Tests for ``python -m porting convert|export``: round trips to torch and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.torch
import torch
import torchvision
from flax import nnx

from porting.__main__ import main
from porting.parity import randomize_torch_model
from porting.pretrained import build_abstract, materialize, read_converted
from porting.safetensors_io import load_safetensors
from porting.state_dict import to_torch_state_dict


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(torch resnet18, its .pth, the directory ``convert`` wrote from it)."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(1)
    model = torchvision.models.resnet18()
    randomize_torch_model(model, seed=1)  # non-default BN statistics and affine terms
    model.eval()
    pth = root / "r18.pth"
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, pth)
    out = root / "converted"
    assert main(["convert", "--arch", "resnet18", "--weights", str(pth), "--out", str(out)]) == 0
    return model, pth, out


def _same_logits(reference: torch.nn.Module, state_dict) -> None:
    restored = torchvision.models.resnet18()
    restored.load_state_dict(state_dict, strict=True)
    restored.eval()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 64, 64), np.float32))
    with torch.no_grad():
        diff = (restored(x) - reference(x)).abs().max().item()
    assert diff <= 1e-4


def test_convert_writes_documented_format(converted):
    _, pth, out = converted
    # As readable as any file the user writes (tempfile's own modes are 0700/0600).
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}
    flat, meta = read_converted(out)
    assert meta["arch"] == "resnet18" and meta["num_classes"] == 1000
    assert meta["source"] == str(pth.resolve())
    assert flat["conv1.kernel"].shape == (7, 7, 3, 64)  # flax layout, flax path
    assert "unwrapped 'state_dict'" in meta["report"]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_round_trip_matches_torch(converted, tmp_path, suffix):
    model, _, out = converted
    target = tmp_path / f"exported{suffix}"
    assert main(["export", "--arch", "resnet18", "--checkpoint", str(out),
                 "--out", str(target)]) == 0
    if suffix == ".pth":
        state = torch.load(target, weights_only=True)
    else:
        state = safetensors.torch.load_file(target)
    assert state["bn1.num_batches_tracked"].dtype == torch.int64
    _same_logits(model, state)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_export_accepts_orbax_state(tmp_path, capsys):
    model = build_abstract("lenet5", 7)
    materialize(model, "lenet5", 7)  # a concrete model without eager init's slow start
    for kind, state in (("state", nnx.state(model)), ("pure", nnx.to_pure_dict(nnx.state(model)))):
        ckpt = tmp_path / kind
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(ckpt, state)
        checkpointer.wait_until_finished()
        target = tmp_path / f"{kind}.safetensors"
        assert main(["export", "--arch", "lenet5", "--checkpoint", str(ckpt),
                     "--out", str(target)]) == 0
        exported, expected = load_safetensors(target), to_torch_state_dict(model)
        assert exported.keys() == expected.keys()
        for k in expected:
            np.testing.assert_array_equal(exported[k], expected[k], err_msg=k)
    # Damaged (its array data gone): one short line, not tensorstore's spec dump.
    import shutil

    for d in (tmp_path / "state").rglob("d"):
        shutil.rmtree(d)
    err = _error(capsys, ["export", "--arch", "lenet5", "--checkpoint", str(tmp_path / "state"),
                          "--out", str(tmp_path / "x.pth")])
    assert "cannot restore Orbax checkpoint" in err and "tensorstore_spec" not in err, err
    assert len(err) < 500 and not (tmp_path / "x.pth").exists()


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_inputs_are_one_line_errors(converted, capsys, tmp_path):
    _, pth, out = converted
    convert = ["convert", "--out", str(tmp_path / "x")]
    assert "resnet18" in _error(capsys, convert + ["--arch", "resnet81", "--weights", str(pth)])
    assert "available: IMAGENET1K_V1, DEFAULT" in _error(
        capsys, convert + ["--arch", "resnet18", "--weights", "IMAGENET1K_V7"])
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02 definitely not a checkpoint")
    assert "corrupt.pth" in _error(capsys, convert + ["--arch", "resnet18",
                                                      "--weights", str(corrupt)])
    err = _error(capsys, convert + ["--arch", "resnet34", "--weights", str(pth)])
    assert "r18.pth: " in err and "layer1.2.conv1.weight" in err
    export = ["export", "--checkpoint", str(out)]
    assert ".pth, .pt or .safetensors" in _error(
        capsys, export + ["--arch", "resnet18", "--out", str(tmp_path / "x.npz")])
    assert "not resnet34" in _error(capsys, export + ["--arch", "resnet34",
                                                       "--out", str(tmp_path / "x.pth")])
    assert "neither a train.finetune run" in _error(
        capsys, ["export", "--arch", "resnet18", "--checkpoint", str(tmp_path),
                 "--out", str(tmp_path / "x.pth")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.pth").exists()
    # convert --out never replaces what is not a converted directory.
    keep = tmp_path / "keep"
    keep.write_text("mine")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine too")
    for target in (keep, folder):
        assert "not a converted directory" in _error(
            capsys, ["convert", "--arch", "resnet18", "--weights", str(pth), "--out", str(target)])
    assert keep.read_text() == "mine" and os.listdir(folder) == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    for _ in range(2):  # an empty folder, then the converted directory itself: replaced
        assert main(["convert", "--arch", "resnet18", "--weights", str(pth), "--out",
                     str(tmp_path / "empty")]) == 0
    capsys.readouterr()
    assert "cannot create" in _error(capsys, export + ["--arch", "resnet18", "--out",
                                                       str(keep / "x.pth")])
    (tmp_path / "d.pth").mkdir()
    assert f"--out {tmp_path / 'd.pth'} is a directory" in _error(
        capsys, export + ["--arch", "resnet18", "--out", str(tmp_path / "d.pth")])
    assert "--num-classes must be positive" in _error(
        capsys, export + ["--arch", "resnet18", "--num-classes", "0", "--out",
                          str(tmp_path / "n.pth")])
    assert keep.read_text() == "mine"


def test_weights_lists_names_marks_default_and_preprocessing(capsys):
    assert main(["weights", "resnet50", "--arch", "vit_b_16"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in out[1:-1]}
    assert list(rows) == ["resnet50.IMAGENET1K_V1", "resnet50.IMAGENET1K_V2",
                          "vit_b_16.IMAGENET1K_SWAG_E2E_V1",
                          "vit_b_16.IMAGENET1K_SWAG_LINEAR_V1", "vit_b_16.IMAGENET1K_V1"]
    # torchvision's own DEFAULT members, and nothing else, carry the mark.
    defaults = {f"resnet50.{torchvision.models.ResNet50_Weights.DEFAULT.name}",
                f"vit_b_16.{torchvision.models.ViT_B_16_Weights.DEFAULT.name}"}
    assert {n for n, line in rows.items() if line.split()[1] == "*"} == defaults
    assert "232/224 bilinear" in rows["resnet50.IMAGENET1K_V2"]
    assert "384/384 bicubic" in rows["vit_b_16.IMAGENET1K_SWAG_E2E_V1"]
    assert "80.858" in rows["resnet50.IMAGENET1K_V2"] and "https:" not in out[1]
    assert main(["weights", "alexnet", "--urls"]) == 0
    assert "alexnet-owt-7be5be79.pth" in capsys.readouterr().out


def test_weights_of_a_model_without_any(capsys):
    assert "lenet5 has no pretrained weights" in _error(capsys, ["weights", "--arch", "lenet5"])
    assert "unknown model 'lenet6'" in _error(capsys, ["weights", "--arch", "lenet6"])


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    assert "{convert,export,weights,verify}" in capsys.readouterr().out


def test_usage_errors_are_one_line(capsys):
    assert "--out" in _error(capsys, ["convert", "--arch", "resnet18"])
    assert "invalid choice" in _error(capsys, ["frobnicate"])


def test_module_entry_point_converts_without_torch(converted, tmp_path):
    _, pth, reference = converted
    # A sitecustomize that makes "import torch" fail in the child process.
    marker = tmp_path / "torch_blocked"
    (tmp_path / "sitecustomize.py").write_text(
        "import sys, pathlib\nsys.modules['torch'] = None\nsys.modules['torchvision'] = None\n"
        f"pathlib.Path({str(marker)!r}).touch()\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "porting", "convert", "--arch", "resnet18", "--weights", str(pth),
         "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])})
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()
    ours, theirs = read_converted(out)[0], read_converted(reference)[0]
    assert ours.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


def read_model_info(run: Path) -> dict:
    return json.loads((run / "model.json").read_text())


def _finetune(run_dir: Path, *args: str) -> None:
    from train.finetune import main as finetune

    assert finetune(["--dataset", "digits", "--weights", "none", "--no-progress",
                     "--batch-size", "16", "--output-dir", str(run_dir), *args]) == 0


def _saved(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    """A run checkpoint's parameters and statistics as Orbax restores them (no jaxnets)."""
    state = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "state")
    return {k: np.asarray(v) for part in ("params", "batch_stats") for k, v in state[part].items()}


def _loads_into_torch(arch: str, path: Path, num_classes: int, **overrides) -> dict:
    from porting.reference import build_torch_model

    state_dict = load_safetensors(path)
    build_torch_model(arch, num_classes, **overrides).load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
    return state_dict


def test_export_of_a_finetune_run(tmp_path, capsys):
    """A train.finetune run exports to torch with no --arch: its newest step, a
    --step, the best step, a step directory; BatchNorm statistics included."""
    from porting.pretrained import load_into_abstract, model_flat

    run = tmp_path / "run"
    _finetune(run, "--arch", "resnet18_cifar", "--image-size", "16", "--steps", "4",
              "--checkpoint-every", "2")
    assert read_model_info(run) == {"arch": "resnet18_cifar", "num_classes": 10,
                                    "model_overrides": {},
                                    "classes": [str(i) for i in range(10)]}
    for extra, step in (([], 4), (["--step", "2"], 2), (["--step", "best"], 4),
                        ([], None)):
        checkpoint = run if step is not None else run / "checkpoints" / "2"
        step = step or 2
        out = tmp_path / f"{step}-{len(extra)}.safetensors"
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), *extra]) == 0
        assert f"step {step} of" in capsys.readouterr().out
        exported = _loads_into_torch("resnet18_cifar", out, 10)
        assert "bn1.running_var" in exported and "layer4.1.bn2.num_batches_tracked" in exported
        # Back into jaxnets from torch keys: the very arrays the run saved.
        model, _, _ = load_into_abstract("resnet18_cifar", exported, torch_keys=True,
                                         label=out.name)
        saved, back = _saved(run, step), model_flat(model)
        assert saved.keys() <= back.keys() and any(k.endswith(".mean") for k in saved)
        for k in saved:
            np.testing.assert_array_equal(back[k], saved[k], err_msg=k)
    # The two steps differ (the check above could not tell them apart otherwise).
    assert not np.array_equal(_saved(run, 2)["fc.kernel"], _saved(run, 4)["fc.kernel"])
    # In Python: the run's model, and the same logits as torch's from the export.
    from porting.reference import build_torch_model
    from train.checkpoint import load_model

    model, step = load_model(str(run), step=2)
    assert step == 2 and all(np.array_equal(model_flat(model)[k], v)
                             for k, v in _saved(run, 2).items())
    assert load_model(run, step="2")[1] == 2  # a pathlib.Path and a step typed as text
    from train.checkpoint import CheckpointError

    for path, step, needle in ((run, "latest", "step must be a step number, 'best' or None"),
                               (run, -1, "step must be a step number"),
                               (tmp_path / "nope", None, "nope does not exist"),
                               (run, 3, "no step 3 in"),
                               (run / "checkpoints" / "2", 4, "is the directory of step 2")):
        with pytest.raises(CheckpointError, match=needle):
            load_model(path, step=step)
    # porting.verify compares torch weights: a run is pointed to porting export.
    from porting.verify import main as verify

    assert verify(["--arch", "resnet18_cifar", "--weights", str(run)]) == 2
    assert "is a train.finetune run directory: write its model as torch weights with " \
           "python -m porting export" in capsys.readouterr().err
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    reference = build_torch_model("resnet18_cifar", 10)
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                               load_safetensors(tmp_path / "2-2.safetensors").items()})
    with torch.no_grad():
        expected = reference.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=1e-4, atol=1e-4)
    # The exported torch model gives the run's own validation logits, image by image.
    from train.augment import AugmentConfig, eval_transform
    from train.data import load_dataset

    cfg = json.loads((run / "config.json").read_text())
    val = load_dataset("digits", split="val", seed=cfg["seed"])
    saved = np.load(run / "predictions.npz")
    images = np.stack([val[int(i)][0] for i in saved["index"]])
    x = np.asarray(eval_transform(images, AugmentConfig(
        crop_size=cfg["image_size"], resize_size=cfg["resize_size"], mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]), channels=3, interpolation=cfg["interpolation"])))
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                               load_safetensors(tmp_path / "4-0.safetensors").items()})
    with torch.no_grad():
        logits = reference.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert len(logits) == len(val) > 300
    np.testing.assert_allclose(logits, saved["logits"], rtol=1e-4, atol=1e-4)
    assert (logits.argmax(1) == saved["pred"]).all()

    def error(*args):
        return _error(capsys, ["export", "--out", str(tmp_path / "x.pth"), *args])

    assert "(steps: 2, 4)" in error("--checkpoint", str(run), "--step", "9")
    assert "a run of resnet18_cifar, not resnet18" in error("--checkpoint", str(run),
                                                            "--arch", "resnet18")
    assert "'best'" in error("--checkpoint", str(run), "--step", "last")
    assert "--step is for a train.finetune run" in error(
        "--checkpoint", str(tmp_path), "--step", "2")
    for f in (run / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"corrupt")
    assert "cannot read step 4" in error("--checkpoint", str(run)) and not (
        tmp_path / "x.pth").exists()
    assert "(other steps: 2; pass --step)" in error("--checkpoint", str(run))
    # A run from before model.json: the arch from config.json.
    (run / "model.json").unlink()
    assert main(["export", "--checkpoint", str(run), "--step", "2", "--out",
                 str(tmp_path / "old.pth")]) == 0
    (run / "config.json").unlink()
    assert "does not say which model" in error("--checkpoint", str(run), "--step", "2")


def test_a_run_keeps_its_model_options_for_export_and_as_weights(tmp_path, capsys):
    """A vector model's input width is a constructor option the run derived from
    --image-size: model.json carries it to the export, and to another run that
    starts from this one (``--weights RUN_DIR``)."""
    from train.finetune import main as finetune

    run = tmp_path / "mlp"
    _finetune(run, "--arch", "mlp", "--steps", "3", "--image-size", "12")
    assert read_model_info(run)["model_overrides"] == {"in_features": 144}
    out = tmp_path / "mlp.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    exported = _loads_into_torch("mlp", out, 10, in_features=144)
    assert exported["fc1.weight"].shape[1] == 144
    # Evaluated from another run directory: the very model, the same figures.
    again = tmp_path / "again"
    _finetune(again, "--arch", "mlp", "--image-size", "12", "--weights", str(run),
              "--eval-only")
    assert f"step 3 of the run {run}" in capsys.readouterr().err
    first, second = (json.loads((d / "summary.json").read_text()) for d in (run, again))
    assert second["val_top1"] == first["val_top1"] and second["val_loss"] == pytest.approx(
        first["val_loss"], rel=1e-6)
    assert finetune(["--arch", "lenet5", "--dataset", "digits", "--weights", str(run),
                     "--output-dir", str(tmp_path / "x")]) == 2
    assert "a run of mlp, not lenet5" in capsys.readouterr().err
    # A model.json whose options do not build the model: one line, not a traceback.
    info = read_model_info(run)
    (run / "model.json").write_text(json.dumps({**info, "model_overrides": {"bogus": 1}}))
    assert finetune(["--arch", "mlp", "--dataset", "digits", "--weights", str(run),
                     "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unexpected keyword argument 'bogus'" in err[0], err


def test_model_args_convert_and_export_a_model_built_with_options(tmp_path, capsys):
    # A transformer of another width and depth: its state_dict fits only a model built
    # with the same options, which the converted directory keeps for the way back.
    from porting.reference import build_torch_model

    options = dict(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=2,
                   dim_feedforward=24)
    torch.manual_seed(5)
    tmodel = build_torch_model("transformer", **options)
    pth = tmp_path / "t.pth"
    torch.save(tmodel.state_dict(), pth)
    out = tmp_path / "converted"
    convert = ["convert", "--arch", "transformer", "--weights", str(pth), "--out", str(out)]
    assert "does not fit" in _error(capsys, convert)
    assert main(convert + [f"--model-arg={k}={v}" for k, v in options.items()]) == 0
    assert read_converted(out)[1]["model_overrides"] == options
    back = tmp_path / "back.pth"
    assert main(["export", "--checkpoint", str(out), "--out", str(back)]) == 0
    exported = torch.load(back, weights_only=True)
    assert exported.keys() == tmodel.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in tmodel.state_dict().items())
    # Options the directory records are not overridden by another value.
    assert "holds a model built with d_model=16, not d_model=32" in _error(
        capsys, ["export", "--checkpoint", str(out), "--out", str(back), "--model-arg",
                 "d_model=32"])
    assert "a converted directory" in _error(capsys, ["verify", "--arch", "transformer",
                                                       "--weights", str(out)])
    assert "values are numbers, strings" in _error(
        capsys, convert + [f"--model-arg={k}={v}" for k, v in options.items()]
        + ["--model-arg", "layer_norm_eps=1j"])

    # An Orbax checkpoint says nothing of its model: the options are given on export.
    model = build_abstract("vit_b_32", 10, image_size=64)
    materialize(model, "vit_b_32", 10, image_size=64)
    ckpt = tmp_path / "vit"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(ckpt, nnx.state(model))
    checkpointer.wait_until_finished()
    export = ["export", "--arch", "vit_b_32", "--checkpoint", str(ckpt),
              "--out", str(tmp_path / "vit.safetensors")]
    assert "encoder.pos_embedding" in _error(capsys, export)
    assert main(export + ["--model-arg", "image_size=64"]) == 0
    exported = load_safetensors(tmp_path / "vit.safetensors")
    expected = to_torch_state_dict(model)
    assert exported.keys() == expected.keys()
    assert all(np.array_equal(exported[k], expected[k]) for k in expected)

    # Bad options: one line each, before anything is read or written.
    assert "unexpected keyword argument 'd_modl'" in _error(
        capsys, convert + ["--model-arg", "d_modl=16"])
    assert "use --num-classes" in _error(capsys, export + ["--model-arg", "num_classes=3"])
    assert "expected KEY=VALUE" in _error(capsys, export + ["--model-arg", "image_size"])
    assert "not divisible" in _error(capsys, convert + ["--model-arg", "d_model=15",
                                                        "--model-arg", "nhead=2"])


def test_export_refuses_a_checkpoint_with_more_than_the_model_holds(tmp_path, capsys):
    # A deeper model's checkpoint fills every variable of a shallower one: its extra
    # layers must be an error, not silently left out of the export.
    options = dict(d_model=16, nhead=2, num_decoder_layers=1, dim_feedforward=24)
    model = build_abstract("transformer", None, num_encoder_layers=2, **options)
    materialize(model, "transformer", None, num_encoder_layers=2, **options)
    ckpt = tmp_path / "deep"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(ckpt, nnx.state(model))
    checkpointer.wait_until_finished()
    export = ["export", "--arch", "transformer", "--checkpoint", str(ckpt),
              "--out", str(tmp_path / "t.pth")] + [f"--model-arg={k}={v}"
                                                   for k, v in options.items()]
    err = _error(capsys, export + ["--model-arg", "num_encoder_layers=1"])
    assert "unexpected" in err and "encoder.layers.1.linear1.kernel" in err
    assert "rngs" not in err  # dropout's RNG state is no weight
    assert not (tmp_path / "t.pth").exists()
    assert main(export + ["--model-arg", "num_encoder_layers=2"]) == 0

    # Parameters without their BatchNorm statistics: said so.
    model = build_abstract("resnet18_cifar", 10)
    materialize(model, "resnet18_cifar", 10)
    ckpt = tmp_path / "params"
    checkpointer.save(ckpt, nnx.state(model, nnx.Param))
    checkpointer.wait_until_finished()
    err = _error(capsys, ["export", "--arch", "resnet18_cifar", "--checkpoint", str(ckpt),
                          "--out", str(tmp_path / "r.pth")])
    assert "no BatchNorm statistics" in err and "bn1.mean" in err


def test_model_arg_values_the_forward_pass_cannot_use_are_refused_first(tmp_path, capsys):
    # A string where a number belongs builds (the option is only stored) and failed in
    # the first forward pass, after the directory was written with it.
    out = tmp_path / "converted"
    err = _error(capsys, ["convert", "--arch", "transformer", "--weights", str(tmp_path / "x.pth"),
                          "--out", str(out), "--model-arg", "layer_norm_eps=nan"])
    assert err.startswith("error: --model-arg: transformer's forward pass:"), err
    assert not out.exists()
