"""python -m porting.verify: PASS/FAIL and exit codes, clear errors on bad input."""

import re
import subprocess
import sys

import pytest
import torch

from porting.reference import build_torch_model
from porting.verify import main


PROGRESS = re.compile(r"^\[\s*\d+\.\ds\] .+ \.\.\.$")


def test_random_model_passes(capsys):
    assert main(["--arch", "lenet5"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "PASS: lenet5" in out and "eval logits" in out and "grads fp64" in out
    # Each stage says so as it starts, on stderr (a big model takes minutes on CPU).
    stages = [line for line in captured.err.splitlines() if PROGRESS.match(line)]
    assert [s.split("] ")[1].split(" (")[0] for s in stages] == [
        "building and porting lenet5 ...", "torch fp32 passes", "jax fp32 passes",
        "torch float64 gradients", "jax float64 gradients"], stages
    assert main(["--arch", "lenet5", "--no-grads", "--quiet"]) == 0
    assert not capsys.readouterr().err.strip()


def test_checkpoint_from_disk(tmp_path, capsys):
    torch.manual_seed(3)
    path = tmp_path / "lenet.pth"
    torch.save({"epoch": 2, "state_dict": build_torch_model("lenet5").state_dict()}, path)
    assert main(["--arch", "lenet5", "--weights", str(path), "--batch", "3"]) == 0
    out = capsys.readouterr().out
    assert "unwrapped 'state_dict'" in out and "PASS" in out


@pytest.mark.parametrize("argv,message", [
    (["--arch", "lenet6"], "unknown model 'lenet6'"),
    (["--arch", "resnet18", "--size", "8", "8"], "at least"),
    (["--arch", "lenet5", "--weights", "/nonexistent.pth"], "not found"),
    (["--arch", "lenet5", "--batch", "0"], "--batch"),
    (["--arch", "resnet18", "--size", "32", "32", "--batch", "1", "--no-grads"],
     "one value per channel"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    *progress, err = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("error:") and message in err
    assert all(PROGRESS.match(line) for line in progress), progress  # no traceback


def test_corrupt_and_wrong_arch_checkpoints(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    assert main(["--arch", "lenet5", "--weights", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    other = tmp_path / "mlp.pth"
    torch.save(build_torch_model("mlp").state_dict(), other)
    assert main(["--arch", "lenet5", "--weights", str(other)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "mlp.pth" in err
    assert "Missing key(s)" in err and "conv1.weight" in err  # the keys, not a bare header


def test_module_entry_point_exit_code():
    proc = subprocess.run([sys.executable, "-m", "porting.verify", "--arch", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown model" in proc.stderr


def test_transformer(capsys):
    assert main(["--arch", "transformer", "--size", "4", "3", "--no-grads", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "input src 4x2x512, tgt 3x2x512" in out and "eval outputs" in out
    assert "PASS: transformer" in out
    assert main(["--arch", "transformer", "--size", "0", "3"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --size: transformer's source and target lengths must be >= 1, got 0 3")
    assert main(["--arch", "mlp", "--size", "4", "3"]) == 2
    assert "does not apply" in capsys.readouterr().err


def test_model_args(capsys):
    # Both models are built with the options; a ViT of another image size takes that size.
    assert main(["--arch", "vit_b_32", "--model-arg", "image_size=64", "--no-grads",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "input 2x64x64x3 (NHWC)" in out and "PASS: vit_b_32" in out
    assert main(["--arch", "vit_b_32", "--model-arg", "imag_size=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model-arg: vit_b_32:") and "imag_size" in err
    assert main(["--arch", "transformer", "--model-arg", "d_model=30", "--model-arg",
                 "nhead=4"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --model-arg: embed_dim 30 is not divisible by num_heads 4")


@pytest.mark.parametrize("argv, message", [
    (["--arch", "lenet5", "--size", "40", "40"], "error: lenet5: LeNet5 takes 32x32 images only"),
    (["--arch", "vit_b_32", "--model-arg", "image_size=256", "--size", "224", "224"],
     "error: vit_b_32: VisionTransformer was built for 256x256 images; got 224x224"),
    (["--arch", "transformer", "--model-arg", "batch_first=maybe"],
     "error: --model-arg: transformer's forward pass:"),
])
def test_what_the_model_refuses_is_one_line_before_the_build(argv, message, capsys):
    assert main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err, err


def test_model_args_the_spec_does_not_know(capsys):
    # num_classes among the options (both models take it); a LeNet-5 of 3 channels.
    assert main(["--arch", "lenet5", "--model-arg", "num_classes=3", "--model-arg",
                 "in_channels=3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "input 2x32x32x3 (NHWC)" in out and "PASS" in out
