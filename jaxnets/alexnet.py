"""AlexNet, as torchvision defines it (the "one weird trick" variant, 64-192-384-256-256).

Submodule indices follow torchvision's ``nn.Sequential``s, parameter-free layers
(ReLU, max-pool) included, so ``features.3.weight`` and ``classifier.6.weight``
port by the default rules.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from jaxnets.layers import (Sequential, adaptive_avg_pool2d, check_images, conv2d,
                            dropout_layer, linear, max_pool2d)
from jaxnets.registry import register_model

__all__ = ["AlexNet"]


class AlexNet(nnx.Module):
    """torchvision's ``AlexNet`` on NHWC input.

    Args:
      num_classes: classifier outputs.
      dropout: dropout rate before each of the two hidden fully connected layers.
      in_channels: input channels.
      rngs: random generators; the ``dropout`` stream (or the default one)
        drives dropout in training mode.
    """

    # Below this, a feature map shrinks to nothing (torch: "Output size is too small").
    MIN_SIZE = (63, 63)

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, *, in_channels: int = 3,
                 rngs: nnx.Rngs):
        self.in_channels = in_channels
        pool = functools.partial(max_pool2d, kernel_size=3, stride=2)
        relu = jax.nn.relu
        self.features = Sequential([
            conv2d(in_channels, 64, 11, 4, 2, rngs=rngs), relu, pool,
            conv2d(64, 192, 5, 1, 2, rngs=rngs), relu, pool,
            conv2d(192, 384, 3, 1, 1, rngs=rngs), relu,
            conv2d(384, 256, 3, 1, 1, rngs=rngs), relu,
            conv2d(256, 256, 3, 1, 1, rngs=rngs), relu, pool,
        ])
        self.classifier = Sequential([
            dropout_layer(dropout, rngs=rngs),
            linear(256 * 6 * 6, 4096, rngs=rngs), relu,
            dropout_layer(dropout, rngs=rngs),
            linear(4096, 4096, rngs=rngs), relu,
            linear(4096, num_classes, rngs=rngs),
        ])

    def forward_features(self, x):
        """The classifier's input: pooled conv features flattened in torch's (C, 6, 6) order.

        (``features`` is the convolutional ``Sequential``, as in torchvision.)

        Args:
          x: (N, H, W, C) images, H and W at least 63.

        Returns:
          (N, 9216) features.
        """
        check_images(x, self.in_channels, "AlexNet", min_size=self.MIN_SIZE)
        x = adaptive_avg_pool2d(self.features(x), (6, 6))
        # torch flattens NCHW; transposing here lets classifier.1 load unchanged.
        return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)

    def __call__(self, x):
        return self.classifier(self.forward_features(x))


@register_model(kind="image", input_size=(224, 224), head=r"^classifier\.6\.",
                min_size=AlexNet.MIN_SIZE)
def alexnet(*, num_classes=1000, rngs, **kw):
    return AlexNet(num_classes, rngs=rngs, **kw)
