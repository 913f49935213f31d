"""``python -m jaxnets.summary NAME``: a per-layer table like torchinfo.

Every module call is recorded while the model runs abstractly
(``jax.eval_shape``: no arrays are computed), giving each layer's path,
output shape and own parameter count, then the totals. The totals count
``nnx.Param`` elements only, as torch's ``sum(p.numel() for p in
model.parameters())`` counts parameters and not buffers.
"""

from __future__ import annotations

import contextlib
import numbers
import dataclasses
import math
import sys

import jax
import jax.numpy as jnp
from flax import nnx

import jaxnets

__all__ = ["LayerRow", "summarize", "format_table", "count_params", "main"]


@dataclasses.dataclass
class LayerRow:
    """One recorded module call."""

    path: str
    kind: str
    output_shape: str
    params: int
    depth: int


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameter elements (``nnx.Param``).

    Args:
      model: the model.

    Returns:
      The count.
    """
    return sum(math.prod(v.get_value().shape) for _, v in nnx.iter_graph(model)
               if isinstance(v, nnx.Param))


def _own_params(module: nnx.Module) -> int:
    total = 0
    for value in vars(module).values():
        if isinstance(value, nnx.Param):
            total += math.prod(value.get_value().shape)
    return total


def _shape_str(out) -> str:
    leaves = jax.tree_util.tree_leaves(out)
    shapes = [list(x.shape) for x in leaves if hasattr(x, "shape")]
    if len(shapes) == 1:
        return str(shapes[0])
    return ", ".join(str(s) for s in shapes)


@contextlib.contextmanager
def _recording(classes, rows, paths):
    originals = {}

    def wrap(cls):
        original = cls.__call__

        def call(self, *args, **kwargs):
            path = paths.get(id(self))
            if path is None:
                return original(self, *args, **kwargs)
            # Appended before the call so that rows come in call (pre-)order.
            row = LayerRow(path or "(model)", type(self).__name__, "", _own_params(self),
                           path.count(".") + 1 if path else 0)
            rows.append(row)
            out = original(self, *args, **kwargs)
            row.output_shape = _shape_str(out)
            return out

        return original, call

    try:
        for cls in classes:
            originals[cls], patched = wrap(cls)
            cls.__call__ = patched
        yield
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


def _example_input(spec, model, size, batch):
    if spec.kind == "image":
        h, w = size or spec.input_size
        return (jax.ShapeDtypeStruct((batch, h, w, spec.in_channels), jnp.float32),)
    if spec.kind == "vector":
        n = getattr(model, "in_features", spec.input_size[0])
        return (jax.ShapeDtypeStruct((batch, n), jnp.float32),)
    d = model.d_model
    shape = (batch, 10, d) if getattr(model, "batch_first", False) else (10, batch, d)
    return (jax.ShapeDtypeStruct(shape, jnp.float32),) * 2


def summarize(name: str, *, size=None, batch: int = 1, **overrides) -> tuple[list[LayerRow], int]:
    """Record every module call of a registered model on an abstract input.

    Args:
      name: registry name.
      size: (height, width) for image models; the spec's default when None.
      batch: batch size of the example input.
      **overrides: constructor options.

    Returns:
      ``(rows, total_params)``.

    Raises:
      TypeError: ``name`` is not a registry name (a model object, say).
    """
    if not isinstance(name, str):
        raise TypeError(f"summarize takes a registered model's name (e.g. 'resnet50'), not a "
                        f"{type(name).__name__}")
    if isinstance(size, numbers.Integral):
        size = (int(size), int(size))
    spec = jaxnets.get_spec(name)
    # Shapes only: nothing is initialised or computed, so a 600M-parameter model is cheap.
    model = nnx.eval_shape(lambda: jaxnets.create_model(name, **overrides))
    model.eval()
    total = count_params(model)
    inputs = _example_input(spec, model, size, batch)
    graphdef, state = nnx.split(model)
    classes = {type(m) for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}
    rows: list[LayerRow] = []
    paths: dict[int, str] = {}

    def run(state, *xs):
        m = nnx.merge(graphdef, state)
        paths.clear()
        paths.update({id(mod): ".".join(map(str, p)) for p, mod in nnx.iter_graph(m)
                      if isinstance(mod, nnx.Module)})
        return m(*xs)

    with _recording(classes, rows, paths):
        jax.eval_shape(run, state, *inputs)
    return rows, total


def format_table(name: str, rows: list[LayerRow], total: int) -> str:
    """Render rows as a fixed-width table with totals.

    Args:
      name: model name for the title.
      rows: from ``summarize``.
      total: total parameter count.

    Returns:
      The table text.
    """
    width = max([len(r.path) for r in rows] + [24]) + 2
    kinds = max([len(r.kind) for r in rows] + [6]) + 2
    lines = [f"{name}", f"{'layer (path)':<{width}}{'type':<{kinds}}{'output shape':<28}"
             f"{'params':>14}", "-" * (width + kinds + 42)]
    seen = set()
    for r in rows:
        shown = r.params if r.path not in seen else 0
        seen.add(r.path)
        lines.append(f"{r.path:<{width}}{r.kind:<{kinds}}{r.output_shape:<28}{shown:>14,}")
    lines.append("-" * (width + kinds + 42))
    lines.append(f"Total params: {total:,}")
    lines.append(f"Parameter size: {total * 4 / 2**20:.2f} MiB (float32)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    from jaxnets.cli import ArgumentParser

    p = ArgumentParser(prog="python -m jaxnets.summary",
                       description="Per-layer output shapes and parameter counts.")
    p.add_argument("name", help="registered model name, e.g. resnet50")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input height, width")
    p.add_argument("--batch", type=int, default=1, help="batch size of the example input")
    p.add_argument("--num-classes", type=int, help="classifier outputs")
    args = p.parse_args(argv)
    try:
        spec = jaxnets.get_spec(args.name)
        if args.size and spec.kind != "image":
            raise ValueError(f"--size does not apply to the {spec.kind} model {args.name}")
        kw = {} if args.num_classes is None else {"num_classes": args.num_classes}
        rows, total = summarize(args.name, size=args.size, batch=args.batch, **kw)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(args.name, rows, total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
