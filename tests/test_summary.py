"""python -m jaxnets.summary: per-layer rows and totals."""

import re

from jaxnets.summary import main, summarize


def test_rows_in_call_order_with_shapes_and_params():
    rows, total = summarize("lenet5")
    paths = [r.path for r in rows]
    assert paths == ["(model)", "conv1", "conv2", "fc1", "fc2", "fc3"]
    by_path = {r.path: r for r in rows}
    assert by_path["conv1"].output_shape == "[1, 28, 28, 6]"
    assert by_path["fc1"].params == 400 * 120 + 120
    assert sum(r.params for r in rows) == total == 61706


def test_size_changes_shapes_not_params():
    rows, total = summarize("resnet18", size=(160, 192))
    by_path = {r.path: r for r in rows}
    assert by_path["layer4"].output_shape == "[1, 5, 6, 512]"
    assert by_path["fc"].output_shape == "[1, 1000]"
    assert total == 11689512


def test_cli_prints_table_and_total(capsys):
    assert main(["resnet18_cifar", "--num-classes", "100"]) == 0
    out = capsys.readouterr().out
    total = int(re.search(r"Total params: ([\d,]+)", out).group(1).replace(",", ""))
    assert total == 11220132  # torchvision resnet18 with a 3x3 stem and a 100-way head
    assert "layer1.0.conv1" in out


def test_cli_errors(capsys):
    assert main(["resnet"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["mlp", "--size", "3", "3"]) == 2
    assert "--size" in capsys.readouterr().err


def test_arguments_a_notebook_user_would_pass():
    import pytest

    import jaxnets

    with pytest.raises(TypeError, match="registered model's name .* not a LeNet5"):
        summarize(jaxnets.create_model("lenet5"))
    import numpy as np

    rows, _ = summarize("resnet18", size=np.int64(64))
    assert {r.path: r for r in rows}["layer4"].output_shape == "[1, 2, 2, 512]"


def test_cli_refuses_sizes_below_the_models_minimum(capsys):
    # XLA would shrink AlexNet's maps to nothing (a [1, 0, 0, 256] row) and go on.
    assert main(["alexnet", "--size", "32", "32"]) == 2
    assert "at least 63x63; got 32x32" in capsys.readouterr().err
