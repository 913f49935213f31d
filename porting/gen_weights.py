"""Regenerate ``porting/weights_data.json`` from the installed torchvision.

``python -m porting.gen_weights`` reads every torchvision classification
weights enum whose architecture has (or will have) a jaxnets counterpart and
writes its URL, hash prefix, preprocessing, metrics and metadata as JSON. No
network is needed: all of it lives in torchvision's source. The output is
committed, so torchvision is needed only to refresh it.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["ARCH_PATTERN", "HASH_REGEX", "MODEL_OVERRIDES", "OUTPUT", "collect", "main"]

OUTPUT = Path(__file__).with_name("weights_data.json")

# The torchvision classification families jaxnets ports (or is porting).
ARCH_PATTERN = re.compile(r"(resnet\d+|resnext\w+|wide_resnet\w+|alexnet|vgg\w+|googlenet"
                          r"|inception_v3|vit_\w+)")

# torch.hub's own regex for the hash prefix in a checkpoint's file name.
HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")

# Constructor options torchvision's builders force when pretrained weights are
# requested (``_ovewrite_named_param`` in googlenet.py and inception.py; ViTs
# also get ``image_size`` from the weights' ``min_size``); the jaxnets model
# must be built the same way for the weights to mean the same. GoogLeNet's
# builder also drops the auxiliary classifiers unless ``aux_logits=True`` is
# asked for (its checkpoint holds them untrained); Inception v3's keeps them.
MODEL_OVERRIDES: dict[str, dict[str, Any]] = {
    "googlenet": {"transform_input": True, "aux_logits": False},
    "inception_v3": {"transform_input": True},
}


def _model_overrides(arch: str, meta: dict[str, Any]) -> dict[str, Any]:
    out = dict(MODEL_OVERRIDES.get(arch, {}))
    if arch.startswith("vit_"):
        # torchvision's _vision_transformer builds the model at the weights' min_size.
        out["image_size"] = int(meta["min_size"][0])
    return out


def _float_or_none(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _transforms(partial) -> dict[str, Any]:
    """Reads a ``functools.partial(ImageClassification, ...)`` with the class defaults."""
    params = inspect.signature(partial.func).parameters
    kw = {name: p.default for name, p in params.items()
          if p.default is not inspect.Parameter.empty}
    kw.update(partial.keywords)
    interpolation = getattr(kw["interpolation"], "value", kw["interpolation"])
    return {
        "resize_size": int(kw["resize_size"]),
        "crop_size": int(kw["crop_size"]),
        "interpolation": str(interpolation),
        "mean": [float(v) for v in kw["mean"]],
        "std": [float(v) for v in kw["std"]],
    }


def collect() -> dict[str, Any]:
    """Reads the weights enums of the installed torchvision.

    Returns:
        The JSON document: ``categories`` (named lists stored once),
        ``defaults`` (arch -> torchvision's DEFAULT name) and ``weights``
        (a list of entries).
    """
    import torchvision
    import torchvision.models as tvm
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    imagenet = list(_IMAGENET_CATEGORIES)
    defaults: dict[str, str] = {}
    entries: list[dict[str, Any]] = []
    for arch in sorted(tvm.list_models(module=tvm)):
        if not ARCH_PATTERN.fullmatch(arch):
            continue
        enum = tvm.get_model_weights(arch)
        defaults[arch] = enum.DEFAULT.name
        for w in enum:
            meta = w.meta
            cats = meta.get("categories")
            if cats is None:
                cat_ref = None
            elif list(cats) == imagenet:
                cat_ref = "imagenet1k"
            else:
                raise ValueError(f"{arch}.{w.name}: categories other than ImageNet-1K's")
            match = HASH_REGEX.search(w.url.rsplit("/", 1)[-1])
            metrics = meta.get("_metrics", {}).get("ImageNet-1K", {})
            entries.append({
                "arch": arch,
                "name": w.name,
                "url": w.url,
                "hash_prefix": match.group(1) if match else None,
                "num_params": int(meta["num_params"]),
                "categories": cat_ref,
                "transforms": _transforms(w.transforms),
                "metrics": {k: _float_or_none(v) for k, v in metrics.items()},
                "recipe": meta.get("recipe"),
                "min_size": list(meta.get("min_size", (1, 1))),
                "file_size_mb": _float_or_none(meta.get("_file_size")),
                "gflops": _float_or_none(meta.get("_ops")),
                "license": meta.get("license"),
                "docs": " ".join(str(meta.get("_docs", "")).split()),
                "model_overrides": _model_overrides(arch, meta),
            })
    return {
        "generator": "python -m porting.gen_weights",
        "torchvision_version": torchvision.__version__,
        "categories": {"imagenet1k": imagenet},
        "defaults": defaults,
        "weights": entries,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point.

    Args:
        argv: arguments (``--out PATH``); ``sys.argv[1:]`` when None.

    Returns:
        The exit status.
    """
    from jaxnets.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m porting.gen_weights", description=__doc__)
    parser.add_argument("--out", type=Path, default=OUTPUT, help="where to write the JSON")
    args = parser.parse_args(argv)
    try:
        doc = collect()
    except ImportError as e:
        print(f"error: torchvision is needed to regenerate the weights table ({e})",
              file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(doc['weights'])} weights for {len(doc['defaults'])} archs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
