"""Declarative torch <-> flax naming and layout rules.

A flax variable path (``layer1.0.conv1.kernel``) becomes a torch state_dict
key (``layer1.0.conv1.weight``) by the first rule whose regex matches, and its
array goes through that rule's layout. Models name their submodules the way
torch does, so the default table covers most families; a family adds rules
only where torch stores something differently (e.g. a flattened Linear that
follows NCHW features). The same table runs in both directions.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["Layout", "Rule", "IDENTITY", "KERNEL", "COUNTER", "flatten_linear", "DEFAULT_RULES",
           "register_rules", "rules_for", "torch_key"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """A pair of inverse array transforms and the shape map they imply.

    Attributes:
      name: for messages.
      to_torch: flax array -> torch-layout array.
      from_torch: torch-layout array -> flax array.
      torch_shape: flax shape -> torch shape.
    """

    name: str
    to_torch: Callable[[np.ndarray], np.ndarray]
    from_torch: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


def _kernel_to_torch(k):
    # Linear (in, out) -> (out, in); conv (*spatial, in, out) -> (out, in, *spatial).
    n = k.ndim
    return np.transpose(k, (n - 1, n - 2, *range(n - 2))) if n >= 2 else k


def _kernel_from_torch(w):
    n = w.ndim
    return np.transpose(w, (*range(2, n), 1, 0)) if n >= 2 else w


def _kernel_shape(s):
    n = len(s)
    return (s[-1], s[-2], *s[: n - 2]) if n >= 2 else tuple(s)


IDENTITY = Layout("identity", lambda a: a, lambda a: a, tuple)
KERNEL = Layout("kernel", _kernel_to_torch, _kernel_from_torch, _kernel_shape)
# torch counts BatchNorm batches in int64; JAX runs in 32-bit unless x64 is on.
COUNTER = Layout("counter", lambda a: np.asarray(a, np.int64),
                 lambda a: np.asarray(a, np.int32), tuple)


def flatten_linear(channels: int, height: int, width: int) -> Layout:
    """Layout of a Linear fed by NHWC features flattened here, NCHW in torch.

    Args:
      channels: feature channels before the flatten.
      height: feature height.
      width: feature width.

    Returns:
      The layout mapping the flax kernel (h*w*c, out) to torch's (out, c*h*w).
    """
    c, h, w = channels, height, width

    def to_torch(k):
        o = k.shape[-1]
        return k.reshape(h, w, c, o).transpose(3, 2, 0, 1).reshape(o, c * h * w)

    def from_torch(t):
        o = t.shape[0]
        return t.reshape(o, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, o)

    return Layout(f"flatten_linear({c},{h},{w})", to_torch, from_torch, lambda s: (s[1], s[0]))


@dataclasses.dataclass(frozen=True)
class Rule:
    """Rename a flax path matching ``pattern`` to ``replacement``, re-laying the array.

    Attributes:
      pattern: regex over the dotted flax path (full match).
      replacement: ``re.sub`` template giving the torch key.
      layout: array transform.
    """

    pattern: str
    replacement: str
    layout: Layout = IDENTITY


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(r"(.*)\.kernel", r"\1.weight", KERNEL),
    Rule(r"(.*)\.scale", r"\1.weight"),
    Rule(r"(.*)\.mean", r"\1.running_mean"),
    Rule(r"(.*)\.var", r"\1.running_var"),
    Rule(r"(.*)\.num_batches_tracked", r"\1.num_batches_tracked", COUNTER),
    Rule(r"(.*)\.embedding", r"\1.weight"),
    Rule(r"(.*)", r"\1"),
)

_FAMILY_RULES: dict[str, tuple[Rule, ...]] = {}


def register_rules(model_class_name: str, rules: Sequence[Rule]) -> None:
    """Add a family's rules, tried before the defaults for that model class.

    Args:
      model_class_name: the ``nnx.Module`` class name, e.g. ``"AlexNet"``;
        subclasses inherit the rules.
      rules: the family's rules, first match wins.
    """
    _FAMILY_RULES[model_class_name] = tuple(rules)


def rules_for(model_or_class) -> tuple[Rule, ...]:
    """The rule table for a model: its family's rules, then the defaults.

    Args:
      model_or_class: a model instance or class.

    Returns:
      The ordered rules.
    """
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    for klass in cls.__mro__:
        if klass.__name__ in _FAMILY_RULES:
            return _FAMILY_RULES[klass.__name__] + DEFAULT_RULES
    return DEFAULT_RULES


_COMPILED: dict[str, re.Pattern] = {}


def torch_key(flax_path: str, rules: Sequence[Rule]) -> tuple[str, Layout]:
    """Map a dotted flax path to its torch key and layout.

    Args:
      flax_path: e.g. ``"layer1.0.downsample.0.kernel"``.
      rules: from ``rules_for``.

    Returns:
      ``(torch_key, layout)``.
    """
    for rule in rules:
        pat = _COMPILED.get(rule.pattern)
        if pat is None:
            pat = _COMPILED[rule.pattern] = re.compile(rule.pattern)
        m = pat.fullmatch(flax_path)
        if m:
            return m.expand(rule.replacement), rule.layout
    raise AssertionError("the default rules end with a catch-all")
