"""``python -m porting.verify --arch NAME``: port a torch model and prove it computes the same.

Builds the torch reference (random init with randomised BatchNorm statistics,
normalisation affine terms and parameters torch initialises to zero, or the
weights given), ports it to jaxnets, runs both on the
same input and prints the max absolute and relative error of every compared
quantity with PASS/FAIL. Exits 1 on FAIL, 2 on bad input.

Examples::

    python -m porting.verify --arch resnet50
    python -m porting.verify --arch resnet18 --size 160 192 --batch 2
    python -m porting.verify --arch resnet50 --weights resnet50-11ad3fa6.pth
    python -m porting.verify --arch googlenet --no-cpu-detours   # the GPU/TPU path, on CPU
    python -m porting.verify --arch transformer --size 16 12     # source, target lengths

The torch reference runs on the CPU; jax on its default backend (a GPU when
one is there), with matmuls and convolutions in full fp32 (no TF32) on both.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from jaxnets import compile_cache
from jaxnets.cli import ArgumentParser, model_arg_type, one_line


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m porting.verify",
        description="Port a torchvision/PyTorch model to jaxnets and compare both in fp32 "
                    "(outputs, BatchNorm statistics) and float64 (gradients).")
    p.add_argument("--arch", required=True, help="registered model name, e.g. resnet50")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="input height and width (default: the model's input size); for "
                        "transformer the source and target lengths (default 10 9)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--weights", metavar="PATH",
                   help="a torch checkpoint (.pth/.pt, or .safetensors) to compare with instead "
                        "of a random initialisation; read without executing pickled code")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, input and loss")
    p.add_argument("--model-arg", dest="model_args", action="append", default=[],
                   metavar="KEY=VALUE", type=model_arg_type(),
                   help="constructor option of both models, repeatable, e.g. image_size=96 "
                        "(vit), d_model=64 (transformer), zero_init_residual=True")
    p.add_argument("--no-grads", action="store_true",
                   help="skip the gradient comparison (outputs and statistics only)")
    p.add_argument("--fp32-grads", action="store_true",
                   help="also report fp32 gradients (informational, see porting/parity.py)")
    p.add_argument("--eager", action="store_true", help="run JAX op by op instead of jit")
    p.add_argument("--quiet", action="store_true",
                   help="nothing on stderr but errors (no progress lines, no compile-cache "
                        "summary)")
    p.add_argument("--no-cpu-detours", dest="cpu_detours", action="store_false",
                   help="on CPU, compute the jax side as a GPU or TPU runs it (XLA's own "
                        "convolutions, pools and attention), not in jaxnets' faster CPU forms")
    compile_cache.add_flag(p)
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _read_weights(path: str) -> dict:
    if not os.path.exists(path):
        raise ValueError(f"weights file not found: {path}")
    from train.checkpoint import locate_run

    if os.path.isdir(path) and locate_run(path) is not None and not any(
            n.endswith((".safetensors", ".safetensors.index.json")) for n in os.listdir(path)):
        raise ValueError(f"{path} is a train.finetune run directory: write its model as torch "
                         f"weights with python -m porting export --checkpoint {path} --out "
                         "model.pth, then pass that file")
    from porting.pretrained import is_converted

    if is_converted(path):
        raise ValueError(f"{path} is a converted directory (flax paths, flax layout): write "
                         f"it as torch weights with python -m porting export --checkpoint "
                         f"{path} --out model.pth, then pass that file")
    if path.endswith(".safetensors") or path.endswith(".json") or os.path.isdir(path):
        from porting.safetensors_io import load_safetensors

        return load_safetensors(path)
    from porting.pth import load_state_dict_file

    state_dict, notes = load_state_dict_file(path)
    for note in notes:
        print(f"{path}: {note}")
    return state_dict


def main(argv: list[str] | None = None) -> int:
    """Run the verification; returns the process exit code."""
    args = _parser().parse_args(argv)
    import jaxnets

    try:
        spec = jaxnets.get_spec(args.arch)
    except jaxnets.UnknownModelError as e:
        return _fail(str(e))
    if args.batch < 1:
        return _fail(f"--batch must be >= 1, got {args.batch}")
    if args.size is not None:
        if spec.kind == "vector":
            return _fail(f"--size does not apply to {args.arch}")
        if spec.kind == "sequence":
            if min(args.size) < 1:
                return _fail(f"--size: {args.arch}'s source and target lengths must be >= 1, "
                             f"got {args.size[0]} {args.size[1]}")
        elif "image_size" not in dict(args.model_args) and any(
                s < m for s, m in zip(args.size, spec.min_size)):
            return _fail(f"{args.arch} needs inputs of at least {spec.min_size[0]}x"
                         f"{spec.min_size[1]}, got {args.size[0]}x{args.size[1]}")
    try:
        import torch  # noqa: F401
    except ImportError:
        return _fail("porting.verify needs torch and torchvision: pip install 'jaxnets[torch]'")
    try:  # before the first compilation
        compile_cache.enable(args.compile_cache)
    except compile_cache.CompileCacheError as e:
        return _fail(f"--compile-cache: {e}")
    from porting.parity import run_parity
    from porting.state_dict import PortingError

    from porting.pretrained import model_problem

    overrides = dict(args.model_args)
    options = {k: v for k, v in overrides.items() if k != "num_classes"}
    # Before anything is built: an option the model refuses, an input it cannot take.
    if (problem := model_problem(args.arch, options, num_classes=overrides.get("num_classes"),
                                 size=args.size, batch=args.batch)):
        return _fail(problem)

    state_dict = None
    if args.weights:
        try:
            state_dict = _read_weights(args.weights)
        except (ValueError, OSError) as e:
            return _fail(str(e))
    t0 = time.perf_counter()

    def progress(stage: str) -> None:  # on stderr: stdout holds the report alone
        if not args.quiet:
            print(f"[{time.perf_counter() - t0:5.1f}s] {stage} ...", file=sys.stderr, flush=True)

    try:
        result = run_parity(args.arch, size=args.size, batch=args.batch, state_dict=state_dict,
                            seed=args.seed, jit=not args.eager, grads=not args.no_grads,
                            fp32_grads=args.fp32_grads, cpu_detours=args.cpu_detours,
                            overrides=overrides, progress=progress)
    except PortingError as e:
        return _fail(f"{args.weights or args.arch}: {e}")
    except TypeError as e:
        if overrides and "argument" in str(e):  # an option torch's model does not take
            return _fail(f"--model-arg: torch's {args.arch}: {one_line(str(e), 600)}")
        raise
    except RuntimeError as e:
        if args.weights and "state_dict" in str(e):
            # torch's own message: a header line, then the missing and unexpected keys.
            return _fail(f"{args.weights} does not fit {args.arch}: {one_line(str(e), 600)}")
        raise
    except ValueError as e:
        # torch's words or jaxnets' BatchNorm's, whichever side ran first.
        if re.search(r"more than (1|one) value per channel", str(e)):
            return _fail(f"--batch {args.batch} leaves one value per channel in a train-mode "
                         f"BatchNorm of {args.arch} at this input size, which torch refuses; "
                         "use --batch 2 or more, or a larger --size")
        raise
    dt = time.perf_counter() - t0
    source = args.weights or ("random init, normalisation layers and zero-initialised "
                              "parameters randomised")
    import jax

    backend = jax.default_backend()
    path = ("CPU detours off: the accelerator path" if backend == "cpu" and not args.cpu_detours
            else "jaxnets' CPU forms" if backend == "cpu" else "XLA's own operations")
    print(f"{args.arch}: input {result.input_label}, weights: {source}; jax on "
          f"{backend} ({path}), fp32 at full precision (TF32 off)")
    print(result.table())
    verdict = "PASS" if result.passed else "FAIL"
    print(f"{verdict}: {args.arch} jaxnets vs torch ({dt:.1f}s)")
    if (line := compile_cache.summary()) and not args.quiet:
        print(line, file=sys.stderr)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
