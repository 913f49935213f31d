"""Where a jaxnets train step's time goes, per XLA operation.

``python -m bench.profile_step --arch vit_b_16 --batch 8 [--size 224]
[--precision fp32|bf16] [--steps 2] [--top 20] [--json OUT]``

Runs the step that ``bench.train_step`` times (``jax_train_step``: forward,
backward, optax SGD-momentum update, buffers donated) under ``jax.profiler``
for ``--steps`` steps after two untimed ones, reads the trace back
(``jax.profiler.ProfileData``) and sums each XLA operation's events per step.
Each operation is named by its instruction in the compiled program: its kind
(a convolution, a dot, a transpose, elementwise work, a reduction), its
output shape and how many operands its fusion reads. Prints the operations
that took longest, the time per kind, and the largest fusions: a fusion that
reads many operands recomputes work that XLA could have stored once (see
``jaxnets.layers.fusion_barrier``).

On CPU the per-operation events need ``--xla_cpu_enable_xprof_traceme=true``,
which this command adds to ``XLA_FLAGS`` before jax starts (a caller that
imported jax already must set it). There, plain (unfused) dots and convolutions
are handed to Eigen on XLA's thread pool, and their events can end before their
work does: the report marks them "(handed over)" and sums them apart in the
time per kind; their work shows up as slower operations beside them. On GPU
the "XLA Ops" line of each device is read. Times are of one run on a shared
machine: compare shares, not absolute figures.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import sys
import tempfile
import time

from bench.output import json_path_problem, write_json
from jaxnets.cli import ArgumentParser

_TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"
# Events that wrap or wait for operations rather than being one.
_WRAPPERS = ("ThunkExecutor", "SlinkyThreadPool", "end:", "Await", "Wait")
_NO_OPERATION = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")
# Marks an operation whose event times its hand-over to XLA:CPU's pool, not its work.
_HANDED_OVER = " (handed over)"
# name = shape opcode(rest); a shape is an array type or a tuple of them (multi-output
# fusions), which has spaces inside.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%([\w.\-]+) = (\((?:[^()]|\([^()]*\))*\)|\S+) ([a-z][\w\-]*)\((.*)$")


@dataclasses.dataclass
class Op:
    """One XLA operation of the profiled program, summed over its events."""

    name: str
    ms: float  # per step
    calls: float  # events per step
    kind: str
    shape: str
    operands: int
    # A plain dot or convolution on CPU: XLA hands it to Eigen on its thread pool and
    # its event can end there, so ``ms`` may time the hand-over only; the rest of its
    # work runs inside the time of the operations it overlaps.
    handed_over: bool = False


@dataclasses.dataclass
class Profile:
    """The profile of one architecture's train step."""

    arch: str
    batch: int
    size: int
    precision: str
    device: str
    step_ms: float  # median wall time of the profiled steps
    ops: list[Op]
    program_ops: int  # the program's top-level operations (what a complete trace shows)

    def by_kind(self) -> dict[str, float]:
        out: dict[str, float] = collections.Counter()
        for op in self.ops:
            out[op.kind + _HANDED_OVER * op.handed_over] += op.ms
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """The instruction lines of each computation of a compiled HLO module's text."""
    comps, current = {}, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            head = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            current = head.lstrip("%")
            comps[current] = []
        elif current is not None and line.startswith(" "):
            comps[current].append(line)
    return comps


def describe_instructions(hlo_text: str) -> dict[str, tuple[str, str, int, bool]]:
    """``{instruction name: (kind, output shape, operands, library call)}`` for a
    compiled module.

    A fusion's kind is that of the heaviest operation it contains (a
    convolution, then a dot, a transpose or copy, a reduction, else
    elementwise); other instructions keep their opcode. A library call is a
    plain (unfused) dot or convolution, which XLA:CPU runs asynchronously in
    Eigen (a library fusion, such as XLA:CPU's ``ynn_fusion``, runs in the event).
    """
    comps = _computations(hlo_text)
    out = {}
    for lines in comps.values():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            name, shape, opcode, rest = m.groups()
            args = rest.split("), ")[0] if opcode == "fusion" else ""
            operands = args.count("%")
            kind = opcode
            if opcode == "fusion":
                called = re.search(r"calls=%([\w.\-]+)", rest)
                body = comps.get(called.group(1), []) if called else []
                inner = {im.group(3) for im in map(_INSTRUCTION.match, body) if im}
                kind = next((k for k, ops in (
                    ("convolution", {"convolution"}), ("dot", {"dot"}),
                    ("transpose/copy", {"transpose", "copy", "concatenate"}),
                    ("reduction", {"reduce", "reduce-window", "select-and-scatter"}))
                    if inner & ops), "elementwise")
            elif opcode in ("copy", "transpose", "concatenate"):
                kind = "transpose/copy"
            out[name] = (kind, shape, operands, opcode in ("dot", "convolution"))
    return out


def program_operations(hlo_text: str) -> set[str]:
    """The operations a run of a compiled module executes: its entry computation's
    instructions, less those that are no operation (parameters, constants, tuples,
    bitcasts)."""
    comps = _computations(hlo_text)
    entry = next(line.split()[1].lstrip("%") for line in hlo_text.splitlines()
                 if line.startswith("ENTRY"))
    return {m.group(1) for m in map(_INSTRUCTION.match, comps[entry])
            if m and m.group(3) not in _NO_OPERATION}


def _op_lines(profile_data):
    """The trace lines whose events are XLA operations: the devices' "XLA Ops"
    lines where there are any (GPU), else every host line (CPU: XLA runs an
    operation on its thread pool, or on the calling thread when the pool is busy)."""
    lines = [(plane, line) for plane in profile_data.planes for line in plane.lines]
    device = [(p, ln) for p, ln in lines if p.name.startswith("/device:") and ln.name == "XLA Ops"]
    return device or [(p, ln) for p, ln in lines if p.name.startswith("/host:")]


def _on_host(lines) -> bool:
    """Whether ``_op_lines`` read the host's lines (a CPU run)."""
    return all(plane.name.startswith("/host:") for plane, _ in lines)


def summarise_trace(path: str, hlo_text: str, steps: int) -> list[Op]:
    """Sum a trace's XLA operation events per step and name them by the program.

    Args:
      path: an ``.xplane.pb`` file written by ``jax.profiler``.
      hlo_text: the profiled program's compiled text (``compiled.as_text()``).
      steps: how many steps the trace holds.

    Returns:
      The operations, longest first.
    """
    from jax.profiler import ProfileData

    described = describe_instructions(hlo_text)
    ms, calls = collections.Counter(), collections.Counter()
    lines = _op_lines(ProfileData.from_file(path))
    host = _on_host(lines)
    for _, line in lines:
        for ev in line.events:
            if ev.name.startswith(_WRAPPERS) or ev.name not in described:
                continue
            ms[ev.name] += ev.duration_ns / 1e6 / steps
            calls[ev.name] += 1 / steps
    ops = []
    for name, t in ms.most_common():
        kind, shape, operands, library_call = described[name]
        ops.append(Op(name, t, calls[name], kind, shape, operands, host and library_call))
    return ops


def profile_arch(arch: str, *, batch: int, size: int | None, precision: str,
                 steps: int) -> Profile:
    """Profile ``steps`` train steps of one architecture (after two untimed ones).

    Raises:
      ValueError: a model kind the train step does not cover, or too small an input.
      RuntimeError: the trace holds no operation events (on CPU: jax was
        started without ``--xla_cpu_enable_xprof_traceme=true``).
    """
    import glob
    import statistics

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxnets
    from bench.train_step import _inputs, jax_train_step, step_setup

    spec, size, overrides = step_setup(arch, size, "bench.profile_step profiles")
    model = jaxnets.create_model(arch, **overrides)
    inputs, _, target = _inputs(spec, batch, size)
    inputs = [jnp.asarray(a) for a in inputs]
    target = jnp.asarray(target.astype(np.int32) if spec.kind == "image" else target)
    step, _, state = jax_train_step(model, spec, precision)
    step = step.lower(*state, inputs, target).compile()  # runs the very program it names
    hlo_text = step.as_text()

    def run():
        state[0], state[1], state[2], loss = step(*state, inputs, target)
        jax.block_until_ready(loss)

    run()
    run()
    times = []
    with tempfile.TemporaryDirectory(prefix="jaxnets_profile_") as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
        traces = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not traces:
            raise RuntimeError(f"jax.profiler wrote no trace under {d}")
        ops = summarise_trace(traces[0], hlo_text, steps)
    if not ops:
        raise RuntimeError("the trace holds no XLA operation events; on CPU, start jax with "
                           f"XLA_FLAGS={_TRACEME_FLAG}")
    return Profile(arch, batch, size, precision, str(jax.devices()[0].device_kind),
                   statistics.median(times) * 1e3, ops, len(program_operations(hlo_text)))


def format_report(p: Profile, top: int = 20, fusions: int = 5) -> str:
    """The report ``main`` prints: longest operations, time per kind, largest fusions."""
    total = sum(op.ms for op in p.ops)
    lines = [f"{p.arch} (batch {p.batch}, size {p.size}, {p.precision}) on {p.device}: "
             f"step {p.step_ms:.1f} ms (median of the profiled steps); {len(p.ops)} of the "
             f"program's {p.program_ops} operations traced, {total:.1f} ms per step "
             "(operations on two threads overlap)"]
    handed = sum(op.handed_over for op in p.ops)
    if handed:
        lines.append(f"{handed} operations{_HANDED_OVER}: plain dots and convolutions, which "
                     "XLA:CPU hands to Eigen on its thread pool. Their events can end before "
                     "their work does; the rest runs inside the time of the operations it "
                     "overlaps, which run slower for it (bench/README.md).")
    lines += ["", "| operation | kind | output | operands | ms/step | share |",
              "|---|---|---|---|---|---|"]
    for op in p.ops[:top]:
        lines.append(f"| {op.name}{_HANDED_OVER * op.handed_over} | {op.kind} | {op.shape} | "
                     f"{op.operands} | {op.ms:.1f} | {100 * op.ms / total:.1f}% |")
    lines += ["", "| kind | ms/step | share |", "|---|---|---|"]
    for kind, ms in p.by_kind().items():
        lines.append(f"| {kind} | {ms:.1f} | {100 * ms / total:.1f}% |")
    widest = sorted(p.ops, key=lambda op: -op.operands)[:fusions]
    lines += ["", "Largest fusions (operands read; many means recomputed work):"]
    lines += [f"  {op.operands:4d}  {op.name} ({op.kind}, {op.shape}): {op.ms:.1f} ms/step"
              for op in widest]
    return "\n".join(lines)


def _parse(argv):
    p = ArgumentParser(prog="python -m bench.profile_step",
                       description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18_cifar",
                   help="a registry name (default: resnet18_cifar)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--size", type=int, default=None,
                   help="image side (sequence length for transformer); spec default if unset")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: bfloat16 compute, float32 parameters (default: fp32)")
    p.add_argument("--steps", type=int, default=2, help="profiled steps (default: 2)")
    p.add_argument("--top", type=int, default=20, help="operations listed (default: 20)")
    p.add_argument("--json", default=None, help="write the profile to this JSON file")
    return p.parse_args(argv)


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
    if args.json and (problem := json_path_problem(args.json)):
        print(f"error: --json {args.json}: {problem}", file=sys.stderr)
        return 2
    if args.batch < 1 or args.steps < 1 or args.top < 1:
        print("error: --batch, --steps and --top must be >= 1", file=sys.stderr)
        return 2
    from jaxnets.hostmem import _backends_started

    # jaxnets imports jax (prepare_cpu did); XLA reads its flags when its backends start.
    if not _backends_started() and _TRACEME_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_TRACEME_FLAG}".strip()
    import jaxnets

    try:
        jaxnets.get_spec(args.arch)
        p = profile_arch(args.arch, batch=args.batch, size=args.size,
                         precision=args.precision, steps=args.steps)
    except (jaxnets.UnknownModelError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(p, args.top))
    if args.json:
        write_json(args.json, {**dataclasses.asdict(p), "by_kind": p.by_kind()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
