"""``python -m porting``: convert torch checkpoints to jaxnets and export them back.

Commands:

* ``convert --arch A [--weights NAME_OR_PATH] --out DIR [--num-classes N]
  [--model-arg KEY=VALUE ...]`` writes a *converted directory* (``model.safetensors`` keyed by flax paths in
  flax layout, plus ``jaxnets.json``; see ``porting.pretrained``). ``NAME`` is
  a registry weights name (``DEFAULT``, ``IMAGENET1K_V2``,
  ``resnet50.IMAGENET1K_V1``), fetched like ``from_torchvision`` does; a path
  is a ``.pth``/``.pt``/``.bin`` or safetensors checkpoint (``DEFAULT`` when not
  given). ``--model-arg``:
  constructor options (``image_size=384``, ``d_model=256``), kept in
  ``jaxnets.json``.
* ``export [--arch A] --checkpoint DIR --out FILE.pth|FILE.safetensors
  [--num-classes N] [--step N|best] [--model-arg KEY=VALUE ...]`` writes a torch state_dict that
  ``torchvision.models.<A>().load_state_dict(..., strict=True)`` accepts.
  ``DIR`` is a ``train.finetune`` run directory (its newest checkpoint, or
  ``--step``; ``best``: the best by validation top-1), its ``checkpoints``
  folder or one step directory; a converted directory; or an Orbax checkpoint
  of ``nnx.state(model)`` or of its ``to_pure_dict()`` (as
  ``ocp.StandardCheckpointer().save(DIR, nnx.state(model))`` writes; a
  ``{"model": ...}`` wrapper is unwrapped). ``--arch`` may be left out where
  ``DIR`` says which model it holds (a run, a converted directory). ``.pth``
  needs torch; ``.safetensors`` does not.
* ``weights [--arch A]`` lists the registry's weights names.
* ``verify ...`` forwards to ``porting.verify`` where that module exists.

Every error is one line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]

_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")
_MAX_ERROR = 1500


class CliError(Exception):
    """A user error, reported as one line."""


def _parser() -> argparse.ArgumentParser:
    from jaxnets.cli import ArgumentParser, model_arg_type

    parser = ArgumentParser(prog="python -m porting", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    c = sub.add_parser("convert", help="torch checkpoint -> converted jaxnets directory")
    c.add_argument("--arch", required=True, help="jaxnets model name, e.g. resnet50")
    c.add_argument("--weights", default="DEFAULT",
                   help="weights name (DEFAULT, IMAGENET1K_V2, ...) or checkpoint path")
    c.add_argument("--out", required=True, type=Path, help="directory to write")
    c.add_argument("--num-classes", type=int, default=None,
                   help="classifier outputs; a different count gets a fresh head")
    c.add_argument("--seed", type=int, default=0, help="seed for a fresh head")
    c.add_argument("--model-arg", dest="model_args", action="append", default=[],
                   metavar="KEY=VALUE",
                   type=model_arg_type({"num_classes": "use --num-classes",
                                        "seed": "use --seed"}),
                   help="constructor option of the architecture, repeatable, e.g. "
                        "image_size=384 (vit) or d_model=256 (transformer); written to "
                        "jaxnets.json, so the converted directory loads with it")
    c.add_argument("--cache-dir", default=None, help="converted cache root ($JAXNETS_CACHE)")
    c.add_argument("--no-progress", action="store_true", help="no download progress bar")

    e = sub.add_parser("export", help="jaxnets checkpoint -> torch state_dict file")
    e.add_argument("--arch", default=None,
                   help="jaxnets model name (default: the one a run or converted directory "
                        "names)")
    e.add_argument("--checkpoint", required=True, type=Path,
                   help="train.finetune run directory (or its checkpoints/ or one step "
                        "directory), converted directory, or Orbax checkpoint of "
                        "nnx.state(model)")
    e.add_argument("--step", type=_step, default=None,
                   help="a run's checkpoint: a step, or 'best' by validation top-1 "
                        "(default: the newest)")
    e.add_argument("--out", required=True, type=Path, help="FILE.pth or FILE.safetensors")
    e.add_argument("--num-classes", type=int, default=None,
                   help="expected classifier outputs (default: the checkpoint's)")
    e.add_argument("--model-arg", dest="model_args", action="append", default=[],
                   metavar="KEY=VALUE",
                   type=model_arg_type({"num_classes": "use --num-classes"}),
                   help="constructor option of the architecture, repeatable: for an Orbax "
                        "checkpoint of a model built with options (a run or a converted "
                        "directory names its own)")

    w = sub.add_parser(
        "weights", help="list the pretrained weights names",
        description="Lists torchvision's pretrained weights for the registered archs: name "
                    "(* marks the arch's DEFAULT, what --weights DEFAULT picks), ImageNet "
                    "top-1/top-5, the evaluation preprocessing "
                    "(resize, crop, interpolation) and the file size.")
    w.add_argument("archs", nargs="*", metavar="ARCH", help="only these archs")
    w.add_argument("--arch", default=None, help="only this arch (as ARCH)")
    w.add_argument("--urls", action="store_true", help="also print each file's URL")
    # Listed for --help only: main() hands "verify ..." to porting.verify before parsing.
    sub.add_parser("verify", help="parity of a model with torch (python -m porting.verify "
                                  "--help)", add_help=False)
    return parser


def _step(text: str) -> int | str:
    if text == "best" or (text.isdigit() and int(text) >= 0):
        return text if text == "best" else int(text)
    raise argparse.ArgumentTypeError(f"expected a step number or 'best', got {text!r}")


def _one_line(e: BaseException) -> str:
    from jaxnets.cli import one_line

    return one_line(str(e) or type(e).__name__, _MAX_ERROR)


def _convert(args: argparse.Namespace) -> None:
    import jaxnets
    from porting import pretrained

    jaxnets.get_spec(args.arch)
    if args.num_classes is not None and args.num_classes <= 0:
        raise CliError(f"--num-classes must be positive, got {args.num_classes}")
    if not pretrained.replaceable(args.out):
        # Before any reading or converting (write_converted would refuse it at the end).
        raise CliError(f"--out {args.out} exists and is not a converted directory (no "
                       "jaxnets.json); not replacing it")
    given = dict(args.model_args)
    _check_model_args(args.arch, given, args.num_classes)
    try:
        json.dumps(given)
    except (TypeError, ValueError):
        raise CliError("--model-arg: values are numbers, strings, booleans, None, or lists "
                       f"and tuples of them (jaxnets.json keeps them); got {given}") from None
    model, report = pretrained.load_torchvision(
        args.arch, args.weights, num_classes=args.num_classes, seed=args.seed,
        cache_dir=args.cache_dir, progress=not args.no_progress, **given)
    if pretrained.is_weights_path(args.weights):
        source = str(Path(args.weights).resolve())
        overrides: dict[str, Any] = {}
        if pretrained.is_converted(args.weights):
            overrides = pretrained.read_converted(args.weights)[1].get("model_overrides", {})
        weights_name = None
    else:
        w = pretrained.resolve_weights(args.arch, args.weights)
        source, overrides, weights_name = w.url, w.model_overrides, w.spec
    overrides = {**overrides, **given}
    meta = {"arch": args.arch, "num_classes": pretrained.head_classes(model, args.arch),
            "model_overrides": overrides, "weights": weights_name, "source": source,
            "report": str(report)}
    pretrained.write_converted(args.out, pretrained.model_flat(model), meta)
    print(f"{args.arch}: {report}")
    print(f"wrote {args.out}")


def _check_model_args(arch: str, overrides: dict, num_classes: int | None) -> None:
    """An option the architecture does not have, or a value it refuses, is one line
    before anything is read (``porting.pretrained.model_problem``)."""
    if not overrides:
        return
    from porting import pretrained

    if (problem := pretrained.model_problem(arch, overrides, num_classes=num_classes)):
        raise CliError(problem)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        path = prefix[:-1]
        # nnx.State saves each Variable as {"value": array}.
        if path.endswith(".value"):
            path = path[: -len(".value")]
        out[path] = tree
    return out


def _read_orbax(path: Path) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    try:
        from train.checkpoint import quiet_failed_reads, read_error
    except ImportError:  # pragma: no cover -- train is part of this distribution
        quiet_failed_reads, read_error = (lambda: None), _one_line
    quiet_failed_reads()  # a damaged checkpoint's other reads end after the error
    try:
        tree = ocp.StandardCheckpointer().restore(path.resolve())
    except Exception as e:  # orbax raises assorted types for a damaged directory
        raise CliError(f"cannot restore Orbax checkpoint {path}: {read_error(e)}") from None
    for _ in range(3):
        if isinstance(tree, dict) and "model" in tree and isinstance(tree["model"], dict):
            tree = tree["model"]
    if not isinstance(tree, dict):
        raise CliError(f"{path}: Orbax checkpoint holds a {type(tree).__name__}, not a state")
    import jax

    # Dropout's RNG state (typed PRNG keys) is no weight: the load seeds it afresh.
    return {k: np.asarray(v) for k, v in _flatten(tree).items()
            if not jax.dtypes.issubdtype(getattr(v, "dtype", np.float32), jax.dtypes.prng_key)}


def _locate_run(path: Path):
    """``train.checkpoint.locate_run``, where ``train`` is installed (it is part of
    this distribution; its Orbax reader needs nothing else)."""
    try:
        from train.checkpoint import locate_run
    except ImportError:
        return None
    return locate_run(str(path))


def _export(args: argparse.Namespace) -> None:
    import jaxnets
    from porting import hub, pretrained
    from porting.state_dict import to_torch_state_dict, to_torch_tensor

    if args.arch is not None:
        jaxnets.get_spec(args.arch)
    suffix = args.out.suffix
    if suffix not in (".pth", ".pt", ".safetensors"):
        raise CliError(f"--out must end in .pth, .pt or .safetensors, got {args.out.name}")
    if args.out.is_dir():
        raise CliError(f"--out {args.out} is a directory")
    if args.num_classes is not None and args.num_classes <= 0:
        raise CliError(f"--num-classes must be positive, got {args.num_classes}")
    ckpt = args.checkpoint
    if not ckpt.is_dir():
        raise CliError(f"checkpoint directory not found: {ckpt}")
    overrides: dict[str, Any] = {}
    default_classes = args.num_classes
    arch, label = args.arch, ckpt.name

    def same_arch(held: str | None, what: str) -> str:
        if held is None:
            if args.arch is None:
                raise CliError(f"{ckpt} does not say which model it holds; pass --arch")
            return args.arch
        if args.arch is not None and held != args.arch:
            raise CliError(f"{ckpt} holds {what} {held}, not {args.arch}")
        return held

    run = _locate_run(ckpt)
    if args.step is not None and run is None:
        raise CliError(f"--step is for a train.finetune run directory; {ckpt} is not one")
    if pretrained.is_converted(ckpt):
        flat, meta = pretrained.read_converted(ckpt)
        arch = same_arch(meta.get("arch"), "a converted")
        overrides = meta.get("model_overrides", {})
        default_classes = default_classes or meta.get("num_classes")
    elif run is not None:
        from train.checkpoint import CheckpointError, read_run_weights

        try:
            weights = read_run_weights(str(ckpt), args.step)
        except CheckpointError as e:
            raise CliError(_one_line(e)) from None
        arch = same_arch(weights.arch, "a run of")
        flat, overrides = weights.arrays, weights.overrides
        default_classes = default_classes or weights.num_classes
        label = f"step {weights.step} of {ckpt}"
        print(f"{arch}: step {weights.step} of {weights.directory}")
    elif any((ckpt / m).exists() for m in _ORBAX_MARKERS):
        arch = same_arch(None, "")
        flat = _read_orbax(ckpt)
    else:
        raise CliError(f"{ckpt} is neither a train.finetune run, a converted directory (no "
                       "jaxnets.json) nor an Orbax checkpoint")
    jaxnets.get_spec(arch)
    if args.model_args:
        given = dict(args.model_args)
        differ = {k: v for k, v in given.items()
                  if k in overrides and not pretrained.same_option(overrides[k], v)}
        if differ:
            k, v = next(iter(differ.items()))
            raise CliError(f"{ckpt} holds a model built with {k}={overrides[k]!r}, not "
                           f"{k}={v!r} (--model-arg is for options it does not record)")
        overrides = {**overrides, **given}
        _check_model_args(arch, overrides, None)
    model, _, nc = pretrained.load_into_abstract(
        arch, flat, torch_keys=False, label=label, default_classes=default_classes,
        overrides=overrides, consume=True)
    if args.num_classes is not None and nc is not None and nc != args.num_classes:
        raise CliError(f"{ckpt} has a {nc}-class head, --num-classes says {args.num_classes}")
    state = to_torch_state_dict(model)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"--out {args.out}: cannot create {args.out.parent}: "
                       f"{e.strerror or e}") from None
    tmp = args.out.with_name(f".{args.out.stem}.{os.getpid()}.tmp{suffix}")
    try:
        if suffix == ".safetensors":
            from porting.safetensors_io import save_safetensors

            save_safetensors(state, tmp, metadata={"format": "pt", "arch": arch})
        else:
            try:
                import torch
            except ImportError:
                raise CliError("writing .pth needs torch (pip install torch); "
                               "write .safetensors instead") from None
            # to_torch_tensor: torch.from_numpy refuses bfloat16 (an ml_dtypes array).
            torch.save(collections.OrderedDict(
                (k, to_torch_tensor(v)) for k, v in state.items()), tmp)
        hub.usual_permissions(tmp)
        os.replace(tmp, args.out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {len(state)} tensors to {args.out}")


def _weights(args: argparse.Namespace) -> None:
    from porting.weights import get_weights, list_weights

    archs = list(dict.fromkeys(args.archs + ([args.arch] if args.arch else [])))
    names = []
    for arch in archs:
        found = list_weights(arch)
        if not found:
            import jaxnets

            jaxnets.get_spec(arch)  # an unknown name: the registry's error, with suggestions
            raise CliError(f"{arch} has no pretrained weights in the table (torchvision "
                           "publishes none for it)")
        names += found
    rows = [("name", "top-1", "top-5", "eval resize/crop", "MB")]
    for spec in names if archs else list_weights():
        w = get_weights(spec)
        default = get_weights(w.arch) == w
        t = w.transforms
        top1, top5 = (w.metrics.get(k) for k in ("acc@1", "acc@5"))
        rows.append((spec + (" *" if default else ""),
                     "-" if top1 is None else f"{top1:.3f}",
                     "-" if top5 is None else f"{top5:.3f}",
                     f"{t.resize_size}/{t.crop_size} {t.interpolation}",
                     "-" if w.file_size_mb is None else f"{w.file_size_mb:.0f}")
                    + ((w.url,) if args.urls else ()))
    if args.urls:
        rows[0] += ("url",)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(n) for c, n in zip(r, widths)) + "  " + r[-1])
    print("* DEFAULT: what --weights DEFAULT loads")


def _verify(argv: list[str]) -> int:
    if importlib.util.find_spec("porting.verify") is None:
        raise CliError("porting.verify is not available in this checkout")
    verify = importlib.import_module("porting.verify")
    if not hasattr(verify, "main"):
        raise CliError("porting.verify has no main(argv)")
    return int(verify.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI.

    Args:
      argv: arguments; ``sys.argv[1:]`` when None.

    Returns:
      The exit status: 0, or 2 after printing ``error: ...``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "verify":
            return _verify(argv[1:])
        try:
            args = _parser().parse_args(argv)
        except SystemExit as e:  # --help, or a usage error already printed
            return int(e.code or 0)
        {"convert": _convert, "export": _export, "weights": _weights}[args.command](args)
    except BrokenPipeError:  # the reader left (| head): quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (CliError, ValueError, OSError, TypeError, RuntimeError) as e:
        # ValueError covers unknown arch/weights, corrupt files and wrong-arch
        # loads; RuntimeError covers failed downloads.
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written by rename: nothing half-written is left
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
