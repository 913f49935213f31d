"""How long and how much memory turning a ``.pth`` into a ready NNX model takes.

``python -m bench.port [--arch resnet50] [--runs 5]`` saves a randomly
initialised torchvision model with ``torch.save`` in a temporary directory
(torch is needed only for that), then, in a fresh subprocess that has
imported jax and jaxnets but touched nothing else:

* the first (cold) load is timed in its three steps, the ones
  ``porting.pretrained.load_torchvision(arch, path)`` takes: building the
  model abstractly (``nnx.eval_shape``, no random init), reading the file
  (``porting.pth.load_state_dict_file``), converting and filling
  (``load_into_abstract`` until every array is ready). Its peak extra memory
  is the process's RSS high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs``) minus its RSS before the load, so numpy and XLA
  buffers count, unlike with ``tracemalloc``;
* then ``--runs`` warm repetitions time the same steps (the build reuses the
  cached abstract trace) and the whole ``load_torchvision`` call; medians are
  reported.

Goal on the development machine: under 2 s and under 2x the checkpoint size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxnets.cli import ArgumentParser

__all__ = ["main", "make_checkpoint", "measure"]

_GOAL_SECONDS = 2.0
_GOAL_MEMORY_RATIO = 2.0


def make_checkpoint(arch: str, directory: Path) -> Path:
    """Saves a random torchvision ``arch`` state_dict (needs torch).

    Args:
      arch: a torchvision model name.
      directory: where to write ``<arch>.pth``.

    Returns:
      The file's path.
    """
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    path = directory / f"{arch}.pth"
    torch.save(model.state_dict(), path)
    return path


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _ready(model) -> None:
    import jax
    from flax import nnx

    jax.block_until_ready(nnx.state(model))


def measure(arch: str, path: Path, runs: int) -> dict:
    """The in-process measurement (run in a fresh subprocess by :func:`main`).

    Args:
      arch: registry name.
      path: the ``.pth``.
      runs: warm repetitions.

    Returns:
      Timings in seconds and memory in bytes.
    """
    import jax
    import jax.numpy as jnp

    from porting.pretrained import build_abstract, load_into_abstract, load_torchvision
    from porting.pth import load_state_dict_file

    def load_once() -> tuple[float, float, float]:
        # The same steps as load_torchvision(arch, path), timed one by one.
        t0 = time.perf_counter()
        build_abstract(arch)  # later builds of the same arch reuse this trace
        t1 = time.perf_counter()
        sd = load_state_dict_file(path).state_dict
        t2 = time.perf_counter()
        model, _, _ = load_into_abstract(arch, sd, torch_keys=True, label=path.name,
                                         consume=True)
        _ready(model)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    jnp.zeros(1).block_until_ready()  # backend start-up is not part of a load
    rss_before = _status_kb("VmRSS") * 1024
    exact_peak = _reset_peak()
    cpu = time.process_time()
    cold = load_once()
    cold_cpu = time.process_time() - cpu
    peak = _status_kb("VmHWM") * 1024

    parts: dict[str, list[float]] = {"build": [], "read": [], "convert": [], "total": []}
    for _ in range(runs):
        for name, seconds in zip(("build", "read", "convert"), load_once()):
            parts[name].append(seconds)
        t = time.perf_counter()
        model, _ = load_torchvision(arch, path)
        _ready(model)
        parts["total"].append(time.perf_counter() - t)
        del model
    return {
        "arch": arch,
        "file_bytes": path.stat().st_size,
        "cold_seconds": dict(zip(("build", "read", "convert"), cold)),
        "cold_cpu_seconds": cold_cpu,
        "peak_extra_bytes": peak - rss_before,
        "peak_is_exact": exact_peak,
        "median_seconds": {k: statistics.median(v) for k, v in parts.items()},
        "runs": runs,
        "backend": jax.default_backend(),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point.

    Args:
      argv: arguments; ``sys.argv[1:]`` when None.

    Returns:
      Exit status (1 when a goal is missed).
    """
    parser = ArgumentParser(prog="python -m bench.port", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50", help="torchvision/jaxnets model name")
    parser.add_argument("--runs", type=int, default=5, help="warm repetitions")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.arch, args.child, args.runs)))
        return 0
    try:
        import jaxnets

        spec = jaxnets.get_spec(args.arch)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.runs < 1:
        print(f"error: --runs must be >= 1, got {args.runs}", file=sys.stderr)
        return 2
    if not spec.torch_reference.startswith("torchvision"):
        print(f"error: bench.port converts a torchvision checkpoint; {args.arch}'s torch "
              f"counterpart is {spec.torch_reference}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = make_checkpoint(args.arch, Path(tmp))
        except ImportError as e:
            print(f"error: making the test checkpoint needs torch and torchvision ({e})",
                  file=sys.stderr)
            return 2
        env = {**os.environ, "JAXNETS_CACHE": str(Path(tmp) / "cache")}
        proc = subprocess.run([sys.executable, "-m", "bench.port", "--arch", args.arch,
                               "--runs", str(args.runs), "--child", str(path)],
                              capture_output=True, text=True, env=env,
                              cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        print(f"error: measurement failed: {proc.stderr.strip().splitlines()[-1:]}",
              file=sys.stderr)
        return 2
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    mb = r["file_bytes"] / 2**20
    ratio = r["peak_extra_bytes"] / r["file_bytes"]
    med = r["median_seconds"]
    print(f"{r['arch']}: checkpoint {mb:.1f} MiB, backend {r['backend']}")
    cold = r["cold_seconds"]
    cold_total = sum(cold.values())
    print(f"  cold (fresh process): {cold_total:.3f} s = build {cold['build']:.3f} s + read "
          f"{cold['read']:.3f} s + convert+fill {cold['convert']:.3f} s (CPU time "
          f"{r['cold_cpu_seconds']:.3f} s: wall time above it means a busy machine)")
    print(f"  warm medians of {r['runs']}: build {med['build']:.3f} s, read {med['read']:.3f} s, "
          f"convert+fill {med['convert']:.3f} s; load_torchvision {med['total']:.3f} s")
    print(f"  peak extra RSS: {r['peak_extra_bytes'] / 2**20:.1f} MiB = {ratio:.2f}x the "
          f"checkpoint{'' if r['peak_is_exact'] else ' (peak since process start)'}")
    ok = cold_total < _GOAL_SECONDS and ratio < _GOAL_MEMORY_RATIO
    print(f"  goal (< {_GOAL_SECONDS:g} s cold, < {_GOAL_MEMORY_RATIO:g}x memory): "
          f"{'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
