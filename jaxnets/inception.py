"""Inception v3, as torchvision defines it (``Inception3``).

Names follow torchvision (``Conv2d_1a_3x3``, ``Mixed_5b.branch5x5_1``,
``AuxLogits.conv1``...). The 3x3 average pools inside the blocks are torch's
``F.avg_pool2d(x, 3, 1, 1)``, which counts the zero padding in the divisor;
the auxiliary head (``AuxLogits``, after ``Mixed_6e``) only runs in training mode.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnets.googlenet import BasicConv2d, transform_input
from jaxnets.layers import (avg_pool2d, check_images, dropout_layer, linear, max_pool2d,
                            normal_init)
from jaxnets.registry import register_model

__all__ = ["Inception3", "InceptionOutputs", "InceptionA", "InceptionB", "InceptionC",
           "InceptionD", "InceptionE", "InceptionAux"]


class InceptionOutputs(NamedTuple):
    """Training-mode outputs, in torchvision's order."""

    logits: jax.Array
    aux_logits: jax.Array


def _pool3(x):
    # torch's default count_include_pad=True: border windows divide by 9.
    return avg_pool2d(x, 3, 1, 1, count_include_pad=True)


def _cat(*xs):
    return jnp.concatenate(xs, axis=-1)


class InceptionA(nnx.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, in_channels: int, pool_features: int, *, conv):
        self.branch1x1 = conv(in_channels, 64, 1)
        self.branch5x5_1 = conv(in_channels, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(in_channels, pool_features, 1)

    def __call__(self, x):
        return _cat(self.branch1x1(x),
                    self.branch5x5_2(self.branch5x5_1(x)),
                    self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    self.branch_pool(_pool3(x)))


class InceptionB(nnx.Module):
    """35x35 -> 17x17 reduction."""

    def __init__(self, in_channels: int, *, conv):
        self.branch3x3 = conv(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x):
        return _cat(self.branch3x3(x),
                    self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    max_pool2d(x, 3, 2))


class InceptionC(nnx.Module):
    """17x17 block with factorised 1x7 / 7x1 convolutions."""

    def __init__(self, in_channels: int, channels_7x7: int, *, conv):
        c7 = channels_7x7
        self.branch1x1 = conv(in_channels, 192, 1)
        self.branch7x7_1 = conv(in_channels, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(in_channels, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(in_channels, 192, 1)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(bd))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        return _cat(self.branch1x1(x), b7, bd, self.branch_pool(_pool3(x)))


class InceptionD(nnx.Module):
    """17x17 -> 8x8 reduction."""

    def __init__(self, in_channels: int, *, conv):
        self.branch3x3_1 = conv(in_channels, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(in_channels, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x):
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(b7))
        return _cat(self.branch3x3_2(self.branch3x3_1(x)), b7, max_pool2d(x, 3, 2))


class InceptionE(nnx.Module):
    """8x8 block with split 1x3 / 3x1 branches."""

    def __init__(self, in_channels: int, *, conv):
        self.branch1x1 = conv(in_channels, 320, 1)
        self.branch3x3_1 = conv(in_channels, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(in_channels, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(in_channels, 192, 1)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return _cat(self.branch1x1(x),
                    self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                    self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                    self.branch_pool(_pool3(x)))


class InceptionAux(nnx.Module):
    """The auxiliary classifier: 5x5/3 average pool, 1x1 and 5x5 convs, global pool, fc."""

    def __init__(self, in_channels: int, num_classes: int, *, conv, init_weights: bool,
                 rngs: nnx.Rngs):
        normal = normal_init
        self.conv0 = conv(in_channels, 128, 1)
        self.conv1 = conv(128, 768, 5, kernel_init=normal(0.01) if init_weights else None)
        self.fc = linear(768, num_classes, kernel_init=normal(0.001) if init_weights else None,
                         rngs=rngs)

    def __call__(self, x):
        if min(x.shape[1:3]) < 17:  # conv1's 5x5 kernel needs the pool's 5x5 output
            raise ValueError(
                f"Inception v3's auxiliary classifier needs Mixed_6e maps of at least 17x17 "
                f"(inputs of 299x299 and up), got {x.shape[1]}x{x.shape[2]}; build the model "
                "with aux_logits=False (on the command line: --model-arg aux_logits=False) "
                "to train on smaller inputs")
        x = self.conv1(self.conv0(avg_pool2d(x, 5, 3)))
        return self.fc(jnp.mean(x, axis=(1, 2)))


class Inception3(nnx.Module):
    """torchvision's ``Inception3`` on NHWC input (299x299 by default).

    In training mode (``model.train()``, the state ``create_model`` returns)
    with ``aux_logits`` the call returns ``InceptionOutputs(logits,
    aux_logits)``; otherwise just the logits, as in torch. Training with the
    auxiliary head needs ``Mixed_6e`` outputs of at least 17x17 (inputs of 299 and
    up; smaller ones raise a ``ValueError``, as torch's 5x5 ``conv1`` does).

    Args:
      num_classes: classifier outputs.
      aux_logits: build the auxiliary classifier ``AuxLogits``.
      transform_input: rescale ImageNet-normalised input to [-1, 1] first
        (what the ported Google weights expect).
      init_weights: torchvision's init (N(0, 0.1) weights, N(0, 0.01) for
        ``AuxLogits.conv1``, N(0, 0.001) for ``AuxLogits.fc``); torch's default
        init when False. None means True.
      dropout: dropout rate before ``fc``.
      rngs: random generators; the ``dropout`` stream (or the default one)
        drives dropout in training mode.

    Attributes:
      deterministic: eval mode when True (set by ``model.eval()``/``model.train()``
        like the dropout layers' flag); the auxiliary head runs only when False.
    """

    # Below this, a feature map shrinks to nothing (torch: "Output size is too small").
    MIN_SIZE = (75, 75)

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True,
                 transform_input: bool = False, init_weights: bool | None = None,
                 dropout: float = 0.5, *, rngs: nnx.Rngs):
        init_weights = True if init_weights is None else init_weights
        # trunc_normal_(std, a=-2, b=2) truncates at >= 20 sigma: a plain normal.
        k = normal_init(0.1) if init_weights else None

        def conv(cin, cout, kernel_size, stride=1, padding=0, kernel_init=k):
            return BasicConv2d(cin, cout, kernel_size, stride, padding, kernel_init=kernel_init,
                               rngs=rngs)

        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self.deterministic = False
        self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, 3)
        self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, 1)
        self.Conv2d_4a_3x3 = conv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, conv=conv)
        self.Mixed_5c = InceptionA(256, 64, conv=conv)
        self.Mixed_5d = InceptionA(288, 64, conv=conv)
        self.Mixed_6a = InceptionB(288, conv=conv)
        self.Mixed_6b = InceptionC(768, 128, conv=conv)
        self.Mixed_6c = InceptionC(768, 160, conv=conv)
        self.Mixed_6d = InceptionC(768, 160, conv=conv)
        self.Mixed_6e = InceptionC(768, 192, conv=conv)
        self.AuxLogits = (InceptionAux(768, num_classes, conv=conv, init_weights=init_weights,
                                       rngs=rngs) if aux_logits else None)
        self.Mixed_7a = InceptionD(768, conv=conv)
        self.Mixed_7b = InceptionE(1280, conv=conv)
        self.Mixed_7c = InceptionE(2048, conv=conv)
        self.dropout = dropout_layer(dropout, rngs=rngs)
        self.fc = linear(2048, num_classes, kernel_init=k, rngs=rngs)

    def _forward(self, x, with_aux: bool):
        check_images(x, 3, "Inception3", min_size=self.MIN_SIZE)
        if self.transform_input:
            x = transform_input(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool2d(x, 3, 2)
        x = max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        run_aux = with_aux and self.aux_logits and not self.deterministic
        aux = self.AuxLogits(x) if run_aux else None
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return jnp.mean(x, axis=(1, 2)), aux

    def features(self, x):
        """The pooled penultimate features (the input of ``fc``).

        Args:
          x: (N, H, W, 3) images, H and W at least 75.

        Returns:
          (N, 2048) features.
        """
        return self._forward(x, with_aux=False)[0]

    def __call__(self, x):
        x, aux = self._forward(x, with_aux=True)
        logits = self.fc(self.dropout(x))
        if aux is not None:
            return InceptionOutputs(logits, aux)
        return logits


@register_model(kind="image", input_size=(299, 299), head=r"^fc\.", min_size=Inception3.MIN_SIZE)
def inception_v3(*, num_classes=1000, rngs, **kw):
    return Inception3(num_classes, rngs=rngs, **kw)
