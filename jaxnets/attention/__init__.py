"""``torch.nn.MultiheadAttention`` as an NNX module, parameters stored the way torch stores them.

The projection weights are raw ``nnx.Param``s in torch layout (``in_proj_weight``
``[3E, E]`` packing q|k|v, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``
when ``kdim``/``vdim`` differ from ``embed_dim``), and ``out_proj`` is a linear
layer whose ``kernel`` ports to torch's ``out_proj.weight`` by the default rule,
so a torch state_dict loads with no family rule at all.

Masks follow torch: a boolean ``attn_mask``/``key_padding_mask`` is True where
attention is *blocked*; a float mask is added to the logits. Both become one
additive bias (``-inf`` where blocked) before the attention itself.

Fully blocked query rows: a row whose keys are all blocked gets all-zero
attention weights, so its attention output is zero and the module returns
``out_proj.bias`` there. That is what torch computes on the path
``nn.Transformer`` takes (``need_weights=False``, ``scaled_dot_product_attention``
with its safe softmax); torch's ``need_weights=True`` path returns NaN for such
rows instead. Zeros keep NaN from spreading out of padded positions (and
into gradients).

Two computations, same numbers: without requested weights and without active
dropout the module calls ``jax.nn.dot_product_attention`` (XLA here, cuDNN's
fused kernel on GPUs where it applies; without masks,
``jaxnets.layers.dot_product_attention``, which on CPU is the same arithmetic
with the heads moved before the tokens); otherwise it computes the softmax
explicitly so the weights can be returned or dropped out. float64 takes the explicit
path too: jax's function computes its softmax in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnets.layers import dot_general, dot_product_attention, dropout_layer, linear

__all__ = ["MultiheadAttention", "xavier_uniform", "xavier_normal"]


def _fans(shape) -> tuple[int, int]:
    # torch's _calculate_fan_in_and_fan_out on a torch-layout (out, in, *rest) shape.
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def xavier_uniform(key, shape, dtype=jnp.float32):
    """``torch.nn.init.xavier_uniform_`` for a torch-layout shape.

    Args:
      key: PRNG key.
      shape: the tensor shape in torch layout (``(out, in, ...)``).
      dtype: result dtype.

    Returns:
      U(-a, a) samples with a = sqrt(6 / (fan_in + fan_out)).
    """
    fan_in, fan_out = _fans(shape)
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def xavier_normal(key, shape, dtype=jnp.float32):
    """``torch.nn.init.xavier_normal_`` for a torch-layout shape.

    Args:
      key: PRNG key.
      shape: the tensor shape in torch layout.
      dtype: result dtype.

    Returns:
      N(0, 2 / (fan_in + fan_out)) samples.
    """
    fan_in, fan_out = _fans(shape)
    return math.sqrt(2.0 / (fan_in + fan_out)) * jax.random.normal(key, shape, dtype)


def _as_bias(mask: jax.Array, name: str, dtype) -> jax.Array:
    """A torch mask (bool True = blocked, or additive float) as an additive float bias."""
    mask = jnp.asarray(mask)
    if mask.dtype == jnp.bool_:
        return jnp.where(mask, -jnp.inf, 0.0).astype(dtype)
    if not jnp.issubdtype(mask.dtype, jnp.floating):
        raise TypeError(f"{name} must be bool (True = blocked) or float (added to the logits); "
                        f"got {mask.dtype}")
    return mask.astype(dtype)


def _safe_softmax(logits: jax.Array) -> jax.Array:
    """Softmax over the last axis that gives 0 (not NaN) on rows that are all -inf."""
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(logits - m)
    den = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(den > 0, den, 1.0)


class MultiheadAttention(nnx.Module):
    """``torch.nn.MultiheadAttention``: same options, parameters, masks and results.

    Attributes:
      embed_dim: model width E.
      num_heads: heads; ``embed_dim`` must be divisible by it.
      kdim: key feature size.
      vdim: value feature size.
      batch_first: inputs and outputs are (N, L, E) when True, (L, N, E) when False.
      head_dim: E // num_heads.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, *, rngs: nnx.Rngs):
        """Build the attention.

        Args:
          embed_dim: model width E (query features and output features).
          num_heads: parallel heads.
          dropout: dropout probability on the attention weights (training only).
          bias: add biases to the input and output projections.
          add_bias_kv: append learned ``bias_k``/``bias_v`` to the keys and values.
          add_zero_attn: append a zero key and value after the heads are split.
          kdim: key features; ``embed_dim`` when None.
          vdim: value features; ``embed_dim`` when None.
          batch_first: (N, L, E) inputs when True, torch's default (L, N, E) when False.
          rngs: random generators (``params`` for init, ``dropout`` for dropout).
        """
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be positive; got {embed_dim} and "
                             f"{num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        e = embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nnx.Param(xavier_uniform(rngs.params(), (3 * e, e)))
            self.q_proj_weight = self.k_proj_weight = self.v_proj_weight = None
        else:
            self.in_proj_weight = None
            self.q_proj_weight = nnx.Param(xavier_uniform(rngs.params(), (e, e)))
            self.k_proj_weight = nnx.Param(xavier_uniform(rngs.params(), (e, self.kdim)))
            self.v_proj_weight = nnx.Param(xavier_uniform(rngs.params(), (e, self.vdim)))
        self.in_proj_bias = nnx.Param(jnp.zeros((3 * e,), jnp.float32)) if bias else None
        self.out_proj = linear(e, e, bias=bias, bias_init=nnx.initializers.zeros, rngs=rngs)
        if add_bias_kv:
            self.bias_k = nnx.Param(xavier_normal(rngs.params(), (1, 1, e)))
            self.bias_v = nnx.Param(xavier_normal(rngs.params(), (1, 1, e)))
        else:
            self.bias_k = self.bias_v = None
        self.dropout = dropout_layer(dropout, rngs=rngs)

    def _project(self, query, key, value, shared: int = 1):
        """q, k and v; ``shared`` says how many of the inputs are one array: 3 for
        self-attention, 2 when only key and value are (cross-attention), else 1.

        With the packed ``in_proj_weight``, inputs that are one array take one
        matmul by their rows of the weight, split afterwards: the weight is then
        not sliced into copies, and its gradient is one matmul, not three joined.
        """
        e = self.embed_dim
        b = self.in_proj_bias[...] if self.in_proj_bias is not None else None

        def project(t, w, rows):  # (N, L, E) by (rows, E) weights, contracting E
            y = dot_general(t, w, (((t.ndim - 1,), (1,)), ((), ())))
            return y if b is None else y + b[rows]

        if not self._qkv_same_embed_dim:
            ws = self.q_proj_weight[...], self.k_proj_weight[...], self.v_proj_weight[...]
            return tuple(project(t, w, slice(i * e, (i + 1) * e))
                         for i, (t, w) in enumerate(zip((query, key, value), ws)))
        w = self.in_proj_weight[...]
        if shared == 3:
            return tuple(jnp.split(project(query, w, slice(None)), 3, axis=-1))
        q = project(query, w[:e], slice(0, e))
        if shared == 2:
            return (q, *jnp.split(project(key, w[e:], slice(e, None)), 2, axis=-1))
        return (q, project(key, w[e:2 * e], slice(e, 2 * e)),
                project(value, w[2 * e:], slice(2 * e, None)))

    def _bias(self, attn_mask, key_padding_mask, n, tgt_len, src_len, dtype):
        """Merge the masks into one (N|1, H|1, L, S) additive bias, or None."""
        bias = None
        if attn_mask is not None:
            am = _as_bias(attn_mask, "attn_mask", dtype)
            if am.ndim == 2:
                if am.shape != (tgt_len, src_len):
                    raise ValueError(f"the 2D attn_mask has shape {am.shape}; expected "
                                     f"(L, S) = {(tgt_len, src_len)}")
                bias = am[None, None]
            elif am.ndim == 3:
                want = (n * self.num_heads, tgt_len, src_len)
                if am.shape != want:
                    raise ValueError(f"the 3D attn_mask has shape {am.shape}; expected "
                                     f"(N*num_heads, L, S) = {want}")
                bias = am.reshape(n, self.num_heads, tgt_len, src_len)
            else:
                raise ValueError(f"attn_mask must be 2D (L, S) or 3D (N*num_heads, L, S); got "
                                 f"shape {am.shape}")
        if key_padding_mask is not None:
            kpm = _as_bias(key_padding_mask, "key_padding_mask", dtype)
            if kpm.shape != (n, src_len):
                raise ValueError(f"key_padding_mask has shape {kpm.shape}; expected "
                                 f"(N, S) = {(n, src_len)}")
            kpm = kpm[:, None, None, :]
            bias = kpm if bias is None else bias + kpm
        return bias

    def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array,
                 key_padding_mask: jax.Array | None = None, need_weights: bool = True,
                 attn_mask: jax.Array | None = None, average_attn_weights: bool = True,
                 is_causal: bool = False, *, rngs: nnx.Rngs | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
        """Attend from ``query`` to ``key``/``value``, as torch's ``forward``.

        Args:
          query: (L, N, E), or (N, L, E) with ``batch_first``, or unbatched (L, E).
          key: (S, N, kdim) / (N, S, kdim) / (S, kdim).
          value: (S, N, vdim) / (N, S, vdim) / (S, vdim).
          key_padding_mask: (N, S) (or (S,) unbatched); bool True = padding, or
            float added to the logits.
          need_weights: also return the attention weights (after dropout, as torch).
          attn_mask: (L, S) or (N*num_heads, L, S); bool True = blocked, or float
            added to the logits.
          average_attn_weights: average the returned weights over heads.
          is_causal: apply a causal mask. torch treats it as a hint that
            ``attn_mask`` is causal and requires that mask; here, with no
            ``attn_mask``, the causal mask is built (top-left aligned, as
            ``scaled_dot_product_attention``), and with one, ``attn_mask`` is used.
          rngs: dropout generators overriding the module's own.

        Returns:
          ``(output, weights)``: output shaped like ``query`` with E features;
          weights (N, L, S') averaged or (N, num_heads, L, S') per head, S' counting
          ``bias_k`` and the zero key, (L, S') / (num_heads, L, S') unbatched; None
          unless ``need_weights``.
        """
        batched = query.ndim == 3
        shared = 3 if query is key is value else 2 if key is value else 1
        if query.ndim not in (2, 3) or key.ndim != query.ndim or value.ndim != query.ndim:
            raise ValueError("query, key and value must all be batched (3D) or all unbatched "
                             f"(2D); got shapes {query.shape}, {key.shape}, {value.shape}")
        if not batched:
            query, key, value = query[None], key[None], value[None]
            if key_padding_mask is not None:
                key_padding_mask = jnp.asarray(key_padding_mask)[None]
        elif not self.batch_first:
            query, key, value = (jnp.swapaxes(t, 0, 1) for t in (query, key, value))
        n, tgt_len, e = query.shape
        src_len = key.shape[1]
        if e != self.embed_dim:
            raise ValueError(f"query has {e} features; this attention expects {self.embed_dim}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"key/value have {key.shape[-1]}/{value.shape[-1]} features; "
                             f"expected kdim {self.kdim} and vdim {self.vdim}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != n:
            raise ValueError(f"query, key and value disagree on batch or key length: "
                             f"{query.shape}, {key.shape}, {value.shape}")
        dtype = query.dtype
        q, k, v = self._project(query, key, value, shared)
        bias = self._bias(attn_mask, key_padding_mask, n, tgt_len, src_len, dtype)
        extra = 0
        if self.bias_k is not None:
            k = jnp.concatenate([k, jnp.broadcast_to(self.bias_k[...].astype(k.dtype),
                                                     (n, 1, e))], axis=1)
            v = jnp.concatenate([v, jnp.broadcast_to(self.bias_v[...].astype(v.dtype),
                                                     (n, 1, e))], axis=1)
            extra += 1
        h, d = self.num_heads, self.head_dim
        q = q.reshape(n, tgt_len, h, d)
        k = k.reshape(n, k.shape[1], h, d)
        v = v.reshape(n, v.shape[1], h, d)
        if self.add_zero_attn:
            k = jnp.concatenate([k, jnp.zeros((n, 1, h, d), k.dtype)], axis=1)
            v = jnp.concatenate([v, jnp.zeros((n, 1, h, d), v.dtype)], axis=1)
            extra += 1
        if bias is not None and extra:
            # The appended keys are never masked (torch pads its masks with 0).
            bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, extra)))
        s_full = k.shape[1]
        causal = is_causal and attn_mask is None
        dropping = (not self.dropout.deterministic) and self.dropout.rate > 0

        # jax's dot_product_attention takes its softmax in float32: exact enough below
        # float64, not in it (float64 parity checks would see ~1e-7 errors).
        if need_weights or dropping or q.dtype == jnp.float64:
            if causal:
                tri = jnp.tril(jnp.ones((tgt_len, s_full), bool))
                cb = jnp.where(tri, 0.0, -jnp.inf).astype(dtype)[None, None]
                bias = cb if bias is None else bias + cb
            # torch scales q before the product; doing the same keeps the rounding alike.
            logits = jnp.einsum("nlhd,nshd->nhls", q * (1.0 / math.sqrt(d)), k)
            if bias is not None:
                logits = logits + bias
            weights = _safe_softmax(logits)
            if dropping:
                weights = self.dropout(weights, rngs=rngs)
            out = jnp.einsum("nhls,nshd->nlhd", weights, v)
        else:
            weights = None
            mask = add = None
            if bias is not None:
                mask = bias > -jnp.inf
                # Only float masks carry values beyond blocked/allowed.
                floats = any(m is not None and jnp.asarray(m).dtype != jnp.bool_
                             for m in (attn_mask, key_padding_mask))
                add = jnp.where(mask, bias, 0.0).astype(dtype) if floats else None
            if mask is None and not causal:
                out = dot_product_attention(q, k, v)  # jax's, faster on CPU
            else:
                out = jax.nn.dot_product_attention(q, k, v, bias=add, mask=mask,
                                                   is_causal=causal)
            if mask is not None:
                # dot_product_attention spreads a fully blocked row evenly over its keys;
                # torch (and the explicit path) give such a row zero weight.
                allowed = mask
                if causal:
                    allowed = allowed & jnp.tril(jnp.ones((tgt_len, s_full), bool))
                valid = jnp.any(allowed, axis=-1)  # (N|1, H|1, L)
                out = jnp.where(jnp.swapaxes(valid, 1, 2)[..., None], out, 0.0)
        out = self.out_proj(out.reshape(n, tgt_len, e))
        if weights is not None and need_weights:
            if average_attn_weights:
                weights = jnp.mean(weights, axis=1)
        else:
            weights = None
        if not batched:
            out = out[0]
            weights = None if weights is None else weights[0]
        elif not self.batch_first:
            out = jnp.swapaxes(out, 0, 1)
        return out, weights

