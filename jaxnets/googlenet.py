"""GoogLeNet (Inception v1), as torchvision defines it.

torchvision's quirks are kept, since its checkpoints depend on them: the "5x5"
branch is a 3x3 convolution (pytorch/vision#906), max-pools use
``ceil_mode=True``, every convolution is followed by BatchNorm with eps=1e-3,
and the two auxiliary heads (``aux1`` after ``inception4a``, ``aux2`` after
``inception4d``) only run in training mode.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnets.layers import (BatchNorm, Sequential, adaptive_avg_pool2d, check_images, conv2d,
                            dropout_layer, linear, max_pool2d, normal_init)
from jaxnets.registry import register_model

__all__ = ["BasicConv2d", "Inception", "InceptionAux", "GoogLeNet", "GoogLeNetOutputs",
           "transform_input"]


class GoogLeNetOutputs(NamedTuple):
    """Training-mode outputs, in torchvision's order."""

    logits: jax.Array
    aux_logits2: jax.Array
    aux_logits1: jax.Array


def transform_input(x: jax.Array) -> jax.Array:
    """torchvision's ``transform_input``: ImageNet-normalised input -> the (x - 0.5) / 0.5 scaling.

    The ported Google weights expect inputs in [-1, 1]; this maps an input
    normalised with the ImageNet mean/std to that range, channel by channel.

    Args:
      x: (N, H, W, 3) images normalised with the ImageNet mean and std.

    Returns:
      The rescaled images.
    """
    scale = jnp.asarray([0.229 / 0.5, 0.224 / 0.5, 0.225 / 0.5], x.dtype)
    shift = jnp.asarray([(0.485 - 0.5) / 0.5, (0.456 - 0.5) / 0.5, (0.406 - 0.5) / 0.5], x.dtype)
    return x * scale + shift


class BasicConv2d(nnx.Module):
    """Convolution without bias, BatchNorm (eps=1e-3), ReLU: torchvision's ``BasicConv2d``.

    Args:
      in_channels: input channels.
      out_channels: output channels.
      kernel_size: kernel size (int or (h, w)).
      stride: stride.
      padding: symmetric zero padding (int or (h, w)).
      kernel_init: convolution initializer; torch's default when None.
      rngs: random generators.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, *,
                 kernel_init=None, rngs: nnx.Rngs):
        self.conv = conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False,
                           kernel_init=kernel_init, rngs=rngs)
        self.bn = BatchNorm(out_channels, eps=0.001)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


class Inception(nnx.Module):
    """The four-branch Inception block of GoogLeNet; outputs are concatenated on channels."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int,
                 ch5x5: int, pool_proj: int, *, kernel_init=None, rngs: nnx.Rngs):
        conv = functools.partial(BasicConv2d, kernel_init=kernel_init, rngs=rngs)
        self.branch1 = conv(in_channels, ch1x1, 1)
        self.branch2 = Sequential([conv(in_channels, ch3x3red, 1), conv(ch3x3red, ch3x3, 3, 1, 1)])
        # torchvision's "5x5" branch is 3x3; its checkpoints have 3x3 kernels here.
        self.branch3 = Sequential([conv(in_channels, ch5x5red, 1), conv(ch5x5red, ch5x5, 3, 1, 1)])
        self.branch4 = Sequential([
            functools.partial(max_pool2d, kernel_size=3, stride=1, padding=1, ceil_mode=True),
            conv(in_channels, pool_proj, 1),
        ])

    def __call__(self, x):
        return jnp.concatenate(
            [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], axis=-1)


class InceptionAux(nnx.Module):
    """An auxiliary classifier: adaptive 4x4 average pool, 1x1 conv, fc-ReLU-dropout-fc."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.7, *,
                 kernel_init=None, rngs: nnx.Rngs):
        self.conv = BasicConv2d(in_channels, 128, 1, kernel_init=kernel_init, rngs=rngs)
        self.fc1 = linear(2048, 1024, kernel_init=kernel_init, rngs=rngs)
        self.fc2 = linear(1024, num_classes, kernel_init=kernel_init, rngs=rngs)
        self.dropout = dropout_layer(dropout, rngs=rngs)

    def __call__(self, x):
        x = self.conv(adaptive_avg_pool2d(x, (4, 4)))
        # torch flattens NCHW; transposing here lets fc1 load unchanged.
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
        return self.fc2(self.dropout(jax.nn.relu(self.fc1(x))))


class GoogLeNet(nnx.Module):
    """torchvision's ``GoogLeNet`` on NHWC input.

    In training mode (``model.train()``, the state ``create_model`` returns)
    with ``aux_logits`` the call returns ``GoogLeNetOutputs(logits,
    aux_logits2, aux_logits1)``; otherwise just the logits, as in torch.

    Args:
      num_classes: classifier outputs.
      aux_logits: build the two auxiliary classifiers ``aux1``/``aux2``.
      transform_input: rescale ImageNet-normalised input to [-1, 1] first
        (what the ported Google weights expect).
      init_weights: torchvision's init (N(0, 0.01) for every conv and linear
        weight, truncated at +-2); torch's default init when False. None means True.
      dropout: dropout rate before ``fc``.
      dropout_aux: dropout rate in the auxiliary classifiers.
      rngs: random generators; the ``dropout`` stream (or the default one)
        drives dropout in training mode.

    Attributes:
      deterministic: eval mode when True (set by ``model.eval()``/``model.train()``
        like the dropout layers' flag); the auxiliary heads run only when False.
    """

    # Below this, a feature map shrinks to nothing (torch: "Output size is too small").
    MIN_SIZE = (15, 15)

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True,
                 transform_input: bool = False, init_weights: bool | None = None,
                 dropout: float = 0.2, dropout_aux: float = 0.7, *, rngs: nnx.Rngs):
        init_weights = True if init_weights is None else init_weights
        # trunc_normal_(std=0.01, a=-2, b=2) truncates at 200 sigma: a plain normal.
        k = normal_init(0.01) if init_weights else None
        conv = functools.partial(BasicConv2d, kernel_init=k, rngs=rngs)
        block = functools.partial(Inception, kernel_init=k, rngs=rngs)
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self.deterministic = False
        self.conv1 = conv(3, 64, 7, 2, 3)
        self.conv2 = conv(64, 64, 1)
        self.conv3 = conv(64, 192, 3, 1, 1)
        self.inception3a = block(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = block(256, 128, 128, 192, 32, 96, 64)
        self.inception4a = block(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = block(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = block(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = block(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = block(528, 256, 160, 320, 32, 128, 128)
        self.inception5a = block(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = block(832, 384, 192, 384, 48, 128, 128)
        if aux_logits:
            self.aux1 = InceptionAux(512, num_classes, dropout_aux, kernel_init=k, rngs=rngs)
            self.aux2 = InceptionAux(528, num_classes, dropout_aux, kernel_init=k, rngs=rngs)
        else:
            self.aux1 = self.aux2 = None
        self.dropout = dropout_layer(dropout, rngs=rngs)
        self.fc = linear(1024, num_classes, kernel_init=k, rngs=rngs)

    def _forward(self, x, with_aux: bool):
        check_images(x, 3, "GoogLeNet", min_size=self.MIN_SIZE)
        if self.transform_input:
            x = transform_input(x)
        pool = functools.partial(max_pool2d, kernel_size=3, stride=2, ceil_mode=True)
        x = pool(self.conv1(x))
        x = pool(self.conv3(self.conv2(x)))
        x = pool(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        run_aux = with_aux and self.aux_logits and not self.deterministic
        aux1 = self.aux1(x) if run_aux else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if run_aux else None
        x = max_pool2d(self.inception4e(x), 2, 2, ceil_mode=True)
        x = self.inception5b(self.inception5a(x))
        return jnp.mean(x, axis=(1, 2)), aux2, aux1

    def features(self, x):
        """The pooled penultimate features (the input of ``fc``).

        Args:
          x: (N, H, W, 3) images, H and W at least 15.

        Returns:
          (N, 1024) features.
        """
        return self._forward(x, with_aux=False)[0]

    def __call__(self, x):
        x, aux2, aux1 = self._forward(x, with_aux=True)
        logits = self.fc(self.dropout(x))
        if aux1 is not None:
            return GoogLeNetOutputs(logits, aux2, aux1)
        return logits


@register_model(kind="image", input_size=(224, 224), head=r"^fc\.", min_size=GoogLeNet.MIN_SIZE)
def googlenet(*, num_classes=1000, rngs, **kw):
    return GoogLeNet(num_classes, rngs=rngs, **kw)
