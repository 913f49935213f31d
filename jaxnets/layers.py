"""Layers with PyTorch semantics, NHWC.

Flax's own layers differ from torch's in small ways that break a port: BatchNorm
updates its running variance with the biased estimate and counts momentum the
other way round, pooling has no ``ceil_mode`` and ``'SAME'`` padding is
asymmetric at stride 2. Everything a model needs to compute exactly what the
torch model computes lives here, so each difference is handled once.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "BatchNorm",
    "draw_flat",
    "kaiming_normal_fan_out",
    "normal_init",
    "Sequential",
    "conv2d",
    "linear",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "check_images",
    "cpu_detours",
    "fusion_barrier",
    "kaiming_normal_fan_out",
    "dropout_layer",
    "torch_default_init",
]


_CPU_DETOURS = True


@contextlib.contextmanager
def cpu_detours(enabled: bool) -> Iterator[None]:
    """Turn this module's CPU detours on or off for what is traced inside.

    On CPU, the convolutions, dense layers, attention, max-pools and fusion
    barriers here take forms that XLA:CPU runs faster than ``lax``'s own (each
    function's docstring says which and why). On GPU and TPU they are ``lax``'s
    and ``jax.nn``'s plain operations. ``cpu_detours(False)`` makes CPU trace
    those accelerator forms too, so the path a GPU or TPU runs can be checked
    against torch on a machine without one (``python -m porting.verify
    --no-cpu-detours``). The choice is made when a function is traced, and
    jax's caches of traced and compiled functions do not know of it, so
    entering and leaving clear them (``jax.clear_caches``) when the setting
    changes: nothing traced under one setting is reused under the other.

    Args:
      enabled: False for the accelerator forms.
    """
    before = _CPU_DETOURS
    _set_cpu_detours(bool(enabled))
    try:
        yield
    finally:
        _set_cpu_detours(before)


def _set_cpu_detours(enabled: bool) -> None:
    global _CPU_DETOURS
    if enabled != _CPU_DETOURS:
        jax.clear_caches()
        _CPU_DETOURS = enabled


def _cpu() -> bool:
    """Whether the CPU detours apply: the default backend is the CPU and they are on."""
    return _CPU_DETOURS and jax.default_backend() == "cpu"


def _static(*shapes: Sequence) -> bool:
    """Whether every dimension is a number: under ``jax.export`` with a symbolic batch
    (``"b, 224, 224, 3"``) the detours' shape tests are undecidable, and lax's
    operations, which take any shape, are used."""
    return all(isinstance(d, int) for shape in shapes for d in shape)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def draw_flat(draw, key, shape, dtype, *args):
    """``draw(key, *args, shape, dtype)``'s numbers, drawn over the flat size and reshaped.

    The same numbers (threefry counts the elements in row-major order either way), but
    XLA:CPU can take seconds to compile jax's draw over a 4-d shape with
    ``jax_threefry_partitionable`` (jax's default): on an AVX2 CPU a uniform over
    3x3x8x12 took 11 s to compile, over its 864 elements in a row 0.2 s. The
    initializers of the convolutions here draw that way.
    """
    return draw(key, *args, (math.prod(shape),), dtype).reshape(shape)


def normal_init(std: float):
    """``nnx.initializers.normal(std)``: the same numbers, drawn flat (``draw_flat``)."""
    def init(key, shape, dtype=jnp.float32):
        return draw_flat(jax.random.normal, key, shape, dtype) * jnp.array(std, dtype)

    return init


def kaiming_normal_fan_out(key, shape, dtype=jnp.float32):
    """torchvision's ResNet/VGG convolution init, ``kaiming_normal_(mode="fan_out",
    nonlinearity="relu")``: ``nnx.initializers.variance_scaling(2.0, "fan_out",
    "normal")``'s numbers for an HWIO kernel, drawn flat (``draw_flat``)."""
    fan_out = shape[-1] * (math.prod(shape) / shape[-2] / shape[-1])  # as jax counts it
    variance = jnp.array(2.0 / fan_out, dtype=dtype)
    return draw_flat(jax.random.normal, key, shape, dtype) * jnp.sqrt(variance)


def dropout_layer(rate: float, *, rngs: nnx.Rngs | None = None) -> nnx.Dropout:
    """``nnx.Dropout(rate)`` for a rate in [0, 1], as ``torch.nn.Dropout`` checks
    (nnx takes any number: 1.5 zeroes everything, -0.5 rescales).

    Raises:
      ValueError: for a rate outside [0, 1].
    """
    try:
        value = float(rate)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(rate, (bool, str)) or not 0 <= value <= 1:
        raise ValueError(f"dropout probability has to be between 0 and 1, got {rate!r}")
    return nnx.Dropout(value, rngs=rngs)


def torch_default_init(fan_in: int):
    """torch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Args:
      fan_in: input features (times kernel area for a convolution).

    Returns:
      A flax initializer.
    """
    bound = 1.0 / math.sqrt(max(fan_in, 1))

    def init(key, shape, dtype=jnp.float32):
        return draw_flat(functools.partial(jax.random.uniform, minval=-bound, maxval=bound),
                         key, shape, dtype)

    return init


class Sequential(nnx.List):
    """A list of layers applied in order; submodule paths are ``name.0``, ``name.1``...

    Mirrors ``torch.nn.Sequential`` so that ``features.3.weight`` in a torch
    state_dict is ``features[3].kernel`` here, with no extra path component.
    """

    def __call__(self, x):
        for layer in self:
            x = layer(x)
        return x


def _spatial_kernel_exceeds_map(lhs_shape, rhs_shape, strides, padding, rhs_dilation) -> bool:
    """An input or output side longer than 1 and shorter than the (dilated) kernel's.

    The output's side matters for the gradient: XLA:CPU computes the input gradient
    as a convolution over the output gradient, which is then the short map (a 3x3,
    stride-2 convolution from 4x4 to 2x2 maps, 256 -> 512 channels, batch 64, ResNet's
    last downsampling at 64 px: 120 ms against 2.4 by patches; its forward pass and
    kernel gradient are not slow).
    """
    for size, k, s, pads, d in zip(lhs_shape[1:3], rhs_shape[:2], strides, padding,
                                   rhs_dilation):
        span = d * (k - 1) + 1
        if 1 < size < span or 1 < _conv_out_len(size, k, s, pads, d) < span:
            return True
    return False


def _pointwise(rhs_shape) -> bool:
    """A 1x1 kernel: the convolution is a matmul over the channels."""
    return tuple(rhs_shape[:2]) == (1, 1)


def _conv_out_len(size: int, k: int, stride: int, pads: tuple[int, int], dilation: int) -> int:
    """Output length of a convolution along one axis."""
    return (size + pads[0] + pads[1] - dilation * (k - 1) - 1) // stride + 1


def _output_positions(lhs_shape, rhs_shape, strides, padding, rhs_dilation) -> int:
    """Batch times output height times width of an NHWC x HWIO convolution."""
    n, out = lhs_shape[0], 1
    for args in zip(lhs_shape[1:3], rhs_shape[:2], strides, padding, rhs_dilation):
        out *= max(_conv_out_len(*args), 0)
    return n * out


# Below this many output positions (batch x height x width) XLA's own weight
# gradient was as fast or faster than ``_conv_weight_grad`` on the development
# machine (``python -m bench.conv_ops``, its "1-d dw" column: 14x14 maps, 256
# channels, batch 8, 1568 positions: 8.9 ms against 10.1; 4x4 maps at batch 64:
# 22.0 against 35.7; 8x8 at batch 64, 4096 positions: 36.9 against 28.7).
_MIN_POSITIONS_FOR_WEIGHT_GRAD = 2048
# float64 (parity's gradients) is left to XLA: there the 1-d convolution is 11-22x
# slower than XLA's own weight gradient (``python -m bench.conv_ops --dtype float64
# --batch 1``: 3x3, 64 channels, 56x56: 145.5 ms against 6.5).
_ROW_GRAD_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Below this many input channels, the input gradient of a ``_conv_row_grad``
# convolution is computed from the convolution by patches (``_conv_by_patches``).
_FEW_CHANNELS = 16


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None, **kwargs):
    """``jax.lax.conv_general_dilated`` with detours around slow XLA:CPU cases.

    On CPU (only there), two kinds of NHWC convolution are computed from shifted
    input slices with one matmul (im2col; the gradient is then slices, pads
    and matmuls) instead of XLA's convolution:

    * 1x1 kernels (ResNet-50's bottlenecks, every downsampling shortcut): XLA:CPU's
      convolution is a slow matmul there, its weight gradient 5-10x slower than
      the same contraction written as a matmul (56x56 maps, 64->256 channels,
      batch 8: 45 ms against 6).
    * An input whose height or width is above 1 but below the kernel's (a 3x3
      conv, padding 1, on a 2x2 map: ResNet's last stage at 64 px, VGG's last
      block at 32 px), which XLA:CPU runs 20-100x slower than any other shape:
      3 GFLOP/s against 100-250 (``resnet18_cifar`` at 16x16 ran a train step
      10x slower than torch because of it); likewise an output side above 1 but
      below the kernel's, whose input gradient is such a convolution (ResNet's last
      downsampling, 4x4 to 2x2 maps at stride 2).

    Every other grouped NHWC convolution on CPU is ``_grouped_conv``: lax's forward
    pass (with up to 8 channels per group, ResNeXt's first two stages, the sum of the
    shifted taps: 3-10x faster) with the derivatives of the convolution by patches
    (XLA:CPU's grouped kernel gradient is 40-90x slower).

    Every other ungrouped NHWC convolution on CPU in ``_ROW_GRAD_DTYPES`` (not
    float64) with at least ``_MIN_POSITIONS_FOR_WEIGHT_GRAD`` output positions is
    XLA's, but its weight
    gradient is ``_conv_weight_grad``'s (a custom JVP rule): XLA:CPU computes that
    gradient as a convolution whose contracted features are the batch (8 at batch 8),
    2-3x slower than a one-dimensional convolution over a whole row of the image
    (3x3, 64 channels, 56x56 maps, batch 8: 49.7 ms against 16.4; torch 12.5 with
    its forward pass). Of those, a convolution of a one-channel input (LeNet-5's
    first) computes its forward pass as one elementwise pass over the input's
    shifted taps (``_conv_taps``): XLA:CPU's convolution runs at 10-20 GFLOP/s
    there (1 -> 6 channels, 5x5, 64x32x32 input: 2.2-2.8 ms against 0.4-0.5), and
    one of fewer than ``_FEW_CHANNELS`` input channels takes its input gradient as
    a matmul and a sum of taps (LeNet-5's second: 1.2 ms against 2.1-2.6).

    Measured on this project's 2-core development machine (``bench/conv_ops.py``
    times each case), with XLA's default YNNPACK convolutions; the programs' XLA
    convolutions (``jaxnets.xla_cpu``) keep the 1-d kernel gradient's gain at step
    level. Everywhere else this is ``lax``'s convolution.
    """
    rhs_dilation = tuple(rhs_dilation or (1, 1))
    nhwc = (dimension_numbers is not None and tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
            and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1)
            and tuple(dimension_numbers.out_spec) == (0, 3, 1, 2))
    cpu_nhwc = (lhs.ndim == 4 and nhwc and not isinstance(padding, str)
                and all(p >= 0 for pair in padding for p in pair)
                and tuple(lhs_dilation or (1, 1)) == (1, 1) and not kwargs.get("out_sharding")
                and kwargs.get("batch_group_count", 1) == 1 and _cpu()
                and _static(lhs.shape, rhs.shape))
    if cpu_nhwc:
        strides, pads = tuple(window_strides), tuple(map(tuple, padding))
        if _output_positions(lhs.shape, rhs.shape, strides, pads, rhs_dilation) == 0 < lhs.size:
            raise ValueError(f"convolution kernel {tuple(rhs.shape[:2])} (dilation "
                             f"{rhs_dilation}) is larger than the padded input "
                             f"{tuple(lhs.shape[1:3])} + padding {pads}")
        if (_pointwise(rhs.shape)
                or _spatial_kernel_exceeds_map(lhs.shape, rhs.shape, strides, pads,
                                               rhs_dilation)):
            return _conv_by_patches(lhs, rhs, strides, pads, rhs_dilation, feature_group_count,
                                    precision, preferred_element_type)
        if feature_group_count > 1:
            return _grouped_conv(lhs, rhs, strides, pads, rhs_dilation, feature_group_count,
                                 precision, preferred_element_type)
        if (lhs.dtype in _ROW_GRAD_DTYPES and _output_positions(
                lhs.shape, rhs.shape, strides, pads, rhs_dilation)
                >= _MIN_POSITIONS_FOR_WEIGHT_GRAD):
            return _conv_row_grad(lhs, rhs, strides, pads, rhs_dilation, precision,
                                  preferred_element_type)
    if preferred_element_type is not None:
        kwargs["preferred_element_type"] = preferred_element_type
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision, **kwargs)


def _lax_conv(x, w, strides, padding, dilation, precision, preferred_element_type, groups=1):
    """``lax``'s NHWC x HWIO convolution."""
    return jax.lax.conv_general_dilated(
        x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups, precision=precision,
        preferred_element_type=preferred_element_type)


def _conv_taps(x, w, strides, padding, dilation, precision, preferred_element_type, groups=1):
    """An NHWC x HWIO convolution with few input channels per group as the sum of its
    shifted taps times the kernel's entries: one elementwise pass (accumulated in
    float32 at least) over (batch, height, width, group, output), for the shapes where
    XLA:CPU's convolution is slowest (a one-channel input; ResNeXt's 4 and 8 channels
    per group)."""
    kh, kw, cg, cout = w.shape
    (sh, sw), (dh, dw) = strides, dilation
    oh = _conv_out_len(x.shape[1], kh, sh, padding[0], dh)
    ow = _conv_out_len(x.shape[2], kw, sw, padding[1], dw)
    acc = jnp.promote_types(jnp.promote_types(x.dtype, w.dtype), jnp.float32)
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0))).astype(acc)
    xp = xp.reshape(*xp.shape[:3], groups, cg)
    wk = w.astype(acc).reshape(kh, kw, cg, groups, cout // groups)
    y = sum(xp[:, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw,
               :, c:c + 1] * wk[i, j, c]
            for i in range(kh) for j in range(kw) for c in range(cg))
    y = y.reshape(x.shape[0], oh, ow, cout)
    # Stored, not fused into its consumers: XLA:CPU would recompute the taps' sum in
    # each (LeNet-5's max-pool and its gradient's mask: a slower step than lax's).
    return fusion_barrier(y.astype(preferred_element_type or jnp.promote_types(x.dtype, w.dtype)),
                          w)


def _conv_forward(x, w, strides, padding, dilation, precision, preferred_element_type):
    """The forward pass of ``_conv_row_grad``: by taps for one input channel, else lax's."""
    conv = _conv_taps if x.shape[3] == 1 else _lax_conv
    return conv(x, w, strides, padding, dilation, precision, preferred_element_type)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv_row_grad(x, w, strides, padding, dilation, precision, preferred_element_type):
    """A convolution with ``_conv_weight_grad`` as its kernel gradient.

    The forward pass is ``_conv_forward``'s. The JVP rule's input tangent term is
    lax's convolution (below ``_FEW_CHANNELS`` input channels the convolution by
    patches, whose transpose is one matmul and a sum of shifted taps: XLA:CPU's
    input gradient with few output features is slow); for the kernel tangent it is
    the transpose of ``_conv_weight_grad``
    (``jax.linear_transpose``), so reverse mode, transposing it back, computes the
    kernel gradient by ``_conv_weight_grad``, which reads the input through a
    ``fusion_barrier`` (as stored, not recomputed from the operations that made
    it). Forward mode, ``vmap`` and higher derivatives work as for any jax
    function.
    """
    return _conv_forward(x, w, strides, padding, dilation, precision, preferred_element_type)


def _conv_row_grad_jvp(strides, padding, dilation, precision, pet, primals, tangents):
    (x, w), (tx, tw) = primals, tangents
    y = _conv_forward(x, w, strides, padding, dilation, precision, pet)
    ty = None
    if type(tx) is not jax.custom_derivatives.SymbolicZero:  # a frozen input: no work
        if x.shape[3] < _FEW_CHANNELS:
            # Transposed (reverse mode): the input gradient as one matmul and the sum of
            # its taps, where XLA:CPU's own (a convolution with few output features) is
            # slow: LeNet-5's second convolution, 6 channels, batch 64: 1.2 ms against 2.6.
            ty = _conv_by_patches(tx, w, strides, padding, dilation, 1, precision, pet)
        else:
            ty = _lax_conv(tx, w, strides, padding, dilation, precision, pet)
    if type(tw) is not jax.custom_derivatives.SymbolicZero:  # a frozen kernel: no work
        # The input as stored: without the barrier XLA:CPU fused the chain that made
        # it (BatchNorm and ReLU, the residual add) into the kernel gradient's
        # transposes and recomputed it there (ResNet-18, CIFAR: fusions of 10
        # operands; the step ~7% slower: bench/README.md).
        grad_w = functools.partial(_conv_weight_grad, fusion_barrier(x, w), kernel=w,
                                   strides=strides, padding=padding, dilation=dilation,
                                   precision=precision, preferred_element_type=pet)
        by_kernel, = jax.linear_transpose(grad_w, jax.ShapeDtypeStruct(y.shape, y.dtype))(tw)
        ty = by_kernel if ty is None else ty + by_kernel
    return y, (jnp.zeros_like(y) if ty is None else ty)


_conv_row_grad.defjvp(_conv_row_grad_jvp, symbolic_zeros=True)


# A grouped convolution's forward pass is ``_conv_taps``' up to this many input channels
# per group and kernel taps times channels per group, lax's above. One process, median of
# 7, ms, 3x3, 32 groups, batch 8, lax / taps: 56x56, 128 channels (4 per group) 74.5 / 7.0;
# 28x28, 256 (8) 18.8 / 6.0 (16.7 / 6.8 in a second run); 14x14, 512 (16) 7.3 / 133.1;
# 56x56, 256 in 64 groups (4) 153.2 / 15.2.
_TAPS_CHANNELS_PER_GROUP = 8
_TAPS_TERMS = 72


def _grouped_forward(x, w, strides, padding, dilation, groups, precision, pet):
    kh, kw, cg, _ = w.shape
    if cg <= _TAPS_CHANNELS_PER_GROUP and kh * kw * cg <= _TAPS_TERMS:
        return _conv_taps(x, w, strides, padding, dilation, precision, pet, groups)
    return _lax_conv(x, w, strides, padding, dilation, precision, pet, groups)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _grouped_conv(x, w, strides, padding, dilation, groups, precision, preferred_element_type):
    """A grouped convolution: lax's forward pass (with few channels per group
    ``_conv_taps``'), the derivatives of the convolution by patches
    (``_conv_by_patches``).

    XLA:CPU computes a grouped convolution's kernel gradient 40-90x slower than the
    transpose of the patches' einsum (ResNeXt-50's 3x3, 128 channels in 32 groups,
    56x56, batch 8: 7070 ms against 96; its train step took 54 s against torch's 1.4)
    and its input gradient 1-5x slower (61 against 23 ms), while its forward pass is
    2-4x faster than the patches' (74.5 against 37.8 ms) and 3-10x slower than the taps'
    with 4 or 8 channels per group (``_TAPS_CHANNELS_PER_GROUP``; the taps' own
    autodiff gradients are slower than the patches'). The JVP rule's tangent is the
    patches' (each term skipped for a symbolic zero), so reverse mode transposes that;
    the input it reads for the kernel's term is stored (``fusion_barrier``). At
    stride 1 with up to 4 output channels per group, the input's term is instead the
    transpose of the input gradient by taps (``_grouped_input_term``: 56x56, 128
    channels in 32 groups, 35 against 15 ms).
    """
    return _grouped_forward(x, w, strides, padding, dilation, groups, precision,
                            preferred_element_type)


# The input gradient of a stride-1 grouped convolution with at most this many output
# channels per group is the taps' (``_grouped_input_term``). One process, the two
# alternating, median of 9, ms, 3x3, batch 8, the patches' / the taps': 56x56, 128
# channels in 32 groups (4 per group) 35.5, 34.6 / 15.4, 14.5; 56x56, 256 in 64 groups
# (4) 61.8, 84.9 / 45.5, 44.5. With 8 per group (28x28, 256 in 32 groups) they were
# within noise in an earlier run (17.7 / 16.0 ms), so the patches' stay there.
_TAPS_INPUT_GRAD_CHANNELS_PER_GROUP = 4


def _grouped_input_term(tx, w, y, strides, padding, dilation, groups, precision, pet):
    """The input tangent's term of ``_grouped_conv``'s JVP rule: the convolution by
    patches of ``tx``, or, at stride 1 with at most
    ``_TAPS_INPUT_GRAD_CHANNELS_PER_GROUP`` output channels per group, the transpose
    (``jax.linear_transpose``) of the input gradient by taps: a grouped convolution of
    the output gradient by the flipped kernel, whose groups have that many input
    channels (``_conv_taps``). Reverse mode, transposing it back, computes the taps'
    input gradient itself; forward mode computes its transpose."""
    kh, kw, cg, cout = w.shape
    og = cout // groups
    (dh, dw), ((pt, pb), (pl, pr)) = dilation, padding
    flipped_pads = ((dh * (kh - 1) - pt, dh * (kh - 1) - pb),
                    (dw * (kw - 1) - pl, dw * (kw - 1) - pr))
    if (tuple(strides) != (1, 1) or og > _TAPS_INPUT_GRAD_CHANNELS_PER_GROUP
            or kh * kw * og > _TAPS_TERMS or min(min(p) for p in flipped_pads) < 0):
        return _conv_by_patches(tx, w, strides, padding, dilation, groups, precision, pet)
    flipped = (w.reshape(kh, kw, cg, groups, og)[::-1, ::-1].transpose(0, 1, 4, 3, 2)
               .reshape(kh, kw, og, groups * cg))

    def input_grad(dy):
        return _conv_taps(dy, flipped, (1, 1), flipped_pads, dilation, precision, tx.dtype,
                          groups)

    term, = jax.linear_transpose(input_grad, jax.ShapeDtypeStruct(y.shape, y.dtype))(tx)
    return term


def _grouped_conv_jvp(strides, padding, dilation, groups, precision, pet, primals, tangents):
    (x, w), (tx, tw) = primals, tangents
    y = _grouped_forward(x, w, strides, padding, dilation, groups, precision, pet)
    zero = jax.custom_derivatives.SymbolicZero
    terms = []
    if type(tx) is not zero:
        terms.append(_grouped_input_term(tx, w, y, strides, padding, dilation, groups,
                                         precision, pet))
    if type(tw) is not zero:
        terms.append(_conv_by_patches(fusion_barrier(x, w), tw, strides, padding, dilation,
                                      groups, precision, pet))
    ty = sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)
    return y, ty


_grouped_conv.defjvp(_grouped_conv_jvp, symbolic_zeros=True)


def _conv_weight_grad(x, dy, kernel, strides, padding, dilation, precision,
                      preferred_element_type, form=None):
    """The kernel gradient of an NHWC x HWIO convolution, as one 1-d convolution.

    ``dw[a, b, i, o] = sum over n, p, q of xpad[n, p*sh + a*dh, q*sw + b*dw, i] dy[n, p, q, o]``.
    Along the width this is a 1-d convolution (kernel: ``dy``'s rows; output: the
    kernel's ``b``); the height and the batch become its contracted features, and
    the kernel row ``a`` goes into one of its other axes:

    * form "A": into its batch, beside the input channels: the input is copied
      once per kernel row (its strided rows ``p*sh + a*dh``), ``dy`` is only
      transposed. Best when the input is small next to ``dy`` (a 3-channel stem) or
      the stride is above 1.
    * form "B": into its output features, beside the output channels: ``dy`` is
      copied once per kernel row, shifted down ``a*dh`` rows (with ``sh - 1`` zero
      rows between its own at a stride), the input is only transposed. Best at
      stride 1 (ResNet's 3x3 convolutions).

    Either form's input is laid out by ``_channels_major``.

    ``kernel`` gives the gradient's shape and dtype (an array or a
    ``jax.ShapeDtypeStruct``); ``x`` is cast to ``dy``'s dtype first, as lax's own
    rule does. ``form`` picks one (for tests); None picks by the rule above.
    """
    if x.dtype != dy.dtype:
        x = x.astype(dy.dtype)
    n, _, _, c = x.shape
    kh, kw, _, cout = kernel.shape
    (sh, sw), (dh, dw) = strides, dilation
    (pt, pb), (pl, pr) = padding
    _, oh, ow, _ = dy.shape
    hn = (kh - 1) * dh + (oh - 1) * sh + 1  # padded rows and columns the kernel reads
    wn = (kw - 1) * dw + (ow - 1) * sw + 1
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))[:, :hn, :wn]
    if form is None:
        form = "A" if sh > 1 or kh * x.size < dy.size else "B"
    # The batch stays the major part of the contracted features, so a batch sharded
    # over devices (data parallel) stays sharded: partial sums, then one all-reduce.
    dyt = jnp.transpose(dy, (2, 0, 1, 3))  # (q, n, p, o)
    anchor = kernel if isinstance(kernel, jax.Array) else None
    if form == "A":
        rows = jnp.stack([xp[:, a * dh:a * dh + (oh - 1) * sh + 1:sh] for a in range(kh)])
        lhs = _channels_major(rows.reshape(kh, n * oh, wn, c), anchor).reshape(
            kh * c, wn, n * oh)
        rhs = dyt.reshape(ow, n * oh, cout)
    else:
        lhs = _channels_major(xp.reshape(1, n * hn, wn, c), anchor).reshape(c, wn, n * hn)
        zero = jnp.zeros((), dy.dtype)
        rhs = jnp.stack([jax.lax.pad(dyt, zero, ((0, 0, 0), (0, 0, 0),
                                                 (a * dh, hn - a * dh - (oh - 1) * sh - 1, sh - 1),
                                                 (0, 0, 0)))
                         for a in range(kh)], axis=3).reshape(ow, n * hn, kh * cout)
    out = jax.lax.conv_general_dilated(lhs, rhs, (dw,), ((0, 0),), rhs_dilation=(sw,),
                                       dimension_numbers=("NWC", "WIO", "NWC"),
                                       precision=precision,
                                       preferred_element_type=preferred_element_type)[:, :kw]
    if form == "A":
        out = out.reshape(kh, c, kw, cout).transpose(0, 2, 1, 3)
    else:
        out = out.reshape(c, kw, kh, cout).transpose(2, 1, 0, 3)
    return out.astype(kernel.dtype)


def _channels_major(v: jax.Array, anchor: jax.Array | None) -> jax.Array:
    """``(b, m, w, c) -> (b, c, w, m)``: the layout of ``_conv_weight_grad``'s input.

    From ``_FEW_CHANNELS`` channels on, in two steps: a batched 2-d transpose of
    ``(m, (w c))``, stored (a ``fusion_barrier`` reading ``anchor``), then a swap of
    ``w`` and ``c`` that moves contiguous runs of ``m``. XLA:CPU's one-step transpose
    is slower there (one process, median of 20, ms, one step / two: ResNet-18's
    64x32x32x64 input at stride 2 (form A) 27.5 / 14.8, at stride 1 (form B) 15.2 /
    13.0; 64x16x16x128, stride 2, 13.2 / 4.6; 8x56x56x64, stride 1, 4.7 / 2.6) and
    faster with few channels (64x32x32x3: 0.75 / 2.1; 8x224x224x3 at 7x7, stride 2:
    5.2 / 17.6).
    """
    b, m, w, c = v.shape
    if c < _FEW_CHANNELS:
        return jnp.transpose(v, (0, 3, 2, 1))
    t = fusion_barrier(jnp.transpose(v.reshape(b, m, w * c), (0, 2, 1)), anchor)
    return jnp.transpose(t.reshape(b, w, c, m), (0, 2, 1, 3))


def _patches(v, kh, kw, strides, dilation, oh, ow):
    """``(..., h, w, c) -> (..., oh, ow, kh * kw * c)``: the (padded) input under each
    output position, in the HWIO kernel's (row, column, channel) order."""
    (sh, sw), (dh, dw) = strides, dilation
    *lead, _, _, c = v.shape
    if (kh, kw, sh, sw) == (1, 1, 1, 1):
        return v  # a 1x1 kernel at stride 1 reads every position: no slice
    if (sh, sw, dh, dw) == (kh, kw, 1, 1):
        # Non-overlapping patches (ViT's patch embedding: 16x16 or 32x32 at the same
        # stride): one reshape and transpose instead of kh * kw slices, which made a
        # float64 gradient run op by op compile ~1,000 slices (vit_b_32's parity: 60 s
        # against 18) and a jit-compiled step carry as many ops.
        p = v[..., :oh * kh, :ow * kw, :].reshape(*lead, oh, kh, ow, kw, c)
        m = len(lead)
        p = p.transpose(*range(m), m, m + 2, m + 1, m + 3, m + 4)
        return p.reshape(*lead, oh, ow, kh * kw * c)
    taps = [v[..., i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw, :]
            for i in range(kh) for j in range(kw)]
    return jnp.concatenate(taps, axis=-1)


def _conv_by_patches(x, w, strides, padding, dilation, groups, precision,
                     preferred_element_type):
    """An NHWC x HWIO convolution as input slices (one per kernel tap) and one matmul
    (batched over the feature groups when there are several)."""
    n, h, wd, c = x.shape
    kh, kw, cin_g, cout = w.shape
    (pt, pb), (pl, pr) = padding
    oh = _conv_out_len(h, kh, strides[0], (pt, pb), dilation[0])
    ow = _conv_out_len(wd, kw, strides[1], (pl, pr), dilation[1])
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0))) if pt or pb or pl or pr else x
    if groups == 1:
        # One matmul over (tap, channel), laid out as the HWIO kernel's rows: no
        # transposes around it (an einsum moved its unit axes around with a transpose
        # and a copy each way, ~8 per 1x1 convolution of a gradient program).
        # ``dot_general`` merges (batch, height, width) into one axis, so the kernel
        # gradient is a 2-d matmul too (lax's 4-d dot had XLA:CPU copy the output
        # gradient transposed first).
        return dot_general(_patches(xp, kh, kw, strides, dilation, oh, ow),
                           w.reshape(kh * kw * cin_g, cout), (((3,), (0,)), ((), ())),
                           precision=precision, preferred_element_type=preferred_element_type)
    # Groups first: the input is moved to (group, n, h, w, channel) once and the patches
    # are made in the layout of the matmul batched over the groups, (group, positions,
    # taps x channels); made NHWC, the kh * kw times larger patches were copied again
    # into that layout, and their gradient back (ResNeXt-50: a quarter of the step).
    og = cout // groups
    xg = xp.reshape(n, *xp.shape[1:3], groups, cin_g).transpose(3, 0, 1, 2, 4)
    patches = _patches(xg, kh, kw, strides, dilation, oh, ow).reshape(
        groups, n * oh * ow, kh * kw * cin_g)
    kernel = w.reshape(kh * kw, cin_g, groups, og).transpose(2, 0, 1, 3).reshape(
        groups, kh * kw * cin_g, og)
    y = jax.lax.dot_general(patches, kernel, (((2,), (1,)), ((0,), (0,))), precision=precision,
                            preferred_element_type=preferred_element_type)
    return y.reshape(groups, n, oh, ow, og).transpose(1, 2, 3, 0, 4).reshape(n, oh, ow, cout)


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    *,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    bias: bool = True,
    kernel_init=None,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A ``torch.nn.Conv2d``-equivalent ``nnx.Conv`` with symmetric explicit padding.

    Args:
      in_channels: input channels.
      out_channels: output channels.
      kernel_size: kernel height and width.
      stride: stride.
      padding: zero padding on each side (torch's integer ``padding``).
      dilation: kernel dilation.
      groups: feature groups.
      bias: whether to add a bias.
      kernel_init: initializer; torch's default when None.
      rngs: random number generators.

    Returns:
      The convolution module.
    """
    kh, kw = _pair(kernel_size)
    ph, pw = _pair(padding)
    fan_in = in_channels // groups * kh * kw
    init = kernel_init or torch_default_init(fan_in)
    return nnx.Conv(
        in_channels,
        out_channels,
        (kh, kw),
        strides=_pair(stride),
        padding=((ph, ph), (pw, pw)),
        kernel_dilation=_pair(dilation),
        feature_group_count=groups,
        use_bias=bias,
        kernel_init=init,
        bias_init=torch_default_init(fan_in),
        conv_general_dilated=conv_general_dilated,
        rngs=rngs,
    )


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs):
    """``jax.lax.dot_general``; on CPU, a (..., K) array by a matrix is one 2-d matmul.

    A dense layer on tokens, (batch, L, K) by (K, N), is a dot whose kernel
    gradient contracts two axes (batch and L). XLA:CPU canonicalises that
    gradient by copying the output gradient transposed, then runs a slower
    matmul form (ViT-B/16's first MLP layer, 1576 tokens, 768 -> 3072: a kernel
    gradient of 54 ms against 30; ``python -m bench.conv_ops``, its dense rows).
    Flattening the leading axes first makes the gradient a 2-d matmul that
    contracts one axis, with no copy; the values are the same sums.

    On CPU, when ``lhs`` has more than two axes and contracts only its last one
    against one axis of a 2-d ``rhs`` (no batch axes, no ``out_sharding``), the
    leading axes are merged; everywhere else (and on other backends, where the
    merge could relayout a tiled array) this is ``lax.dot_general``. The
    signature is ``lax.dot_general``'s, so this is a ``dot_general`` for
    ``nnx.Linear``.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    if (_cpu() and lhs.ndim > 2 and rhs.ndim == 2 and not lb
            and not rb and tuple(lc) == (lhs.ndim - 1,) and len(rc) == 1
            and kwargs.get("out_sharding") is None):
        rows = math.prod(lhs.shape[:-1])
        out = jax.lax.dot_general(lhs.reshape(rows, lhs.shape[-1]), rhs,
                                  (((1,), tuple(rc)), ((), ())), precision=precision,
                                  preferred_element_type=preferred_element_type)
        return out.reshape(*lhs.shape[:-1], out.shape[-1])
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)


_ATTENTION_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float64))


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """``jax.nn.dot_product_attention(query, key, value)``, no mask or bias; on CPU
    with the heads moved before the tokens.

    jax's XLA path contracts (batch, tokens, heads, dim) arrays in place, and
    XLA:CPU then runs the batched products over (batch, heads) through
    transposed copies of the logits and their gradients. Moving the heads in
    front first (three small transposes) makes every product batched over
    leading axes: ViT-B/16's attention (batch 8, 197 tokens, 12 heads of 64),
    forward and backward, 52 ms against 81 (``python -m bench.conv_ops``, its
    attention row). The arithmetic is jax's: logits in float32 at least, then
    scaled by 1/sqrt(dim), a float32 softmax, the probabilities in the inputs'
    dtype; bfloat16 products accumulate in float32 as jax's do. Other dtypes,
    and other backends, go to ``jax.nn.dot_product_attention``.

    Args:
      query: (batch, T, heads, dim).
      key: (batch, S, heads, dim).
      value: (batch, S, heads, dim).

    Returns:
      (batch, T, heads, dim).
    """
    dtype = jnp.dtype(query.dtype)
    if (not _cpu() or dtype not in _ATTENTION_DTYPES or query.ndim != 4
            or key.ndim != 4 or key.shape != value.shape or query.shape[2:] != key.shape[2:]
            or not key.dtype == value.dtype == dtype):
        return jax.nn.dot_product_attention(query, key, value)
    precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if dtype == jnp.bfloat16 else None
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (query, key, value))
    logits = jnp.einsum("bhtd,bhsd->bhts", q, k, precision=precision,
                        preferred_element_type=jnp.promote_types(query.dtype, jnp.float32))
    logits = logits * jnp.array(1.0 / math.sqrt(query.shape[-1]), logits.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(key.dtype)
    return jnp.swapaxes(jnp.einsum("bhts,bhsd->bhtd", probs, v), 1, 2)


def linear(in_features: int, out_features: int, *, bias: bool = True, kernel_init=None,
           bias_init=None, rngs: nnx.Rngs) -> nnx.Linear:
    """A ``torch.nn.Linear``-equivalent ``nnx.Linear`` with torch's default init
    (and this module's ``dot_general``).

    Args:
      in_features: input size.
      out_features: output size.
      bias: whether to add a bias.
      kernel_init: initializer; torch's default when None.
      bias_init: bias initializer; torch's default when None.
      rngs: random number generators.

    Returns:
      The linear module.
    """
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=bias,
        kernel_init=kernel_init or torch_default_init(in_features),
        bias_init=bias_init or torch_default_init(in_features),
        dot_general=dot_general,
        rngs=rngs,
    )


class BatchNorm(nnx.Module):
    """``torch.nn.BatchNorm{1,2,3}d`` over the last axis.

    Differences from ``nnx.BatchNorm`` that matter for a port: ``momentum`` is
    torch's (weight of the new batch, default 0.1); the running variance is
    updated with the unbiased batch variance while the batch is normalised
    with the biased one; ``num_batches_tracked`` is counted. Statistics are
    computed in at least float32 whatever the input dtype (mixed precision). Under
    ``jax.jit`` with a batch-sharded input the batch mean is global, so the
    statistics are synchronised across devices like ``SyncBatchNorm``.

    Attributes:
      use_running_average: eval mode when True (set by ``model.eval()``).
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        use_running_average: bool = False,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs  # deterministic init; accepted for a uniform constructor signature
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.use_running_average = use_running_average
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32)) if affine else None
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32)) if affine else None
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.promote_types(dtype, jnp.float32))
        affine = self.scale is not None
        if self.use_running_average:
            y = (x32 - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.eps)
            if affine:
                y = y * self.scale[...] + self.bias[...]
            return y.astype(dtype)
        n = math.prod(x.shape[:-1])
        if n == 1:  # torch's check: the output would be 0 (or the bias) whatever the input
            raise ValueError(
                f"BatchNorm in training mode needs more than one value per channel; got input "
                f"of shape {tuple(x.shape)} (use a batch of 2 or more, larger images, or "
                "model.eval())")
        if affine:
            y, mean, var = _batch_norm(x32, self.scale[...], self.bias[...], self.eps)
        else:
            y, mean, var = _normalize(x32, self.eps)
        m = self.momentum
        unbiased = var * (n / (n - 1))
        stat = self.mean[...].dtype
        # set_value, not `self.mean[...] = ...`: flax's indexed assignment
        # probes the new value's sharding, which on a tracer under grad walks
        # the whole trace (measured: 60% of tracing a ResNet-101 train step).
        self.mean.set_value(((1 - m) * self.mean[...]
                             + m * jax.lax.stop_gradient(mean)).astype(stat))
        self.var.set_value(((1 - m) * self.var[...]
                            + m * jax.lax.stop_gradient(unbiased)).astype(stat))
        self.num_batches_tracked.set_value(self.num_batches_tracked[...] + 1)
        return y.astype(dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _normalize(x: jax.Array, eps: float):
    """Batch normalisation over all axes but the last: ``(xhat, mean, biased var)``.

    With the closed form of its derivative as a custom JVP, linear in the
    tangent, so reverse mode (its transpose) is two fused reductions and one
    elementwise pass, where autodiff of the two-pass variance makes several
    (on CPU, ``python -m bench.conv_ops``: a train-mode BatchNorm + ReLU gradient
    at 8x56x56x256 took 45 ms by autodiff, ~30 ms so; torch 32-37 ms). Forward
    mode works too.
    """
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    # Two-pass variance: E[x^2]-E[x]^2 loses digits that torch keeps.
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    return (x - mean) * jax.lax.rsqrt(var + eps), mean, var


@_normalize.defjvp
def _normalize_jvp(eps, primals, tangents):
    (x,), (t,) = primals, tangents
    xhat, mean, var = _normalize(x, eps)
    axes = tuple(range(x.ndim - 1))
    rstd = jax.lax.rsqrt(var + eps)
    t_mean = jnp.mean(t, axis=axes)
    t_xhat = jnp.mean(t * xhat, axis=axes)  # d var = 2 (x - mean) t / n = 2 xhat t / (n rstd)
    return ((xhat, mean, var),
            (rstd * (t - t_mean - xhat * t_xhat), t_mean, 2.0 * t_xhat / rstd))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float):
    """Train-mode batch normalisation with its affine terms: ``(y, mean, biased var)``.

    ``_normalize`` then ``* scale + bias``, with a derivative rule of its own. Its
    tangent applies the per-channel factor ``scale * rstd`` to the input's tangent
    before the two means that project it, and adds the scale's and the bias's
    tangents beside those means (``xhat * (t_scale - mean(u * xhat)) + (t_bias -
    mean(u))``). Reverse mode, its transpose, then computes ``sum(g)`` and
    ``sum(g * xhat)`` once each: they are the bias's and the scale's gradients and
    the two means of the input's gradient. Composing ``_normalize``'s rule with the
    affine map computes them twice, once on ``g`` and once on ``g * scale``, six
    reductions per layer where four do (train-mode BatchNorm + ReLU gradient,
    8x56x56x256: ~10 against ~7.5 ms on the development machine). Frozen terms
    (symbolic zero tangents) cost nothing.
    """
    xhat, mean, var = _normalize(x, eps)
    return xhat * scale + bias, mean, var


def _batch_norm_jvp(eps, primals, tangents):
    (x, scale, bias), (tx, ts, tb) = primals, tangents
    xhat, mean, var = _normalize(x, eps)
    y = xhat * scale + bias
    rstd = jax.lax.rsqrt(var + eps)
    axes = tuple(range(x.ndim - 1))
    zero = jax.custom_derivatives.SymbolicZero
    per_channel = jnp.zeros(scale.shape, xhat.dtype)  # multiplies xhat
    shift = jnp.zeros(bias.shape, xhat.dtype)  # added to it
    ty, t_mean, t_var = None, jnp.zeros_like(mean), jnp.zeros_like(var)
    if type(tx) is not zero:
        u = tx * (scale * rstd)
        ty = u
        per_channel = per_channel - jnp.mean(u * xhat, axis=axes)
        shift = shift - jnp.mean(u, axis=axes)
        t_mean = jnp.mean(tx, axis=axes)
        t_var = 2.0 * jnp.mean(tx * xhat, axis=axes) / rstd
    if type(ts) is not zero:
        per_channel = ts + per_channel
    if type(tb) is not zero:
        shift = tb + shift
    by_stats = xhat * per_channel + shift
    ty = by_stats if ty is None else ty + by_stats
    return (y, mean, var), (ty, t_mean, t_var)


_batch_norm.defjvp(_batch_norm_jvp, symbolic_zeros=True)


def fusion_barrier(x: jax.Array, anchor: jax.Array | None = None) -> jax.Array:
    """The identity, which XLA:CPU stores instead of fusing it into its consumers.

    XLA:CPU fuses a chain of cheap elementwise operations into every consumer
    of its result instead of writing the result out, even when that recomputes
    the whole chain in each consumer. A residual stream's gradient is such a
    chain: each pre-norm block adds its LayerNorm's backward terms to it, and
    without a stored sum a ViT's gradient fusions at block ``k`` recompute the
    terms of every block above it (ViT-B/16: fusions of up to 171 operands, a
    third of the train step; quadratic in depth). A place XLA cannot fuse
    across stops the chain. ``jax.lax.optimization_barrier`` is no such place
    on CPU (XLA removes it before fusion); a conditional is. So ``x`` goes
    through one whose predicate is data and whose two branches compute the
    same values (the identity and a double negation, both exact): XLA can
    neither fold it nor fuse through it, and jax's derivative of a conditional
    is a conditional, so the tangent (forward mode) and the cotangent (reverse
    mode) are stored too.

    Values and derivatives (forward and reverse mode, any order) are the
    identity's. Under ``vmap`` of a batched predicate (``anchor``, or ``x`` when
    it is the anchor) the conditional becomes a select and nothing is stored.
    Elsewhere than on CPU, or for non-float or empty arrays, this returns ``x``
    itself.

    Args:
      x: the array to store.
      anchor: the array whose first element the predicate reads (default
        ``x``). Pass a replicated one (a parameter) where ``x`` is sharded over
        devices, so the predicate needs no cross-device read.

    Returns:
      ``x``'s values.
    """
    if (not _cpu() or not jnp.issubdtype(x.dtype, jnp.inexact)
            or x.size == 0):
        return x
    anchor = x if anchor is None else anchor
    if anchor.size == 0:
        return x
    first = jax.lax.stop_gradient(anchor).reshape(-1)[0]
    return jax.lax.cond(first == first, lambda a: a, lambda a: -(-a), x)


def _pool_geometry(size: int, k: int, s: int, p: int, ceil_mode: bool) -> tuple[int, int]:
    """Output length and right padding of a torch pooling window along one axis."""
    span = size + 2 * p - k
    out = (-(-span // s) if ceil_mode else span // s) + 1
    # torch drops a last window that would start inside the right padding.
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    hi = (out - 1) * s + k - size - p
    return out, hi


def _pool_pads(x, k, s, p, ceil_mode):
    outs, pads = [], [(0, 0)]
    for axis in (1, 2):
        o, hi = _pool_geometry(x.shape[axis], k[axis - 1], s[axis - 1], p[axis - 1], ceil_mode)
        outs.append(o)
        pads.append((p[axis - 1], max(hi, 0)))
    pads.append((0, 0))
    return outs, pads


def max_pool2d(x: jax.Array, kernel_size, stride=None, padding=0, *, ceil_mode: bool = False):
    """``torch.nn.functional.max_pool2d`` on NHWC input.

    Padding is -inf (never selected); with ``ceil_mode`` the bottom/right edge
    gets extra -inf padding for the partial windows torch keeps.

    Args:
      x: (N, H, W, C) array.
      kernel_size: window size.
      stride: stride; defaults to ``kernel_size`` like torch.
      padding: implicit -inf padding on each side.
      ceil_mode: torch's ``ceil_mode``.

    Returns:
      The pooled (N, H', W', C) array.
    """
    k = _pair(kernel_size)
    s = _pair(stride if stride is not None else kernel_size)
    p = _pair(padding)
    (oh, ow), pads = _pool_pads(x, k, s, p, ceil_mode)
    if k == s and p == (0, 0) and oh * k[0] <= x.shape[1] and ow * k[1] <= x.shape[2]:
        return _max_pool_tiles(x, k, oh, ow)
    if _cpu() and x.ndim == 4 and k[0] * k[1] <= _MAX_POOL_TAPS:
        return _max_pool_taps(x, k, s, p, ceil_mode)
    # A concrete numpy init lets JAX pick the differentiable max-pool primitive.
    init = np.array(-np.inf, x.dtype)
    y = jax.lax.reduce_window(x, init, jax.lax.max, (1, *k, 1), (1, *s, 1), pads)
    return y[:, :oh, :ow, :]


@jax.custom_jvp
def _first_max(t: jax.Array) -> jax.Array:
    """``max`` over the last axis whose derivative is that of the *first* maximum.

    torch's max-pool gives a window's whole gradient to the first maximum in it
    (row-major); ``jnp.max``'s derivative would share it among tied maxima, which
    happen wherever a flat image region meets a constant bias.
    """
    return jnp.max(t, axis=-1)


@_first_max.defjvp
def _first_max_jvp(primals, tangents):
    (t,), (dt,) = primals, tangents
    first = jnp.argmax(t, axis=-1)  # the first maximum (a NaN counts as one, as in torch)
    pick = jnp.arange(t.shape[-1]) == first[..., None]
    return jnp.max(t, axis=-1), jnp.sum(jnp.where(pick, dt, jnp.zeros_like(dt)), axis=-1)


def _max_pool_tiles(x: jax.Array, k: tuple[int, int], oh: int, ow: int) -> jax.Array:
    """Max-pool over windows that tile the input (kernel == stride, no padding).

    A reshape and a reduction instead of ``reduce_window``: XLA:CPU's
    ``reduce_window``/``select_and_scatter`` pair is slow (LeNet-5's fp32 train step
    measured 12.1 ms with it, 8.5 ms with tiles; VGG's pools and GoogLeNet's last
    2x2 pool are tiles too). Same values and, through ``_first_max``, the same
    gradients as torch.
    """
    n, _, _, c = x.shape
    kh, kw = k
    t = x[:, :oh * kh, :ow * kw].reshape(n, oh, kh, ow, kw, c)
    t = t.transpose(0, 1, 3, 5, 2, 4).reshape(n, oh, ow, c, kh * kw)
    return _first_max(t)


# Windows of up to this many elements take ``_max_pool_taps`` on CPU (its window
# index is an int8).
_MAX_POOL_TAPS = 127


def _window_taps(x, k, s, p, ceil_mode):
    """The maximum of every pooling window and the (row-major) index of the element
    that torch's max-pool picks in it: the first maximum, or the last NaN."""
    (oh, ow), pads = _pool_pads(x, k, s, p, ceil_mode)
    xp = jnp.pad(x, pads, constant_values=-jnp.inf)
    best = index = None
    for tap in range(k[0] * k[1]):
        a, b = divmod(tap, k[1])
        v = xp[:, a:a + (oh - 1) * s[0] + 1:s[0], b:b + (ow - 1) * s[1] + 1:s[1]]
        if best is None:
            best, index = v, jnp.zeros(v.shape, jnp.int8)
        else:
            take = (v > best) | jnp.isnan(v)
            best, index = jnp.where(take, v, best), jnp.where(take, jnp.int8(tap), index)
    return best, index


def _max_pool_scatter(index, dy, x_shape, k, s, p):
    """The gradient of a max-pool, given each window's chosen element (``index``).

    Written as a gather, one elementwise pass over the input: a padded input row
    ``i = s*b + r`` is the kernel row ``r + s*m`` of the window ``b - m``, so each
    residue ``(r, q)`` of the rows and columns modulo the stride is a sum over the
    few windows that can read it, the windows taken in torch's (row-major) order so
    that the sums round as torch's do; the residues are then interleaved.
    """
    n, h, w, c = x_shape
    oh, ow = dy.shape[1:3]
    bh, bw = -(-(h + p[0]) // s[0]), -(-(w + p[1]) // s[1])  # blocks of s rows/columns
    mh, mw = -(-k[0] // s[0]), -(-k[1] // s[1])  # windows that can read one element
    grow = ((0, 0), (mh - 1, bh - oh), (mw - 1, bw - ow), (0, 0))
    dyp = jnp.pad(dy, grow)
    indexp = jnp.pad(index, grow, constant_values=-1)
    rows = []
    for r in range(s[0]):
        cols = []
        for q in range(s[1]):
            acc = jnp.zeros((n, bh, bw, c), dy.dtype)
            for m in reversed(range(mh)):
                for u in reversed(range(mw)):
                    a, b = r + s[0] * m, q + s[1] * u
                    if a < k[0] and b < k[1]:
                        window = (slice(None), slice(mh - 1 - m, mh - 1 - m + bh),
                                  slice(mw - 1 - u, mw - 1 - u + bw))
                        acc = acc + jnp.where(indexp[window] == a * k[1] + b, dyp[window],
                                              jnp.zeros((), dy.dtype))
            cols.append(acc)
        rows.append(jnp.stack(cols, axis=3))
    full = jnp.stack(rows, axis=2).reshape(n, bh * s[0], bw * s[1], c)
    return full[:, p[0]:p[0] + h, p[1]:p[1] + w]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool_taps(x, k, s, p, ceil_mode):
    """Max-pool as the maximum of the window's shifted slices (CPU).

    XLA:CPU's ``reduce_window`` and, above all, its ``select_and_scatter``
    gradient are slow: ResNet's 3x3/2 stem pool on 8x112x112x64, forward and
    backward, took 100 ms (torch: 6.3; ``python -m bench.conv_ops``, its max-pool
    rows). Here the forward pass is one elementwise pass over the kernel's taps
    that also records each window's chosen element, and the gradient is
    ``_max_pool_scatter``'s gather (17 ms). The JVP rule's
    tangent is the transpose of that gather (``jax.linear_transpose``), so
    reverse mode runs the gather itself; forward mode, ``vmap`` and higher
    derivatives work as for any jax function.
    """
    return _window_taps(x, k, s, p, ceil_mode)[0]


@_max_pool_taps.defjvp
def _max_pool_taps_jvp(k, s, p, ceil_mode, primals, tangents):
    (x,), (tx,) = primals, tangents
    y, index = _window_taps(x, k, s, p, ceil_mode)
    scatter = functools.partial(_max_pool_scatter, index, x_shape=x.shape, k=k, s=s, p=p)
    ty, = jax.linear_transpose(scatter, jax.ShapeDtypeStruct(y.shape, tx.dtype))(tx)
    return y, ty


def _avg_divisor(size, k, s, p, out, count_include_pad):
    starts = np.arange(out) * s - p
    ends = np.minimum(starts + k, size + p)
    if count_include_pad:
        return (ends - starts).astype(np.float32)
    return (np.minimum(ends, size) - np.maximum(starts, 0)).astype(np.float32)


def avg_pool2d(x: jax.Array, kernel_size, stride=None, padding=0, *, ceil_mode: bool = False,
               count_include_pad: bool = True):
    """``torch.nn.functional.avg_pool2d`` on NHWC input.

    Args:
      x: (N, H, W, C) array.
      kernel_size: window size.
      stride: stride; defaults to ``kernel_size``.
      padding: implicit zero padding on each side.
      ceil_mode: torch's ``ceil_mode``.
      count_include_pad: whether the zero padding counts in the divisor
        (torch's default True). Windows hanging past the padding in ceil mode
        never count the overhang, as in torch.

    Returns:
      The pooled (N, H', W', C) array.
    """
    k = _pair(kernel_size)
    s = _pair(stride if stride is not None else kernel_size)
    p = _pair(padding)
    (oh, ow), pads = _pool_pads(x, k, s, p, ceil_mode)
    y = jax.lax.reduce_window(x, np.array(0, x.dtype), jax.lax.add, (1, *k, 1), (1, *s, 1), pads)
    y = y[:, :oh, :ow, :]
    dh = _avg_divisor(x.shape[1], k[0], s[0], p[0], oh, count_include_pad)
    dw = _avg_divisor(x.shape[2], k[1], s[1], p[1], ow, count_include_pad)
    div = jnp.asarray(np.outer(dh, dw)[None, :, :, None], x.dtype)
    return y / div


def _adaptive_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) averaging matrix with torch's floor/ceil window bounds."""
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        lo = (i * size) // out
        hi = -(-((i + 1) * size) // out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool2d(x: jax.Array, output_size) -> jax.Array:
    """``torch.nn.functional.adaptive_avg_pool2d`` on NHWC input.

    Windows run from ``floor(i*H/o)`` to ``ceil((i+1)*H/o)``: uneven and
    overlapping when ``o`` does not divide ``H``. Divisible sizes use a
    reshape-mean; others a static averaging matrix per axis.

    Args:
      x: (N, H, W, C) array.
      output_size: (oh, ow) or an int.

    Returns:
      The (N, oh, ow, C) array.
    """
    oh, ow = _pair(output_size)
    n, h, w, c = x.shape
    if (oh, ow) == (1, 1):
        return jnp.mean(x, axis=(1, 2), keepdims=True)
    if h % oh == 0 and w % ow == 0:
        return x.reshape(n, oh, h // oh, ow, w // ow, c).mean(axis=(2, 4))
    mh = jnp.asarray(_adaptive_matrix(h, oh), x.dtype)
    mw = jnp.asarray(_adaptive_matrix(w, ow), x.dtype)
    hp = jax.lax.Precision.HIGHEST
    return jnp.einsum("oh,nhwc,pw->nopc", mh, x, mw, precision=hp)


def check_images(x, channels: int, name: str, *, min_size: tuple[int, int] | None = None,
                 exact: bool = False, hint: str = "") -> None:
    """Raise a one-line error unless ``x`` is an NHWC image batch with ``channels``.

    Args:
      x: the model input.
      channels: the channel count the model expects.
      name: the model's name, for the message.
      min_size: the smallest (height, width) the model takes, if any: below it
        a feature map would shrink to nothing (torch raises "Output size is too
        small"; XLA would give NaN logits).
      exact: ``min_size`` is the only size the model takes (a flatten into a
        fixed-width layer).
      hint: appended to the message of a wrong ``exact`` size.

    Raises:
      TypeError: for a non-array, or integer or boolean images (torch's
        convolutions refuse them too: convert to float and normalise first).
      ValueError: when the rank, channel count or size is wrong.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} expects a jax or numpy array of images; got "
                        f"{type(x).__name__} (wrap it with jnp.asarray)")
    if type(x).__module__.startswith("torch"):
        raise TypeError(f"{name} expects a jax or numpy array of images, NHWC; got a torch "
                        "tensor (x.permute(0, 2, 3, 1).numpy() for an NCHW batch)")
    shape = tuple(x.shape)
    if jnp.issubdtype(x.dtype, jnp.integer) or jnp.issubdtype(x.dtype, jnp.bool_):
        raise TypeError(f"{name} expects floating-point images; got {x.dtype} (convert to "
                        "float and normalise first, e.g. x / 255 then the mean and std)")
    if len(shape) != 4:
        raise ValueError(
            f"{name} expects a 4-D NHWC image batch (batch, height, width, {channels}); "
            f"got an array of shape {shape}"
        )
    if shape[-1] != channels:
        hint = " (channels-last: did you pass NCHW?)" if shape[1] == channels else ""
        raise ValueError(
            f"{name} expects {channels} input channel(s) in the last axis (NHWC); "
            f"got shape {shape}{hint}"
        )
    if min_size is not None:
        h, w = shape[1:3]
        if exact and (h, w) != tuple(min_size):
            raise ValueError(f"{name} takes {min_size[0]}x{min_size[1]} images only; got "
                             f"{h}x{w}{hint}")
        if h < min_size[0] or w < min_size[1]:
            raise ValueError(f"{name} needs images of at least {min_size[0]}x{min_size[1]}; "
                             f"got {h}x{w} (its feature maps would shrink to nothing)")
