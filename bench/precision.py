"""bf16 against fp32 training: the same run twice, held-out accuracy side by side.

``python -m bench.precision [--arch resnet18_cifar] [--epochs 8] [--image-size 16]
[--json out.json] [-- EXTRA FINETUNE ARGS]`` runs ``train.finetune`` twice with one
command line (same data, seed, schedule and augmentation), once with
``--precision fp32`` and once with ``--precision bf16`` (bfloat16 compute, float32
parameters, optimizer state and BatchNorm statistics), each into its own run folder,
and prints both runs' held-out top-1, the difference and each run's wall time.

The default is what the scale issue asks for: ``resnet18_cifar`` trained from scratch
on scikit-learn's digits (offline). The digits are 8x8 images; ``--image-size 16``
keeps a CPU run to minutes (the model takes any size from 16 up), ``--image-size 32``
is the CIFAR resolution. Exit status 0 when bf16 is within ``--max-drop`` points of
fp32 (either way; default 1), 1 when it is not, 2 on bad input (as ``train.finetune``).
With ``--output-dir`` the run folders are kept; running the same command again
resumes them (``train.finetune`` resumes a run from its last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from bench.output import json_path_problem, write_json
from jaxnets.cli import ArgumentParser

__all__ = ["compare", "main"]

PRECISIONS = ("fp32", "bf16")


def compare(finetune_args: list[str], output_dir: str) -> dict:
    """Runs ``train.finetune`` with ``finetune_args`` once per precision.

    Args:
      finetune_args: the common command line (no ``--precision``/``--output-dir``).
      output_dir: parent folder; each run writes ``<output_dir>/<precision>``.

    Returns:
      ``{"fp32": summary, "bf16": summary, "drop_points": fp32 minus bf16 top-1,
      in points}``, where a summary is the run's ``summary.json`` plus its ``wall_s``
      and ``run_dir``.

    Raises:
      SystemExit: a run failed; its exit status is the code.
    """
    from train import finetune

    for flag in ("--precision", "--output-dir"):
        if any(a == flag or a.startswith(flag + "=") for a in finetune_args):
            raise ValueError(f"{flag} is set by bench.precision, not in the finetune arguments")
    out: dict = {}
    for precision in PRECISIONS:
        run_dir = os.path.join(output_dir, precision)
        t0 = time.perf_counter()
        status = finetune.main(finetune_args + ["--precision", precision,
                                                "--output-dir", run_dir])
        if status != 0:
            raise SystemExit(status)
        with open(os.path.join(run_dir, "summary.json")) as f:
            out[precision] = {**json.load(f), "wall_s": round(time.perf_counter() - t0, 1),
                              "run_dir": run_dir}
    out["drop_points"] = round(100 * (out["fp32"]["val_top1"] - out["bf16"]["val_top1"]), 2)
    return out


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = ArgumentParser(
        prog="python -m bench.precision",
        description="Train the same model with --precision fp32 and bf16 and compare the "
                    "held-out top-1. Arguments after -- go to train.finetune as they are.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet18_cifar", help="registered model")
    p.add_argument("--dataset", default="digits", help="train.finetune --dataset")
    p.add_argument("--weights", default="none", help="train.finetune --weights")
    p.add_argument("--image-size", type=int, default=16, help="input size fed to the model")
    p.add_argument("--epochs", type=int, default=8, help="epochs of each run")
    p.add_argument("--batch-size", type=int, default=64, help="batch size")
    p.add_argument("--seed", type=int, default=0, help="seed of both runs")
    p.add_argument("--max-drop", type=float, default=1.0,
                   help="largest fp32-minus-bf16 top-1 difference, in points, that passes")
    p.add_argument("--output-dir", default=None,
                   help="keep both run folders here; when not given, a temporary folder")
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.image_size < 1:
        p.error("--epochs, --batch-size and --image-size must be positive")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    """The CLI entry point; returns the exit status."""
    args, extra = _parse(sys.argv[1:] if argv is None else argv)
    if args.json and (problem := json_path_problem(args.json)):
        print(f"error: --json {args.json}: {problem}", file=sys.stderr)
        return 2
    common = ["--arch", args.arch, "--dataset", args.dataset, "--weights", args.weights,
              "--image-size", str(args.image_size), "--epochs", str(args.epochs),
              "--batch-size", str(args.batch_size), "--seed", str(args.seed),
              "--no-progress", *extra]
    try:
        if args.output_dir:
            result = compare(common, args.output_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
                result = compare(common, tmp)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # a finetune run failed and said why
        return int(e.code or 1)
    print(f"\n{args.arch} on {args.dataset} at {args.image_size}px, {args.epochs} epochs, "
          f"batch {args.batch_size}, seed {args.seed}")
    print("| precision | val top-1 | val loss | wall s |\n|---|---|---|---|")
    for precision in PRECISIONS:
        r = result[precision]
        print(f"| {precision} | {100 * r['val_top1']:.2f}% | {r['val_loss']:.4f} | "
              f"{r['wall_s']:.0f} |")
    ok = abs(result["drop_points"]) <= args.max_drop
    print(f"fp32 minus bf16 top-1: {result['drop_points']:+.2f} points "
          f"(goal: within {args.max_drop:g}): {'PASS' if ok else 'FAIL'}")
    if args.json:
        write_json(args.json, {"command": common, **result}, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
