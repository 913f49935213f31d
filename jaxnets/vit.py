"""Vision Transformers (ViT-B/16 ... ViT-H/14), as torchvision defines them.

Submodule names follow ``torchvision.models.vision_transformer`` (``conv_proj``,
``class_token``, ``encoder.pos_embedding``,
``encoder.layers.encoder_layer_0.self_attention.in_proj_weight``, ``mlp.0``,
``mlp.3``, ``encoder.ln``, ``heads.head``), so the default porting rules map a
torchvision state_dict one to one. Two things a torchvision checkpoint may need
before it fits, both done by ``VisionTransformer.adapt_torch_state_dict``
(torchvision does them in ``MLPBlock._load_from_state_dict`` and
``interpolate_embeddings``): old MLP keys ``mlp.linear_1``/``mlp.linear_2``
renamed to ``mlp.0``/``mlp.3``, and a positional embedding trained at another
image size resized to this model's patch grid.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnets.layers import (Sequential, check_images, conv2d, dot_general, draw_flat,
                             dot_product_attention, dropout_layer, fusion_barrier, linear)
from jaxnets.registry import register_model

__all__ = ["ViTSelfAttention", "MLPBlock", "EncoderBlock", "Encoder", "VisionTransformer",
           "interpolate_pos_embedding", "interpolation_matrix", "VIT_VARIANTS"]

_LN_EPS = 1e-6  # torchvision's ViT: partial(nn.LayerNorm, eps=1e-6)

# (patch_size, num_layers, num_heads, hidden_dim, mlp_dim), from torchvision's builders.
VIT_VARIANTS: dict[str, tuple[int, int, int, int, int]] = {
    "vit_b_16": (16, 12, 12, 768, 3072),
    "vit_b_32": (32, 12, 12, 768, 3072),
    "vit_l_16": (16, 24, 16, 1024, 4096),
    "vit_l_32": (32, 24, 16, 1024, 4096),
    "vit_h_14": (14, 32, 16, 1280, 5120),
}

_xavier_uniform = nnx.initializers.xavier_uniform()


def _trunc_normal(std: float):
    # torch's trunc_normal_ cuts at +-2 absolute, i.e. at +-2/std standard deviations.
    def init(key, shape, dtype=jnp.float32):  # drawn flat: see jaxnets.layers.draw_flat
        lim = 2.0 / std
        return draw_flat(jax.random.truncated_normal, key, shape, dtype, -lim, lim) * std

    return init


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # use_fast_variance=False: E[x^2]-E[x]^2 loses digits that torch keeps.
    return nnx.LayerNorm(dim, epsilon=_LN_EPS, use_fast_variance=False, rngs=rngs)


class ViTSelfAttention(nnx.Module):
    """``nn.MultiheadAttention(E, H, dropout, batch_first=True)`` used as self-attention.

    Parameters carry torch's names and layouts: ``in_proj_weight`` is q|k|v packed
    as ``[3E, E]`` and ``in_proj_bias`` ``[3E]`` (both stored as torch stores
    them, so no porting rule is needed), ``out_proj`` a linear layer.

    Args:
      embed_dim: model width E.
      num_heads: attention heads; must divide E.
      dropout: dropout on the attention weights in training mode.
      rngs: random generators.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, *,
                 rngs: nnx.Rngs):
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nnx.Param(_xavier_uniform(rngs.params(), (3 * embed_dim, embed_dim)))
        self.in_proj_bias = nnx.Param(jnp.zeros((3 * embed_dim,), jnp.float32))
        self.out_proj = linear(embed_dim, embed_dim, bias_init=nnx.initializers.zeros,
                               rngs=rngs)
        self.attn_drop = dropout_layer(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, *, need_weights: bool = False,
                 deterministic: bool | None = None):
        """Self-attention over the tokens of ``x``.

        Args:
          x: (batch, L, E) tokens.
          need_weights: also return the per-head attention weights.
          deterministic: turn attention dropout off; the module's mode when None.

        Returns:
          (batch, L, E) outputs, and with ``need_weights`` the
          (batch, heads, L, L) weights (after dropout, as torch returns them
          with ``average_attn_weights=False``).
        """
        b, n, e = x.shape
        h = self.num_heads
        d = e // h
        qkv = dot_general(x, self.in_proj_weight[...], (((2,), (1,)), ((), ())))
        qkv = qkv + self.in_proj_bias[...]
        q, k, v = (t.reshape(b, n, h, d) for t in jnp.split(qkv, 3, axis=-1))
        det = self.attn_drop.deterministic if deterministic is None else deterministic
        dropping = self.attn_drop.rate > 0 and not det
        weights = None
        # dot_product_attention takes its softmax in float32: exact enough below float64,
        # not in it (float64 parity checks would see ~1e-7 errors).
        if need_weights or dropping or x.dtype == jnp.float64:
            logits = jnp.einsum("bqhd,bkhd->bhqk", q * (1.0 / math.sqrt(d)), k)
            weights = jax.nn.softmax(logits, axis=-1)
            weights = self.attn_drop(weights, deterministic=det)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        else:
            out = dot_product_attention(q, k, v)
        out = self.out_proj(out.reshape(b, n, e))
        return (out, weights) if need_weights else out


class MLPBlock(Sequential):
    """torchvision's ``MLPBlock``: [Linear, GELU, Dropout, Linear, Dropout] (keys ``0``, ``3``).

    Args:
      in_dim: model width.
      mlp_dim: hidden width.
      dropout: dropout rate.
      rngs: random generators.
    """

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float, *, rngs: nnx.Rngs):
        bias_init = nnx.initializers.normal(1e-6)
        super().__init__([
            linear(in_dim, mlp_dim, kernel_init=_xavier_uniform, bias_init=bias_init, rngs=rngs),
            functools.partial(jax.nn.gelu, approximate=False),  # torch's GELU is exact
            dropout_layer(dropout, rngs=rngs),
            linear(mlp_dim, in_dim, kernel_init=_xavier_uniform, bias_init=bias_init, rngs=rngs),
            dropout_layer(dropout, rngs=rngs),
        ])

    def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
        for layer in self:
            is_dropout = isinstance(layer, nnx.Dropout)
            x = layer(x, deterministic=deterministic) if is_dropout else layer(x)
        return x


class EncoderBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(.)).

    Args:
      num_heads: attention heads.
      hidden_dim: model width.
      mlp_dim: MLP hidden width.
      dropout: dropout after attention and in the MLP.
      attention_dropout: dropout on the attention weights.
      rngs: random generators.
    """

    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float,
                 attention_dropout: float, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.ln_1 = _layer_norm(hidden_dim, rngs)
        self.self_attention = ViTSelfAttention(hidden_dim, num_heads, attention_dropout,
                                               rngs=rngs)
        self.dropout = dropout_layer(dropout, rngs=rngs)
        self.ln_2 = _layer_norm(hidden_dim, rngs)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout, rngs=rngs)

    def __call__(self, x: jax.Array, *, need_weights: bool = False,
                 deterministic: bool | None = None):
        """Apply the block.

        Args:
          x: (batch, L, E) tokens.
          need_weights: also return the attention weights (batch, heads, L, L).
          deterministic: turn dropout off; the modules' mode when None.

        Returns:
          The (batch, L, E) output, or ``(output, weights)`` with ``need_weights``.
        """
        # Each residual sum and its gradient are stored once (on CPU, XLA
        # otherwise recomputes every later block's share of the gradient in
        # each consumer).
        x = fusion_barrier(x, self.ln_1.scale[...])
        y = self.self_attention(self.ln_1(x), need_weights=need_weights,
                                deterministic=deterministic)
        y, weights = y if need_weights else (y, None)
        x = fusion_barrier(x + self.dropout(y, deterministic=deterministic),
                           self.ln_2.scale[...])
        x = x + self.mlp(self.ln_2(x), deterministic=deterministic)
        return (x, weights) if need_weights else x


class _Layers(nnx.Module):
    """torch's ``nn.Sequential(OrderedDict(encoder_layer_0=...))``: named children in order."""

    def __init__(self, blocks: list[EncoderBlock]):
        self.names = tuple(f"encoder_layer_{i}" for i in range(len(blocks)))
        for name, block in zip(self.names, blocks):
            setattr(self, name, block)

    def __iter__(self):
        return (getattr(self, name) for name in self.names)

    def __len__(self):
        return len(self.names)


class Encoder(nnx.Module):
    """Positional embedding, dropout, the blocks, a final LayerNorm.

    Args:
      seq_length: tokens including the class token.
      num_layers: blocks.
      num_heads: attention heads.
      hidden_dim: model width.
      mlp_dim: MLP hidden width.
      dropout: dropout rate.
      attention_dropout: attention-weight dropout rate.
      rngs: random generators.
    """

    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int,
                 mlp_dim: int, dropout: float, attention_dropout: float, *, rngs: nnx.Rngs):
        self.pos_embedding = nnx.Param(
            draw_flat(jax.random.normal, rngs.params(), (1, seq_length, hidden_dim),
                      jnp.float32) * 0.02)  # BERT init
        self.dropout = dropout_layer(dropout, rngs=rngs)
        self.layers = _Layers([EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout,
                                            attention_dropout, rngs=rngs)
                               for _ in range(num_layers)])
        self.ln = _layer_norm(hidden_dim, rngs)

    def __call__(self, x: jax.Array, *, need_weights: bool = False,
                 deterministic: bool | None = None):
        """Encode tokens.

        Args:
          x: (batch, L, E) tokens, class token first.
          need_weights: also return every block's attention weights.
          deterministic: turn dropout off; the modules' mode when None.

        Returns:
          The normalised (batch, L, E) tokens, or ``(tokens, [weights per
          block])`` with ``need_weights``.
        """
        x = self.dropout(x + self.pos_embedding[...], deterministic=deterministic)
        all_weights = []
        for block in self.layers:
            x = block(x, need_weights=need_weights, deterministic=deterministic)
            if need_weights:
                x, w = x
                all_weights.append(w)
        x = self.ln(x)
        return (x, all_weights) if need_weights else x


class _Heads(nnx.Module):
    """torch's ``heads`` Sequential: ``head``, or ``pre_logits`` -> tanh -> ``head``."""

    def __init__(self, hidden_dim: int, num_classes: int, representation_size: int | None, *,
                 rngs: nnx.Rngs):
        zeros = nnx.initializers.zeros
        if representation_size is None:
            self.pre_logits = None
            self.head = linear(hidden_dim, num_classes, kernel_init=zeros, bias_init=zeros,
                               rngs=rngs)
        else:
            self.pre_logits = linear(hidden_dim, representation_size,
                                     kernel_init=_trunc_normal(math.sqrt(1 / hidden_dim)),
                                     bias_init=zeros, rngs=rngs)
            self.head = linear(representation_size, num_classes, kernel_init=zeros,
                               bias_init=zeros, rngs=rngs)

    def __call__(self, x):
        if self.pre_logits is not None:
            x = jnp.tanh(self.pre_logits(x))
        return self.head(x)


class VisionTransformer(nnx.Module):
    """torchvision's ``VisionTransformer`` (patchify stem; no convolutional stem).

    Takes NHWC images of exactly ``image_size`` x ``image_size``.

    Args:
      image_size: input side; the positional embedding has
        ``(image_size // patch_size) ** 2 + 1`` positions.
      patch_size: patch side (the stem's kernel and stride).
      num_layers: encoder blocks.
      num_heads: attention heads.
      hidden_dim: model width.
      mlp_dim: MLP hidden width.
      dropout: dropout rate (embeddings, attention output, MLP).
      attention_dropout: dropout rate on the attention weights.
      num_classes: classifier outputs.
      representation_size: width of a tanh ``pre_logits`` layer before the
        head; none when None.
      in_channels: input channels.
      rngs: random generators; the ``dropout`` stream (or the default one)
        drives dropout in training mode.
    """

    def __init__(self, image_size: int, patch_size: int, num_layers: int, num_heads: int,
                 hidden_dim: int, mlp_dim: int, dropout: float = 0.0,
                 attention_dropout: float = 0.0, num_classes: int = 1000,
                 representation_size: int | None = None, *, in_channels: int = 3,
                 rngs: nnx.Rngs):
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size "
                             f"{patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.in_channels = in_channels
        fan_in = in_channels * patch_size * patch_size
        self.conv_proj = conv2d(in_channels, hidden_dim, patch_size, patch_size,
                                kernel_init=_trunc_normal(math.sqrt(1 / fan_in)), rngs=rngs)
        self.conv_proj.bias.set_value(jnp.zeros_like(self.conv_proj.bias[...]))
        self.class_token = nnx.Param(jnp.zeros((1, 1, hidden_dim), jnp.float32))
        seq_length = (image_size // patch_size) ** 2 + 1
        self.seq_length = seq_length
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout,
                               attention_dropout, rngs=rngs)
        self.heads = _Heads(hidden_dim, num_classes, representation_size, rngs=rngs)

    @property
    def grid_size(self) -> tuple[int, int]:
        """The (height, width) grid of patch tokens."""
        g = self.image_size // self.patch_size
        return (g, g)

    def check_input(self, x) -> None:
        """Raise a one-line ``ValueError`` unless ``x`` is an NHWC batch this model takes.

        Args:
          x: anything with a ``shape``.
        """
        check_images(x, self.in_channels, type(self).__name__)
        if x.shape[1] != self.image_size or x.shape[2] != self.image_size:
            raise ValueError(
                f"{type(self).__name__} was built for {self.image_size}x{self.image_size} "
                f"images; got {x.shape[1]}x{x.shape[2]} (build it with image_size="
                f"{x.shape[1]} if the sides are equal and divisible by {self.patch_size})")

    def _process_input(self, x: jax.Array) -> jax.Array:
        self.check_input(x)
        x = self.conv_proj(x)
        n, gh, gw, e = x.shape
        # Row-major (h, w) tokens: the order of torch's reshape of (N, E, gh, gw).
        x = x.reshape(n, gh * gw, e)
        cls = jnp.broadcast_to(self.class_token[...], (n, 1, e)).astype(x.dtype)
        return jnp.concatenate([cls, x], axis=1)

    def tokens(self, x: jax.Array, *, need_weights: bool = False,
               deterministic: bool | None = None):
        """The encoder's output tokens, class token first.

        Args:
          x: (N, image_size, image_size, C) images.
          need_weights: also return every block's attention weights.
          deterministic: turn dropout off; the modules' mode when None.

        Returns:
          (N, L, hidden_dim) tokens, or ``(tokens, [(N, heads, L, L) per
          block])`` with ``need_weights``.
        """
        return self.encoder(self._process_input(x), need_weights=need_weights,
                            deterministic=deterministic)

    def features(self, x: jax.Array) -> jax.Array:
        """The class token after the encoder, (N, hidden_dim): the head's input."""
        return self.tokens(x)[:, 0]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.heads(self.features(x))

    def adapt_torch_state_dict(self, state_dict: Mapping[str, Any]
                               ) -> tuple[dict[str, Any], list[str]]:
        """Make a torchvision ViT state_dict fit this model, as torchvision's loaders do.

        Renames the old MLP keys ``mlp.linear_1``/``mlp.linear_2`` to ``mlp.0``/
        ``mlp.3`` (torchvision's ``MLPBlock._load_from_state_dict``) and, when
        ``encoder.pos_embedding`` has another number of positions, resizes it to
        this model's patch grid with ``interpolate_pos_embedding`` (torchvision's
        ``interpolate_embeddings``). Everything else passes through unchanged;
        the input is not modified.

        Args:
          state_dict: torch key -> tensor or array.

        Returns:
          ``(state_dict, notes)``: the adapted dict and one note per change.
        """
        out: dict[str, Any] = {}
        renamed = 0
        for key, value in state_dict.items():
            new = _OLD_MLP_KEY.sub(lambda m: f"{m[1]}{3 * (int(m[2]) - 1)}.", key)
            renamed += new != key
            out[new] = value
        notes = [f"renamed {renamed} old MLP keys mlp.linear_1/2 -> mlp.0/3"] if renamed else []
        pos = out.get("encoder.pos_embedding")
        if pos is not None and tuple(pos.shape)[1] != self.seq_length:
            old_shape = tuple(pos.shape)
            out["encoder.pos_embedding"] = interpolate_pos_embedding(
                _as_numpy(pos), self.image_size, self.patch_size)
            notes.append(f"interpolated encoder.pos_embedding {list(old_shape)} -> "
                         f"{[1, self.seq_length, old_shape[2]]} (bicubic, as torchvision)")
        return out, notes


_OLD_MLP_KEY = re.compile(r"^(encoder\.layers\.encoder_layer_\d+\.mlp\.)linear_([12])\.")


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, possibly bfloat16
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """torch's cubic convolution weights for taps at -1, 0, 1, 2 given fraction ``t``."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def interpolation_matrix(in_size: int, out_size: int, mode: str = "bicubic",
                         align_corners: bool = True) -> np.ndarray:
    """The (out_size, in_size) matrix of ``torch.nn.functional.interpolate`` along one axis.

    Bicubic is torch's: Keys' kernel with a=-0.75 (``jax.image.resize``'s
    'cubic' uses a=-0.5) and taps beyond the edge clamped to the edge. Both
    modes are separable, so a 2-D resize is this matrix applied to each axis.

    Args:
      in_size: input length.
      out_size: output length.
      mode: ``"bicubic"`` or ``"bilinear"``.
      align_corners: torch's ``align_corners``.

    Returns:
      A float64 matrix M with ``out = M @ in``.
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"interpolation mode {mode!r} is not supported "
                         "(use 'bicubic' or 'bilinear')")
    i = np.arange(out_size, dtype=np.float64)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = i * scale
    else:
        src = (i + 0.5) * (in_size / out_size) - 0.5
        if mode == "bilinear":  # torch clamps the linear source index at 0, not the cubic one
            src = np.maximum(src, 0.0)
    base = np.floor(src)
    t = src - base
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    if mode == "bicubic":
        taps, weights = base[:, None] + np.arange(-1, 3), _cubic_weights(t, -0.75)
    else:
        taps, weights = base[:, None] + np.arange(2), np.stack([1 - t, t], axis=-1)
    taps = np.clip(taps, 0, in_size - 1).astype(np.int64)
    for j in range(taps.shape[1]):
        np.add.at(m, (rows, taps[:, j]), weights[:, j])
    return m


def interpolate_pos_embedding(pos_embedding, new_image_size: int, patch_size: int, *,
                              mode: str = "bicubic"):
    """torchvision's ``interpolate_embeddings`` on one positional embedding.

    The class-token position is kept; the patch positions, a square grid, are
    resized to ``new_image_size // patch_size`` per side with
    ``F.interpolate(mode, align_corners=True)`` as torchvision does (its
    bicubic kernel, a=-0.75, edge taps clamped). An embedding that already has
    the right length is returned unchanged.

    Args:
      pos_embedding: (1, 1 + g*g, E) numpy or jax array.
      new_image_size: the new model's image side.
      patch_size: the new model's patch side.
      mode: ``"bicubic"`` (torchvision's default) or ``"bilinear"``.

    Returns:
      The (1, 1 + n*n, E) embedding, numpy in numpy out, jax in jax out.

    Raises:
      ValueError: for a batch dimension other than 1 or a non-square grid.
    """
    shape = tuple(pos_embedding.shape)
    if len(shape) != 3 or shape[0] != 1:
        raise ValueError(f"unexpected position embedding shape {shape}; expected (1, L, E)")
    _, seq_length, hidden = shape
    new_g = new_image_size // patch_size
    if new_g * new_g + 1 == seq_length:
        return pos_embedding
    g = math.isqrt(seq_length - 1)
    if g * g != seq_length - 1:
        raise ValueError(f"position embedding has {seq_length - 1} patch positions, not a "
                         "square grid")
    m = interpolation_matrix(g, new_g, mode, align_corners=True)
    grid_of = lambda a: a[0, 1:].reshape(g, g, hidden)  # noqa: E731
    if isinstance(pos_embedding, jax.Array):
        mj = jnp.asarray(m, jnp.promote_types(pos_embedding.dtype, jnp.float32))
        img = jnp.einsum("ph,qw,hwe->pqe", mj, mj, grid_of(pos_embedding).astype(mj.dtype),
                         precision=jax.lax.Precision.HIGHEST)
        img = img.reshape(1, new_g * new_g, hidden).astype(pos_embedding.dtype)
        return jnp.concatenate([pos_embedding[:, :1], img], axis=1)
    arr = np.asarray(pos_embedding)
    img = np.einsum("ph,qw,hwe->pqe", m, m, grid_of(arr).astype(np.float64))
    img = img.reshape(1, new_g * new_g, hidden).astype(arr.dtype)
    return np.concatenate([arr[:, :1], img], axis=1)


def _vit(name: str, *, num_classes: int = 1000, rngs: nnx.Rngs, image_size: int = 224,
         **kwargs) -> VisionTransformer:
    patch, layers, heads, hidden, mlp = VIT_VARIANTS[name]
    return VisionTransformer(image_size, patch, layers, heads, hidden, mlp,
                             num_classes=num_classes, rngs=rngs, **kwargs)


_image = functools.partial(register_model, kind="image", input_size=(224, 224),
                           head=r"^heads\.head\.", min_size=(224, 224))


@_image()
def vit_b_16(**kw):
    return _vit("vit_b_16", **kw)


@_image()
def vit_b_32(**kw):
    return _vit("vit_b_32", **kw)


@_image()
def vit_l_16(**kw):
    return _vit("vit_l_16", **kw)


@_image()
def vit_l_32(**kw):
    return _vit("vit_l_32", **kw)


@_image()
def vit_h_14(**kw):
    return _vit("vit_h_14", **kw)
