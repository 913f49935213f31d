"""``torch.nn.Transformer`` and its encoder/decoder stacks as NNX modules.

Submodules carry torch's names (``encoder.layers.0.self_attn.in_proj_weight``,
``decoder.layers.1.multihead_attn.out_proj.weight``, ``encoder.norm.weight``...),
so a torch state_dict loads with the default porting rules. Defaults are
torch's: ``batch_first=False`` (inputs (S, N, E)), post-norm, ReLU, dropout 0.1,
LayerNorm eps 1e-5, final LayerNorms on both stacks.

Masks are torch's: bool True = blocked, float = added to the logits; key
padding masks are (N, S) with True at padding. A query position whose keys
are all blocked attends to nothing (zero attention output, see
``jaxnets.attention``) rather than producing NaN.

The ``*_is_causal`` flags: torch uses them as hints that the mask given is
causal (and detects a causal mask by value when None). Under ``jax.jit`` a
mask's values are not known, so here the given mask is always applied as is;
with ``is_causal=True`` and no mask, the causal mask is built.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnets.attention import MultiheadAttention, xavier_uniform
from jaxnets.layers import Sequential, dropout_layer, linear
from jaxnets.registry import register_model

__all__ = ["Transformer", "TransformerEncoder", "TransformerEncoderLayer", "TransformerDecoder",
           "TransformerDecoderLayer", "generate_square_subsequent_mask", "transformer"]

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    # torch's F.gelu is the exact erf form; jax.nn.gelu defaults to the tanh approximation.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def _activation(activation: str | Callable) -> Callable:
    if callable(activation):
        return activation
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation should be relu/gelu or a callable, not {activation!r}")
    return _ACTIVATIONS[activation]


def generate_square_subsequent_mask(sz: int, dtype=jnp.float32) -> jax.Array:
    """A causal mask as ``torch.nn.Transformer.generate_square_subsequent_mask``.

    Args:
      sz: sequence length.
      dtype: float dtype of the mask.

    Returns:
      (sz, sz) float mask: 0 on and below the diagonal, -inf above it.
    """
    return jnp.triu(jnp.full((sz, sz), -jnp.inf, dtype), k=1)


def _layer_norm(d_model: int, eps: float, bias: bool, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Flax's default eps is 1e-6; torch's nn.LayerNorm is 1e-5 (set by the caller).
    return nnx.LayerNorm(d_model, epsilon=eps, use_bias=bias, rngs=rngs)


class TransformerEncoderLayer(nnx.Module):
    """``torch.nn.TransformerEncoderLayer``: self-attention and feed-forward blocks."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str | Callable = "relu",
                 layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, *, rngs: nnx.Rngs):
        """Build the layer.

        Args:
          d_model: model width.
          nhead: attention heads.
          dim_feedforward: hidden width of the feed-forward block.
          dropout: dropout after attention, inside and after the feed-forward block
            (and on the attention weights).
          activation: ``"relu"``, ``"gelu"`` (exact) or a callable.
          layer_norm_eps: LayerNorm epsilon.
          batch_first: (N, S, E) inputs when True, (S, N, E) when False.
          norm_first: pre-norm when True, post-norm (the original) when False.
          bias: biases in the linear layers and LayerNorms.
          rngs: random generators.
        """
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                            batch_first=batch_first, rngs=rngs)
        self.linear1 = linear(d_model, dim_feedforward, bias=bias, rngs=rngs)
        self.dropout = dropout_layer(dropout, rngs=rngs)
        self.linear2 = linear(dim_feedforward, d_model, bias=bias, rngs=rngs)
        self.norm_first = norm_first
        self.norm1 = _layer_norm(d_model, layer_norm_eps, bias, rngs)
        self.norm2 = _layer_norm(d_model, layer_norm_eps, bias, rngs)
        self.dropout1 = dropout_layer(dropout, rngs=rngs)
        self.dropout2 = dropout_layer(dropout, rngs=rngs)
        self.activation = _activation(activation)

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           need_weights=False, is_causal=is_causal)[0]
        return self.dropout1(x)

    def _ff_block(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def __call__(self, src: jax.Array, src_mask: jax.Array | None = None,
                 src_key_padding_mask: jax.Array | None = None,
                 is_causal: bool = False) -> jax.Array:
        """Encode one layer.

        Args:
          src: (S, N, E), or (N, S, E) with ``batch_first``.
          src_mask: (S, S) or (N*nhead, S, S) attention mask.
          src_key_padding_mask: (N, S), True at padding.
          is_causal: apply a causal mask when ``src_mask`` is None.

        Returns:
          The layer output, shaped like ``src``.
        """
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class TransformerDecoderLayer(nnx.Module):
    """``torch.nn.TransformerDecoderLayer``: self-attention, cross-attention, feed-forward."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str | Callable = "relu",
                 layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, *, rngs: nnx.Rngs):
        """Build the layer.

        Args:
          d_model: model width.
          nhead: attention heads.
          dim_feedforward: hidden width of the feed-forward block.
          dropout: dropout probability.
          activation: ``"relu"``, ``"gelu"`` (exact) or a callable.
          layer_norm_eps: LayerNorm epsilon.
          batch_first: (N, T, E) inputs when True, (T, N, E) when False.
          norm_first: pre-norm when True, post-norm when False.
          bias: biases in the linear layers and LayerNorms.
          rngs: random generators.
        """
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                            batch_first=batch_first, rngs=rngs)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                                 batch_first=batch_first, rngs=rngs)
        self.linear1 = linear(d_model, dim_feedforward, bias=bias, rngs=rngs)
        self.dropout = dropout_layer(dropout, rngs=rngs)
        self.linear2 = linear(dim_feedforward, d_model, bias=bias, rngs=rngs)
        self.norm_first = norm_first
        self.norm1 = _layer_norm(d_model, layer_norm_eps, bias, rngs)
        self.norm2 = _layer_norm(d_model, layer_norm_eps, bias, rngs)
        self.norm3 = _layer_norm(d_model, layer_norm_eps, bias, rngs)
        self.dropout1 = dropout_layer(dropout, rngs=rngs)
        self.dropout2 = dropout_layer(dropout, rngs=rngs)
        self.dropout3 = dropout_layer(dropout, rngs=rngs)
        self.activation = _activation(activation)

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           need_weights=False, is_causal=is_causal)[0]
        return self.dropout1(x)

    def _mha_block(self, x, mem, attn_mask, key_padding_mask, is_causal):
        x = self.multihead_attn(x, mem, mem, attn_mask=attn_mask,
                                key_padding_mask=key_padding_mask, need_weights=False,
                                is_causal=is_causal)[0]
        return self.dropout2(x)

    def _ff_block(self, x):
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def __call__(self, tgt: jax.Array, memory: jax.Array, tgt_mask: jax.Array | None = None,
                 memory_mask: jax.Array | None = None,
                 tgt_key_padding_mask: jax.Array | None = None,
                 memory_key_padding_mask: jax.Array | None = None, tgt_is_causal: bool = False,
                 memory_is_causal: bool = False) -> jax.Array:
        """Decode one layer.

        Args:
          tgt: (T, N, E), or (N, T, E) with ``batch_first``.
          memory: the encoder output, (S, N, E) or (N, S, E).
          tgt_mask: (T, T) or (N*nhead, T, T) self-attention mask.
          memory_mask: (T, S) or (N*nhead, T, S) cross-attention mask.
          tgt_key_padding_mask: (N, T), True at padding.
          memory_key_padding_mask: (N, S), True at padding.
          tgt_is_causal: causal self-attention when ``tgt_mask`` is None.
          memory_is_causal: causal cross-attention when ``memory_mask`` is None.

        Returns:
          The layer output, shaped like ``tgt``.
        """
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask,
                                    memory_is_causal)
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask,
                                               memory_is_causal))
            x = self.norm3(x + self._ff_block(x))
        return x


def _clones(layer: nnx.Module, n: int, rngs: nnx.Rngs | None) -> list[nnx.Module]:
    out = []
    for _ in range(n):
        clone = copy.deepcopy(layer)
        if rngs is not None:
            # A deep copy repeats the original's dropout key; torch's global RNG does not.
            for _, node in nnx.iter_graph(clone):
                if isinstance(node, nnx.Dropout) and node.rngs is not None:
                    node.rngs = rngs.dropout.fork()
        out.append(clone)
    return out


class TransformerEncoder(nnx.Module):
    """``torch.nn.TransformerEncoder``: ``num_layers`` copies of a layer and an optional norm."""

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int,
                 norm: nnx.Module | None = None, *, rngs: nnx.Rngs | None = None):
        """Stack independent copies of ``encoder_layer`` (as torch's ``_get_clones``).

        Args:
          encoder_layer: the layer to copy; copies start with its parameters.
          num_layers: number of layers.
          norm: final normalisation (torch's ``norm``), or None.
          rngs: generators giving each copy its own dropout stream; without
            them the copies draw the same dropout masks.
        """
        self.layers = Sequential(_clones(encoder_layer, num_layers, rngs))
        self.num_layers = num_layers
        self.norm = norm

    def __call__(self, src: jax.Array, mask: jax.Array | None = None,
                 src_key_padding_mask: jax.Array | None = None,
                 is_causal: bool | None = None) -> jax.Array:
        """Encode.

        Args:
          src: (S, N, E), or (N, S, E) with ``batch_first``.
          mask: (S, S) or (N*nhead, S, S) attention mask.
          src_key_padding_mask: (N, S), True at padding.
          is_causal: causal attention when ``mask`` is None and this is True.

        Returns:
          The encoded sequence, shaped like ``src``.
        """
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                      is_causal=bool(is_causal))
        return self.norm(x) if self.norm is not None else x


class TransformerDecoder(nnx.Module):
    """``torch.nn.TransformerDecoder``: ``num_layers`` copies of a layer and an optional norm."""

    def __init__(self, decoder_layer: TransformerDecoderLayer, num_layers: int,
                 norm: nnx.Module | None = None, *, rngs: nnx.Rngs | None = None):
        """Stack independent copies of ``decoder_layer``.

        Args:
          decoder_layer: the layer to copy; copies start with its parameters.
          num_layers: number of layers.
          norm: final normalisation, or None.
          rngs: generators giving each copy its own dropout stream.
        """
        self.layers = Sequential(_clones(decoder_layer, num_layers, rngs))
        self.num_layers = num_layers
        self.norm = norm

    def __call__(self, tgt: jax.Array, memory: jax.Array, tgt_mask: jax.Array | None = None,
                 memory_mask: jax.Array | None = None,
                 tgt_key_padding_mask: jax.Array | None = None,
                 memory_key_padding_mask: jax.Array | None = None,
                 tgt_is_causal: bool | None = None, memory_is_causal: bool = False) -> jax.Array:
        """Decode.

        Args:
          tgt: (T, N, E), or (N, T, E) with ``batch_first``.
          memory: encoder output (S, N, E) or (N, S, E).
          tgt_mask: (T, T) or (N*nhead, T, T) self-attention mask.
          memory_mask: (T, S) or (N*nhead, T, S) cross-attention mask.
          tgt_key_padding_mask: (N, T), True at padding.
          memory_key_padding_mask: (N, S), True at padding.
          tgt_is_causal: causal self-attention when ``tgt_mask`` is None and this is True.
          memory_is_causal: causal cross-attention when ``memory_mask`` is None.

        Returns:
          The decoded sequence, shaped like ``tgt``.
        """
        x = tgt
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                      tgt_key_padding_mask=tgt_key_padding_mask,
                      memory_key_padding_mask=memory_key_padding_mask,
                      tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
        return self.norm(x) if self.norm is not None else x


class Transformer(nnx.Module):
    """``torch.nn.Transformer``: an encoder-decoder with final LayerNorms on both stacks.

    Attributes:
      d_model: model width.
      nhead: attention heads.
      batch_first: (N, S, E) inputs when True, torch's default (S, N, E) when False.
    """

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str | Callable = "relu",
                 custom_encoder: nnx.Module | None = None,
                 custom_decoder: nnx.Module | None = None, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, *,
                 rngs: nnx.Rngs):
        """Build the model with torch's defaults and initialisation.

        Args:
          d_model: model width.
          nhead: attention heads.
          num_encoder_layers: encoder layers.
          num_decoder_layers: decoder layers.
          dim_feedforward: feed-forward hidden width.
          dropout: dropout probability.
          activation: ``"relu"``, ``"gelu"`` (exact) or a callable.
          custom_encoder: an encoder to use instead of the standard one.
          custom_decoder: a decoder to use instead of the standard one.
          layer_norm_eps: LayerNorm epsilon.
          batch_first: (N, S, E) inputs when True.
          norm_first: pre-norm layers when True.
          bias: biases in linear layers and LayerNorms.
          rngs: random generators.
        """
        layer_kw = dict(dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                        layer_norm_eps=layer_norm_eps, batch_first=batch_first,
                        norm_first=norm_first, bias=bias, rngs=rngs)
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            self.encoder = TransformerEncoder(
                TransformerEncoderLayer(d_model, nhead, **layer_kw), num_encoder_layers,
                _layer_norm(d_model, layer_norm_eps, bias, rngs), rngs=rngs)
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            self.decoder = TransformerDecoder(
                TransformerDecoderLayer(d_model, nhead, **layer_kw), num_decoder_layers,
                _layer_norm(d_model, layer_norm_eps, bias, rngs), rngs=rngs)
        self.d_model = d_model
        self.nhead = nhead
        self.batch_first = batch_first
        self._reset_parameters(rngs)

    def _reset_parameters(self, rngs: nnx.Rngs) -> None:
        # torch re-initialises every parameter with more than one dimension with
        # xavier_uniform_; this also makes the deep-copied layers differ.
        for path, node in nnx.iter_graph(self):
            if isinstance(node, nnx.Param) and node.get_value().ndim > 1:
                value = node.get_value()
                shape = value.shape
                if path[-1] == "kernel":
                    # flax (in, out) is torch (out, in) transposed; fans swap back.
                    node.set_value(xavier_uniform(rngs.params(), shape[::-1], value.dtype).T)
                else:
                    node.set_value(xavier_uniform(rngs.params(), shape, value.dtype))

    @staticmethod
    def generate_square_subsequent_mask(sz: int, dtype=jnp.float32) -> jax.Array:
        """The causal float mask (-inf above the diagonal); see the module function.

        Args:
          sz: sequence length.
          dtype: float dtype.

        Returns:
          (sz, sz) mask.
        """
        return generate_square_subsequent_mask(sz, dtype)

    def encode(self, src: jax.Array, src_mask: jax.Array | None = None,
               src_key_padding_mask: jax.Array | None = None,
               src_is_causal: bool | None = None) -> jax.Array:
        """Run the encoder alone (for decoding step by step).

        Args:
          src: (S, N, E), or (N, S, E) with ``batch_first``.
          src_mask: encoder attention mask.
          src_key_padding_mask: (N, S), True at padding.
          src_is_causal: causal encoder attention when ``src_mask`` is None.

        Returns:
          The memory.
        """
        return self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                            is_causal=src_is_causal)

    def __call__(self, src: jax.Array, tgt: jax.Array, src_mask: jax.Array | None = None,
                 tgt_mask: jax.Array | None = None, memory_mask: jax.Array | None = None,
                 src_key_padding_mask: jax.Array | None = None,
                 tgt_key_padding_mask: jax.Array | None = None,
                 memory_key_padding_mask: jax.Array | None = None,
                 src_is_causal: bool | None = None, tgt_is_causal: bool | None = None,
                 memory_is_causal: bool = False) -> jax.Array:
        """Encode ``src`` and decode ``tgt`` against it, as torch's ``forward``.

        Args:
          src: (S, N, E), or (N, S, E) with ``batch_first``; (S, E) unbatched.
          tgt: (T, N, E), or (N, T, E) with ``batch_first``; (T, E) unbatched.
          src_mask: (S, S) or (N*nhead, S, S).
          tgt_mask: (T, T) or (N*nhead, T, T), e.g. ``generate_square_subsequent_mask(T)``.
          memory_mask: (T, S) or (N*nhead, T, S).
          src_key_padding_mask: (N, S), True at padding.
          tgt_key_padding_mask: (N, T), True at padding.
          memory_key_padding_mask: (N, S), True at padding (usually the src one).
          src_is_causal: causal encoder attention when ``src_mask`` is None.
          tgt_is_causal: causal decoder self-attention when ``tgt_mask`` is None.
          memory_is_causal: causal cross-attention when ``memory_mask`` is None.

        Returns:
          (T, N, E) or (N, T, E) decoder output.
        """
        batched = src.ndim == 3
        if batched and src.shape[1 - self.batch_first] != tgt.shape[1 - self.batch_first]:
            raise ValueError(f"the batch number of src and tgt must be equal; got shapes "
                             f"{src.shape} and {tgt.shape} (batch_first={self.batch_first})")
        if src.shape[-1] != self.d_model or tgt.shape[-1] != self.d_model:
            raise ValueError(f"the feature number of src and tgt must be equal to d_model "
                             f"{self.d_model}; got {src.shape[-1]} and {tgt.shape[-1]}")
        memory = self.encode(src, src_mask, src_key_padding_mask, src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask,
                            tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


@register_model(kind="sequence", torch_reference="porting.reference:transformer",
                head=r"(?!)", num_classes=0)
def transformer(*, rngs: nnx.Rngs, **kw) -> Transformer:
    """``torch.nn.Transformer`` with torch's defaults (512 wide, 8 heads, 6+6 layers).

    Args:
      rngs: random generators.
      **kw: ``Transformer`` options (torch's names).

    Returns:
      The model.
    """
    return Transformer(rngs=rngs, **kw)
