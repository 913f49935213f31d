"""ResNet, ResNeXt and Wide ResNet, as torchvision defines them (v1.5: stride in the 3x3).

Submodule names follow torchvision (``conv1``, ``bn1``, ``layer1[0].downsample[1]``,
``fc``) so porting is a rename table, not per-model code.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnets.layers import (BatchNorm, Sequential, check_images, conv2d, kaiming_normal_fan_out,
                            linear, max_pool2d)
from jaxnets.registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "ResNet"]


def _conv(cin, cout, k, stride=1, padding=0, *, groups=1, dilation=1, rngs):
    return conv2d(cin, cout, k, stride, padding, groups=groups, dilation=dilation, bias=False,
                  kernel_init=kaiming_normal_fan_out, rngs=rngs)


class BasicBlock(nnx.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, *, rngs: nnx.Rngs):
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and width_per_group=64")
        if dilation > 1:
            raise ValueError("BasicBlock does not support dilation > 1 "
                             "(replace_stride_with_dilation needs a Bottleneck ResNet)")
        self.conv1 = _conv(inplanes, planes, 3, stride, 1, rngs=rngs)
        self.bn1 = BatchNorm(planes)
        self.conv2 = _conv(planes, planes, 3, 1, 1, rngs=rngs)
        self.bn2 = BatchNorm(planes)
        self.downsample = downsample

    def __call__(self, x):
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return jax.nn.relu(out + identity)


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (grouped, strided, dilated), 1x1 expand (ResNet-50 and up)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, *, rngs: nnx.Rngs):
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv(inplanes, width, 1, rngs=rngs)
        self.bn1 = BatchNorm(width)
        self.conv2 = _conv(width, width, 3, stride, dilation, groups=groups, dilation=dilation,
                           rngs=rngs)
        self.bn2 = BatchNorm(width)
        self.conv3 = _conv(width, planes * self.expansion, 1, rngs=rngs)
        self.bn3 = BatchNorm(planes * self.expansion)
        self.downsample = downsample

    def __call__(self, x):
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return jax.nn.relu(out + identity)


class ResNet(nnx.Module):
    """torchvision's ``ResNet`` with its constructor options.

    Args:
      block: ``BasicBlock`` or ``Bottleneck``.
      layers: blocks per stage.
      num_classes: classifier outputs.
      zero_init_residual: zero the last BatchNorm scale of each block.
      groups: convolution groups in the 3x3 (ResNeXt).
      width_per_group: base width per group (ResNeXt, Wide ResNet).
      replace_stride_with_dilation: three booleans, one per stage 2-4.
      in_channels: input channels.
      cifar_stem: 3x3 stride-1 first convolution and no max-pool, for 32x32 inputs.
      rngs: random generators.
    """

    def __init__(self, block, layers: Sequence[int], num_classes: int = 1000, *,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Sequence[bool] | None = None,
                 in_channels: int = 3, cifar_stem: bool = False, rngs: nnx.Rngs):
        self.inplanes = 64
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group
        self.in_channels = in_channels
        self.cifar_stem = cifar_stem
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element "
                             f"sequence, got {replace_stride_with_dilation!r}")
        if cifar_stem:
            self.conv1 = _conv(in_channels, 64, 3, 1, 1, rngs=rngs)
        else:
            self.conv1 = _conv(in_channels, 64, 7, 2, 3, rngs=rngs)
        self.bn1 = BatchNorm(64)
        self.layer1 = self._make_layer(block, 64, layers[0], rngs=rngs)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, replace_stride_with_dilation[0],
                                       rngs=rngs)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, replace_stride_with_dilation[1],
                                       rngs=rngs)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, replace_stride_with_dilation[2],
                                       rngs=rngs)
        self.fc = linear(512 * block.expansion, num_classes, rngs=rngs)
        if zero_init_residual:
            for _, m in nnx.iter_graph(self):
                if isinstance(m, Bottleneck):
                    m.bn3.scale.set_value(jnp.zeros_like(m.bn3.scale[...]))
                elif isinstance(m, BasicBlock):
                    m.bn2.scale.set_value(jnp.zeros_like(m.bn2.scale[...]))

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False, *, rngs):
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = Sequential([
                _conv(self.inplanes, planes * block.expansion, 1, stride, rngs=rngs),
                BatchNorm(planes * block.expansion),
            ])
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, rngs=rngs)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation, rngs=rngs))
        return Sequential(layers)

    def features(self, x):
        """Pooled penultimate features, (N, 512 * expansion)."""
        check_images(x, self.in_channels, type(self).__name__)
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        if not self.cifar_stem:
            x = max_pool2d(x, 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, x):
        return self.fc(self.features(x))


_image = functools.partial(register_model, kind="image", head=r"^fc\.")


def _resnet(block, layers, *, num_classes=1000, rngs, **kwargs):
    return ResNet(block, layers, num_classes, rngs=rngs, **kwargs)


@_image()
def resnet18(**kw):
    return _resnet(BasicBlock, (2, 2, 2, 2), **kw)


@_image()
def resnet34(**kw):
    return _resnet(BasicBlock, (3, 4, 6, 3), **kw)


@_image()
def resnet50(**kw):
    return _resnet(Bottleneck, (3, 4, 6, 3), **kw)


@_image()
def resnet101(**kw):
    return _resnet(Bottleneck, (3, 4, 23, 3), **kw)


@_image()
def resnet152(**kw):
    return _resnet(Bottleneck, (3, 8, 36, 3), **kw)


@_image()
def resnext50_32x4d(**kw):
    return _resnet(Bottleneck, (3, 4, 6, 3), groups=32, width_per_group=4, **kw)


@_image()
def resnext101_32x8d(**kw):
    return _resnet(Bottleneck, (3, 4, 23, 3), groups=32, width_per_group=8, **kw)


@_image()
def resnext101_64x4d(**kw):
    return _resnet(Bottleneck, (3, 4, 23, 3), groups=64, width_per_group=4, **kw)


@_image()
def wide_resnet50_2(**kw):
    return _resnet(Bottleneck, (3, 4, 6, 3), width_per_group=128, **kw)


@_image()
def wide_resnet101_2(**kw):
    return _resnet(Bottleneck, (3, 4, 23, 3), width_per_group=128, **kw)


@_image(input_size=(32, 32), num_classes=10, min_size=(8, 8),
        torch_reference="porting.reference:resnet18_cifar")
def resnet18_cifar(**kw):
    return _resnet(BasicBlock, (2, 2, 2, 2), cifar_stem=True, **kw)
