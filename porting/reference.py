"""The PyTorch reference for every registered model (needs the ``torch`` extra).

torchvision models come from ``torchvision.models.get_model``; models
torchvision does not have (``lenet5``, ``mlp``, ``resnet18_cifar``) are
written here in plain torch, the way people write them.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

import jaxnets

__all__ = ["build_torch_model", "LeNet5", "MLP", "resnet18_cifar", "lenet5", "mlp"]


class LeNet5(nn.Module):
    """The classic LeNet-5 with ReLU and max-pooling, 32x32 inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class MLP(nn.Module):
    """Linear-ReLU-Linear."""

    def __init__(self, in_features: int = 784, hidden: int = 256, num_classes: int = 10):
        super().__init__()
        self.in_features = in_features
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def lenet5(num_classes: int = 10, **kw) -> nn.Module:
    return LeNet5(num_classes, **kw)


def mlp(num_classes: int = 10, **kw) -> nn.Module:
    return MLP(num_classes=num_classes, **kw)


def resnet18_cifar(num_classes: int = 10, **kw) -> nn.Module:
    """torchvision's resnet18 with a 3x3 stride-1 stem and no max-pool."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=num_classes, **kw)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def build_torch_model(name: str, num_classes: int | None = None, **overrides: Any) -> nn.Module:
    """The torch counterpart of ``jaxnets.create_model(name, ...)``.

    Args:
      name: registry name.
      num_classes: classifier outputs; the spec's default when None.
      **overrides: the same constructor options as for the jaxnets model.

    Returns:
      A freshly initialised torch module in training mode.
    """
    spec = jaxnets.get_spec(name)
    kwargs = dict(overrides)
    if spec.kind != "sequence" or num_classes is not None:
        kwargs["num_classes"] = spec.num_classes if num_classes is None else num_classes
    if spec.torch_reference == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kwargs)
    module, _, fn = spec.torch_reference.partition(":")
    return getattr(importlib.import_module(module), fn)(**kwargs)


def transformer(**kw) -> nn.Module:
    """``torch.nn.Transformer`` with the given options (torch's defaults otherwise)."""
    import warnings

    with warnings.catch_warnings():
        # Its encoder's nested-tensor fast path (inference only) does not apply to
        # sequence-first layers: torch warns at every build.
        warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
        return nn.Transformer(**kw)
