"""The checks for a machine with an accelerator, as one command under a time budget.

    python -m bench.device_check [--out DIR] [--budget-s 420] [--skip-parity] [--skip-bench]
                                 [--short] [--list]

For a session that is lent a GPU for a few minutes (bench/README.md, "GPU"): one
process runs, in this order, while the budget lasts,

* the train-step benchmark of ResNet-50 in bf16 at batch 256 (the goal: above
  2,500 images/s on one H100-class GPU), then the other rows of bench/README's
  table (lenet5 in fp32; resnet18_cifar, resnet50, vit_b_16, transformer in fp32
  with TF32 as each framework uses it for speed, and bf16), ``bench.train_step`` on both
  sides (torch eager; ``torch.compile`` on the last ResNet-50 row);
* parity with torch (``porting.parity.run_parity``: full fp32, TF32 off on both
  sides; the jax side on the accelerator, torch on the CPU) of every registered
  model (image, vector and ``transformer``): float64 gradients too for one model of
  each family,
  outputs and BatchNorm statistics for the rest, at batch 2.

The benchmark's first row and one parity model of each family go first, then the
rest. An item is started only while the budget lasts; each one's result is
written as soon as it is done (``DIR/device_check.json``, ``DIR/device_check.md``),
so a run cut off still leaves what it finished; an item that raises is recorded
with its error and the run goes on. Exit 0 when every item that ran passed (no
error, parity PASS), 1 otherwise, 2 on bad input.

On the lent machine (nothing installed there from this repository; its own jax,
flax, torch and torchvision are used, and their versions are printed first)::

    PYTHONUNBUFFERED=1 python3 -m bench.device_check --out "$OUT" --budget-s 420

with a device ``timeout_s`` of about 540. ``--short`` is the CPU smoke run the test
suite makes (LeNet-5 only, tiny sizes).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import traceback

from bench.output import strict

__all__ = ["Item", "plan", "run_items", "format_report", "main"]

# ResNet-50 bf16 train step, one H100-class GPU: the goal.
GOAL_IMAGES_PER_S = 2500.0
# Parity models compared with float64 gradients (one of each family, smaller inputs):
# the rest are compared on outputs and BatchNorm statistics only.
GRAD_PARITY = {"lenet5": None, "mlp": None, "resnet18": (160, 192), "resnet50": (160, 192),
               "resnext50_32x4d": (128, 96), "wide_resnet50_2": (128, 96), "alexnet": None,
               "vgg11_bn": (64, 80), "googlenet": (225, 231), "inception_v3": (299, 299),
               "vit_b_32": None, "transformer": None}
# Deep networks: each distinct block compiled once (porting.parity's jit="blocks").
_BLOCKS = ("101", "152", "vit_l", "vit_h")


@dataclasses.dataclass
class Item:
    """One check: a parity run or a benchmark row."""

    kind: str  # "parity" or "bench"
    arch: str
    batch: int
    size: tuple[int, int] | int | None = None
    precision: str = "fp32"  # bench
    grads: bool = False  # parity: float64 gradients (train mode) too
    compile_too: bool = False  # bench: torch.compile as well

    @property
    def label(self) -> str:
        if self.kind == "parity":
            return f"parity {self.arch}{' +grads' if self.grads else ''}"
        return (f"bench {self.arch} {self.precision} b{self.batch}"
                + (" +torch.compile" if self.compile_too else ""))


def plan(short: bool = False, parity: bool = True, bench: bool = True) -> list[Item]:
    """The items in the order they run.

    Args:
      short: LeNet-5 only, tiny sizes (a CPU smoke run).
      parity: include the parity runs.
      bench: include the benchmark rows.

    Returns:
      The ordered items.
    """
    if short:
        items = [Item("bench", "lenet5", 4, 32), Item("parity", "lenet5", 2, grads=True)]
        return [i for i in items if (parity if i.kind == "parity" else bench)]
    import jaxnets

    first_bench = [Item("bench", "resnet50", 256, 224, "bf16")]
    more_bench = [Item("bench", "resnet50", 128, 224, "fp32"),
                  Item("bench", "resnet18_cifar", 256, 32, "fp32"),
                  Item("bench", "resnet18_cifar", 256, 32, "bf16"),
                  Item("bench", "lenet5", 256, 32, "fp32"),
                  Item("bench", "vit_b_16", 64, 224, "fp32"),
                  Item("bench", "vit_b_16", 64, 224, "bf16"),
                  Item("bench", "transformer", 64, 128, "fp32"),
                  Item("bench", "transformer", 64, 128, "bf16"),
                  Item("bench", "resnet50", 256, 224, "bf16", compile_too=True)]
    archs = [a for kind in ("image", "vector", "sequence") for a in jaxnets.list_models(kind=kind)]
    family = [Item("parity", a, 2, GRAD_PARITY[a], grads=True) for a in GRAD_PARITY
              if a in archs]
    rest = [Item("parity", a, 2) for a in archs if a not in GRAD_PARITY]
    return ((first_bench if bench else []) + (family if parity else [])
            + (more_bench if bench else []) + (rest if parity else []))


def _parity_row(item: Item) -> dict:
    from porting.parity import run_parity

    arch = item.arch
    result = run_parity(arch, size=item.size, batch=item.batch,
                        grads=("train",) if item.grads else False,
                        jit="blocks" if any(t in arch for t in _BLOCKS) else True)
    worst = {}
    for q in result.quantities:
        key = ("grads" if q.name.startswith("grads") else "stats" if q.name.startswith("BN")
               else "train" if q.name.startswith("train") else "eval"
               if q.name.startswith("eval") else None)
        if key:
            err = q.max_rel if q.on == "rel" else q.max_abs
            worst[key] = max(worst.get(key, 0.0), err)
    return {"input": result.input_label, "passed": result.passed, **worst,
            "table": result.table()}


def _bench_row(item: Item, steps: int, warmup: int) -> dict:
    from bench.train_step import bench_arch

    r = bench_arch(item.arch, batch=item.batch, size=item.size, precision=item.precision,
                   steps=steps, warmup=warmup, compile_too=item.compile_too)
    row = {**dataclasses.asdict(r), "ratio": r.ratio, "images_per_s": r.images_per_s,
           "passed": True}
    return row


def _release_memory() -> None:
    import jax

    gc.collect()
    jax.clear_caches()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def run_items(items: list[Item], *, budget_s: float, out: str | None, steps: int = 20,
              warmup: int = 3, header: dict | None = None) -> list[dict]:
    """Run the items in order while the budget lasts, writing the report after each.

    Args:
      items: from ``plan``.
      budget_s: no item but the first starts after this many seconds.
      out: folder for ``device_check.json`` and ``device_check.md`` (None: not written).
      steps: timed steps of each benchmark row.
      warmup: untimed steps of each benchmark row after its first.
      header: the environment, written at the top of the report.

    Returns:
      One dict per item: ``item`` (its fields), ``status`` ("done", "error" or
      "not reached"), ``seconds`` and the item's figures.
    """
    t0 = time.perf_counter()
    rows = [{"item": dataclasses.asdict(i), "label": i.label, "status": "not reached"}
            for i in items]
    for n, (item, row) in enumerate(zip(items, rows)):
        if n and time.perf_counter() - t0 > budget_s:
            break
        start = time.perf_counter()
        print(f"[{start - t0:6.1f}s] {item.label} ...", flush=True)
        try:
            row.update(_parity_row(item) if item.kind == "parity"
                       else _bench_row(item, steps, warmup))
            row["status"] = "done"
        except Exception as e:  # one model's failure must not end the others' checks
            row.update(status="error", passed=False,
                       error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                       if str(e).strip() else type(e).__name__,
                       traceback=traceback.format_exc()[-2000:])
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(f"[{time.perf_counter() - t0:6.1f}s] {item.label}: {_summary(row)}", flush=True)
        _release_memory()
        if out:
            _write(out, rows, header or {})
    return rows


def _summary(row: dict) -> str:
    if row["status"] == "error":
        return f"ERROR {row['error']}"
    if row["item"]["kind"] == "parity":
        errs = ", ".join(f"{k} {row[k]:.1e}" for k in ("eval", "train", "stats", "grads")
                         if k in row)
        return f"{'PASS' if row['passed'] else 'FAIL'} ({errs})"
    ips = row["images_per_s"]
    return (f"jax {row['jax_ms']:.1f} ms ({ips['jax']:.0f}/s), torch {row['torch_ms']:.1f} ms "
            f"({ips['torch']:.0f}/s), jax/torch {row['ratio']:.2f}x")


def _fmt(x, spec=".1e") -> str:
    return "-" if x is None or x != x else format(x, spec)


def format_report(rows: list[dict], header: dict) -> str:
    """The markdown report: environment, goal, benchmark table, parity table."""
    from bench.train_step import Result, format_table

    lines = ["# bench.device_check", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in header.items()]
    bench = [r for r in rows if r["item"]["kind"] == "bench" and r["status"] == "done"]
    goal = [r for r in bench if r["arch"] == "resnet50" and r["precision"] == "bf16"]
    lines += ["", "## Train step (bench.train_step)", ""]
    if goal:
        ips = max(r["images_per_s"]["jax"] for r in goal)
        verdict = "met" if ips > GOAL_IMAGES_PER_S else "not met"
        lines.append(f"ResNet-50 bf16 train step: {ips:.0f} images/s "
                     f"(goal {GOAL_IMAGES_PER_S:.0f}: {verdict})")
        lines.append("")
    fields = {f.name for f in dataclasses.fields(Result)}
    if bench:
        lines.append(format_table([Result(**{k: v for k, v in r.items() if k in fields})
                                   for r in bench]))
    lines += ["", "## Parity with torch (full fp32, TF32 off; float64 gradients)", "",
              "| model | input | eval abs | train abs | BN stats rel | grads fp64 rel | result "
              "| s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["item"]["kind"] != "parity" or r["status"] == "not reached":
            continue
        result = ("ERROR" if r["status"] == "error" else "PASS" if r["passed"] else "FAIL")
        lines.append(f"| {r['item']['arch']} | {r.get('input', '')} | "
                     f"{_fmt(r.get('eval'))} | {_fmt(r.get('train'))} | {_fmt(r.get('stats'))} "
                     f"| {_fmt(r.get('grads'))} | {result} | {r['seconds']} |")
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {r['label']}: {r['error']}" for r in errors]
    missed = [r["label"] for r in rows if r["status"] == "not reached"]
    if missed:
        lines += ["", f"Not reached within the budget ({len(missed)}): " + ", ".join(missed)]
    return "\n".join(lines) + "\n"


def _write(out: str, rows: list[dict], header: dict) -> None:
    os.makedirs(out, exist_ok=True)
    for name, text in (("device_check.json", json.dumps(strict({"environment": header,
                                                               "items": rows}),
                                                        indent=1, allow_nan=False)),
                       ("device_check.md", format_report(rows, header))):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def environment() -> dict:
    """Versions and devices, for the report's header."""
    import importlib.metadata as md

    import jax

    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "jax devices": ", ".join(sorted({d.device_kind for d in jax.devices()}))
           + f" ({jax.default_backend()}, {jax.device_count()})",
           "python": sys.version.split()[0], "cpus": os.cpu_count()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "torchvision"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = "not installed"
    try:
        import torch

        env["torch device"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                               else "cpu")
    except ImportError:
        pass
    return env


def _parse(argv):
    p = _Parser(prog="python -m bench.device_check",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "device_check",
                   help="folder for device_check.json and .md (default: $OUT, else "
                        "./device_check)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="no item starts after this many seconds (default 420)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per benchmark row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per benchmark row")
    p.add_argument("--skip-parity", action="store_true", help="no parity items")
    p.add_argument("--skip-bench", action="store_true", help="no benchmark items")
    p.add_argument("--short", action="store_true", help="LeNet-5 only, tiny sizes (CPU smoke)")
    p.add_argument("--list", action="store_true", help="print the items in order and exit")
    return p.parse_args(argv)


class _Parser(argparse.ArgumentParser):
    """One-line usage errors (``jaxnets.cli.ArgumentParser``'s, without importing
    jaxnets: an old flax on the machine is reported by ``main``, not a traceback)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parse(argv)
    if args.budget_s <= 0 or args.steps < 1 or args.warmup < 0:
        print("error: --budget-s and --steps must be > 0, --warmup >= 0", file=sys.stderr)
        return 2
    if args.skip_parity and args.skip_bench:
        print("error: --skip-parity and --skip-bench leave nothing to run", file=sys.stderr)
        return 2
    if not args.list:
        from train.config import ConfigError, check_output_dir

        try:  # before the first item: its report goes there
            check_output_dir(args.out, "--out")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        import jaxnets  # noqa: F401  (the machine's own flax must carry it)
    except (ImportError, AttributeError) as e:
        env = environment()
        print(f"error: jaxnets does not import with this machine's packages (flax "
              f"{env['flax']}, jax {env['jax']}; pyproject.toml names the versions needed): "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 2
    items = plan(args.short, parity=not args.skip_parity, bench=not args.skip_bench)
    if args.list:
        print("\n".join(i.label for i in items))
        return 0
    header = environment()
    for k, v in header.items():
        print(f"{k}: {v}", flush=True)
    steps, warmup = (2, 1) if args.short else (args.steps, args.warmup)
    rows = run_items(items, budget_s=args.budget_s, out=args.out, steps=steps, warmup=warmup,
                     header=header)
    print(format_report(rows, header))
    print(f"report: {os.path.join(args.out, 'device_check.md')}")
    ran = [r for r in rows if r["status"] != "not reached"]
    return 0 if all(r.get("passed") for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
