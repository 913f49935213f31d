"""The precision policy of a training step: ``--precision fp32|bf16``.

``bf16`` is mixed precision in the usual sense: the forward and backward
passes compute in bfloat16, everything that accumulates over steps stays
float32. Concretely, inside the jitted step:

* parameters are kept (and updated by the optimizer) in float32; a bfloat16
  copy of the ``nnx.Param`` leaves is made for the forward pass
  (``cast_for_compute``), so the gradients flowing back through the cast are
  float32 again;
* the optimizer state is built from the float32 parameters, so it is float32;
* ``jaxnets.layers.BatchNorm`` computes batch statistics in float32 whatever
  its input dtype and stores them in the dtype of its running statistics
  (float32): ``nnx.BatchStat`` leaves are never cast;
* inputs are cast to bfloat16; the logits are cast back to float32 before the
  loss (``cast_output``), so softmax and cross-entropy run in float32.

bfloat16 has float32's exponent range, so no loss scaling is needed (unlike
float16). ``fp32`` is the identity policy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["Policy", "POLICIES", "get_policy", "cast_for_compute", "cast_floating"]

_T = TypeVar("_T")


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def cast_for_compute(state: _T, dtype: Any) -> _T:
    """Cast the floating ``nnx.Param`` leaves of a state to ``dtype``.

    Batch statistics, RNG state, counters and any non-Param variables are
    left as they are. Apply it inside the differentiated function, before
    ``nnx.merge``, so gradients are taken with respect to the original
    (float32) leaves.

    Args:
      state: an ``nnx.State`` (from ``nnx.split``) or any pytree holding
        ``nnx.Variable`` leaves.
      dtype: the compute dtype, e.g. ``jnp.bfloat16``.

    Returns:
      A state of the same structure.
    """
    def cast(x):
        if isinstance(x, nnx.Param):
            v = x.get_value()
            if jnp.issubdtype(v.dtype, jnp.floating) and v.dtype != dtype:
                return x.replace(v.astype(dtype))
        return x

    return jax.tree.map(cast, state, is_leaf=_is_variable)


def cast_floating(tree: _T, dtype: Any) -> _T:
    """Cast every floating leaf of a plain pytree (e.g. a flat ``{path: array}`` of params).

    For trees that hold parameters only; use ``cast_for_compute`` on an
    ``nnx.State`` that also holds statistics.

    Args:
      tree: a pytree of arrays.
      dtype: the target dtype.

    Returns:
      The tree with floating leaves in ``dtype``.
    """
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a step computes: the dtype of the forward/backward pass.

    Attributes:
      name: ``"fp32"`` or ``"bf16"``.
      compute_dtype: dtype of parameters and activations in the forward pass.
      param_dtype: dtype in which parameters, optimizer state and BatchNorm
        statistics are stored (always float32 here).
      output_dtype: dtype of the logits handed to the loss.
    """

    name: str
    compute_dtype: Any
    param_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32

    @property
    def is_mixed(self) -> bool:
        """Whether the compute dtype differs from the storage dtype."""
        return jnp.dtype(self.compute_dtype) != jnp.dtype(self.param_dtype)

    def cast_params(self, state: _T) -> _T:
        """The compute copy of a model state (Param leaves only; see ``cast_for_compute``).

        Args:
          state: an ``nnx.State``.

        Returns:
          The state with floating Params in ``compute_dtype``.
        """
        if not self.is_mixed:
            return state
        return cast_for_compute(state, self.compute_dtype)

    def cast_param_tree(self, params: _T) -> _T:
        """The compute copy of a parameters-only pytree (e.g. a flat ``{path: array}``).

        Args:
          params: floating parameters (no statistics).

        Returns:
          The tree in ``compute_dtype``.
        """
        return cast_floating(params, self.compute_dtype) if self.is_mixed else params

    def cast_inputs(self, x: jax.Array) -> jax.Array:
        """Floating model inputs in the compute dtype; integer inputs (tokens) unchanged.

        Args:
          x: the model input.

        Returns:
          The input to feed the model.
        """
        if jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(self.compute_dtype)
        return x

    def cast_output(self, y: Any) -> Any:
        """Model outputs (a pytree) in ``output_dtype`` for the loss.

        Args:
          y: logits, or a tuple/dict of them.

        Returns:
          The same structure in float32.
        """
        return cast_floating(y, self.output_dtype)


POLICIES: dict[str, Policy] = {
    "fp32": Policy("fp32", jnp.float32),
    "bf16": Policy("bf16", jnp.bfloat16),
}


def get_policy(name: str) -> Policy:
    """The policy for a ``--precision`` value.

    Args:
      name: ``"fp32"`` or ``"bf16"``.

    Returns:
      The ``Policy``.

    Raises:
      ValueError: for any other name.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]
