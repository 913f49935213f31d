"""LeNet-5 and a one-hidden-layer MLP: the small models for quick runs and tests."""

from __future__ import annotations

import jax
from flax import nnx

from jaxnets.layers import check_images, conv2d, linear, max_pool2d
from jaxnets.registry import register_model

__all__ = ["LeNet5", "MLP"]


class LeNet5(nnx.Module):
    """conv 6@5x5, max-pool, conv 16@5x5, max-pool, fc 120-84-classes, ReLU.

    Takes (N, 32, 32, C) images. The features are flattened in torch's NCHW
    order so a torch state_dict loads without permuting ``fc1``.
    """

    # The one size it takes: fc1 reads 16 maps of 5x5.
    MIN_SIZE = (32, 32)

    def __init__(self, num_classes: int = 10, *, in_channels: int = 1, rngs: nnx.Rngs):
        self.in_channels = in_channels
        self.conv1 = conv2d(in_channels, 6, 5, rngs=rngs)
        self.conv2 = conv2d(6, 16, 5, rngs=rngs)
        self.fc1 = linear(16 * 5 * 5, 120, rngs=rngs)
        self.fc2 = linear(120, 84, rngs=rngs)
        self.fc3 = linear(84, num_classes, rngs=rngs)

    def features(self, x):
        """The 84-wide penultimate features."""
        mnist = tuple(getattr(x, "shape", ())[1:3]) == (28, 28)
        check_images(x, self.in_channels, "LeNet5", min_size=self.MIN_SIZE, exact=True,
                     hint=" (pad 28x28 MNIST digits by 2 pixels on each side)" if mnist else "")
        x = max_pool2d(jax.nn.relu(self.conv1(x)), 2)
        x = max_pool2d(jax.nn.relu(self.conv2(x)), 2)
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
        return jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x))))

    def __call__(self, x):
        return self.fc3(self.features(x))


class MLP(nnx.Module):
    """Linear-ReLU-Linear. Inputs of any shape (N, ...) are flattened (row-major)."""

    def __init__(self, in_features: int = 784, hidden: int = 256, num_classes: int = 10, *,
                 rngs: nnx.Rngs):
        self.in_features = in_features
        self.fc1 = linear(in_features, hidden, rngs=rngs)
        self.fc2 = linear(hidden, num_classes, rngs=rngs)

    def features(self, x):
        """The hidden activations."""
        if x.ndim < 2:
            raise ValueError(f"MLP expects a batch (N, {self.in_features}); got shape {x.shape}")
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"MLP expects {self.in_features} input features; got {x.shape[1]}")
        return jax.nn.relu(self.fc1(x))

    def __call__(self, x):
        return self.fc2(self.features(x))


@register_model(input_size=(32, 32), in_channels=1, num_classes=10, head=r"^fc3\.",
                min_size=LeNet5.MIN_SIZE, torch_reference="porting.reference:lenet5")
def lenet5(*, num_classes=10, rngs, **kw):
    return LeNet5(num_classes, rngs=rngs, **kw)


@register_model(kind="vector", input_size=(784,), in_channels=1, num_classes=10,
                head=r"^fc2\.", torch_reference="porting.reference:mlp")
def mlp(*, num_classes=10, in_features=784, hidden=256, rngs, **kw):
    return MLP(in_features, hidden, num_classes, rngs=rngs, **kw)
