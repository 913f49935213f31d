"""Train-step and inference throughput of a jaxnets model next to its PyTorch reference.

``python -m bench.train_step --arch resnet18_cifar --batch 64 [--size 32]
[--precision fp32|bf16] [--steps 10] [--warmup 2] [--short] [--json OUT]``

For each ``--arch``, in one process, on the same batch:

* jaxnets: ``nnx.split`` + ``jax.jit`` step (forward, backward, optax
  SGD-momentum update) with the parameter, statistics and optimizer buffers
  donated; ``--precision bf16`` computes in bfloat16 with float32 parameters
  (``train.precision``). The first call is timed separately (trace +
  compile + one step). Inference: a jitted eval-mode forward.
* PyTorch: the model from ``porting.reference.build_torch_model`` with the
  same weights (ported into the jaxnets model), ``torch.optim.SGD`` with the
  same momentum, eager, then ``torch.compile`` (``--compile auto``: on CUDA
  only, not with ``--short``; a failure is reported, not raised).
  bf16: ``torch.autocast(dtype=torch.bfloat16)``.

Each timed step is synchronised (``block_until_ready`` / ``cuda.synchronize``);
figures are medians over ``--steps`` after ``--warmup``. Images models use a
cross-entropy loss on random labels; ``transformer`` (``torch.nn.Transformer``,
no embeddings) a mean-squared error on random (S, N, E) source/target
sequences with a causal target mask, ``--size`` being the sequence length.

Memory: on GPU the frameworks' peak allocator figures
(``memory_stats()["peak_bytes_in_use"]``, ``torch.cuda.max_memory_allocated``);
on CPU the process's peak RSS during each framework's phase (``VmHWM``, reset
through ``/proc/self/clear_refs`` before the phase; it includes the resident
libraries of both frameworks).

Precision on GPU: fp32 runs allow TF32 on both sides (JAX's default matmul
precision, ``torch.backends.cuda.matmul.allow_tf32`` and ``cudnn.allow_tf32``
set True), which is what each framework would use for speed; ``--tf32 off``
makes both use full fp32.

The device is picked automatically: JAX's default backend and, for torch,
CUDA when available.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import time
from typing import Any, Callable

from bench.output import json_path_problem, write_json
from jaxnets.cli import ArgumentParser

__all__ = ["Result", "bench_arch", "format_table", "main"]


@dataclasses.dataclass
class Result:
    """Figures for one architecture; times in milliseconds, memory in MiB."""

    arch: str
    batch: int
    size: int
    precision: str
    device_jax: str
    device_torch: str
    jax_ms: float = float("nan")
    jax_compile_s: float = float("nan")
    jax_infer_ms: float = float("nan")
    jax_peak_mib: float = float("nan")
    torch_ms: float = float("nan")
    torch_first_s: float = float("nan")
    torch_infer_ms: float = float("nan")
    torch_peak_mib: float = float("nan")
    compiled_ms: float = float("nan")
    compiled_first_s: float = float("nan")
    compiled_note: str = ""

    @property
    def images_per_s(self) -> dict[str, float]:
        """Examples per second of each timed step (jax, torch eager, torch.compile)."""
        return {k: self.batch * 1e3 / getattr(self, f"{k}_ms")
                for k in ("jax", "torch", "compiled")}

    @property
    def ratio(self) -> float:
        """jax throughput / torch eager throughput (> 1: jaxnets is faster)."""
        return self.torch_ms / self.jax_ms


# ---------------------------------------------------------------------------
# Memory.


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak_rss_mib() -> float:
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median_ms(fn: Callable[[], Any], sync: Callable[[Any], None], steps: int,
               warmup: int) -> float:
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


# ---------------------------------------------------------------------------
# Inputs and losses.


def _inputs(spec, batch: int, size: int, seed: int = 0):
    """numpy (inputs for jax, inputs for torch, target) for one batch."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if spec.kind == "sequence":
        e = 512
        src = rng.standard_normal((size, batch, e)).astype(np.float32)
        tgt = rng.standard_normal((size, batch, e)).astype(np.float32)
        target = rng.standard_normal((size, batch, e)).astype(np.float32)
        return (src, tgt), (src, tgt), target
    x = rng.standard_normal((batch, size, size, spec.in_channels)).astype(np.float32)
    labels = rng.integers(0, spec.num_classes, batch).astype(np.int64)
    return (x,), (np.ascontiguousarray(x.transpose(0, 3, 1, 2)),), labels


def _jax_forward(model, inputs, kind):
    import jax.numpy as jnp

    if kind == "sequence":
        src, tgt = inputs
        mask = model.generate_square_subsequent_mask(tgt.shape[0], jnp.float32)
        return model(src, tgt, tgt_mask=mask.astype(src.dtype))
    return model(*inputs)


# The weight of each auxiliary classifier's loss (GoogLeNet, Inception v3), on both
# sides; ``train.finetune``'s ``--aux-weight`` default.
AUX_WEIGHT = 0.4


def _jax_loss(out, target, kind):
    import jax.numpy as jnp
    import optax

    from train.steps import logits_and_aux

    if kind == "sequence":
        return jnp.mean(jnp.square(out - target))

    def ce(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()

    logits, aux = logits_and_aux(out)
    return ce(logits) + AUX_WEIGHT * sum(ce(z) for z in aux)


def _torch_forward(model, inputs, kind):
    if kind == "sequence":
        src, tgt = inputs
        mask = model.generate_square_subsequent_mask(tgt.shape[0], device=tgt.device)
        return model(src, tgt, tgt_mask=mask)
    return model(*inputs)


def _torch_loss(out, target, kind):
    import torch.nn.functional as F

    if kind == "sequence":
        return F.mse_loss(out.float(), target)
    if isinstance(out, tuple):  # torchvision's GoogLeNetOutputs / InceptionOutputs
        return (F.cross_entropy(out[0].float(), target)
                + AUX_WEIGHT * sum(F.cross_entropy(z.float(), target) for z in out[1:]))
    return F.cross_entropy(out.float(), target)


# ---------------------------------------------------------------------------
# The two sides.


def jax_train_step(model, spec, precision: str):
    """The jitted jaxnets train step that ``bench_arch`` times, and its state.

    Args:
      model: the jaxnets model (split here; not used afterwards).
      spec: its registry spec (the loss depends on ``spec.kind``).
      precision: ``"fp32"`` or ``"bf16"``.

    Returns:
      ``(step, predict, state)``: ``step(params, rest, opt_state, inputs, target)``
      returns the three updated and the loss, donating its first three
      arguments; ``predict(params, rest, inputs)`` is the eval-mode forward;
      ``state`` is ``[params, rest, opt_state]``.
    """
    import jax
    import optax
    from flax import nnx

    from train.precision import get_policy

    policy = get_policy(precision)
    kind = spec.kind
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(1e-3, momentum=0.9)
    opt_state = tx.init(params)

    def step(params, rest, opt_state, inputs, target):
        def loss_fn(p, rs):
            m = nnx.merge(graphdef, policy.cast_params(p), rs, copy=True)
            out = policy.cast_output(_jax_forward(m, [policy.cast_inputs(a) for a in inputs],
                                                  kind))
            return _jax_loss(out, target, kind), nnx.split(m, nnx.Param, ...)[2]

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    def predict(params, rest, inputs):
        m = nnx.merge(graphdef, policy.cast_params(params), rest)
        m.eval()
        return policy.cast_output(_jax_forward(m, [policy.cast_inputs(a) for a in inputs], kind))

    return jax.jit(step, donate_argnums=(0, 1, 2)), jax.jit(predict), [params, rest, opt_state]


def _bench_jax(model, spec, inputs, target, precision, steps, warmup, r: Result) -> None:
    import jax
    import jax.numpy as jnp

    step, predict, state = jax_train_step(model, spec, precision)
    inputs = [jnp.asarray(a) for a in inputs]
    target = jnp.asarray(target)
    _reset_peak_rss()

    def run():
        state[0], state[1], state[2], loss = step(*state, inputs, target)
        return loss

    sync = jax.block_until_ready
    t0 = time.perf_counter()
    sync(run())
    r.jax_compile_s = time.perf_counter() - t0
    r.jax_ms = _median_ms(run, sync, steps, warmup)
    sync(predict(state[0], state[1], inputs))
    r.jax_infer_ms = _median_ms(lambda: predict(state[0], state[1], inputs), sync, steps,
                                warmup)
    stats = jax.devices()[0].memory_stats() or {}
    r.jax_peak_mib = (stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats
                      else _peak_rss_mib())


def _torch_step_fn(model, inputs, target, kind, precision, device):
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) \
        if precision == "bf16" else contextlib.nullcontext

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = _torch_forward(model, inputs, kind)
        loss = _torch_loss(out, target, kind)
        loss.backward()
        opt.step()
        return loss

    def infer():
        with torch.no_grad(), autocast():
            return _torch_forward(model, inputs, kind)

    return step, infer


def _bench_torch(tmodel, spec, inputs, target, precision, steps, warmup, r: Result,
                 compile_too: bool) -> None:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmodel = tmodel.to(device).train()
    inputs = [torch.from_numpy(a).to(device) for a in inputs]
    target = torch.from_numpy(target).to(device)

    def sync(x):
        if device.type == "cuda":
            torch.cuda.synchronize()
        return x

    _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step, infer = _torch_step_fn(tmodel, inputs, target, spec.kind, precision, device)
    t0 = time.perf_counter()
    sync(step())
    r.torch_first_s = time.perf_counter() - t0
    r.torch_ms = _median_ms(step, sync, steps, warmup)
    tmodel.eval()
    r.torch_infer_ms = _median_ms(infer, sync, steps, warmup)
    tmodel.train()
    r.torch_peak_mib = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                        else _peak_rss_mib())
    if not compile_too:
        r.compiled_note = "not run"
        return
    try:
        compiled = torch.compile(tmodel)
        step, _ = _torch_step_fn(compiled, inputs, target, spec.kind, precision, device)
        t0 = time.perf_counter()
        sync(step())
        r.compiled_first_s = time.perf_counter() - t0
        r.compiled_ms = _median_ms(step, sync, steps, warmup)
    except Exception as e:  # torch.compile fails in many environment-specific ways
        r.compiled_note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


def step_setup(arch: str, size: int | None, what: str):
    """The spec, input size and constructor overrides of an architecture's train step.

    Args:
      arch: registry name (an image model or ``transformer``).
      size: image side (sequence length for ``transformer``); the spec's default
        when None.
      what: the caller, for the error ("bench.train_step times").

    Returns:
      ``(spec, size, overrides)``.

    Raises:
      ValueError: a model kind the step does not cover, or too small an input.
    """
    import jaxnets

    spec = jaxnets.get_spec(arch)
    if spec.kind not in ("image", "sequence"):
        raise ValueError(f"{arch} is a {spec.kind!r} model; {what} image models and the "
                         "transformer")
    if size is None:
        size = 32 if spec.kind == "sequence" else spec.input_size[0]
    if spec.kind == "image" and size < spec.min_size[0]:
        raise ValueError(f"{arch} needs inputs of at least {spec.min_size[0]} pixels, got {size}")
    # Dropout draws differ between frameworks anyway; 0 keeps the work equal.
    return spec, size, {"dropout": 0.0} if spec.kind == "sequence" else {}


def bench_arch(arch: str, *, batch: int, size: int | None, precision: str, steps: int,
               warmup: int, compile_too: bool = True, tf32: bool = True) -> Result:
    """Time one architecture on both sides.

    Args:
      arch: registry name (an image model or ``transformer``).
      batch: batch size.
      size: image side (sequence length for ``transformer``); the spec's
        default when None.
      precision: ``"fp32"`` or ``"bf16"``.
      steps: timed steps (median reported).
      warmup: untimed steps after the first.
      compile_too: also time ``torch.compile``.
      tf32: allow TF32 for fp32 matmuls/convolutions on GPU (both sides).

    Returns:
      The ``Result``.
    """
    import jax
    import numpy as np
    import torch

    import jaxnets
    from porting.parity import matmul_precision
    from porting.reference import build_torch_model
    from porting.state_dict import load_torch_state_dict

    spec, size, overrides = step_setup(arch, size, "bench.train_step times")
    torch.manual_seed(0)
    tmodel = build_torch_model(arch, **overrides)
    model = jaxnets.create_model(arch, **overrides)
    load_torch_state_dict(model, tmodel.state_dict(), strict=True)
    jax_in, torch_in, target = _inputs(spec, batch, size)
    r = Result(arch, batch, size, precision, str(jax.devices()[0].device_kind),
               "cuda" if torch.cuda.is_available() else "cpu")
    # Scoped, not global: a caller's (e.g. the test suite's) settings survive.
    with matmul_precision(tf32=tf32):
        _bench_jax(model, spec, jax_in,
                   target.astype(np.int32) if spec.kind == "image" else target,
                   precision, steps, warmup, r)
        del model
        _bench_torch(tmodel, spec, torch_in, target, precision, steps, warmup, r, compile_too)
    return r


def _fmt(x: float, digits: int = 1) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def format_table(results: list[Result]) -> str:
    """A markdown table of the results.

    Args:
      results: the measured results.

    Returns:
      The table text.
    """
    head = ("| arch | batch | size | prec | jax ms/step | torch ms/step | jax/torch speed | "
            "torch.compile ms/step | jax compile s | jax infer ms | torch infer ms | "
            "jax peak MiB | torch peak MiB |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        compiled = _fmt(r.compiled_ms) if r.compiled_ms == r.compiled_ms else (
            r.compiled_note or "-")
        rows.append(f"| {r.arch} | {r.batch} | {r.size} | {r.precision} | {_fmt(r.jax_ms)} | "
                    f"{_fmt(r.torch_ms)} | {_fmt(r.ratio, 2)}x | {compiled} | "
                    f"{_fmt(r.jax_compile_s)} | {_fmt(r.jax_infer_ms)} | "
                    f"{_fmt(r.torch_infer_ms)} | {_fmt(r.jax_peak_mib, 0)} | "
                    f"{_fmt(r.torch_peak_mib, 0)} |")
    return "\n".join(rows)


def _parse(argv):
    p = ArgumentParser(prog="python -m bench.train_step", description=__doc__.split(
        "\n")[0])
    p.add_argument("--arch", nargs="+", default=["resnet18_cifar"],
                   help="registry names (default: resnet18_cifar)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--size", type=int, default=None,
                   help="image side (sequence length for transformer); spec default if unset")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: bfloat16 compute, float32 parameters (default: fp32)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps after the first (default: 2)")
    p.add_argument("--short", action="store_true",
                   help="tiny batch/size/steps and no torch.compile (CI smoke run)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="time torch.compile too; auto: on CUDA only (on CPU inductor's C++ "
                        "build of the first step did not finish in 8 minutes on the "
                        "development machine)")
    p.add_argument("--tf32", choices=["on", "off"], default="on",
                   help="TF32 for fp32 matmuls/convs on GPU, both frameworks")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    return p.parse_args(argv)


def _compile_wanted(args) -> bool:
    if args.compile != "auto":
        return args.compile == "on"
    import torch

    return torch.cuda.is_available() and not args.short


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
      argv: arguments (``sys.argv[1:]`` when None).

    Returns:
      The exit status.
    """
    from jaxnets.xla_cpu import prepare_cpu

    prepare_cpu()  # before jax starts: jaxnets/hostmem.py, jaxnets/xla_cpu.py
    args = _parse(argv)
    import jaxnets

    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        print("error: --batch and --steps must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    if args.json and (problem := json_path_problem(args.json)):
        print(f"error: --json {args.json}: {problem}", file=sys.stderr)
        return 2
    if args.size is not None and args.size < 1:
        print(f"error: --size must be >= 1, got {args.size}", file=sys.stderr)
        return 2
    plans = []
    try:  # every model checked before the first is measured
        for arch in args.arch:
            spec = jaxnets.get_spec(arch)
            batch, size, steps, warmup = args.batch, args.size, args.steps, args.warmup
            if args.short:
                batch, steps, warmup = min(batch, 4), min(steps, 3), min(warmup, 1)
                if size is None:
                    size = 8 if spec.kind == "sequence" else max(spec.min_size[0], 16)
            step_setup(arch, size, "bench.train_step times")
            plans.append((arch, batch, size, steps, warmup))
    except (jaxnets.UnknownModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = []
    for arch, batch, size, steps, warmup in plans:
        try:
            r = bench_arch(arch, batch=batch, size=size, precision=args.precision, steps=steps,
                           warmup=warmup, compile_too=_compile_wanted(args),
                           tf32=args.tf32 == "on")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        results.append(r)
        print(f"{arch}: jax {r.jax_ms:.1f} ms/step, torch {r.torch_ms:.1f} ms/step "
              f"(jax/torch speed {r.ratio:.2f}x), torch.compile "
              f"{_fmt(r.compiled_ms)} {r.compiled_note}".rstrip(), file=sys.stderr, flush=True)
    import torch

    print(f"jax devices: {r.device_jax}; torch device: {r.device_torch}; "
          f"torch threads {torch.get_num_threads()}; cpus {os.cpu_count()}")
    print(format_table(results))
    if args.json:
        write_json(args.json, [{**dataclasses.asdict(r), "ratio": r.ratio,
                                "images_per_s": r.images_per_s} for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
