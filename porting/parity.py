"""Side-by-side runs of a jaxnets model and its torch reference, fp32.

Parity here means: a randomly initialised torch model, its BatchNorm running
statistics and affine terms randomised too (left at their defaults, a BN bug
hides), is ported and both are compared on the same input for eval outputs,
train-mode outputs, the BatchNorm statistics after that train-mode forward,
and the gradient of a scalar loss for every parameter (BatchNorm in eval mode,
as when fine-tuning with frozen statistics, and in train mode). Dropout is set
to 0 on both sides so train-mode runs are deterministic.

Outputs must be within 1e-4 (absolute) of torch's fp32 outputs. Very deep
networks amplify fp32 rounding beyond that: a random ResNet-101 gives logits
that differ between torch fp32 and torch float64 by ~4e-4. When torch's
float64 run is at hand (``grads=True``, else a float64 forward is run for an
output that misses the bound) an output that misses 1e-4 still
passes if it is no further from the float64 result than ``FP32_NOISE_FACTOR``
times torch's own fp32 error, and the table says so.

Gradients are compared in float64 on both sides (JAX with x64 enabled, torch
``.double()``), where they must agree to 1e-4 per tensor (they agree to ~1e-12).
In fp32 they are only reported (``fp32_grads=True``): fp32 gradients of a deep
normalised ReLU network are not reproducible to 1e-4 by any two
implementations. A pre-activation within fp32 rounding of 0 is on one side of
the ReLU kink in one implementation and on the other in the next, which moves
every gradient upstream of it by up to a few percent; with ~10^6 activations
per pass that happens in about every other run, and torch's own fp32
gradients differ from its float64 ones by up to 20% per tensor for a random
ResNet-50 in train mode (``bench/grad_conditioning.py`` measures it). In
float64 the rounding is 10^9 times smaller, so the comparison checks the
backward pass itself.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxnets
import jaxnets.layers
from porting.state_dict import flax_to_torch, flax_variables, load_torch_state_dict, slabs, \
    to_numpy, to_torch_state_dict

__all__ = ["Quantity", "ParityResult", "randomize_torch_model", "compare_arrays", "run_parity",
           "run_parity_inputs", "matmul_precision", "jit_repeated_blocks", "repeated_block_types"]

# Thresholds: outputs absolute; statistics and gradients relative to the
# tensor's largest magnitude (a gradient of 1e3 cannot be held to 1e-4 absolute
# in fp32, a gradient of 1e-6 would pass any absolute bound).
OUTPUT_ATOL = 1e-4
REL_TOL = 1e-4
# Two independent fp32 computations land at comparable distances from the exact
# result; the factor leaves a margin for that ratio.
FP32_NOISE_FACTOR = 3.0
# Denominator floor for per-tensor gradient errors, relative to the model's largest gradient.
GRAD_SCALE_FLOOR = 1e-6
# BatchNorm with running statistics (as when fine-tuning with frozen
# statistics), and with batch statistics.
GRAD_MODES = ("eval", "train")


@dataclasses.dataclass
class Quantity:
    """One compared quantity, reduced over its tensors.

    Attributes:
      name: e.g. ``"eval logits"``, ``"grad layer1.0.conv1.weight"``.
      max_abs: max |jax - torch|.
      max_rel: max |jax - torch| / max |torch| (per tensor, worst tensor).
      tol: the bound.
      on: ``"abs"`` or ``"rel"``: which error the bound applies to.
      worst: the tensor with the worst error, for groups of tensors.
      failed: tensors that failed a per-tensor criterion (gradients); None
        when the bound on ``max_abs``/``max_rel`` decides.
      note: extra figures (the float64 comparison for gradients).
    """

    name: str
    max_abs: float
    max_rel: float
    tol: float
    on: str
    worst: str = ""
    failed: list[str] | None = None
    note: str = ""

    @property
    def passed(self) -> bool:
        if self.failed is not None:
            return not self.failed
        err = self.max_abs if self.on == "abs" else self.max_rel
        return bool(np.isfinite(err) and err <= self.tol)


@dataclasses.dataclass
class ParityResult:
    """All quantities of one parity run."""

    arch: str
    input_shape: tuple[int, ...]
    quantities: list[Quantity]
    # Sequence models: ``input_shape`` is the source's, this the target's.
    target_shape: tuple[int, ...] | None = None

    @property
    def input_label(self) -> str:
        """The input's shape in words: ``2x32x32x1 (NHWC)``, ``src 10x2x512, tgt 9x2x512``."""
        shape = "x".join(map(str, self.input_shape))
        if self.target_shape is not None:
            return f"src {shape}, tgt {'x'.join(map(str, self.target_shape))}"
        return f"{shape} ({'NHWC' if len(self.input_shape) == 4 else 'NC'})"

    @property
    def passed(self) -> bool:
        return all(q.passed for q in self.quantities)

    def table(self) -> str:
        """A fixed-width table of the errors with PASS/FAIL per row."""
        rows = [f"{'quantity':<34} {'max abs err':>12} {'max rel err':>12} {'bound':>14}  result"]
        for q in self.quantities:
            bound = f"{q.on}<={q.tol:.0e}" if np.isfinite(q.tol) else "(info)"
            name = q.name if not q.worst else f"{q.name} [{q.worst}]"
            rows.append(f"{name[:34]:<34} {q.max_abs:>12.3e} {q.max_rel:>12.3e} {bound:>14}  "
                        f"{'PASS' if q.passed else 'FAIL'}")
            if q.note:
                rows.append(f"    {q.note}")
            if q.failed:
                rows.append(f"    failed: {', '.join(q.failed[:8])}")
        return "\n".join(rows)


def randomize_torch_model(model, seed: int = 0, calibration_input=None) -> None:
    """Randomise every normalisation layer's affine terms and statistics in place.

    With a calibration input the running statistics are first set to the
    batch statistics of that input (as in a trained network, where they keep
    eval-mode activations near unit scale) and then perturbed; without one they
    are drawn around their defaults. Either way no layer keeps torch's
    defaults, which would hide a mix-up of mean and variance or of eps.

    Parameters that torch initialises to zero (attention and VGG biases, ViT's class
    token) are drawn too: a zero bias hides a bias that is dropped or sliced wrongly.

    Args:
      model: a torch ``nn.Module``.
      seed: seed of the generator used.
      calibration_input: an input batch for the model, or None.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in model.modules():
            affine = (m in bns and m.affine) or (
                isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine)
            if affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        # After the affine terms (the draws before stay as they were), before calibration.
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if calibration_input is not None and bns:
            was_training, momenta = model.training, [m.momentum for m in bns]
            for m in bns:
                m.momentum = 1.0
            model.train()
            model(calibration_input)
            model.train(was_training)
            for m, mom in zip(bns, momenta):
                m.momentum = mom
        for m in bns:
            if not m.track_running_stats:
                continue
            n = m.num_features
            std = m.running_var.sqrt()
            # Small perturbations: every channel differs from the batch statistics,
            # yet eval-mode activations stay near unit scale through 100+ layers.
            m.running_mean.add_(torch.randn(n, generator=g) * 0.05 * std)
            m.running_var.mul_(torch.rand(n, generator=g) * 0.2 + 0.9)
            m.num_batches_tracked.zero_()


def _max_abs(a: np.ndarray, b: np.ndarray | None = None) -> float:
    """``max |a - b|`` (``max |a|`` without ``b``) in float64; ``inf`` where a NaN meets.

    Slab by slab (``porting.state_dict.slabs``) along the transposed side's
    outer axis: no full-size float64 temporaries, and cache-friendly when one
    side is a transposed view (a jax kernel seen in torch layout).
    """
    if a.size == 0:
        return 0.0
    lead = b if b is not None and a.flags.c_contiguous else a
    worst = 0.0
    for index in slabs(lead):
        d = np.abs(a[index], dtype=np.float64) if b is None else np.abs(
            np.subtract(a[index], b[index], dtype=np.float64))
        m = float(np.max(d))
        if m != m:  # NaN: Python's max() would drop it
            return float("inf")
        worst = max(worst, m)
    return worst


def compare_arrays(name: str, got: dict[str, Any], want: dict[str, Any], *, tol: float,
                   on: str, scale_floor: float = 0.0) -> Quantity:
    """Reduce the errors of matching tensors to one ``Quantity``.

    Args:
      name: label of the group.
      got: key -> jax-side array (torch layout).
      want: key -> torch-side array.
      tol: bound.
      on: ``"abs"`` or ``"rel"``.
      scale_floor: lower bound of the relative error's denominator, as a
        fraction of the largest magnitude over the whole group. Gradients that
        are zero in exact arithmetic (a conv bias feeding a train-mode
        BatchNorm) are pure rounding noise; relative to their own ~1e-12 scale
        that noise would read as a 100% error.

    Returns:
      The worst errors over the group.

    Raises:
      KeyError: when the two sides do not have the same keys.
    """
    if set(got) != set(want):
        raise KeyError(f"{name}: keys differ: only jax {sorted(set(got) - set(want))[:5]}, "
                       f"only torch {sorted(set(want) - set(got))[:5]}")
    max_abs = max_rel = 0.0
    worst = ""
    for k in want:
        if np.shape(got[k]) != np.shape(want[k]):
            raise ValueError(f"{name} {k}: shape {np.shape(got[k])} vs torch {np.shape(want[k])}")
    # One pass per tensor for its scale (these can be 100M-element VGG gradients).
    scales = {k: _max_abs(np.asarray(want[k])) for k in want}
    floor = scale_floor * max(scales.values(), default=0.0)
    for k in want:
        err = _max_abs(np.asarray(got[k]), np.asarray(want[k]))
        scale = max(scales[k], floor)
        if not np.isfinite(scale):  # a NaN on torch's side
            rel = float("inf")
        else:
            rel = err / scale if scale > 0 else err
        if (rel if on == "rel" else err) >= (max_rel if on == "rel" else max_abs):
            worst = k
        max_abs, max_rel = max(max_abs, err), max(max_rel, rel)
    return Quantity(name, max_abs, max_rel, tol, on, worst if len(want) > 1 else "")


def compare_grads_fp32(name: str, got: dict, want32: dict, want64: dict) -> Quantity:
    """Report (not judge) fp32 gradients against torch fp32 and the float64 truth.

    Args:
      name: label.
      got: key -> jax fp32 gradient (torch layout).
      want32: key -> torch fp32 gradient.
      want64: key -> torch float64 gradient.

    Returns:
      A ``Quantity`` that always passes; its note gives both implementations'
      distance to float64, the figure that matters for fp32 gradients.
    """
    q = compare_arrays(name, got, want32, tol=REL_TOL, on="rel")
    j64 = compare_arrays(name, got, want64, tol=REL_TOL, on="rel")
    t64 = compare_arrays(name, want32, want64, tol=REL_TOL, on="rel")
    q.failed = []
    q.tol = float("nan")
    q.note = (f"vs float64 torch: jax fp32 {j64.max_rel:.2e}, torch fp32 {t64.max_rel:.2e} "
              "(worst tensor, relative; reported, not judged)")
    return q


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality of two arrays of one dtype and shape (NaN payloads and
    the sign of zero included); ~40x faster than ``array_equal(equal_nan=True)``."""
    if a.dtype.itemsize not in (1, 2, 4, 8):
        return bool(np.array_equal(a, b))
    bits = np.dtype(f"u{a.dtype.itemsize}")
    return bool(np.array_equal(a.view(bits), b.view(bits)))


def compare_round_trip(fmodel, torch_state: dict) -> Quantity:
    """The export direction: ``to_torch_state_dict`` of the loaded model must give
    back the torch state_dict it was loaded from, bit for bit, same keys, shapes
    and dtypes.

    Args:
      fmodel: the NNX model, loaded from ``torch_state``.
      torch_state: the torch model's ``state_dict()``.

    Returns:
      A ``Quantity`` with bound 0 on the absolute error; keys, shapes or dtypes
      that differ are listed as failed.
    """
    back = to_torch_state_dict(fmodel)
    failed = sorted(set(back) ^ set(torch_state))
    max_abs = 0.0
    worst = ""
    for k in sorted(set(back) & set(torch_state)):
        want = to_numpy(torch_state[k])
        got = back[k]
        if got.shape != want.shape or got.dtype != want.dtype:
            failed.append(f"{k} ({got.dtype}{list(got.shape)} vs {want.dtype}{list(want.shape)})")
            continue
        if not _same_bits(got, want):
            err = _max_abs(got, want)
            failed.append(k)
            if err >= max_abs:
                max_abs, worst = err, k
    return Quantity("round trip torch->jax->torch", max_abs, 0.0, 0.0, "abs", worst,
                    failed=failed, note="" if failed else f"{len(back)} tensors bit-exact")


def _outputs(y) -> list:
    if isinstance(y, (tuple, list)):
        return list(y)
    return [y]


def _zero_dropout_torch(model) -> None:
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) or type(m).__name__.startswith("Dropout"):
            m.p = 0.0
        elif isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = 0.0  # a float attribute, not a Dropout module


def _zero_dropout_flax(model) -> None:
    for _, m in nnx.iter_graph(model):
        if isinstance(m, nnx.Dropout):
            m.rate = 0.0


def _loss_weights(shapes, seed, dtype):
    rng = np.random.default_rng(seed + 1)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _torch_side(tmodel, x, batch: int, seed: int, grads: Sequence[str] = GRAD_MODES) -> dict:
    """Eval outputs and eval-mode grads; train outputs, statistics and train-mode grads
    (gradients only for the modes in ``grads``)."""
    import torch

    def backward(ys, seed_, scale, mode):
        if mode not in grads:
            return {}
        rs = _loss_weights([tuple(o.shape) for o in ys], seed_, np.float64)
        (sum((o * torch.from_numpy(r).to(o.dtype)).sum() for o, r in zip(ys, rs)) / scale
         ).backward()
        # The arrays keep their gradient tensors alive: zero_grad(set_to_none)
        # only drops the model's references.
        result = {k: p.grad.numpy() for k, p in tmodel.named_parameters()
                  if p.grad is not None}
        tmodel.zero_grad(set_to_none=True)
        return result

    out = {}
    tmodel.eval()
    with torch.set_grad_enabled("eval" in grads):
        y = _outputs(_call(tmodel, x))
    out["eval_grads"] = backward(y, seed, 1, "eval")
    out["eval"] = [o.detach().numpy() for o in y]
    tmodel.train()
    with torch.set_grad_enabled("train" in grads):
        y = _outputs(_call(tmodel, x))
    out["train_grads"] = backward(y, seed + 7, batch, "train")
    out["train"] = [o.detach().numpy() for o in y]
    out["stats"] = {k: b.numpy().copy() for k, b in tmodel.named_buffers() if "running" in k}
    return out


def _jax_side(fmodel, x, batch: int, seed: int, jit: bool | str,
              grads: Sequence[str] = GRAD_MODES, outputs: bool = True) -> dict:
    """The same computations as ``_torch_side`` on the NNX model; with ``outputs``
    False only the passes that give the gradients of ``grads`` (the float64 side,
    whose outputs are not compared)."""
    def loss(m, xb, seed_, scale):
        ys = _outputs(_call(m, xb))
        rs = _loss_weights([tuple(o.shape) for o in ys], seed_, np.float64)
        return sum(jnp.sum(o * jnp.asarray(r, o.dtype)) for o, r in zip(ys, rs)) / scale, ys

    def forward(m, xb, mode, seed_, scale):
        if mode not in grads:
            return _outputs(_call(m, xb)), None
        (_, ys), g = nnx.value_and_grad(loss, has_aux=True)(m, xb, seed_, scale)
        return ys, g

    def compute(m, xb):
        y_eval = g_eval = y_train = g_train = None
        if outputs or "eval" in grads:
            m.eval()
            y_eval, g_eval = forward(m, xb, "eval", seed, 1)
        if outputs or "train" in grads:
            m.train()
            y_train, g_train = forward(m, xb, "train", seed + 7, batch)
        return y_eval, g_eval, y_train, g_train

    if jit == "blocks":
        with jit_repeated_blocks(fmodel):
            y_eval, g_eval, y_train, g_train = compute(fmodel, x)
    elif jit:
        graphdef, state = nnx.split(fmodel)

        @jax.jit
        def run(state, xb):
            m = nnx.merge(graphdef, state)
            return compute(m, xb), nnx.state(m)

        (y_eval, g_eval, y_train, g_train), new_state = run(state, x)
        nnx.update(fmodel, new_state)
    else:
        y_eval, g_eval, y_train, g_train = compute(fmodel, x)

    def torch_layout(g):
        if g is None:
            return {}
        flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(g)}
        return flax_to_torch(fmodel, flat, contiguous=False)

    if not outputs:
        return {"eval_grads": torch_layout(g_eval), "train_grads": torch_layout(g_train)}
    return {"eval": [np.asarray(o) for o in y_eval], "eval_grads": torch_layout(g_eval),
            "train": [np.asarray(o) for o in y_train], "train_grads": torch_layout(g_train),
            "stats": _running_stats(fmodel)}


def repeated_block_types(model: nnx.Module) -> set[type]:
    """Module classes of which ``model`` holds two or more structurally identical
    instances (same graph definition: ResNet's residual blocks, ViT's encoder layers,
    also repeated layers such as BatchNorm), the root's class excepted."""
    by_type = collections.defaultdict(list)
    for _, m in nnx.iter_graph(model):
        if isinstance(m, nnx.Module) and m is not model:
            by_type[type(m)].append(nnx.graphdef(m))
    return {cls for cls, defs in by_type.items() if len(set(defs)) < len(defs)}


_IN_BLOCK = threading.local()


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run_block(call, graphdef, state, args):
    m = nnx.merge(graphdef, state)
    _IN_BLOCK.active = True
    try:
        out = call(m, *args)
    finally:
        _IN_BLOCK.active = False
    return out, nnx.state(m)


@contextlib.contextmanager
def jit_repeated_blocks(model: nnx.Module):
    """Within the block, every call with array arguments of a module of a
    ``repeated_block_types(model)`` class that defines ``__call__`` itself runs as one
    compiled program, shared by all instances with the same structure and input shapes;
    calls nested in such a program are traced into it.

    A network of N identical blocks then compiles each distinct block once, where
    ``jax.jit`` of the whole network compiles the N unrolled copies (ResNet-152's float64
    gradient: 23 s under jit, 11 s so); the code between blocks runs op by op. Meant for
    the parity passes: it patches the classes' ``__call__`` while active (one thread).
    """
    originals = {cls: cls.__dict__["__call__"] for cls in repeated_block_types(model)
                 if "__call__" in cls.__dict__}

    def jitted(call):
        @functools.wraps(call)
        def wrapper(self, *args, **kwargs):
            if (kwargs or getattr(_IN_BLOCK, "active", False)
                    or not all(isinstance(a, (jax.Array, np.ndarray)) for a in args)):
                return call(self, *args, **kwargs)
            graphdef, state = nnx.split(self)
            out, new_state = _run_block(call, graphdef, state, args)
            nnx.update(self, new_state)
            return out
        return wrapper

    try:
        for cls, call in originals.items():
            cls.__call__ = jitted(call)
        yield
    finally:
        for cls, call in originals.items():
            cls.__call__ = call


def _stat_values(fmodel) -> dict:
    """flax path -> value of every ``nnx.BatchStat`` (BatchNorm statistics, batch counts)."""
    return {p: v.get_value() for p, v in flax_variables(fmodel).items()
            if isinstance(v, nnx.BatchStat)}


def _restore_stats(fmodel, values: dict) -> None:
    variables = flax_variables(fmodel)
    for path, value in values.items():
        variables[path].set_value(value)


def _running_stats(fmodel) -> dict:
    """BatchNorm running statistics in torch naming (not the whole state_dict)."""
    stats = flax_to_torch(fmodel, _stat_values(fmodel))
    return {k: v for k, v in stats.items() if "running" in k}


def _build_pair(arch, overrides, state_dict, seed, size, batch):
    import torch

    from porting.reference import build_torch_model

    spec = jaxnets.get_spec(arch)
    torch.manual_seed(seed)
    if state_dict is not None:
        tmodel = _torch_model_from(arch, overrides, state_dict)
    else:
        tmodel = build_torch_model(arch, **overrides)
        _, calibration = _inputs(spec, tmodel, size, batch, seed + 1000)
        randomize_torch_model(tmodel, seed, calibration)
    _zero_dropout_torch(tmodel)
    from porting.pretrained import build_abstract, materialize

    # Shape-only build, filled by the load: a 100M-parameter model is not
    # initialised just to be overwritten.
    num_classes = _num_classes(tmodel.state_dict(), spec)
    options = {k: v for k, v in overrides.items() if k != "num_classes"}  # the head's count
    fmodel = build_abstract(arch, num_classes, **options)
    load_torch_state_dict(fmodel, tmodel.state_dict(), strict=True)
    materialize(fmodel, arch, num_classes, seed, **options)
    _zero_dropout_flax(fmodel)
    return spec, tmodel, fmodel


def _torch_model_from(arch, overrides, state_dict):
    """The torch reference holding ``state_dict``'s values in float32, built on the meta
    device: torch's random initialisation, overwritten anyway, is skipped (ViT-H/14:
    632M values, ~5 s). The model owns its tensors (the train-mode pass updates BatchNorm
    buffers in place; the caller's state_dict stays as it was)."""
    import torch

    from porting.reference import build_torch_model

    own = {}
    for k, v in state_dict.items():
        t = v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v))
        own[k] = t.to(torch.float32, copy=True) if t.is_floating_point() else t.clone()
    spec = jaxnets.get_spec(arch)
    head = _num_classes(own, spec)
    if "num_classes" not in overrides and head not in (None, spec.num_classes):
        # A fine-tuned checkpoint: both models take its head's class count.
        overrides = {**overrides, "num_classes": head}
    with torch.device("meta"):
        tmodel = build_torch_model(arch, **overrides)
    tmodel.load_state_dict(own, strict=True, assign=True)
    if any(t.is_meta for t in [*tmodel.parameters(), *tmodel.buffers()]):
        # A buffer the state_dict does not hold (not persistent): build it for real.
        tmodel = build_torch_model(arch, **overrides)
        tmodel.load_state_dict(own, strict=True)
    return tmodel


def _call(model, x):
    """``model(x)``; a sequence model's input is a dict of its call's arguments."""
    return model(**x) if isinstance(x, dict) else model(x)


def _jax_input(x, dtype=None):
    """The input as jax arrays, its floating ones in ``dtype`` (masks stay boolean)."""
    return jax.tree.map(lambda a: jnp.asarray(
        a, dtype if dtype is not None and np.issubdtype(a.dtype, np.floating) else None), x)


def _torch_input(x, dtype):
    """The torch input's floating tensors in ``dtype``."""
    if isinstance(x, dict):
        return {k: _torch_input(v, dtype) for k, v in x.items()}
    return x.to(dtype) if x.is_floating_point() else x


def _sequence_inputs(model, arch, size, batch, rng):
    """Source and target sequences with every kind of mask a decoder-encoder takes
    as booleans: the causal target mask, and padding at the end of the last sequence
    of the batch (source, target and memory key padding)."""
    from porting.pretrained import SEQUENCE_SIZE, input_shapes

    s, t = size or SEQUENCE_SIZE
    src, tgt = (rng.standard_normal(shape).astype(np.float32)
                for shape in input_shapes(model, arch, (s, t), batch))

    def padding(length):
        mask = np.zeros((batch, length), bool)
        if batch > 1:
            mask[-1, max(1, length - length // 3):] = True
        return mask

    src_padding = padding(s)
    return dict(src=src, tgt=tgt, tgt_mask=np.triu(np.ones((t, t), bool), 1),
                src_key_padding_mask=src_padding, tgt_key_padding_mask=padding(t),
                memory_key_padding_mask=src_padding)


def _inputs(spec, model, size, batch, seed):
    import torch

    from porting.pretrained import input_shapes

    rng = np.random.default_rng(seed)
    if spec.kind == "sequence":
        x = _sequence_inputs(model, spec.name, size, batch, rng)
        return x, {k: torch.from_numpy(v.copy()) for k, v in x.items()}
    x = rng.standard_normal(input_shapes(model, spec.name, size, batch)[0]).astype(np.float32)
    if spec.kind == "vector":
        return x, torch.from_numpy(x)
    return x, torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _judge_against_float64(q: Quantity, got, want32, want64) -> None:
    """Let an output that misses the fp32 bound pass if torch fp32 misses it as much.

    Deep networks amplify fp32 rounding: a random ResNet-101 gives logits that
    differ between torch fp32 and torch float64 by ~4e-4, so no fp32
    implementation can be held to 1e-4 of torch's fp32 there. Such an output
    passes when it is no further from torch's float64 result than
    ``FP32_NOISE_FACTOR`` times torch's own fp32 error; the note says so.
    """
    exact = np.asarray(want64, np.float64)
    ours = float(np.max(np.abs(np.asarray(got, np.float64) - exact)))
    theirs = float(np.max(np.abs(np.asarray(want32, np.float64) - exact)))
    q.note = f"vs float64 torch: jax fp32 {ours:.2e}, torch fp32 {theirs:.2e}"
    if not q.passed:
        q.failed = [] if ours <= max(q.tol, FP32_NOISE_FACTOR * theirs) else ["y"]
        q.note += (f" (judged: jax fp32 within {FP32_NOISE_FACTOR:g}x torch fp32's own error"
                   " of the float64 result)")


def _to_float64(fmodel):
    """A float64 copy of an NNX model (call under ``jax.enable_x64``)."""
    m = nnx.clone(fmodel)
    for var in flax_variables(m).values():
        v = var.get_value()
        if jnp.issubdtype(v.dtype, jnp.floating):
            var.set_value(jnp.asarray(v, jnp.float64))
    return m


def run_parity(arch: str, *, size: Sequence[int] | None = None, batch: int = 2,
               state_dict: dict | None = None, seed: int = 0, jit: bool | str = True,
               jit64: bool | str | None = None, grads: bool | Sequence[str] = True,
               fp32_grads: bool = False, overrides: dict | None = None,
               cpu_detours: bool = True,
               progress: Callable[[str], None] | None = None) -> ParityResult:
    """Port a torch model to jaxnets and compare the two.

    Judged: eval outputs and train-mode outputs (fp32, absolute), BatchNorm
    running statistics after the train-mode forward (fp32, relative), and the
    gradients of a random linear loss with the model in eval mode and in train
    mode (float64 on both sides, relative per tensor; see the module
    docstring). Reported with ``fp32_grads``: the fp32 gradients.

    Args:
      arch: registry name: an image, vector or sequence model (``transformer``:
        source and target sequences with a causal target mask and padding masks,
        torch's attention fast path off).
      size: input (height, width), for a sequence model (source, target) lengths;
        None: the spec's default (``porting.pretrained.SEQUENCE_SIZE`` for sequence
        models).
      batch: batch size.
      state_dict: torch weights to use instead of a random initialisation. Both
        models take its classifier head's class count unless ``overrides`` names
        ``num_classes``.
      seed: seed for the weights, the statistics, the input and the loss.
      jit: run the jax side under ``jax.jit`` (True: one compile per pass), op by op
        (False), or ``"blocks"``: op by op except for repeated blocks, each distinct
        one compiled once for all its copies (``jit_repeated_blocks``; for deep
        networks, whose unrolled program takes longer to compile than to run).
      jit64: the same for the float64 gradient pass; None: as ``jit``.
      grads: compare gradients (the float64 pass) in both modes (True), in
        the modes named (``("train",)``: BatchNorm with batch statistics, the
        one check that covers every parameter), or not at all (False: outputs
        and statistics only, for models too large to run in float64 here).
      fp32_grads: also compute and report fp32 gradients.
      overrides: constructor options passed to both models.
      cpu_detours: False traces the jax side as a GPU or TPU would run it
        (``jaxnets.layers.cpu_detours``); no effect off CPU.
      progress: called with a short line as each stage starts (building the
        models, each framework's passes), for a command line to show.

    Returns:
      The ``ParityResult``.
    """
    return run_parity_inputs(arch, [(size, batch)], state_dict=state_dict, seed=seed, jit=jit,
                             jit64=jit64, grads=grads, fp32_grads=fp32_grads,
                             overrides=overrides, cpu_detours=cpu_detours,
                             progress=progress)[0]


def run_parity_inputs(arch: str, inputs: Sequence[tuple[Sequence[int] | None, int]], *,
                      state_dict: dict | None = None, seed: int = 0,
                      jit: bool | str = True, jit64: bool | str | None = None,
                      grads: bool | Sequence[str] = True, fp32_grads: bool = False,
                      overrides: dict | None = None, cpu_detours: bool = True,
                      grads_at: Sequence[int] | None = None,
                      progress: Callable[[str], None] | None = None) -> list[ParityResult]:
    """``run_parity`` at several input sizes, with one build of the two models.

    The models (and, with ``grads``, their float64 copies) are built, ported
    and checked for the round trip once; every ``(size, batch)`` of ``inputs``
    then starts from the same weights and BatchNorm statistics. For big models
    (VGG: 133M+ parameters) the build and the float64 copies cost more than
    the passes themselves.

    Both sides compute in full fp32 whatever the caller's settings: jax's
    matmuls and convolutions at ``"highest"`` precision and torch's CUDA
    TF32 off (on Ampere and later GPUs both frameworks would otherwise round
    fp32 products to TF32's 10-bit mantissa, ~1e-3), restored on return.

    Args:
      arch: registry name.
      inputs: ``(size, batch)`` pairs; ``size`` None is the spec's default.
        The first one also calibrates the random BatchNorm statistics.
      state_dict, seed, jit, jit64, grads, fp32_grads, overrides, cpu_detours, progress:
        as in ``run_parity``.
      grads_at: the indices of ``inputs`` at which ``grads`` are compared (the
        float64 pass: most of a big model's time); None: at every input. The others
        compare outputs and statistics only.

    Returns:
      One ``ParityResult`` per input, in order (each starts with the round trip).
    """
    with (matmul_precision(tf32=False), jaxnets.layers.cpu_detours(cpu_detours),
          _torch_attention_slow_path(jaxnets.get_spec(arch).kind == "sequence")):
        return _run_parity_inputs(arch, inputs, state_dict, seed, jit, jit64, grads,
                                  fp32_grads, overrides, grads_at,
                                  progress or (lambda _: None))


@contextlib.contextmanager
def _torch_attention_slow_path(active: bool):
    """torch's attention without its eval fast path (nested tensors), which returns
    zeros at padded positions where the slow path, and jaxnets, compute them."""
    import torch

    was = torch.backends.mha.get_fastpath_enabled()
    if active:
        torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


@contextlib.contextmanager
def matmul_precision(*, tf32: bool):
    """Both frameworks' fp32 matmul/convolution precision, inside; restored after.

    Args:
      tf32: True: TF32 allowed on GPU, as each framework uses it for speed (jax's
        ``"default"`` precision, torch's ``allow_tf32`` flags on); False: full
        fp32 (``"highest"``, the flags off).
    """
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        with jax.default_matmul_precision("default" if tf32 else "highest"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _run_parity_inputs(arch, inputs, state_dict, seed, jit, jit64, grads, fp32_grads,
                       overrides, grads_at, progress) -> list[ParityResult]:
    import copy

    overrides = dict(overrides or {})
    modes = GRAD_MODES if grads is True else tuple(grads or ())
    if not set(modes) <= set(GRAD_MODES):
        raise ValueError(f"grads: modes must be among {GRAD_MODES}, got {modes}")
    if not inputs:
        raise ValueError("inputs: give at least one (size, batch)")
    bad = [b for _, b in inputs if not (isinstance(b, (int, np.integer)) and b >= 1)]
    if bad:
        raise ValueError(f"inputs: batch sizes must be integers >= 1, got {bad[0]!r}")
    for name, value in (("jit", jit), ("jit64", jit64)):
        allowed = isinstance(value, bool) or value == "blocks"
        if not (allowed or (name == "jit64" and value is None)):
            raise ValueError(f"{name}: True, False or 'blocks', got {value!r}")
    if grads_at is None:
        grads_at = range(len(inputs))
    grads_at = sorted(set(grads_at))
    if not all(isinstance(i, (int, np.integer)) and 0 <= i < len(inputs) for i in grads_at):
        raise ValueError(f"grads_at: indices of the {len(inputs)} inputs, got {grads_at}")
    if not grads_at:
        modes = ()
    progress(f"building and porting {arch}")
    spec, tmodel, fmodel = _build_pair(arch, overrides, state_dict, seed, *inputs[0])
    round_trip = compare_round_trip(fmodel, tmodel.state_dict())
    # The train-mode pass updates BatchNorm buffers; every input starts from these
    # (only the buffers: cheap), also the float64 re-runs of the outputs.
    start_buffers = {k: b.clone() for k, b in tmodel.named_buffers()}
    start_stats = _stat_values(fmodel)
    t64 = f64 = None
    if modes:
        t64 = copy.deepcopy(tmodel).double()
        with jax.enable_x64(True):
            f64 = _to_float64(fmodel)
            start_stats64 = _stat_values(f64)
    # The float64 models go as soon as the last input is done with them (peak memory).
    models64 = [t64, f64]
    del t64, f64
    results = []
    for i, (size, batch) in enumerate(inputs):
        if i:
            tmodel.load_state_dict(start_buffers, strict=False)
            _restore_stats(fmodel, start_stats)
            if models64[0] is not None:  # not yet dropped after its last input
                models64[0].load_state_dict(start_buffers, strict=False)  # cast to float64
                with jax.enable_x64(True):
                    _restore_stats(models64[1], start_stats64)
        at = modes if i in grads_at else ()
        qs = _compare_at(arch, spec, tmodel, fmodel, models64, bool(at) and i == grads_at[-1],
                         start_buffers, size, batch, seed, (jit, jit if jit64 is None else jit64),
                         at, fp32_grads, progress)
        results.append(ParityResult(arch, qs[0][0], [round_trip] + qs[1:],
                                    qs[0][1] if len(qs[0]) > 1 else None))
    return results


def _compare_at(arch, spec, tmodel, fmodel, models64, last, start_buffers, size, batch, seed,
                jits, modes, fp32_grads, progress) -> list:
    """One input's passes and judgements: ``[input shape, *quantities]``.

    ``models64`` is ``[torch float64 model, jax float64 model]``; on the ``last``
    input each entry is dropped once its pass is done.
    """
    import copy

    import torch

    grads = bool(modes)
    fp32_modes = modes if fp32_grads else ()
    x, x_torch = _inputs(spec, fmodel, size, batch, seed)
    shapes = [v.shape for v in ([x["src"], x["tgt"]] if isinstance(x, dict) else [x])]
    shape = ", ".join("x".join(map(str, v)) for v in shapes)
    progress(f"torch fp32 passes ({shape})")
    want = _torch_side(tmodel, x_torch, batch, seed, grads=fp32_modes)
    progress(f"jax fp32 passes ({shape}{', compiling' if jits[0] else ''})")
    got = _jax_side(fmodel, _jax_input(x), batch, seed, jits[0], grads=fp32_modes)
    if grads:
        progress(f"torch float64 gradients ({', '.join(modes)} mode)")
        want64 = _torch_side(models64[0], _torch_input(x_torch, torch.float64), batch, seed,
                             grads=modes)
        if last:
            models64[0] = None
        progress(f"jax float64 gradients ({', '.join(modes)} mode"
                 f"{', compiling' if jits[1] else ''})")
        with jax.enable_x64(True):
            got64 = _jax_side(models64[1], _jax_input(x, jnp.float64), batch, seed, jits[1],
                              grads=modes, outputs=False)
        if last:
            models64[1] = None

    def outs(tag):
        f, t = got[tag], want[tag]
        if len(f) != len(t):
            raise ValueError(f"{arch}: jax returns {len(f)} outputs in {tag} mode, torch {len(t)}")
        qs = []
        for i, (a, b) in enumerate(zip(f, t)):
            kind = "outputs" if spec.kind == "sequence" else "logits"
            q = compare_arrays(f"{tag} output {i}" if len(t) > 1 else f"{tag} {kind}",
                               {"y": a}, {"y": b}, tol=OUTPUT_ATOL, on="abs")
            if grads or not q.passed:
                _judge_against_float64(q, a, b, outputs64()[tag][i])
            qs.append(q)
        return qs

    cache64 = {}

    def outputs64():
        """torch float64 outputs: from the gradient pass, or a forward-only re-run."""
        if grads:
            return want64
        if not cache64:
            t = copy.deepcopy(tmodel)
            t.load_state_dict(start_buffers, strict=False)
            cache64.update(_torch_side(t.double(), _torch_input(x_torch, torch.float64),
                                       batch, seed, grads=()))
        return cache64

    qs = outs("eval") + outs("train")
    if want["stats"]:
        q = compare_arrays("BN running stats", got["stats"], want["stats"], tol=REL_TOL, on="rel")
        if not q.passed:
            exact = outputs64()["stats"]
            ours = compare_arrays("", got["stats"], exact, tol=REL_TOL, on="rel").max_rel
            theirs = compare_arrays("", want["stats"], exact, tol=REL_TOL, on="rel").max_rel
            q.note = (f"vs float64 torch: jax fp32 {ours:.2e}, torch fp32 {theirs:.2e} (worst "
                      f"tensor, relative; judged: within {FP32_NOISE_FACTOR:g}x torch fp32's "
                      "own error)")
            q.failed = [] if ours <= max(q.tol, FP32_NOISE_FACTOR * theirs) else [q.worst]
        qs.append(q)
    for mode in modes:
        tag = f"BN {mode}" if want["stats"] else f"{mode} mode"
        g64 = {k: v for k, v in got64[f"{mode}_grads"].items() if k in want64[f"{mode}_grads"]}
        qs.append(compare_arrays(f"grads fp64 ({tag})", g64, want64[f"{mode}_grads"],
                                 tol=REL_TOL, on="rel", scale_floor=GRAD_SCALE_FLOOR))
        if mode in fp32_modes:
            g32 = {k: v for k, v in got[f"{mode}_grads"].items() if k in want[f"{mode}_grads"]}
            qs.append(compare_grads_fp32(f"grads fp32 ({tag})", g32, want[f"{mode}_grads"],
                                         want64[f"{mode}_grads"]))
    n_params = sum(1 for _ in tmodel.parameters())
    # Every parameter takes part in train mode (auxiliary heads are idle in eval mode).
    if "train" in modes and len(want64["train_grads"]) != n_params:
        raise AssertionError(f"{arch}: only {len(want64['train_grads'])} of {n_params} torch "
                             "parameters received a gradient")
    return [tuple(map(tuple, shapes))] + qs


def _num_classes(state_dict, spec) -> int | None:
    """The outputs of the first classifier head weight in a torch ``state_dict``."""
    for k, v in state_dict.items():
        if spec.head and re.search(spec.head, k) and k.endswith("weight"):
            return int(np.shape(v)[0])
    return None
