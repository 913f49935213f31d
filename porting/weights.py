"""The pretrained weights jaxnets knows about, as typed data.

One frozen :class:`Weights` per torchvision weights entry (URL, hash prefix,
preprocessing, metrics, recipe), read from ``weights_data.json``, which
``python -m porting.gen_weights`` generates from torchvision's own weights
enums. Entries are named ``"<arch>.<NAME>"`` (``"resnet50.IMAGENET1K_V2"``);
``"<arch>"`` and ``"<arch>.DEFAULT"`` mean torchvision's ``DEFAULT`` entry.

The table covers every torchvision classification architecture jaxnets ports,
including families not registered yet; :func:`list_weights` lists only those
whose architecture is registered in ``jaxnets``, while :func:`get_weights`
answers for any entry in the table.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import json
import re
from pathlib import Path
from typing import Any

__all__ = ["Transforms", "Weights", "UnknownWeightsError", "get_weights", "list_weights",
           "all_weights", "hash_prefix_of"]

_DATA = Path(__file__).with_name("weights_data.json")
_HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")


class UnknownWeightsError(ValueError):
    """A weights name that is not in the table."""


@dataclasses.dataclass(frozen=True)
class Transforms:
    """Evaluation preprocessing the weights were measured with (torchvision's presets).

    Attributes:
      resize_size: the shorter side is resized to this first.
      crop_size: then centre-cropped to this square.
      interpolation: ``"bilinear"`` or ``"bicubic"``.
      mean: per-channel mean subtracted after scaling to [0, 1].
      std: per-channel standard deviation divided by.
    """

    resize_size: int
    crop_size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Weights:
    """One set of pretrained weights.

    Attributes:
      arch: jaxnets / torchvision architecture name, e.g. ``"resnet50"``.
      name: torchvision's weights name, e.g. ``"IMAGENET1K_V2"``.
      url: where the ``.pth`` is downloaded from.
      hash_prefix: leading hex digits of the file's sha256 (from its name, as
        ``torch.hub`` checks them); None when the name carries none.
      num_params: parameter count of the full model.
      categories: class names in output order, or None (feature weights).
      transforms: evaluation preprocessing.
      metrics: ImageNet-1K ``acc@1`` / ``acc@5`` (None where unpublished).
      recipe: link to the training recipe.
      min_size: smallest (height, width) input.
      file_size_mb: size of the ``.pth`` in MB, if known.
      gflops: forward cost at ``crop_size``, if known.
      license: license link where torchvision gives one.
      docs: torchvision's description.
      model_overrides: constructor options the weights need (torchvision forces
        them when building the pretrained model, e.g. ``transform_input``).
    """

    arch: str
    name: str
    url: str
    hash_prefix: str | None
    num_params: int
    categories: tuple[str, ...] | None
    transforms: Transforms
    metrics: dict[str, float | None]
    recipe: str | None = None
    min_size: tuple[int, int] = (1, 1)
    file_size_mb: float | None = None
    gflops: float | None = None
    license: str | None = None
    docs: str = ""
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def spec(self) -> str:
        """``"<arch>.<name>"``."""
        return f"{self.arch}.{self.name}"

    @property
    def num_classes(self) -> int | None:
        """Outputs of the classifier the weights were trained with, if known."""
        return None if self.categories is None else len(self.categories)

    @property
    def file_name(self) -> str:
        """The checkpoint's file name in the torch hub cache."""
        return self.url.rsplit("/", 1)[-1]

    def __hash__(self) -> int:  # model_overrides/metrics are dicts; the spec+url identify it
        return hash((self.arch, self.name, self.url))


def hash_prefix_of(file_name: str) -> str | None:
    """The hash prefix torch.hub reads from a checkpoint file name.

    Args:
      file_name: e.g. ``"resnet50-11ad3fa6.pth"``.

    Returns:
      ``"11ad3fa6"``, or None when the name has none.
    """
    m = _HASH_REGEX.search(file_name)
    return m.group(1) if m and m.group(1) else None


@functools.cache
def _table() -> tuple[dict[tuple[str, str], Weights], dict[str, str]]:
    doc = json.loads(_DATA.read_text())
    cats = {k: tuple(v) for k, v in doc["categories"].items()}
    table = {}
    for e in doc["weights"]:
        e = dict(e)
        e["categories"] = None if e["categories"] is None else cats[e["categories"]]
        t = e["transforms"]
        e["transforms"] = Transforms(t["resize_size"], t["crop_size"], t["interpolation"],
                                     tuple(t["mean"]), tuple(t["std"]))
        e["min_size"] = tuple(e["min_size"])
        w = Weights(**e)
        table[(w.arch, w.name)] = w
    return table, dict(doc["defaults"])


def all_weights() -> list[Weights]:
    """Every entry in the table, registered architecture or not.

    Returns:
      The entries, sorted by arch then name.
    """
    table, _ = _table()
    return [table[k] for k in sorted(table)]


def _registered_archs() -> set[str]:
    import jaxnets

    return set(jaxnets.list_models())


def list_weights(arch: str | None = None) -> list[str]:
    """Names of the weights whose architecture is registered in jaxnets.

    Args:
      arch: only this architecture's entries.

    Returns:
      Sorted ``"<arch>.<NAME>"`` specs (``DEFAULT`` aliases not repeated).
    """
    registered = _registered_archs()
    return [w.spec for w in all_weights()
            if w.arch in registered and (arch is None or w.arch == arch)]


def _names_for(arch: str) -> list[str]:
    table, defaults = _table()
    names = sorted(n for a, n in table if a == arch)
    return names + (["DEFAULT"] if arch in defaults else [])


def get_weights(spec: str | tuple[str, str] | Weights) -> Weights:
    """Looks up one weights entry.

    Args:
      spec: ``"resnet50"`` (torchvision's DEFAULT), ``"resnet50.DEFAULT"``,
        ``"resnet50.IMAGENET1K_V1"``, ``("resnet50", "IMAGENET1K_V1")``, a
        torchvision weights enum member (``ResNet50_Weights.IMAGENET1K_V1``;
        torch is not needed to look one up otherwise), or a ``Weights``
        (returned as is; tests use this to point at a local server).

    Returns:
      The ``Weights``.

    Raises:
      UnknownWeightsError: naming the available names for the arch, or the
        archs that have weights.
    """
    if isinstance(spec, Weights):
        return spec
    if isinstance(spec, enum.Enum):
        # torchvision's WeightsEnum: class <Arch>_Weights, member named as the entry
        # (DEFAULT is an alias, so its name is the entry's).
        arch, name = type(spec).__name__.removesuffix("_Weights").lower(), spec.name
    elif isinstance(spec, tuple):
        arch, name = spec
    elif isinstance(spec, str):
        arch, _, name = spec.partition(".")
        name = name or "DEFAULT"
    else:
        raise UnknownWeightsError(f"weights must be a name or (arch, name), got {spec!r}")
    table, defaults = _table()
    if arch not in defaults:
        close = difflib.get_close_matches(arch, defaults, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownWeightsError(
            f"no pretrained weights for arch {arch!r}{hint}; archs with weights: "
            + ", ".join(sorted(defaults)))
    if name == "DEFAULT":
        name = defaults[arch]
    if (arch, name) not in table:
        raise UnknownWeightsError(
            f"unknown weights {name!r} for {arch}; available: " + ", ".join(_names_for(arch)))
    return table[(arch, name)]
