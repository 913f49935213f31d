"""The model registry: ``create_model(name)`` is the one way in.

Each architecture family registers small builder functions with
``@register_model``; the spec records what tools need to know about a model
without building it (input size, class count, the torch reference to compare
with, which parameters form the classifier head).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import numbers
from collections.abc import Callable
from typing import Any

from flax import nnx

__all__ = ["ModelSpec", "UnknownModelError", "register_model", "create_model", "list_models",
           "get_spec"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one named model.

    Attributes:
      name: registry name, e.g. ``"resnet50"``.
      builder: ``builder(*, num_classes, rngs, **overrides) -> nnx.Module``.
      kind: ``"image"`` (NHWC classifier), ``"vector"`` (a classifier of
        flattened inputs, the MLP) or ``"sequence"`` (the Transformer).
      input_size: default (height, width) for image models.
      in_channels: input channels for image models.
      num_classes: default class count.
      torch_reference: where the torch model comes from: ``"torchvision"``
        (``torchvision.models.get_model(name)``) or ``"module:function"``.
      head: regex over torch state_dict keys of the classifier head, left out
        of a load when the class count differs from the checkpoint's.
      min_size: smallest (height, width) the model accepts.
    """

    name: str
    builder: Callable[..., nnx.Module]
    kind: str = "image"
    input_size: tuple[int, int] = (224, 224)
    in_channels: int = 3
    num_classes: int = 1000
    torch_reference: str = "torchvision"
    head: str = r"^fc\."
    min_size: tuple[int, int] = (32, 32)


class UnknownModelError(ValueError):
    """Raised for a model name that is not registered."""


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(**spec_fields: Any) -> Callable:
    """Decorator registering a builder under its function name.

    Args:
      **spec_fields: ``ModelSpec`` fields other than ``name`` and ``builder``.

    Returns:
      The decorator; it returns the builder unchanged.
    """

    def wrap(builder):
        name = builder.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(name=name, builder=builder, **spec_fields)
        return builder

    return wrap


def _ensure_loaded() -> None:
    # Importing the package imports every family module, which registers it.
    import jaxnets  # noqa: F401


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model.

    Args:
      name: registry name.

    Returns:
      Its ``ModelSpec``.

    Raises:
      UnknownModelError: naming the closest registered names.
      TypeError: for a name that is not a string.
    """
    _ensure_loaded()
    if not isinstance(name, str):
        raise TypeError(f"a model name is a string (jaxnets.list_models() lists them); got "
                        f"{type(name).__name__} {name!r}")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}{hint} ({len(_REGISTRY)} registered; "
            "jaxnets.list_models() lists them)"
        )
    return _REGISTRY[name]


def list_models(pattern: str | None = None, *, kind: str | None = None) -> list[str]:
    """Registered model names, sorted.

    Args:
      pattern: optional shell-style filter, e.g. ``"resnet*"``.
      kind: optional ``"image"``, ``"vector"`` or ``"sequence"`` filter.

    Returns:
      The matching names.

    Raises:
      ValueError: for a ``kind`` no model has.
    """
    _ensure_loaded()
    kinds = sorted({s.kind for s in _REGISTRY.values()})
    if kind and kind not in kinds:
        raise ValueError(f"unknown model kind {kind!r}; kinds: {', '.join(kinds)}")
    names = sorted(_REGISTRY)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    if kind:
        names = [n for n in names if _REGISTRY[n].kind == kind]
    return names


def create_model(name: str, *, num_classes: int | None = None, rngs: nnx.Rngs | None = None,
                 seed: int = 0, **overrides: Any) -> nnx.Module:
    """Build a registered model.

    Args:
      name: registry name, e.g. ``"resnet50"``.
      num_classes: classifier outputs; the spec's default when None.
      rngs: random generators for initialisation; ``nnx.Rngs(seed)`` when None.
      seed: seed used when ``rngs`` is None.
      **overrides: constructor options of the architecture (torchvision's
        names, e.g. ``zero_init_residual=True``).

    Returns:
      The model in training mode, as a new torch module is; call
      ``model.eval()`` for inference.

    Raises:
      UnknownModelError: for an unregistered name.
      TypeError: for an option the architecture does not have, ``rngs``
        that is not an ``nnx.Rngs``, or a ``seed`` that is no integer (or key).
      ValueError: for a ``num_classes`` that is not a positive integer.
    """
    spec = get_spec(name)
    if rngs is not None and not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"{name}: rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)); got "
                        f"{type(rngs).__name__} (or pass seed=...)")
    if rngs is None and (isinstance(seed, (bool, str, float)) or seed is None):
        raise TypeError(f"{name}: seed must be an integer (or a jax random key); got {seed!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(
            num_classes, numbers.Integral) or num_classes < 1):
        raise ValueError(f"{name}: num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(seed, numbers.Integral):
        seed = int(seed)  # nnx.Rngs takes a Python int or a key, not np.int64
    rngs = rngs if rngs is not None else nnx.Rngs(seed)
    kwargs = dict(overrides)
    if spec.kind == "image" or num_classes is not None:
        kwargs["num_classes"] = spec.num_classes if num_classes is None else int(num_classes)
    try:
        model = spec.builder(rngs=rngs, **kwargs)
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from e
    model.train()
    return model
