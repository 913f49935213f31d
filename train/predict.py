"""``python -m train.predict``: classify image files with a fine-tuned run, torchvision's
pretrained weights, or a checkpoint file.

    python -m train.predict --weights runs/resnet18-flowers photo.jpg more_photos/
    python -m train.predict --arch resnet50 --weights DEFAULT photo.jpg --top 3
    python -m train.predict --arch resnet18 --weights model.pth photo.jpg --json out.json

Each image gets the model's evaluation input as ``train.finetune`` (and torchvision's
``ImageClassification`` preset) makes it: the shorter side resized on the host with PIL
(``--resize-size``, the weights' interpolation), the central ``--image-size`` square,
then normalised with ``--mean``/``--std``. What these are unless given: a run's own
(its ``config.json``), named weights' published transforms, else ImageNet's (resize
256 for a 224 crop at the model's default input size). The class names: a run's
(recorded in its ``model.json`` since this program exists), named weights' categories,
else the class indices.

One line per image on stdout as its batch is done, ``PATH: NAME PROB%, ...`` (the
``--top`` most probable classes, softmax of the logits in float32); ``--json`` writes
every image's top classes, probabilities and logits, and how the model was read and the
images shaped, at the end. The model computes in float32 (a run trained with
``--precision bf16`` evaluated in bfloat16: its logits differ by bfloat16's rounding).
Image files are read as ``train.finetune`` reads them (16-bit and float images scaled to
8 bits, alpha dropped). Bad input (an unknown arch, weights that do not fit it, a
missing path, a damaged run, an image that cannot be decoded without ``--skip-bad``) is
one ``error:`` line and exit status 2: the lines printed before it stand, ``--json`` is
not written (a file already there is kept).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Preprocessing", "LoadedModel", "load", "find_images", "main", "predict"]

EXIT_BAD_INPUT = 2
EXIT_WRITE = 74


class PredictError(Exception):
    """Bad input: reported by ``main`` as one line."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The model's evaluation input: torchvision's ``Resize(resize_size)`` of the
    shorter side, ``CenterCrop(image_size)``, ``Normalize(mean, std)``."""

    image_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclasses.dataclass
class LoadedModel:
    """A model ready to classify: in eval mode, with what its input and outputs mean."""

    model: Any
    arch: str
    source: str  # where the weights came from, one line
    preprocessing: Preprocessing
    class_names: list[str] | None  # None: the outputs have no recorded names
    channels: int
    num_classes: int | None


# --------------------------------------------------------------------------
# The model.


def _imagenet_preprocessing(spec, transforms=None) -> Preprocessing:
    """Named weights' transforms, else ImageNet's at the model's default input size."""
    from train.config import default_normalization

    mean, std = default_normalization(spec.in_channels, transforms)
    if transforms is not None:
        return Preprocessing(int(transforms.crop_size), int(transforms.resize_size),
                             transforms.interpolation, mean, std)
    size = spec.input_size[0]
    if spec.kind == "vector":  # a flattened square image
        size = math.isqrt(size // spec.in_channels)
    return Preprocessing(size, round(size * 256 / 224), "bilinear", mean, std)


def _run_model(path: str, arch: str | None, step, model_args: dict) -> LoadedModel:
    """A ``train.finetune`` run's checkpoint, with the run's preprocessing and classes;
    ``arch`` and ``model_args`` for what the run does not record (a bare checkpoints
    folder has no model.json)."""
    import jaxnets
    from porting import pretrained
    from train import checkpoint as ckpt_lib

    try:
        weights = ckpt_lib.read_run_weights(path, step, fall_back=step is None)
        if weights.arch is None and arch is None:
            raise PredictError(f"--weights {path}: the run does not say its arch (neither "
                               "a model.json nor a config.json names one); pass --arch")
        if arch is not None and weights.arch not in (None, arch):
            raise PredictError(f"--weights {path}: a run of {weights.arch}, not --arch {arch}")
        recorded = weights.overrides
        for k, v in model_args.items():
            if k in recorded and not pretrained.same_option(recorded[k], v):
                raise PredictError(f"--weights {path}: the run's model was built with "
                                   f"{k}={recorded[k]!r}, not {k}={v!r} (--model-arg is for "
                                   "options a run does not record)")
        weights = weights._replace(arch=weights.arch or arch,
                                   overrides={**recorded, **model_args})
        if jaxnets.get_spec(weights.arch).kind not in ("image", "vector"):
            raise PredictError(f"--arch {weights.arch} is not an image classifier")
        if recorded and (problem := pretrained.model_problem(weights.arch, recorded)):
            raise PredictError(f"--weights {path}: the options the run records do not build "
                               f"{weights.arch}: {problem.removeprefix('--model-arg: ')}")
        if (problem := pretrained.model_problem(weights.arch, weights.overrides)):
            raise PredictError(problem)
        model = ckpt_lib.model_of(weights)
        num_classes = pretrained.head_classes(model, weights.arch)
    except ckpt_lib.CheckpointError as e:
        raise PredictError(f"--weights {path}: {e}") from None
    except (pretrained.PortingError, ValueError, TypeError) as e:  # arrays of another model
        from jaxnets.cli import one_line

        raise PredictError(f"--weights {path}: {one_line(e, 600)}") from None
    spec = jaxnets.get_spec(weights.arch)
    run_dir = os.path.dirname(os.path.dirname(weights.directory))
    saved, info = _read_json(run_dir, "config.json"), _read_json(run_dir, "model.json")
    default = _at_size(_imagenet_preprocessing(spec), weights.overrides.get("image_size"))
    try:  # a run's config.json holds resolved values; a bare checkpoints folder has none
        size = int(saved.get("image_size") or default.image_size)
        pre = Preprocessing(
            size, int(saved.get("resize_size") or (size if saved else default.resize_size)),
            str(saved.get("interpolation") or default.interpolation),
            tuple(float(v) for v in saved.get("mean") or default.mean),
            tuple(float(v) for v in saved.get("std") or default.std))
    except (TypeError, ValueError) as e:
        raise PredictError(f"{os.path.join(run_dir, 'config.json')}: its preprocessing "
                           f"values are damaged ({e})") from None
    _check_preprocessing(pre, spec.in_channels, f"{os.path.join(run_dir, 'config.json')}:")
    names = info.get("classes")
    if names is None and saved.get("dataset") == "digits":
        names = [str(i) for i in range(10)]
    elif names is not None and _names(names, num_classes) is None:
        print(f"note: {os.path.join(run_dir, 'model.json')}: its classes are not "
              f"{num_classes} names, one per output; indices shown", file=sys.stderr)
    return LoadedModel(model, weights.arch, f"step {weights.step} of the run {run_dir}", pre,
                       _names(names, num_classes), spec.in_channels, num_classes)


def _read_json(folder: str, name: str) -> dict:
    """A JSON object file of a run or converted directory; {} where there is none."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise PredictError(f"{path} is unreadable: {e}") from None
    if not isinstance(value, dict):
        raise PredictError(f"{path} is not a JSON object")
    return value


def _names(names, num_classes: int | None) -> list[str] | None:
    if isinstance(names, list) and num_classes is not None and len(names) == num_classes:
        return [str(n) for n in names]
    return None


def load(weights: str, arch: str | None = None, *, step: int | str | None = None,
         model_args: dict | None = None, progress: bool = True) -> LoadedModel:
    """Reads the model ``--weights`` names, in eval mode.

    Args:
        weights: A ``train.finetune`` run directory (or its ``checkpoints`` folder, or
            one step directory), a directory ``porting convert`` wrote, a ``.pth`` /
            ``.safetensors`` file, or a torchvision weights name (``DEFAULT``,
            ``IMAGENET1K_V2``, ``resnet50.IMAGENET1K_V2``).
        arch: The registered name; a run, a converted directory and ``ARCH.NAME``
            weights say their own (a different ``arch`` is an error).
        step: A run's step (``"best"``: the best by validation top-1); None: the
            newest readable one.
        model_args: Constructor options (for a run: those it does not record).
        progress: Show a bar while named weights download.

    Returns:
        The ``LoadedModel``.

    Raises:
        PredictError: Naming what does not fit.
    """
    import jaxnets
    from porting import pretrained
    from train import checkpoint as ckpt_lib

    model_args = dict(model_args or {})
    path = os.path.expanduser(weights)
    converted = os.path.isdir(path) and pretrained.is_converted(path)
    if not converted and ckpt_lib.locate_run(path) is not None:
        return _run_model(path, arch, step, model_args)
    if step is not None:
        raise PredictError("--step is for a train.finetune run's checkpoints; --weights "
                           f"{weights} is not a run")
    named = None
    if converted:
        meta = _read_json(path, "jaxnets.json")
        arch = _same_arch(arch, meta.get("arch"), f"--weights {weights} (converted)")
        if isinstance(meta.get("weights"), str):
            named = _lookup(meta["weights"])
    elif pretrained.is_weights_path(weights):
        if not os.path.exists(path):
            raise PredictError(f"--weights {weights}: no such file or directory")
    else:
        named_arch = weights.partition(".")[0] if "." in weights else None
        arch = _same_arch(arch, named_arch, f"--weights {weights}")
        if arch is None:
            raise PredictError(f"--weights {weights}: no such file or folder; a torchvision "
                               f"weights name needs --arch (or ARCH.{weights})")
        jaxnets.get_spec(arch)  # an unknown arch: the registry's error, with suggestions
        from porting.weights import list_weights

        if not list_weights(arch):
            raise PredictError(f"--weights {weights}: no such file, and {arch} has no "
                               "pretrained weights (torchvision publishes none for it)")
        named = _lookup(weights if named_arch else f"{arch}.{weights}")
        if named is None:
            raise PredictError(f"--weights {weights}: no such file, and not a torchvision "
                               f"weights name of {arch} (python -m porting weights {arch})")
    if arch is None:
        raise PredictError(f"--weights {weights} needs --arch (a run has a checkpoints/ "
                           "folder, a converted directory a jaxnets.json)")
    spec = jaxnets.get_spec(arch)
    if spec.kind not in ("image", "vector"):
        raise PredictError(f"--arch {arch} is not an image classifier")
    try:
        model, report = pretrained.load_torchvision(
            arch, named.spec if named is not None and not converted else path,
            progress=progress, **model_args)
    except jaxnets.UnknownModelError:  # a ValueError, reported by main as it is
        raise
    except (OSError, ValueError, TypeError, RuntimeError) as e:  # RuntimeError: DownloadError
        from jaxnets.cli import one_line

        raise PredictError(f"--weights {weights}: {one_line(e, 600)}") from None
    model.eval()
    num_classes = pretrained.head_classes(model, arch)
    categories = None if named is None or named.categories is None else list(named.categories)
    pre = _at_size(_imagenet_preprocessing(spec, None if named is None else named.transforms),
                   model_args.get("image_size"))
    label = named.spec if named is not None and not converted else weights
    return LoadedModel(model, arch, f"{label} ({report})", pre,
                       _names(categories, num_classes), spec.in_channels, num_classes)


def _at_size(pre: Preprocessing, size) -> Preprocessing:
    """``pre`` for a model built for ``size`` (a ViT's ``image_size`` option), the
    resize keeping its ratio to the crop."""
    if not isinstance(size, int) or size == pre.image_size:
        return pre
    return dataclasses.replace(pre, image_size=size,
                               resize_size=round(size * pre.resize_size / pre.image_size))


def _same_arch(given: str | None, found: str | None, what: str) -> str | None:
    if given is not None and found is not None and given != found:
        raise PredictError(f"{what} is for {found}, not --arch {given}")
    return given or found


def _lookup(spec: str):
    from porting.weights import get_weights

    try:
        return get_weights(spec)
    except ValueError:
        return None


# --------------------------------------------------------------------------
# The images.


def find_images(paths: Sequence[str]) -> list[str]:
    """The image files named: files as given, folders' images (recursively, in
    ``ImageFolder``'s order, hidden ones left out).

    Raises:
        PredictError: A path that does not exist, or a folder without images.
    """
    from train.data import _list_images

    found = []
    for p in paths:
        path = os.path.expanduser(p)
        if os.path.isdir(path):
            images = _list_images(path)
            if not images:
                raise PredictError(f"{p}: no image files in this folder")
            found += images
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise PredictError(f"{p}: no such file or folder")
    return found


def predict(loaded: LoadedModel, paths: Sequence[str], *, top: int = 5,
            batch_size: int = 16, skip_bad: bool = False, progress: bool = True,
            on_result=None) -> tuple[list[dict[str, Any]], list[str]]:
    """Classifies image files.

    Args:
        loaded: From ``load``.
        paths: Image files.
        top: Classes kept per image (at most the class count).
        batch_size: Images per forward pass (the last batch is padded: one compile).
        skip_bad: Leave out files that cannot be decoded (returned) instead of failing.
        progress: Show a bar.
        on_result: Called with each result as its batch is done (the program prints it).

    Returns:
        ``(results, skipped)``: per image ``{"path", "top": [{"index", "name", "prob"}],
        "logits"}``, in the order of ``paths``; and the files left out.

    Raises:
        PredictError: A file that cannot be decoded (without ``skip_bad``).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from train.augment import AugmentConfig, eval_transform
    from train.data import DataError, HostTransform, decode_image
    from train.distributed import progress as bar_of

    pre = loaded.preprocessing
    host = HostTransform("eval", pre.image_size, pre.resize_size, pre.interpolation)
    augment = AugmentConfig(crop_size=pre.image_size, resize_size=pre.resize_size,
                            mean=pre.mean, std=pre.std, channels=loaded.channels,
                            interpolation=pre.interpolation, eval_prepared=True)
    graphdef, state = nnx.split(loaded.model)

    @jax.jit
    def forward(state, images):
        logits = nnx.merge(graphdef, state)(eval_transform(images, augment))
        logits = logits.astype(jnp.float32)
        return logits, jax.nn.softmax(logits, axis=-1)

    results, skipped = [], []
    batch: list[tuple[str, np.ndarray]] = []
    batch_size = max(1, min(batch_size, len(paths)))  # one image: no 16-image batch

    def flush():
        images = np.stack([x for _, x in batch])
        pad = batch_size - len(batch)
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        logits, probs = (np.asarray(a)[: len(batch)] for a in forward(state, images))
        k = min(top, logits.shape[-1])
        for (path, _), row, p in zip(batch, logits, probs):
            order = np.argsort(-p, kind="stable")[:k]
            results.append({"path": path, "logits": row.tolist(), "top": [
                {"index": int(i), "name": _name(loaded.class_names, int(i)),
                 "prob": float(p[i])} for i in order]})
            if on_result is not None:
                on_result(results[-1])
        batch.clear()

    with bar_of(paths, desc="predict", unit="img", leave=False,
                disable=not progress or len(paths) <= batch_size) as bar:
        for path in bar:
            try:
                batch.append((path, decode_image(path, host)))
            except DataError as e:
                if not skip_bad:
                    raise PredictError(f"{e} (--skip-bad leaves such files out)") from None
                skipped.append(path)
                continue
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    return results, skipped


def _name(names: list[str] | None, index: int) -> str:
    return str(index) if names is None else names[index]


# --------------------------------------------------------------------------
# The command line.


def _parser():
    import argparse

    from jaxnets import compile_cache
    from jaxnets.cli import ArgumentParser, model_arg_type
    from train.config import _floats, _positive_int

    p = ArgumentParser(
        prog="python -m train.predict",
        description="Classify image files with a train.finetune run, torchvision's "
                    "pretrained weights or a checkpoint file: one line per image with its "
                    "most probable classes.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, or folders (their files with ImageFolder's image "
                        "extensions, recursively, in ImageFolder's order)")
    p.add_argument("--weights", required=True,
                   help="a train.finetune run directory (or its checkpoints/ folder, or one "
                        "step folder in it), a directory `porting convert` wrote, a "
                        ".pth/.safetensors file, or torchvision weights (DEFAULT, "
                        "IMAGENET1K_V2, resnet50.IMAGENET1K_V2; python -m porting weights)")
    p.add_argument("--arch", default=None,
                   help="registered model name (a run or a converted directory says its "
                        "own; a bare checkpoints folder does not)")
    p.add_argument("--step", default=None,
                   help="a run's checkpoint step, or 'best' (default: the newest readable "
                        "one; a note says so when the newest cannot be read)")
    p.add_argument("--top", type=_positive_int, default=5,
                   help="classes shown per image (default: 5)")
    p.add_argument("--batch-size", type=_positive_int, default=16,
                   help="images per forward pass (default: 16)")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="center crop side (default: the run's, the weights', else the "
                        "model's default input); given alone, --resize-size keeps its ratio "
                        "to it")
    p.add_argument("--resize-size", type=_positive_int, default=None,
                   help="shorter side before the crop (default: the run's, the weights', "
                        "else 256/224 of the crop)")
    p.add_argument("--interpolation", choices=("bilinear", "bicubic"), default=None,
                   help="resize filter (default: the run's, the weights', else bilinear)")
    p.add_argument("--mean", type=_floats, default=None,
                   help="normalisation mean per channel, comma-separated (default: the "
                        "run's, the weights', else ImageNet's; for a 1-channel model their "
                        "average, 0.449 and 0.226)")
    p.add_argument("--std", type=_floats, default=None,
                   help="normalisation std per channel, comma-separated (default: as --mean)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   type=model_arg_type({"num_classes": "the checkpoint's head decides"}),
                   help="constructor option of the architecture, repeatable (for a run: "
                        "one it does not record)")
    p.add_argument("--class-names", default=None, metavar="FILE",
                   help="a text file naming the model's outputs, one per line, in order "
                        "(default: the run's, the weights' categories, else indices)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out image files that cannot be decoded (listed on stderr)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write every image's top classes, probabilities and logits")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar on stderr")
    compile_cache.add_flag(p)
    return p


def _step(text: str | None):
    if text is None or text == "best":
        return text
    if text.isdigit():
        return int(text)
    raise PredictError(f"--step must be a step number or 'best', got {text!r}")


def _override(pre: Preprocessing, args, channels: int) -> Preprocessing:
    given = {k: getattr(args, k) for k in ("image_size", "resize_size", "interpolation",
                                           "mean", "std") if getattr(args, k) is not None}
    if "image_size" in given and "resize_size" not in given:  # keep the ratio
        given["resize_size"] = round(given["image_size"] * pre.resize_size / pre.image_size)
    pre = dataclasses.replace(pre, **{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in given.items()})
    _check_preprocessing(pre, channels, "")
    return pre


def _check_preprocessing(pre: Preprocessing, channels: int, where: str) -> None:
    """Refuses values the transform cannot take; ``where`` leads the message (a damaged
    config.json), else the flags are named."""
    lead = f"{where} " if where else "--"
    for name in ("mean", "std"):
        if len(getattr(pre, name)) != channels:
            raise PredictError(f"{lead}{name} needs {channels} value(s) for this model's "
                               f"{channels} input channel(s)")
    if min(pre.std) <= 0 or not all(map(math.isfinite, pre.mean + pre.std)):
        raise PredictError(f"{lead}mean must be finite and {'' if where else '--'}std "
                           "finite and > 0")
    if pre.image_size < 1 or pre.resize_size < 1 or pre.interpolation not in (
            "bilinear", "bicubic"):
        raise PredictError(f"{where} image_size {pre.image_size}, resize_size "
                           f"{pre.resize_size}, interpolation {pre.interpolation!r}: expected "
                           "sizes >= 1 and bilinear or bicubic")


def _check_input(loaded: LoadedModel, pre: Preprocessing) -> None:
    """The model takes ``pre.image_size`` images (traced without values)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(loaded.model)
    x = jax.ShapeDtypeStruct((1, pre.image_size, pre.image_size, loaded.channels), np.float32)
    try:
        jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    except Exception as e:  # noqa: BLE001 -- shape errors surface as several types.
        raise PredictError(f"{loaded.arch} cannot take --image-size {pre.image_size}: "
                           f"{str(e).splitlines()[0][:300]}") from None


def _read_names(path: str) -> list[str]:
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            names = [line.strip() for line in f.read().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise PredictError(f"--class-names {path}: {e}") from None
    while names and not names[-1]:  # a final newline or two
        names.pop()
    if not names or not all(names):
        raise PredictError(f"--class-names {path}: expected one non-empty name per line")
    return names


def _line(result: dict) -> str:
    return f"{result['path']}: " + ", ".join(f"{t['name']} {100 * t['prob']:.1f}%"
                                              for t in result["top"])


def _check_json(path: str) -> None:
    """``--json`` names a new or regular file in an existing, writable folder (checked
    before the work; the file is written whole, replacing one there, after it)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not path or path.endswith((os.sep, "/")) or os.path.isdir(path):
        raise PredictError(f"--json {path!r}: expected a file name, not a folder")
    if os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
        raise PredictError(f"--json {path}: exists and is not a regular file (a link or a "
                           "device); name a file")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise PredictError(f"--json {path}: not a file in an existing, writable folder")


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI entry point; returns the exit status: 0; 2 after one ``error:`` line (bad
    input); 74 when ``--json`` cannot be written; 130 on Ctrl-C."""
    from jaxnets.xla_cpu import prepare_cpu

    prepare_cpu()  # before jax starts
    args = _parser().parse_args(argv)
    import jaxnets
    from jaxnets import compile_cache
    from jaxnets.cli import one_line
    from porting.pth import PthError
    from porting.state_dict import PortingError

    def show(result):  # each image's line as its batch is done
        print(_line(result), flush=True)

    try:
        try:  # before the first compilation
            compile_cache.enable(args.compile_cache)
        except compile_cache.CompileCacheError as e:
            raise PredictError(f"--compile-cache: {e}") from None
        if args.json is not None:
            _check_json(args.json)
        images = find_images(args.images)
        names = None if args.class_names is None else _read_names(args.class_names)
        started = time.time()
        loaded = load(args.weights, args.arch, step=_step(args.step),
                      model_args=dict(args.model_arg), progress=args.progress)
        if names is not None:
            if loaded.num_classes is None:
                raise PredictError(f"--class-names: {loaded.arch} has no classifier head")
            if len(names) != loaded.num_classes:
                raise PredictError(f"--class-names {args.class_names} names {len(names)} "
                                   f"classes; the model has {loaded.num_classes} outputs")
            loaded.class_names = names
        loaded.preprocessing = pre = _override(loaded.preprocessing, args, loaded.channels)
        _check_input(loaded, pre)
        print(f"{loaded.arch}: {loaded.source}; {len(images)} image(s), {pre.resize_size}/"
              f"{pre.image_size} {pre.interpolation}"
              + ("" if loaded.class_names else "; no class names: indices shown"),
              file=sys.stderr)
        results, skipped = predict(loaded, images, top=args.top, batch_size=args.batch_size,
                                   skip_bad=args.skip_bad, progress=args.progress,
                                   on_result=show)
        if not results:
            raise PredictError(f"none of the {len(images)} image file(s) could be decoded")
    except (PredictError, jaxnets.UnknownModelError, PthError, PortingError) as e:
        print(f"error: {one_line(e, 600)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (| head): quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if line := compile_cache.summary():
        print(line, file=sys.stderr)
    if skipped:
        print(f"note: --skip-bad left out {len(skipped)} image file(s) that cannot be "
              f"decoded: {', '.join(skipped)}", file=sys.stderr)
    if args.json is not None:
        from train.config import write_json

        try:
            write_json(args.json, {
                "arch": loaded.arch, "weights": args.weights, "source": loaded.source,
                "preprocessing": dataclasses.asdict(pre), "class_names": loaded.class_names,
                "predictions": results, "skipped": skipped,
                "seconds": round(time.time() - started, 1)})
        except OSError as e:
            print(f"error: --json {args.json}: {e}", file=sys.stderr)
            return EXIT_WRITE
    return 0


if __name__ == "__main__":
    sys.exit(main())
