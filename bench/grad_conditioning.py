"""How far PyTorch's own fp32 gradients are from its float64 gradients.

``python -m bench.grad_conditioning [--arch resnet50] [--size 160 192] [--batch 2] [--seed 0]``

A randomly initialised torch model with randomised BatchNorm
(``porting.parity.randomize_torch_model`` with a calibration batch) is run in
fp32 and, as an exact copy, in float64, on the same input, with the same
random linear loss as ``porting.parity`` uses. For every parameter the
gradient error is ``max |g32 - g64| / max |g64|`` (relative to the tensor's
largest magnitude, as the parity tests judge). Printed per BatchNorm mode
(eval: frozen statistics; train: batch statistics): the worst tensors and the
maximum.

This is the measurement behind ``porting/parity.py``'s design: if torch
cannot reproduce its own float64 gradients to 1e-4 in fp32, no port can be
held to 1e-4 against torch's fp32 gradients, so gradients are compared in
float64 on both sides.
"""

from __future__ import annotations

import copy
import sys

import numpy as np

from jaxnets.cli import ArgumentParser

__all__ = ["gradient_errors", "main"]


def _grads(model, x, weights, scale):
    import torch

    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * torch.from_numpy(weights).to(y.dtype)).sum().div(scale).backward()
    return {k: p.grad.detach().double().numpy() for k, p in model.named_parameters()
            if p.grad is not None}


def gradient_errors(arch: str, *, size: tuple[int, int], batch: int, seed: int = 0
                    ) -> dict[str, dict[str, float]]:
    """Per-tensor relative error of torch fp32 gradients against float64.

    Args:
      arch: registry name of an image model.
      size: input (height, width).
      batch: batch size.
      seed: seed of the weights, the BatchNorm randomisation, input and loss.

    Returns:
      ``{"eval": {name: error}, "train": {name: error}}``.
    """
    import torch

    import jaxnets
    from porting.parity import randomize_torch_model
    from porting.reference import build_torch_model

    spec = jaxnets.get_spec(arch)
    if spec.kind != "image":
        raise ValueError(f"{arch} is not an image model")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, spec.in_channels, *size)).astype(np.float32)
    calibration = rng.standard_normal(x.shape).astype(np.float32)
    m32 = build_torch_model(arch)
    randomize_torch_model(m32, seed, torch.from_numpy(calibration))
    for m in m32.modules():  # deterministic train-mode passes
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    m64 = copy.deepcopy(m32).double()
    out = {}
    for mode, scale in (("eval", 1.0), ("train", float(batch))):
        m32.train(mode == "train")
        m64.train(mode == "train")
        with torch.no_grad():
            shape = tuple(m32(torch.from_numpy(x)).shape)
        weights = rng.standard_normal(shape)
        g32 = _grads(m32, torch.from_numpy(x), weights, scale)
        g64 = _grads(m64, torch.from_numpy(x).double(), weights, scale)
        out[mode] = {k: float(np.max(np.abs(g32[k] - g64[k])) / max(np.max(np.abs(g64[k])),
                                                                     1e-300))
                     for k in g64}
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
      argv: arguments (``sys.argv[1:]`` when None).

    Returns:
      The exit status.
    """
    p = ArgumentParser(prog="python -m bench.grad_conditioning",
                                description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, nargs="+", default=[160, 192],
                   help="input height [width]")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=5, help="worst tensors to list per mode")
    args = p.parse_args(argv)
    import jaxnets

    if len(args.size) not in (1, 2) or min(args.size) < 1 or args.batch < 1:
        print("error: --size takes 1 or 2 positive integers and --batch must be >= 1",
              file=sys.stderr)
        return 2
    size = (args.size[0], args.size[-1])
    try:
        errors = gradient_errors(args.arch, size=size, batch=args.batch, seed=args.seed)
    except (jaxnets.UnknownModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.arch} {size[0]}x{size[1]} batch {args.batch} seed {args.seed}: torch fp32 "
          "gradients vs torch float64, max|g32-g64| / max|g64| per tensor")
    for mode, errs in errors.items():
        worst = sorted(errs.items(), key=lambda kv: -kv[1])
        print(f"\nBatchNorm {mode} mode: max {worst[0][1]:.2e} over {len(errs)} tensors, "
              f"{sum(e > 1e-4 for e in errs.values())} above 1e-4, median "
              f"{np.median(list(errs.values())):.1e}")
        for name, e in worst[:args.top]:
            print(f"  {e:.2e}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
