"""python -m porting.verify: PASS/FAIL and exit codes, clear errors on bad input."""

import subprocess
import sys

import pytest
import torch

from porting.reference import build_torch_model
from porting.verify import main


def test_random_model_passes(capsys):
    assert main(["--arch", "lenet5"]) == 0
    out = capsys.readouterr().out
    assert "PASS: lenet5" in out and "eval logits" in out and "grads fp64" in out


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
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1


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
