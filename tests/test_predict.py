"""Tests for ``python -m train.predict``: a run's model, torchvision's weights and a
checkpoint file classify image files as torch / ``train.finetune``'s evaluation do."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from train import finetune
from train.predict import main


def _image(path, w, h, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 3 + 2, w // 3 + 2, 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run directory, dataset folder) of a 2-step LeNet-5 run on a folder of 3 classes."""
    root = tmp_path_factory.mktemp("predict")
    sizes = [(40, 31), (31, 40), (33, 33), (60, 25)]
    for c, name in enumerate(("cat", "dog", "owl")):
        (root / "ds" / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            _image(root / "ds" / name / f"{i}.{'jpg' if i % 2 else 'png'}", w, h, 10 * c + i)
    assert finetune.main(["--arch", "lenet5", "--dataset", str(root / "ds"), "--weights", "none",
                          "--steps", "2", "--batch-size", "4", "--val-fraction", "0.5",
                          "--resize-size", "36", "--no-progress",
                          "--output-dir", str(root / "run")]) == 0
    return root / "run", root / "ds"


@pytest.mark.xdist_group("predict-run")  # one worker builds the run for both
def test_a_run_predicts_what_its_evaluation_gave(run, tmp_path, capsys):
    from train.data import load_dataset

    run_dir, ds = run
    capsys.readouterr()
    evaluated = np.load(run_dir / "predictions.npz")
    val = load_dataset(str(ds), split="val", val_fraction=0.5)
    files = [val.files[i] for i in evaluated["index"]]
    out = tmp_path / "p.json"
    assert main(files + ["--weights", str(run_dir), "--top", "2", "--batch-size", "4",
                         "--json", str(out), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    got = json.loads(out.read_text())
    assert [p["path"] for p in got["predictions"]] == files and len(lines) == len(files) == 6
    # The same host resize (36) and crop (32), luma and normalisation as the run's own
    # evaluation: the same logits.
    np.testing.assert_allclose([p["logits"] for p in got["predictions"]],
                               evaluated["logits"], rtol=1e-5, atol=1e-5)
    assert got["class_names"] == ["cat", "dog", "owl"]
    assert got["preprocessing"]["resize_size"] == 36 and got["preprocessing"]["image_size"] == 32
    for p, pred, line in zip(got["predictions"], evaluated["pred"], lines):
        assert [t["index"] for t in p["top"]][0] == pred and len(p["top"]) == 2
        assert p["top"][0]["prob"] >= p["top"][1]["prob"]
        assert line == (f"{p['path']}: {p['top'][0]['name']} {100 * p['top'][0]['prob']:.1f}%, "
                        f"{p['top'][1]['name']} {100 * p['top'][1]['prob']:.1f}%")
    # A folder: its images, recursively, in ImageFolder's order.
    assert main([str(ds), "--weights", str(run_dir), "--step", "best", "--no-progress"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 12


@pytest.mark.xdist_group("predict-run")
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, capsys):
    run_dir, ds = run
    image = str(ds / "cat" / "0.png")
    out = tmp_path / "keep.json"
    out.write_text("mine")

    def error(args):
        capsys.readouterr()
        assert main(args + ["--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: "), err
        return err[-1]

    weights = ["--weights", str(run_dir)]
    assert "nope.png: no such file or folder" in error([str(tmp_path / "nope.png")] + weights)
    (tmp_path / "empty").mkdir()
    assert "no image files in this folder" in error([str(tmp_path / "empty")] + weights)
    assert "a run of lenet5, not --arch resnet18" in error([image, "--arch", "resnet18"] + weights)
    assert "unexpected keyword argument 'dropout'" in error([image, "--model-arg", "dropout=0.1"]
                                                     + weights)
    assert "--step must be a step number" in error([image, "--step", "last"] + weights)
    assert "needs --arch" in error([image, "--weights", "DEFAULT"])
    assert "unknown model 'resnet181'" in error([image, "--arch", "resnet181",
                                                 "--weights", "DEFAULT"])
    assert "not a torchvision weights name of resnet18" in error(
        [image, "--arch", "resnet18", "--weights", "IMAGENET9K"])
    assert "--step is for a train.finetune run" in error(
        [image, "--arch", "resnet18", "--weights", "DEFAULT", "--step", "3"])
    assert "is for resnet50, not --arch resnet18" in error(
        [image, "--arch", "resnet18", "--weights", "resnet50.IMAGENET1K_V2"])
    assert "--mean needs 1 value(s)" in error([image, "--mean", "0.5,0.5,0.5"] + weights)
    (tmp_path / "names.txt").write_text("cat\n\nowl\n")
    assert "one non-empty name per line" in error(
        [image, "--class-names", str(tmp_path / "names.txt")] + weights)
    assert "No such file" in error([image, "--class-names", str(tmp_path / "no.txt")] + weights)
    assert "lenet5 cannot take --image-size 40" in error([image, "--image-size", "40"] + weights)
    assert "expected a file name, not a folder" in error([image, "--json", str(tmp_path)]
                                                         + weights)
    assert "not a file in an existing, writable folder" in error(
        [image, "--json", str(tmp_path / "no" / "p.json")] + weights)
    (tmp_path / "link.json").symlink_to(out)
    assert "is not a regular file" in error([image, "--json", str(tmp_path / "link.json")]
                                            + weights)
    assert "lenet5 has no pretrained weights" in error([image, "--arch", "lenet5",
                                                        "--weights", "DEFAULT"])
    assert "no such file or folder; a torchvision weights name needs --arch" in error(
        [image, "--weights", "myrun"])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    msg = error([image, str(bad), "--json", str(out)] + weights)
    assert "cannot decode image" in msg and str(bad) in msg and "--skip-bad" in msg
    assert out.read_text() == "mine"
    assert "none of the 1 image file(s) could be decoded" in error(
        [str(bad), "--skip-bad", "--json", str(out)] + weights)
    assert out.read_text() == "mine"
    assert main([image, str(bad), "--skip-bad", "--json", str(out), "--no-progress"]
                + weights) == 0
    assert json.loads(out.read_text())["skipped"] == [str(bad)]
    assert f"left out 1 image file(s) that cannot be decoded: {bad}" in capsys.readouterr().err
    # A damaged run: its config.json (the preprocessing) is one line, not defaults.
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    (damaged / "config.json").write_text('{"arch": ')
    assert "config.json is unreadable" in error([image, "--weights", str(damaged)])
    config = json.loads((run_dir / "config.json").read_text())
    (damaged / "config.json").write_text(json.dumps({**config, "image_size": "big"}))
    assert "its preprocessing values are damaged" in error([image, "--weights", str(damaged)])
    (damaged / "config.json").write_text(json.dumps({**config, "interpolation": "nearest"}))
    assert "expected sizes >= 1 and bilinear or bicubic" in error(
        [image, "--weights", str(damaged)])
    # ... and its model.json: named, not "no readable checkpoint".
    (damaged / "config.json").write_text(json.dumps(config))
    info = json.loads((run_dir / "model.json").read_text())
    (damaged / "model.json").write_text('{"arch": ')
    assert "model.json is unreadable: Expecting value" in error(
        [image, "--weights", str(damaged)])
    # Classes that do not fit the head: indices, and a note that says why.
    (damaged / "model.json").write_text(json.dumps({**info, "classes": ["cat", "dog"]}))
    capsys.readouterr()
    assert main([image, "--weights", str(damaged), "--no-progress"]) == 0
    printed, err = capsys.readouterr()
    assert "its classes are not 3 names, one per output; indices shown" in err, err
    assert re.match(rf"{re.escape(image)}: [012] [0-9.]+%, [012] ", printed), printed
    # The names go by the head the checkpoint holds, not by model.json's count; a
    # model.json without its arch leaves it to config.json; options it records that do
    # not build the model are its own error, not --model-arg's.
    (damaged / "model.json").write_text(json.dumps({
        "num_classes": 7, "classes": ["cat", "dog", "owl"], "model_overrides": {}}))
    assert main([image, "--weights", str(damaged), "--no-progress"]) == 0
    printed, err = capsys.readouterr()
    assert "note" not in err and re.match(rf"{re.escape(image)}: (cat|dog|owl) ", printed), err
    (damaged / "model.json").write_text(json.dumps({**info, "model_overrides": {"bogus": 1}}))
    assert "the options the run records do not build lenet5: lenet5: LeNet5.__init__() got " \
        "an unexpected keyword argument 'bogus'" in error([image, "--weights", str(damaged)])
    from porting.pretrained import same_option

    assert same_option([False, True], (False, True)) and not same_option([1, 2], (2, 1))
    # --model-arg on a run: only what it does not record.
    (damaged / "model.json").write_text(json.dumps({**info, "model_overrides": {
        "in_channels": 1}}))
    assert "the run's model was built with in_channels=1, not in_channels=3" in error(
        [image, "--weights", str(damaged), "--model-arg", "in_channels=3"])
    assert "conv1" in error([image, "--model-arg", "in_channels=3"] + weights)
    # A bare checkpoints folder: --arch (and what the model was built with) from the user.
    bare = tmp_path / "bare" / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", bare)
    assert "the run does not say its arch (neither a model.json nor a config.json names " \
        "one); pass --arch" in error([image, "--weights", str(bare)])
    assert "--arch transformer is not an image classifier" in error(
        [image, "--weights", str(bare), "--arch", "transformer"])
    same = ["--resize-size", "36", "--mean", str(config["mean"][0]),
            "--std", str(config["std"][0])]
    logits = []
    for source in ([str(run_dir)], [str(bare), "--arch", "lenet5"]):
        assert main([image, "--weights", *source, "--json", str(out), "--no-progress"]
                    + same) == 0
        logits.append(json.loads(out.read_text())["predictions"][0]["logits"])
    assert logits[0] == logits[1]


def test_torchvision_weights_and_a_pth_give_torch_logits(tmp_path, monkeypatch, capsys):
    """``--weights DEFAULT`` (a random state_dict in torch hub's cache under the published
    file name: nothing is downloaded) classifies with the weights' categories and
    preprocessing; the same state_dict as a file gives the same logits, indices as names."""
    import torch
    import torchvision
    from torchvision.datasets.folder import default_loader

    from porting import hub
    from porting.parity import randomize_torch_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("JAXNETS_CACHE", str(tmp_path / "jaxnets"))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    randomize_torch_model(model, seed=0)
    model.eval()
    hub_dir = hub.hub_checkpoints_dir()
    hub_dir.mkdir(parents=True)
    torch.save(model.state_dict(), hub_dir / weights.url.rsplit("/", 1)[-1])
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    files = [str(tmp_path / "wide.jpg"), str(tmp_path / "tall.png")]
    _image(files[0], 300, 230, 1)
    _image(files[1], 200, 260, 2)
    with torch.no_grad():
        want = model(torch.stack([weights.transforms()(default_loader(f)) for f in files]))
    want = want.numpy()

    capsys.readouterr()
    out = tmp_path / "named.json"
    assert main(files + ["--arch", "resnet18", "--weights", "DEFAULT", "--top", "3",
                         "--json", str(out), "--no-progress"]) == 0
    named = json.loads(out.read_text())
    logits = np.array([p["logits"] for p in named["predictions"]])
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    for p, row in zip(named["predictions"], want):
        top = np.argsort(-row)[:3]
        assert [t["index"] for t in p["top"]] == list(top)
        assert [t["name"] for t in p["top"]] == [weights.meta["categories"][i] for i in top]
    assert named["preprocessing"]["resize_size"] == 256
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{files[0]}: {weights.meta['categories'][np.argmax(want[0])]} ")

    out = tmp_path / "pth.json"
    assert main(files + ["--arch", "resnet18", "--weights", str(tmp_path / "r18.pth"),
                         "--json", str(out), "--no-progress"]) == 0
    from_file = json.loads(out.read_text())
    np.testing.assert_allclose([p["logits"] for p in from_file["predictions"]], logits,
                               rtol=1e-6, atol=1e-6)
    assert from_file["class_names"] is None
    assert from_file["predictions"][0]["top"][0]["name"] == str(np.argmax(want[0]))
    assert "no class names: indices shown" in capsys.readouterr().err
    names = tmp_path / "names.txt"
    names.write_text("".join(f"thing {i}\n" for i in range(1000)) + "\n")
    assert main(files + ["--arch", "resnet18", "--weights", str(tmp_path / "r18.pth"),
                         "--class-names", str(names), "--top", "1", "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        f"{files[1]}: thing {np.argmax(want[1])} "
        f"{100 * from_file['predictions'][1]['top'][0]['prob']:.1f}%")
    names.write_text("a\nb\n")
    assert main(files + ["--arch", "resnet18", "--weights", str(tmp_path / "r18.pth"),
                         "--class-names", str(names), "--no-progress"]) == 2
    assert "names 2 classes; the model has 1000 outputs" in capsys.readouterr().err


def test_default_preprocessing_is_finetunes():
    """Without a run's config or named weights: ImageNet's statistics, one value each
    (their average) for a 1-channel model, as train.config.resolve gives a run."""
    import jaxnets
    from train.config import default_normalization
    from train.predict import _imagenet_preprocessing

    lenet = _imagenet_preprocessing(jaxnets.get_spec("lenet5"))
    assert (lenet.image_size, lenet.resize_size, lenet.interpolation) == (32, 37, "bilinear")
    np.testing.assert_allclose(lenet.mean + lenet.std, (0.449, 0.226))
    assert (lenet.mean, lenet.std) == default_normalization(1)
    resnet = _imagenet_preprocessing(jaxnets.get_spec("resnet18"))
    assert (resnet.image_size, resnet.resize_size) == (224, 256)
    assert resnet.mean == (0.485, 0.456, 0.406) and resnet.std == (0.229, 0.224, 0.225)
    assert _imagenet_preprocessing(jaxnets.get_spec("mlp")).image_size == 28
