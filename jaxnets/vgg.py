"""VGG 11/13/16/19, with and without BatchNorm, as torchvision defines them.

The variants are rows of ``CFGS`` (torchvision's table: channel counts and
``"M"`` for a 2x2 max-pool). ``features`` is built like torchvision's
``make_layers`` so its ``nn.Sequential`` indices (``features.0``,
``features.1`` for the BatchNorm of ``_bn`` models...) match torch's keys.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnets.layers import (BatchNorm, Sequential, adaptive_avg_pool2d, check_images, conv2d,
                            dropout_layer, kaiming_normal_fan_out, linear, max_pool2d)
from jaxnets.registry import register_model

__all__ = ["VGG", "CFGS", "make_layers"]

CFGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512,
          512, 512, "M"),
}

_zeros = nnx.initializers.zeros_init()
_linear_init = nnx.initializers.normal(0.01)


def make_layers(cfg: Sequence[int | str], batch_norm: bool = False, *, in_channels: int = 3,
                init_weights: bool = True, rngs: nnx.Rngs) -> Sequential:
    """torchvision's ``make_layers``: 3x3 convolutions (+BatchNorm) + ReLU, ``"M"`` max-pools.

    Args:
      cfg: a row of ``CFGS``.
      batch_norm: add a BatchNorm after each convolution.
      in_channels: input channels.
      init_weights: torchvision's VGG init (Kaiming fan-out, zero bias); torch's
        default init otherwise.
      rngs: random generators.

    Returns:
      The ``features`` Sequential.
    """
    layers = []
    for v in cfg:
        if v == "M":
            layers.append(functools.partial(max_pool2d, kernel_size=2, stride=2))
            continue
        conv = conv2d(in_channels, v, 3, 1, 1, rngs=rngs,
                      kernel_init=kaiming_normal_fan_out if init_weights else None)
        if init_weights:
            conv.bias.set_value(jnp.zeros_like(conv.bias[...]))
        layers += [conv, BatchNorm(v), jax.nn.relu] if batch_norm else [conv, jax.nn.relu]
        in_channels = v
    return Sequential(layers)


class VGG(nnx.Module):
    """torchvision's ``VGG`` on NHWC input.

    Args:
      features: the convolutional part, from ``make_layers``.
      num_classes: classifier outputs.
      init_weights: torchvision's init (Kaiming fan-out convolutions, N(0, 0.01)
        linear weights, zero biases); torch's default init otherwise.
      dropout: dropout rate after each hidden fully connected layer.
      in_channels: input channels (must match ``features``).
      rngs: random generators; the ``dropout`` stream (or the default one)
        drives dropout in training mode.
    """

    # Below this, a feature map shrinks to nothing (torch: "Output size is too small").
    MIN_SIZE = (32, 32)

    def __init__(self, features: Sequential, num_classes: int = 1000, init_weights: bool = True,
                 dropout: float = 0.5, *, in_channels: int = 3, rngs: nnx.Rngs):
        self.in_channels = in_channels
        self.features = features
        init = dict(kernel_init=_linear_init, bias_init=_zeros) if init_weights else {}
        self.classifier = Sequential([
            linear(512 * 7 * 7, 4096, rngs=rngs, **init), jax.nn.relu,
            dropout_layer(dropout, rngs=rngs),
            linear(4096, 4096, rngs=rngs, **init), jax.nn.relu,
            dropout_layer(dropout, rngs=rngs),
            linear(4096, num_classes, rngs=rngs, **init),
        ])

    def forward_features(self, x):
        """The classifier's input: pooled conv features flattened in torch's (C, 7, 7) order.

        (``features`` is the convolutional ``Sequential``, as in torchvision.)

        Args:
          x: (N, H, W, C) images, H and W at least 32.

        Returns:
          (N, 25088) features.
        """
        check_images(x, self.in_channels, "VGG", min_size=self.MIN_SIZE)
        x = adaptive_avg_pool2d(self.features(x), (7, 7))
        # torch flattens NCHW; transposing here lets classifier.0 load unchanged.
        return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)

    def __call__(self, x):
        return self.classifier(self.forward_features(x))


def _vgg(cfg: str, batch_norm: bool, *, num_classes=1000, init_weights=True, dropout=0.5,
         in_channels=3, rngs):
    features = make_layers(CFGS[cfg], batch_norm, in_channels=in_channels,
                           init_weights=init_weights, rngs=rngs)
    return VGG(features, num_classes, init_weights, dropout, in_channels=in_channels, rngs=rngs)


_image = functools.partial(register_model, kind="image", input_size=(224, 224),
                           head=r"^classifier\.6\.", min_size=VGG.MIN_SIZE)


@_image()
def vgg11(**kw):
    return _vgg("A", False, **kw)


@_image()
def vgg11_bn(**kw):
    return _vgg("A", True, **kw)


@_image()
def vgg13(**kw):
    return _vgg("B", False, **kw)


@_image()
def vgg13_bn(**kw):
    return _vgg("B", True, **kw)


@_image()
def vgg16(**kw):
    return _vgg("D", False, **kw)


@_image()
def vgg16_bn(**kw):
    return _vgg("D", True, **kw)


@_image()
def vgg19(**kw):
    return _vgg("E", False, **kw)


@_image()
def vgg19_bn(**kw):
    return _vgg("E", True, **kw)
