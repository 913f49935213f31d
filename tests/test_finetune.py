"""python -m train.finetune end to end: steps, CLI, resume, interrupts, torch weights.

Sizes are tiny to fit the CI budget: lenet5/mlp on digits for at most 60
steps. The README's full offline command (resnet18, digits, >= 95%) is not
run here; the short CLI run asserts a lower bar (> 50% after 60 steps).
"""

import dataclasses
import functools
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jaxnets
from jaxnets.resnet import BasicBlock, ResNet
from train import finetune, optim, steps
from train.augment import AugmentConfig
from train.checkpoint import Checkpointer
from train.metrics import read_events

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENET = ["--arch", "lenet5", "--dataset", "digits", "--weights", "none", "--no-progress"]


def _restore_any(directory, step=None):
    """The raw train state saved in a run directory (no template needed)."""
    import orbax.checkpoint as ocp

    ck = Checkpointer(os.path.join(directory, "checkpoints"))
    step = step if step is not None else max(ck.steps())
    state = ocp.StandardCheckpointer().restore(os.path.join(ck.directory, str(step), "state"))
    return step, state


# --------------------------------------------------------------------------
# Steps.


def test_train_step_freezes_bit_exactly_and_compiles_once():
    model = ResNet(BasicBlock, (1, 1, 1, 1), num_classes=5, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
    model.eval()
    logits, feats = steps.forward_with_head_input(model, x, "fc")
    np.testing.assert_allclose(feats, model.features(x), rtol=1e-6)
    np.testing.assert_allclose(logits, model(x), rtol=1e-6)

    parts, params, stats = steps.split_model(model, r"^fc\.")
    aug = AugmentConfig(crop_size=32, resize_size=32)
    rng = np.random.default_rng(1)
    batch = {"image": rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8),
             "label": rng.integers(0, 5, 8).astype(np.int32), "mask": np.ones(8, bool)}
    frozen_re = [r"^(conv1|bn1)\.", r"^layer1\."]
    for freeze_bn_stats in (True, False):
        groups = optim.param_groups(list(params), list(stats), model_or_class=ResNet,
                                    freeze=frozen_re, freeze_bn_stats=freeze_bn_stats)
        tx = optim.make_optimizer(params, groups, lr=0.1, total_steps=10)
        state = steps.init_state(params, stats, tx, seed=0)
        start = jax.device_get(state)
        train_step = steps.make_train_step(parts, tx, augment=aug, num_classes=5,
                                           frozen=groups.frozen, frozen_stats=groups.frozen_stats)
        for _ in range(3):
            state, metrics = train_step(state, batch)
        assert train_step._cache_size() == 1  # no re-compilation after the first batch
        end = jax.device_get(state)
        assert int(end["step"]) == 3 and np.isfinite(float(metrics["loss"]))
        for key, value in end["params"].items():
            same = np.array_equal(value, start["params"][key])
            assert same == (key in groups.frozen), key
        for key, value in end["batch_stats"].items():
            same = np.array_equal(value, start["batch_stats"][key])
            frozen_layer = key.startswith(("bn1.", "layer1."))
            assert same == (frozen_layer and freeze_bn_stats), key

    eval_step = steps.make_eval_step(parts, augment=aug, num_classes=5)
    for n in (8, 8, 8):
        out = eval_step(state, batch)
    assert eval_step._cache_size() == 1 and out["pred"].shape == (8,)


def test_every_image_family_has_a_head_for_replacement_and_mmd():
    # One model per family module (abstract, no arrays): the head regex of
    # the spec must find the classifier module that MMD and head replacement use.
    families = {}
    for name in jaxnets.list_models(kind="image"):
        families.setdefault(jaxnets.get_spec(name).builder.__module__, name)
    assert len(families) >= 2
    for name in families.values():
        spec = jaxnets.get_spec(name)
        model = nnx.eval_shape(lambda: jaxnets.create_model(name, num_classes=3))
        assert steps.head_path(model, spec.head) is not None, name


def test_every_image_family_traces_a_train_step_with_dropout_aux_heads_and_mmd():
    """One model per family module, traced (``jax.eval_shape``, nothing compiled): the
    train step reseeds dropout inside jit (AlexNet, VGG, GoogLeNet, Inception v3 have
    dropout; merged without ``copy`` that raised flax's TraceContextError) and takes
    the auxiliary classifiers' outputs (GoogLeNet, Inception v3), with and without MMD."""
    families = {}
    for name in jaxnets.list_models(kind="image"):
        families.setdefault(jaxnets.get_spec(name).builder.__module__, name)
    assert {"alexnet", "googlenet", "inception_v3"} <= set(families.values()), families
    rng = np.random.default_rng(0)
    for name in families.values():
        spec = jaxnets.get_spec(name)
        size = spec.input_size[0]
        model = nnx.eval_shape(lambda: jaxnets.create_model(name, num_classes=3))
        parts, params, stats = steps.split_model(model, spec.head)  # shapes, no arrays
        groups = optim.param_groups(list(params), list(stats), model_or_class=parts.model_class)
        tx = optim.make_optimizer(params, groups, lr=0.1, total_steps=10)
        state = jax.eval_shape(lambda p, s: steps.init_state(p, s, tx, seed=0), params, stats)
        image = rng.integers(0, 255, (2, size, size, spec.in_channels), dtype=np.uint8)
        batch = {"image": image, "label": np.array([0, 2], np.int32), "mask": np.ones(2, bool)}
        aug = AugmentConfig(crop_size=size, resize_size=size, channels=spec.in_channels,
                            mean=(0.5,) * spec.in_channels, std=(0.5,) * spec.in_channels)
        for mmd in (0.0, 1.0) if name in ("googlenet", "inception_v3") else (0.0,):
            train_step = steps.make_train_step(parts, tx, augment=aug, num_classes=3,
                                               mmd_weight=mmd)
            _, metrics = jax.eval_shape(train_step, state,
                                        {**batch, "target_image": image} if mmd else batch)
            assert metrics["loss"].shape == () and metrics["ce"].shape == (), name


class _AuxNet(nnx.Module):
    """GoogLeNet's output structure in miniature: main logits (after dropout) and two
    auxiliary heads that predict nothing (zero logits: a cross-entropy of log 5)."""

    def __init__(self):
        self.fc = nnx.Linear(3, 5, rngs=nnx.Rngs(0))
        self.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(1))

    def __call__(self, x):
        from jaxnets.googlenet import GoogLeNetOutputs

        logits = self.fc(self.dropout(x.mean(axis=(1, 2))))
        zero = jax.numpy.zeros_like(logits)
        return GoogLeNetOutputs(logits, zero, zero)


def test_auxiliary_classifiers_add_their_weighted_loss():
    parts, params, stats = steps.split_model(_AuxNet(), r"^fc\.")
    groups = optim.param_groups(list(params), list(stats), model_or_class=_AuxNet)
    tx = optim.make_optimizer(params, groups, lr=0.1, total_steps=10)
    rng = np.random.default_rng(2)
    batch = {"image": rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8),
             "label": rng.integers(0, 5, 4).astype(np.int32), "mask": np.ones(4, bool)}
    for weight in (0.0, 0.4, 1.5):
        train_step = steps.make_train_step(parts, tx, augment=AugmentConfig(8, 8),
                                           num_classes=5, aux_weight=weight)
        state = steps.init_state(jax.tree.map(np.array, params), stats, tx, seed=0)
        _, m = train_step(state, batch)  # (the state is donated)
        np.testing.assert_allclose(float(m["loss"]), float(m["ce"]) + weight * 2 * np.log(5),
                                   rtol=1e-6)
    # train.distributed's step too (the same dropout draw each time: the state's own key).
    from train import distributed

    graphdef, params, rest = nnx.split(_AuxNet(), nnx.Param, ...)
    sgd = optax.sgd(0.1)
    images = jax.numpy.asarray(batch["image"], np.float32) / 255
    losses = [float(distributed.make_sharded_step(graphdef, sgd, donate=False, aux_weight=w)(
        params, rest, sgd.init(params), images, batch["label"])[3]) for w in (0.0, 0.4)]
    np.testing.assert_allclose(losses[1] - losses[0], 0.4 * 2 * np.log(5), rtol=1e-5)


# --------------------------------------------------------------------------
# CLI: bad input.


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("args, needle", [
    (["--arch", "resnet1800", "--dataset", "digits", "--weights", "none"], "resnet1800"),
    (["--arch", "lenet5", "--dataset", "nosuchdata", "--weights", "none"], "nosuchdata"),
    (["--arch", "lenet5", "--dataset", "digits", "--weights", "/no/such/file.pth"],
     "/no/such/file.pth"),
    (["--arch", "lenet5", "--dataset", "digits", "--weights", "none", "--freeze", "layer9"],
     "layer9"),
    (["--arch", "lenet5", "--dataset", "digits", "--weights", "none", "--image-size", "16"],
     "minimum"),
    (["--arch", "inception_v3", "--dataset", "digits", "--weights", "none", "--image-size",
      "224"], "in training: Inception v3's auxiliary classifier needs"),
    (LENET + ["--freeze", "."], "freezes every parameter of lenet5: nothing would train"),
    (LENET + ["--image-size", "40"],
     "lenet5 cannot take --image-size 40: LeNet5 takes 32x32 images only; got 40x40"),
    (["--arch", "resnet18_cifar", "--dataset", "digits", "--weights", "none", "--image-size",
      "8", "--batch-size", "1"], "--batch-size 1 at --image-size 8 leaves one value per "
                                 "channel in a train-mode BatchNorm"),
    (["--arch", "alexnet", "--dataset", "digits", "--weights", "none", "--model-arg",
      "dropout=1.5"], "--model-arg: dropout probability has to be between 0 and 1"),
    (LENET + ["--std", "0"], "--std finite and > 0"),
    (LENET + ["--mean", "nan"], "--mean must be finite"),
    (LENET + ["--mean", "0.1,0.2"], "--mean has 2 value(s) and --std 1; lenet5 takes 1 channel"),
    (LENET + ["--label-feature", "label"], "--label-feature is for tfds datasets; 'digits'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, needle):
    assert finetune.main(args + ["--output-dir", str(tmp_path / "run")]) == 2
    assert needle in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()  # bad input writes nothing


def test_an_output_dir_that_cannot_be_made_is_one_line(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep")
    for out, needle in ((f, "a file, not a directory"),
                        (f / "run", f"{f} is a file, not a directory")):
        assert finetune.main(LENET + ["--steps", "1", "--output-dir", str(out)]) == 2
        assert f"--output-dir {out}: {needle}" in _one_error_line(capsys)
    assert f.read_text() == "keep"
    # An existing folder it may not write in (os.access mocked: root may write anywhere).
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "access", lambda p, mode: (real_access(p, mode)
                                                  and os.fspath(p) != str(locked)))
        assert finetune.main(LENET + ["--steps", "1", "--output-dir", str(locked)]) == 2
    assert f"--output-dir {locked}: no permission to write in it" in _one_error_line(capsys)
    assert os.listdir(locked) == []


def test_a_line_cut_short_in_metrics_jsonl_is_left_out_on_resume(tmp_path, caplog):
    from train.metrics import MetricsLog

    (tmp_path / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 2.0}\n'
                                            '{"split": "tr')
    log = MetricsLog(str(tmp_path), resume_step=1)
    assert "metrics.jsonl: line 2 is damaged and left out" in caplog.text
    log.log("train", 2, loss=1.0)
    log.close()
    assert [r["step"] for r in log.records()] == [1, 2]
    # TensorBoard is told that the run goes on from step 2 (SessionLog START at step 2:
    # it drops the earlier files' events from there on, as the JSON log was trimmed).
    (events,) = [read_events(f) for f in glob.glob(str(tmp_path / "tb" / "events.*"))]
    start = [e for e in events if b"\x3a\x02\x08\x01" in e]  # session_log (7) {status: START}
    assert len(start) == 1 and b"\x10\x02" in start[0]  # step 2


@pytest.mark.parametrize("flag, value, needle", [
    ("--seed", "-1", "must be in [0, 2**32)"), ("--seed", str(2 ** 70), "must be in [0, 2**32)"),
    ("--crop-scale-min", "0", "must be in (0, 1]"), ("--lr", "inf", "finite number >= 0"),
    ("--lr", "abc", "invalid non-negative number value: 'abc'"),
    ("--model-arg", "num_classes=5", "the class count comes from the dataset"),
    ("--val-fraction", "0", "must be in (0, 1)"), ("--val-fraction", "1", "must be in (0, 1)"),
])
def test_flag_values_out_of_range_are_one_line(capsys, flag, value, needle):
    with pytest.raises(SystemExit) as e:
        finetune.main(LENET + [flag, value])
    assert e.value.code == 2 and needle in _one_error_line(capsys)


def test_color_jitter_flag_reaches_the_train_transform(capsys):
    from train import config as config_lib

    spec = jaxnets.get_spec("resnet18_cifar")
    parse = config_lib.parse_args
    assert parse(LENET + ["--color-jitter", "0.4"]).color_jitter == (0.4, 0.4, 0.4, 0.0)
    for bad in ("0.1,0.2", "0.1,0.1,0.1,0.6", "-1", "nan"):
        with pytest.raises(SystemExit):
            parse(LENET + ["--color-jitter", bad])
        assert "--color-jitter" in _one_error_line(capsys)
    cfg = config_lib.resolve(parse(["--arch", "resnet18_cifar", "--dataset", "digits",
                                    "--color-jitter", "0.4,0.3,0.2,0.1"]),
                             spec=spec, native_size=8, transforms=None, steps_per_epoch=10)
    aug = finetune.augment_config(cfg, spec, train=True)
    assert (aug.brightness, aug.contrast, aug.saturation, aug.hue) == (0.4, 0.3, 0.2, 0.1)
    plain = finetune.augment_config(dataclasses.replace(cfg, color_jitter=None), spec, True)
    assert (plain.brightness, plain.hue) == (0.0, 0.0)
    from train.augment import train_transform

    images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
    key = jax.random.key(1)
    assert not np.allclose(train_transform(key, images, aug), train_transform(key, images, plain))


def test_shortened_flags_are_refused_and_doubtful_values_noted(capsys):
    # argparse would take --warmup as --warmup-steps; a flag added later could change
    # what an old command means.
    with pytest.raises(SystemExit) as e:
        finetune.main(LENET + ["--warmup", "5"])
    line = _one_error_line(capsys)
    assert e.value.code == 2 and "unrecognized arguments: --warmup 5" in line, line
    assert "(see python -m train.finetune --help)" in line
    from train import config as config_lib
    from train import seq2seq

    with pytest.raises(SystemExit) as e:
        seq2seq.main(["--ste", "3"])
    assert e.value.code == 2 and "--ste" in _one_error_line(capsys)

    spec = jaxnets.get_spec("lenet5")
    resolve = functools.partial(config_lib.resolve, spec=spec, native_size=8, transforms=None,
                                steps_per_epoch=10)
    assert config_lib.doubtful(resolve(config_lib.parse_args(LENET))) == []
    notes = config_lib.doubtful(resolve(config_lib.parse_args(
        LENET + ["--steps", "20", "--warmup-steps", "50", "--resize-size", "24"])))
    assert len(notes) == 2, notes
    assert "--warmup-steps 50 is more than the run's 20 steps" in notes[0]
    assert "--resize-size 24 is below --image-size 32" in notes[1]
    # Digits and characters are not flipped unless asked: a mirrored glyph is another one.
    flips = {spec: resolve(config_lib.parse_args(["--arch", "lenet5", "--dataset", spec])).hflip
             for spec in ("digits", "tfds:mnist", "tfds:emnist/letters:3.*.*:train:test",
                          "tfds:svhn_cropped", "tfds:cifar10", "/data/mnist", "folder:x")}
    assert flips == {"digits": 0.0, "tfds:mnist": 0.0, "tfds:emnist/letters:3.*.*:train:test": 0.0,
                     "tfds:svhn_cropped": 0.0, "tfds:cifar10": 0.5, "/data/mnist": 0.5,
                     "folder:x": 0.5}


def test_resume_with_another_optimizer_setup_is_refused_in_one_line(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    args = LENET + ["--steps", "2", "--batch-size", "16", "--checkpoint-every", "1",
                    "--output-dir", str(run), "--mean", "0.5"]
    assert finetune.main(args) == 0
    assert "lenet5: random init (--weights none)" in capsys.readouterr().err
    # An evaluation of the run names its checkpoint, not how the run began.
    assert finetune.main(args + ["--eval-only"]) == 0
    assert "lenet5: step 2 of this run;" in capsys.readouterr().err
    # Saves without a validation accuracy (mid-epoch) are not each one warning from Orbax.
    assert not [r for r in caplog.records if "tracked_metric" in r.getMessage()]
    # An evaluation reads the parameters and statistics alone: other training flags
    # will do (a --freeze that matches nothing too), the run's preprocessing (its
    # --mean) is kept unless given, and the run's config.json stays as it was.
    config_before = (run / "config.json").read_text()
    logits = np.load(run / "predictions.npz")["logits"]
    other = ["--batch-size", "32", "--optimizer", "adamw", "--lr", "0.5", "--freeze", "^none"]
    for command in (["--eval-only"] + other, ["--steps", "0"]):  # --steps 0 evaluates too
        assert finetune.main(LENET + ["--output-dir", str(run)] + command) == 0
        err = capsys.readouterr().err
        assert "lenet5: step 2 of this run;" in err and "note:" not in err, err
        # (Another eval batch size rounds differently; another mean moves them ~1e-2.)
        np.testing.assert_allclose(np.load(run / "predictions.npz")["logits"], logits,
                                   rtol=1e-5, atol=1e-6)
        assert (run / "config.json").read_text() == config_before
    assert finetune.main(args + ["--eval-only", "--std", "0.5"]) == 0
    assert "note: evaluating with other preprocessing than the run's: std 0.22" in (
        capsys.readouterr().err)
    # ... but not another model or validation split.
    assert finetune.main(args + ["--eval-only", "--seed", "1"]) == 2
    assert "different run (seed: 0 there, 1 now)" in _one_error_line(capsys)
    # An unreadable newest step: the one before is evaluated, with a warning; nothing
    # in the run is moved or rewritten.
    for f in glob.glob(str(run / "checkpoints" / "2" / "state" / "**" / "d" / "*"),
                       recursive=True):
        with open(f, "wb") as fh:
            fh.write(b"corrupt")
    caplog.clear()
    assert finetune.main(args + ["--eval-only"]) == 0
    assert "lenet5: step 1 of this run;" in capsys.readouterr().err
    assert any("read step 1 instead of 2" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(run / "checkpoints")) == ["1", "2"]
    shutil.rmtree(run / "checkpoints" / "2")
    assert finetune.main(args + ["--optimizer", "adamw"]) == 2
    assert "different run (optimizer: 'sgd' there, 'adamw' now)" in _one_error_line(capsys)
    # Were the flags not told apart, the state itself is: one line, nothing moved.
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "optimizer": "adamw"}))
    assert finetune.main(args + ["--optimizer", "adamw", "--steps", "3"]) == 2
    line = _one_error_line(capsys)
    assert "holds a state of another structure" in line and "--optimizer" in line, line
    assert sorted(os.listdir(run / "checkpoints")) == ["1"]


def test_run_identity_ignores_model_arg_order_and_path_spelling(tmp_path, monkeypatch):
    same = finetune._same_value
    assert same("model_args", [["a", 1], ["b", "x"]]) == same("model_args", [["b", "x"], ["a", 1]])
    assert same("model_args", [["a", 1]]) != same("model_args", [["a", 2]])
    monkeypatch.chdir(tmp_path)
    assert same("weights", "./w.pth") == same("weights", str(tmp_path / "w.pth"))
    assert same("weights", "DEFAULT") == "DEFAULT" != same("weights", "IMAGENET1K_V1")


def test_a_resume_note_marks_values_worked_out_anew(tmp_path):
    from train import config as config_lib

    saved = config_lib.Config(arch="mlp", dataset="digits", steps=70, warmup_steps=7, lr=0.1)
    config_lib.save(saved, str(tmp_path / "config.json"))
    (tmp_path / "checkpoints" / "70" / "state").mkdir(parents=True)
    given = config_lib.Config(arch="mlp", dataset="digits", steps=100, lr=0.1,
                              epochs=30)  # not used with --steps: not noted
    now = dataclasses.replace(given, warmup_steps=10, val_fraction=0.2)
    is_run, changed = finetune._check_identity(str(tmp_path), now, given)
    assert is_run and sorted(changed) == ["steps 70 -> 100", "warmup-steps 7 -> 10 (auto)"]
    # A clip norm of 0 (accepted before it was refused) was no clipping: the same run.
    assert finetune._same_value("clip_grad_norm", 0.0) == finetune._same_value(
        "clip_grad_norm", None) != finetune._same_value("clip_grad_norm", 1.0)


def test_a_resume_with_other_training_flags_says_which(tmp_path, capsys):
    import torch

    from porting.reference import build_torch_model

    weights = tmp_path / "lenet.pth"
    torch.save(build_torch_model("lenet5").state_dict(), weights)
    run = tmp_path / "run"
    args = ["--arch", "lenet5", "--dataset", "digits", "--weights", str(weights),
            "--no-progress", "--batch-size", "16", "--output-dir", str(run)]
    # An evaluation in a new folder holds no checkpoint: a run there is not held to it.
    assert finetune.main(args + ["--eval-only", "--batch-size", "64"]) == 0
    assert finetune.main(args + ["--steps", "1"]) == 0
    capsys.readouterr()
    # The checkpoint replaces the weights: they are not read again (the file may be gone).
    weights.unlink()
    assert finetune.main(args + ["--steps", "2", "--lr", "0.05", "--no-progress",
                                 "--color-jitter", "0.4,0.3,0.2,0.1",
                                 "--val-fraction", "0.2"]) == 0  # digits' default, said
    err = capsys.readouterr().err
    assert "resuming" in err
    note = [line for line in err.splitlines() if line.startswith("note: flags changed")]
    assert len(note) == 1 and "lr 0.1 -> 0.05" in note[0] and "steps 1 -> 2" in note[0], err
    assert "color-jitter (default) -> 0.4 0.3 0.2 0.1" in note[0]
    assert "progress" not in note[0] and "output" not in note[0]


def test_one_class_is_refused_and_a_lone_mean_keeps_the_default_std(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "one" / "cat"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("L", (8, 8), color=i * 40).save(folder / f"{i}.png")
    assert finetune.main(["--arch", "lenet5", "--weights", "none", "--dataset",
                          f"folder:{tmp_path / 'one'}", "--output-dir", str(tmp_path / "r")]) == 2
    assert "has 1 class; a classifier needs at least 2" in _one_error_line(capsys)
    from train import config as config_lib

    spec = jaxnets.get_spec("lenet5")
    cfg = config_lib.resolve(config_lib.parse_args(LENET + ["--mean", "0.5"]), spec=spec,
                             native_size=8, transforms=None, steps_per_epoch=10)
    assert cfg.mean == (0.5,) and cfg.std == pytest.approx(((0.229 + 0.224 + 0.225) / 3,))


def test_a_folder_of_other_files_is_refused_and_bad_input_writes_nothing(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"x": 1}\n')
    assert finetune.main(LENET + ["--steps", "1", "--output-dir", str(other)]) == 2
    assert "holds other files and no run" in _one_error_line(capsys)
    assert os.listdir(other) == ["metrics.jsonl"]
    assert (other / "metrics.jsonl").read_text() == '{"x": 1}\n'
    # Bad input found late (the target dataset) still writes nothing.
    fresh = tmp_path / "fresh"
    assert finetune.main(LENET + ["--steps", "1", "--target-dataset", "bogus",
                                  "--output-dir", str(fresh)]) == 2
    assert "bogus" in _one_error_line(capsys) and not fresh.exists()
    # A run stopped by bad input before its first step (as before that check) holds
    # nothing to keep: the corrected command is not refused as "a different run".
    (fresh / "checkpoints").mkdir(parents=True)
    (fresh / "config.json").write_text(json.dumps({"arch": "lenet5", "target_dataset": "x"}))
    assert finetune.main(LENET + ["--steps", "1", "--batch-size", "16",
                                  "--output-dir", str(fresh)]) == 0
    assert json.loads((fresh / "config.json").read_text())["target_dataset"] is None


def test_an_input_size_the_model_cannot_take_fails_before_weights_are_read(
        tmp_path, capsys, monkeypatch):
    # Checked on a model without values: no pretrained file is fetched or read first.
    from porting import pretrained

    def fetched(*args, **kwargs):
        raise AssertionError("pretrained weights read before the input size was checked")

    monkeypatch.setattr(pretrained, "load_torchvision", fetched)
    args = ["--arch", "inception_v3", "--dataset", "digits", "--weights", "DEFAULT",
            "--image-size", "224", "--output-dir", str(tmp_path / "run")]
    assert finetune.main(args) == 2
    assert "cannot take --image-size 224 in training" in _one_error_line(capsys)
    # Evaluation alone does not need the auxiliary head: the check passes, then the
    # weights are read (here: the stand-in's error, reported as the weights' own).
    assert finetune.main(args[:-2] + ["--eval-only", "--output-dir", str(tmp_path / "ev")]) == 2
    assert "--weights DEFAULT: pretrained weights read before" in _one_error_line(capsys)


def test_bad_flags_and_wrong_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        finetune.main(["--arch", "lenet5", "--dataset", "digits", "--lr-mult", "fc3"])
    assert e.value.code == 2 and "REGEX=FACTOR" in _one_error_line(capsys)
    with pytest.raises(SystemExit) as e:
        finetune.main(["--arch", "lenet5", "--dataset", "digits", "--bogus"])
    assert e.value.code == 2 and "--bogus" in _one_error_line(capsys)

    import torch

    from porting.reference import build_torch_model

    path = str(tmp_path / "lenet.pth")
    torch.save(build_torch_model("lenet5").state_dict(), path)
    args = ["--arch", "resnet18", "--dataset", "digits", "--weights", path,
            "--output-dir", str(tmp_path / "r")]
    assert finetune.main(args) == 2
    line = _one_error_line(capsys)
    # Said once, and a long key list is cut between keys.
    assert "does not fit resnet18: " in line and "state_dict does not fit" not in line
    assert line.endswith(", ...") and len(line) < 800, line

    # A run directory of another run is refused, its files untouched.
    run = tmp_path / "other"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"arch": "mlp"}))
    (run / "metrics.jsonl").write_text("{}\n")
    assert finetune.main(LENET + ["--output-dir", str(run)]) == 2
    assert "different run" in _one_error_line(capsys)
    assert (run / "metrics.jsonl").read_text() == "{}\n"
    assert json.loads((run / "config.json").read_text()) == {"arch": "mlp"}


# --------------------------------------------------------------------------
# CLI: runs.


def _cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "train.finetune", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _steps_saved(run_dir):
    ck = os.path.join(run_dir, "checkpoints")
    return sorted(int(d) for d in os.listdir(ck) if d.isdigit()) if os.path.isdir(ck) else []


def _wait_for(proc, run_dir, predicate, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate(_steps_saved(run_dir)):
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before the wanted checkpoint: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("timed out waiting for a checkpoint")


def test_interrupt_kill_corrupt_resume_matches_uninterrupted_run(tmp_path):
    common = LENET + ["--steps", "60", "--batch-size", "32", "--checkpoint-every", "8",
                      "--log-every", "5"]
    a_dir, b_dir = str(tmp_path / "a"), str(tmp_path / "b")
    run_a = _cli(common + ["--output-dir", a_dir])
    b_args = common + ["--output-dir", b_dir]

    # 1. Ctrl-C: saves where it is and exits 130.
    run_b = _cli(b_args)
    _wait_for(run_b, b_dir, lambda s: 8 in s)
    run_b.send_signal(signal.SIGINT)
    out, err = run_b.communicate(timeout=900)
    assert run_b.returncode == 130, err[-2000:]
    assert "interrupted: checkpoint saved" in out + err
    interrupted_at = max(_steps_saved(b_dir))
    assert 8 <= interrupted_at < 60

    # 2. SIGKILL after two more checkpoints, then corrupt the newest one.
    run_b = _cli(b_args)
    _wait_for(run_b, b_dir, lambda s: len([x for x in s if x > interrupted_at]) >= 2)
    run_b.send_signal(signal.SIGKILL)
    run_b.communicate(timeout=60)
    assert run_b.returncode == -signal.SIGKILL
    saved = _steps_saved(b_dir)
    assert max(saved) < 60, "the run finished before it was killed"
    for f in glob.glob(os.path.join(b_dir, "checkpoints", str(max(saved)), "state", "**", "d",
                                    "*"), recursive=True):
        with open(f, "wb") as fh:
            fh.write(b"corrupt")

    # 3. The same command resumes from the previous good checkpoint.
    run_b = _cli(b_args)
    out, err = run_b.communicate(timeout=900)
    assert run_b.returncode == 0, err[-2000:]
    assert "unreadable" in err and "resuming" in err
    # One warning line per unreadable step, no tracebacks (the failed restore's
    # other reads finish into a closed event loop), and the step moved aside.
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
    assert os.path.isdir(os.path.join(b_dir, "checkpoints", f"{max(saved)}.unreadable"))

    out_a, err_a = run_a.communicate(timeout=900)
    assert run_a.returncode == 0, err_a[-2000:]
    step_a, state_a = _restore_any(a_dir, 60)
    step_b, state_b = _restore_any(b_dir, 60)
    for key in state_a["params"]:
        np.testing.assert_allclose(state_b["params"][key], state_a["params"][key], atol=1e-6,
                                   rtol=1e-6, err_msg=key)
    for key in state_a["batch_stats"]:
        np.testing.assert_allclose(state_b["batch_stats"][key], state_a["batch_stats"][key],
                                   atol=1e-6)

    # What the user gets from a run.
    assert "val top-1" in out_a and "top-5" in out_a
    summary = json.load(open(os.path.join(a_dir, "summary.json")))
    assert summary["val_top1"] > 0.5 and summary["step"] == 60
    for name in ("curves.png", "confusion.png", "config.json", "predictions.npz"):
        assert os.path.getsize(os.path.join(a_dir, name)) > 0, name
    records = [json.loads(line) for line in open(os.path.join(a_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(5, 61, 5))
    assert any(r["split"] == "val" and "top5" in r for r in records)
    b_records = [json.loads(line) for line in open(os.path.join(b_dir, "metrics.jsonl"))]
    train_steps = [r["step"] for r in b_records if r["split"] == "train"]
    assert train_steps == sorted(train_steps), "resume must drop the lost part's records"
    (event_file,) = glob.glob(os.path.join(a_dir, "tb", "events.out.tfevents.*"))
    events = read_events(event_file)
    assert b"brain.Event:2" in events[0] and any(b"train/loss" in e for e in events)
    config = json.load(open(os.path.join(a_dir, "config.json")))
    assert config["image_size"] == 32 and config["lr"] == 0.1 and config["steps"] == 60


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, capsys):
    run_dir = str(tmp_path / "nan")
    args = LENET + ["--steps", "30", "--checkpoint-every", "10", "--debug-nan-at-step", "15",
                    "--output-dir", run_dir]
    assert finetune.main(args) == 1
    err = capsys.readouterr().err
    assert "error: loss is nan at step 15" in err and "step 10" in err
    assert _steps_saved(run_dir) == [10]
    _, state = _restore_any(run_dir)
    assert all(np.isfinite(v).all() for v in state["params"].values())


# --------------------------------------------------------------------------
# CLI: data sources, MMD, torch weights.


def test_tfds_source_with_folder_target_mmd_and_folder_source(tmp_path, capsys):
    import tensorflow_datasets as tfds
    from PIL import Image

    folder = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (folder / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                folder / c / f"{i}.png")
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        args = ["--arch", "lenet5", "--dataset", "tfds:mnist", "--weights", "none",
                "--target-dataset", f"folder:{folder}", "--mmd-weight", "0.5", "--steps", "3",
                "--batch-size", "8", "--log-every", "1", "--no-progress",
                "--output-dir", str(tmp_path / "mnist")]
        assert finetune.main(args) == 0
    records = [json.loads(line) for line in open(tmp_path / "mnist" / "metrics.jsonl")]
    mmd = [r["mmd"] for r in records if r["split"] == "train"]
    assert len(mmd) == 3 and all(np.isfinite(mmd)) and max(mmd) > 0
    assert finetune.main(["--arch", "mlp", "--dataset", str(folder), "--weights", "none",
                          "--image-size", "8", "--steps", "4", "--batch-size", "8",
                          "--no-progress", "--output-dir", str(tmp_path / "folder")]) == 0
    summary = json.load(open(tmp_path / "folder" / "summary.json"))
    assert summary["val_count"] == 3  # one held-out image per class
    capsys.readouterr()


def test_a_tfds_label_feature_is_the_runs_classes(tmp_path, capsys):
    """--label-feature coarse_label trains cifar100's 20 superclasses; it is part of what
    the run is (another is refused on resume), and a wrong one writes nothing."""
    import tensorflow_datasets as tfds

    run = tmp_path / "run"
    args = ["--arch", "lenet5", "--dataset", "tfds:cifar100", "--weights", "none", "--steps",
            "1", "--batch-size", "8", "--no-progress", "--output-dir", str(run)]
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        assert finetune.main(args + ["--label-feature", "id"]) == 2
        assert "--label-feature id: not a ClassLabel feature" in _one_error_line(capsys)
        assert not run.exists()
        assert finetune.main(args + ["--label-feature", "coarse_label"]) == 0
        assert json.loads((run / "model.json").read_text())["num_classes"] == 20
        assert json.loads((run / "config.json").read_text())["label_feature"] == "coarse_label"
        assert finetune.main(args + ["--eval-only", "--label-feature", "coarse_label"]) == 0
        capsys.readouterr()
        assert finetune.main(args + ["--eval-only"]) == 2
        assert "label_feature: 'coarse_label' there, 'label' now" in _one_error_line(capsys)
        # A run records the features it read, also those chosen for it: naming them is
        # the same run, and so is a run from before the flags (no such fields).
        other = args[:-1] + [str(tmp_path / "default")]
        assert finetune.main(other) == 0
        config = json.loads((tmp_path / "default" / "config.json").read_text())
        assert (config["image_feature"], config["label_feature"]) == ("image", "label")
        named = ["--eval-only", "--image-feature", "image", "--label-feature", "label"]
        assert finetune.main(other + named) == 0
        del config["image_feature"], config["label_feature"]
        (tmp_path / "default" / "config.json").write_text(json.dumps(config))
        assert finetune.main(other + named) == 0
        capsys.readouterr()
        assert finetune.main(other + ["--eval-only", "--label-feature", "coarse_label"]) == 2
        assert "label_feature: 'label' there, 'coarse_label' now" in _one_error_line(capsys)


def test_torch_trained_lenet_gives_the_same_predictions(tmp_path, capsys):
    import torch
    import torch.nn.functional as F

    from porting.reference import build_torch_model
    from train.data import load_dataset

    def preprocess(images):
        # The eval transform: Resize(32) + CenterCrop(32) (= resize) + Normalize(0.5, 0.25).
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        return (x - 0.5) / 0.25

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only contend
    train = load_dataset("digits", split="train")
    val = load_dataset("digits", split="val")
    model = build_torch_model("lenet5")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x_train, y_train = preprocess(train.images), torch.from_numpy(train.labels).long()
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(y_train), (64,), generator=gen)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        want = model(preprocess(val.images)).argmax(1).numpy()
    torch.set_num_threads(threads)
    assert (want == val.labels).mean() > 0.9  # a trained model, so ties are rare
    path = str(tmp_path / "lenet_digits.pth")
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, path)

    run_dir = tmp_path / "eval"
    assert finetune.main(["--arch", "lenet5", "--dataset", "digits", "--weights", path,
                          "--eval-only", "--mean", "0.5", "--std", "0.25", "--no-progress",
                          "--output-dir", str(run_dir)]) == 0
    got = np.load(run_dir / "predictions.npz")
    order = np.argsort(got["index"])
    np.testing.assert_array_equal(got["index"][order], np.arange(len(val)))
    np.testing.assert_array_equal(got["pred"][order], want)
    capsys.readouterr()


def test_folder_evaluation_gives_torchvisions_logits(tmp_path, capsys):
    """--eval-only on an image folder of varying sizes: the logits of a torch model
    fed torchvision's ImageFolder loader and eval preset (bicubic, odd margins)."""
    import torch
    from PIL import Image
    from torchvision.datasets.folder import default_loader
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    from porting.reference import build_torch_model
    from train.data import load_dataset

    rng = np.random.default_rng(1)
    sizes = [(50, 37), (37, 50), (41, 41), (90, 20), (17, 15), (120, 95)]
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "ds" / split / c).mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                small = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)
                Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(
                    tmp_path / "ds" / split / c / f"{i}.{'jpg' if i % 2 else 'png'}")
    torch.manual_seed(0)
    model = build_torch_model("resnet18_cifar", 2).eval()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    assert finetune.main(["--arch", "resnet18_cifar", "--dataset", str(tmp_path / "ds"),
                          "--weights", str(tmp_path / "m.pth"), "--eval-only",
                          "--image-size", "32", "--resize-size", "35", "--interpolation",
                          "bicubic", "--batch-size", "4", "--no-progress",
                          "--output-dir", str(tmp_path / "run")]) == 0
    got = np.load(tmp_path / "run" / "predictions.npz")
    files = load_dataset(str(tmp_path / "ds"), split="val").files
    preset = ImageClassification(crop_size=32, resize_size=35,
                                 interpolation=InterpolationMode.BICUBIC)
    x = torch.stack([preset(default_loader(files[i])) for i in got["index"]])
    with torch.no_grad():
        want = model(x).numpy()
    assert len(want) == 12
    np.testing.assert_allclose(got["logits"], want, rtol=1e-4, atol=1e-4)
    capsys.readouterr()


def _train_val_folders(root):
    """An image dataset with train/ and val/ folders: classes a and b, 4 and 2 small
    PNGs of different sizes each."""
    from PIL import Image

    for split, count in (("train", 4), ("val", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (10 + i, 9), (60 * i, 90, 30)).save(root / split / c / f"{i}.png")


def test_an_unreadable_val_image_keeps_the_epoch_and_skip_bad_passes_it(tmp_path, capsys):
    """A corrupt file met at the epoch's evaluation stops the run in one line with the
    epoch's checkpoint written; --skip-bad logs, leaves out and lists it. A validation
    split with no images is refused before anything is written."""
    from PIL import Image

    from train.data import load_dataset

    _train_val_folders(tmp_path / "ds")
    bad = tmp_path / "ds" / "val" / "b" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    args = ["--arch", "mlp", "--dataset", str(tmp_path / "ds"), "--weights", "none",
            "--image-size", "8", "--epochs", "1", "--batch-size", "4", "--checkpoint-every", "0",
            "--no-progress"]
    run = tmp_path / "run"
    assert finetune.main(args + ["--output-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot decode image ") and str(bad) in err[-1]
    assert os.listdir(run / "checkpoints") == ["2"]  # the epoch's 2 steps are kept
    # The same at the end of a run's first of two epochs. Once the image is mended, a
    # resumed run evaluates the epoch first (its line, its row), once: a rerun after a
    # NaN at the next step does not again; so does the rerun of the first run (its last).
    two = args[:args.index("--epochs")] + ["--epochs", "2"] + args[args.index("--epochs") + 2:]
    assert finetune.main(two + ["--output-dir", str(tmp_path / "two")]) == 2
    assert "error: cannot decode image " in capsys.readouterr().err
    saved_bad = bad.read_bytes()
    Image.new("RGB", (11, 9), (30, 90, 60)).save(bad)
    assert finetune.main(two + ["--output-dir", str(tmp_path / "two"),
                                "--debug-nan-at-step", "3"]) == 1
    captured = capsys.readouterr()
    assert "resuming" in captured.err and "epoch 1 step 2: val top-1" in captured.out
    assert finetune.main(two + ["--output-dir", str(tmp_path / "two")]) == 0
    assert "epoch 1 step 2" not in capsys.readouterr().out
    assert finetune.main(args + ["--output-dir", str(run)]) == 0
    assert "epoch 1 step 2: val top-1" in capsys.readouterr().out
    for name, want in (("two", [(2, 1), (4, 2)]), ("run", [(2, 1)])):
        with open(tmp_path / name / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f]
        assert [(r["step"], r["epoch"]) for r in rows if r["split"] == "val"] == want, name
    bad.write_bytes(saved_bad)
    assert finetune.main(args + ["--output-dir", str(tmp_path / "skip"), "--skip-bad"]) == 0
    summary = json.load(open(tmp_path / "skip" / "summary.json"))
    assert summary["skipped_files"] == [str(bad)] and summary["val_count"] == 3  # left out
    predictions = np.load(tmp_path / "skip" / "predictions.npz")
    files = [load_dataset(str(tmp_path / "ds"), split="val").files[i]
             for i in predictions["index"]]
    assert len(files) == 3 and str(bad) not in files
    assert "--skip-bad skipped 1 image file(s)" in capsys.readouterr().err
    for c in ("a", "b"):
        (tmp_path / "flat" / c).mkdir(parents=True)
        Image.new("RGB", (9, 9)).save(tmp_path / "flat" / c / "0.png")
    args[3] = str(tmp_path / "flat")
    assert finetune.main(args + ["--output-dir", str(tmp_path / "flat_run")]) == 2
    assert "its validation split flat/val holds no images" in capsys.readouterr().err
    assert not (tmp_path / "flat_run").exists()


def test_sgd_flags_torch_refuses_and_adamw_ignores(tmp_path, capsys):
    """--nesterov without momentum (torch.optim.SGD refuses it) or with AdamW and
    --clip-grad-norm 0 are one line; AdamW runs are not told apart by SGD's momentum;
    weight decay switched on or off on resume is named; the logs carry lr and ce."""
    base = ["--arch", "mlp", "--dataset", "digits", "--weights", "none", "--image-size", "8",
            "--batch-size", "32", "--log-every", "1", "--no-progress"]
    for extra, needle in ((["--nesterov", "--momentum", "0"], "--nesterov needs --momentum > 0"),
                          (["--nesterov", "--optimizer", "adamw"], "--nesterov is SGD's"),
                          (["--clip-grad-norm", "0"], "must be a finite number > 0")):
        try:
            code = finetune.main(base + extra + ["--output-dir", str(tmp_path / "x")])
        except SystemExit as e:  # a usage error
            code = e.code
        assert code == 2 and needle in capsys.readouterr().err
    run = str(tmp_path / "adamw")
    args = base + ["--optimizer", "adamw", "--steps", "2", "--warmup-steps", "2",
                   "--lr", "0.01", "--output-dir", run]
    assert finetune.main(args) == 0
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["lr"] for r in train] == pytest.approx([0.005, 0.01])
    assert all(r["ce"] == pytest.approx(r["loss"]) for r in train)  # no aux, no MMD
    capsys.readouterr()
    assert finetune.main(args[:-4] + ["--steps", "3", "--momentum", "0.5", "--mmd-weight", "2",
                                      "--output-dir", run]) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "--momentum 0.5 is SGD's: adamw ignores it" in err
    assert "--mmd-weight 2.0 is for --target-dataset, which is not given" in err
    # AdamW's state is the same with or without decay; SGD's is not.
    assert finetune.main(args[:-4] + ["--steps", "4", "--weight-decay", "0",
                                      "--output-dir", run]) == 0
    sgd = base + ["--output-dir", str(tmp_path / "sgd")]
    assert finetune.main(sgd + ["--steps", "1"]) == 0
    capsys.readouterr()
    assert finetune.main(sgd + ["--steps", "2", "--weight-decay", "0"]) == 2
    assert "weight_decay: 0.0005 there, 0.0 now" in capsys.readouterr().err


def test_a_resume_on_a_changed_split_says_so(tmp_path, capsys):
    """Files added to a flat image folder move others between the splits: a resume
    notes it (validation images may have been trained on); the same split is silent."""
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "ds" / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (9 + i, 8), (40 * i, 80, 20)).save(tmp_path / "ds" / c / f"{i}.png")
    args = ["--arch", "mlp", "--dataset", str(tmp_path / "ds"), "--weights", "none",
            "--image-size", "8", "--batch-size", "4", "--no-progress",
            "--output-dir", str(tmp_path / "run")]
    # An evaluation first (another split): a run that then starts there writes its own.
    assert finetune.main(args + ["--steps", "0", "--val-fraction", "0.5"]) == 0
    assert json.load(open(tmp_path / "run" / "split.json"))["val"] == 6
    args += ["--val-fraction", "0.3"]
    assert finetune.main(args + ["--steps", "1"]) == 0
    split = json.load(open(tmp_path / "run" / "split.json"))
    assert (split["train"], split["val"]) == (8, 4)
    assert finetune.main(args + ["--steps", "2"]) == 0
    assert "split is not the one" not in capsys.readouterr().err
    Image.new("RGB", (9, 9)).save(tmp_path / "ds" / "a" / "00.png")
    assert finetune.main(args + ["--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "note: the dataset's split is not the one this run started with (8 train / 4 val " \
           "images then, 9 / 4 now, other validation images)" in err, err
    assert json.load(open(tmp_path / "run" / "split.json")) == split  # the start's, kept
    # summary.json: this invocation's seconds and the run's, earlier invocations included.
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["run_seconds"] > summary["seconds"] > 0, summary
    # With train/ and val/ folders, training images added leave the validation ones be.
    _train_val_folders(tmp_path / "tv")
    args = ["--arch", "mlp", "--dataset", str(tmp_path / "tv"), "--weights", "none",
            "--image-size", "8", "--batch-size", "4", "--no-progress",
            "--output-dir", str(tmp_path / "tv_run")]
    assert finetune.main(args + ["--steps", "1"]) == 0
    Image.new("RGB", (9, 9)).save(tmp_path / "tv" / "train" / "a" / "9.png")
    capsys.readouterr()
    assert finetune.main(args + ["--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "note: the dataset has 9 training images, 8 when this run started; its " \
           "validation images are the same" in err and "split is not the one" not in err, err


def test_logged_ce_is_plain_cross_entropy_under_label_smoothing(tmp_path):
    rows = {}
    for smoothing in ("0", "0.5"):
        run = tmp_path / smoothing
        assert finetune.main(["--arch", "mlp", "--dataset", "digits", "--weights", "none",
                              "--image-size", "8", "--steps", "1", "--log-every", "1",
                              "--label-smoothing", smoothing, "--no-progress",
                              "--output-dir", str(run)]) == 0
        rows[smoothing] = [json.loads(line) for line in open(run / "metrics.jsonl")][0]
    assert rows["0.5"]["ce"] == pytest.approx(rows["0"]["ce"], rel=1e-6)  # same first step
    assert rows["0"]["loss"] == pytest.approx(rows["0"]["ce"])
    assert abs(rows["0.5"]["loss"] - rows["0.5"]["ce"]) > 1e-3  # the loss is smoothed


def test_progress_in_a_log_is_a_few_lines(tmp_path, capsys):
    # stderr is not a terminal (here pytest's capture; a log file, a pipe): the bars are
    # lines at most every 30 s, not a redraw per step or per --log-every (which updates
    # the bar's loss and accuracy).
    run_dir = str(tmp_path / "run")
    args = [a for a in LENET if a != "--no-progress"]
    assert finetune.main(args + ["--steps", "30", "--log-every", "1", "--batch-size", "16",
                                 "--output-dir", run_dir]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    bars = [line for line in err.splitlines() if line.startswith("lenet5 train:")]
    assert 2 <= len(bars) <= 3, err
    assert bars[0].startswith("lenet5 train:   0%") and "30/30" in bars[-1], bars
    # The last line shows the last logged loss; the evaluation's bar keeps its last line.
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f if '"train"' in line][-1]
    assert last["step"] == 30 and bars[-1].endswith(f"loss={last['loss']:.4f}]"), bars
    assert any(line.startswith("eval: 100%") for line in err.splitlines()), err
