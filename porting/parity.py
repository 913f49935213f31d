"""Side-by-side runs of a jaxnets model and its torch reference, fp32.

Parity here means: a randomly initialised torch model, its BatchNorm running
statistics and affine terms randomised too (left at their defaults, a BN bug
hides), is ported and both are compared on the same input for eval outputs,
train-mode outputs, the BatchNorm statistics after that train-mode forward,
and the gradient of a scalar loss for every parameter. Dropout is set to 0 on
both sides so train-mode runs are deterministic.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxnets
from porting.state_dict import flax_to_torch, load_torch_state_dict, to_torch_state_dict

__all__ = ["Quantity", "ParityResult", "randomize_torch_model", "compare_arrays", "run_parity"]

# Thresholds: outputs absolute; statistics and gradients relative to the
# tensor's largest magnitude (a gradient of 1e3 cannot be held to 1e-4 absolute
# in fp32, a gradient of 1e-6 would pass any absolute bound).
OUTPUT_ATOL = 1e-4
REL_TOL = 1e-4


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
    """

    name: str
    max_abs: float
    max_rel: float
    tol: float
    on: str
    worst: str = ""

    @property
    def passed(self) -> bool:
        err = self.max_abs if self.on == "abs" else self.max_rel
        return bool(np.isfinite(err) and err <= self.tol)


@dataclasses.dataclass
class ParityResult:
    """All quantities of one parity run."""

    arch: str
    input_shape: tuple[int, ...]
    quantities: list[Quantity]

    @property
    def passed(self) -> bool:
        return all(q.passed for q in self.quantities)

    def table(self) -> str:
        """A fixed-width table of the errors with PASS/FAIL per row."""
        rows = [f"{'quantity':<34} {'max abs err':>12} {'max rel err':>12} {'bound':>14}  result"]
        for q in self.quantities:
            bound = f"{q.on}<={q.tol:.0e}"
            name = q.name if not q.worst else f"{q.name} [{q.worst}]"
            rows.append(f"{name[:34]:<34} {q.max_abs:>12.3e} {q.max_rel:>12.3e} {bound:>14}  "
                        f"{'PASS' if q.passed else 'FAIL'}")
        return "\n".join(rows)


def randomize_torch_model(model, seed: int = 0) -> None:
    """Randomise every normalisation layer's statistics and affine terms in place.

    Args:
      model: a torch ``nn.Module``.
      seed: seed of the generator used.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            elif isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def compare_arrays(name: str, got: dict[str, Any], want: dict[str, Any], *, tol: float,
                   on: str) -> Quantity:
    """Reduce the errors of matching tensors to one ``Quantity``.

    Args:
      name: label of the group.
      got: key -> jax-side array (torch layout).
      want: key -> torch-side array.
      tol: bound.
      on: ``"abs"`` or ``"rel"``.

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
        a = np.asarray(got[k], np.float64)
        b = np.asarray(want[k], np.float64)
        if a.shape != b.shape:
            raise ValueError(f"{name} {k}: shape {a.shape} vs torch {b.shape}")
        err = float(np.max(np.abs(a - b))) if a.size else 0.0
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        rel = err / scale if scale > 0 else err
        if (rel if on == "rel" else err) >= (max_rel if on == "rel" else max_abs):
            worst = k
        max_abs, max_rel = max(max_abs, err), max(max_rel, rel)
    return Quantity(name, max_abs, max_rel, tol, on, worst if len(want) > 1 else "")


def _outputs(y) -> list:
    if isinstance(y, (tuple, list)):
        return list(y)
    return [y]


def _zero_dropout_torch(model) -> None:
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) or type(m).__name__.startswith("Dropout"):
            m.p = 0.0


def _zero_dropout_flax(model) -> None:
    for _, m in nnx.iter_graph(model):
        if isinstance(m, nnx.Dropout):
            m.rate = 0.0


def run_parity(arch: str, *, size: Sequence[int] | None = None, batch: int = 2,
               state_dict: dict | None = None, seed: int = 0, jit: bool = False,
               overrides: dict | None = None) -> ParityResult:
    """Port a torch model to jaxnets and compare the two in fp32.

    Args:
      arch: registry name of an image or vector model.
      size: input (height, width); the spec's default when None.
      batch: batch size.
      state_dict: torch weights to use instead of a random initialisation.
      seed: seed for the weights, the statistics and the input.
      jit: run the jax side under one ``jax.jit`` (slower to start for big
        models on CPU, whose one-shot runs are quicker op by op).
      overrides: constructor options passed to both models.

    Returns:
      The ``ParityResult``.
    """
    import torch

    from porting.reference import build_torch_model

    overrides = dict(overrides or {})
    spec = jaxnets.get_spec(arch)
    torch.manual_seed(seed)
    tmodel = build_torch_model(arch, **overrides)
    if state_dict is not None:
        tmodel.load_state_dict({k: torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v)
                                else v for k, v in state_dict.items()}, strict=True)
    else:
        randomize_torch_model(tmodel, seed)
    _zero_dropout_torch(tmodel)
    num_classes = _num_classes(tmodel, spec)
    fmodel = jaxnets.create_model(arch, num_classes=num_classes, **overrides)
    load_torch_state_dict(fmodel, tmodel.state_dict(), strict=True)
    _zero_dropout_flax(fmodel)

    rng = np.random.default_rng(seed)
    if spec.kind == "vector":
        x = rng.standard_normal((batch, getattr(fmodel, "in_features", spec.input_size[0])),
                                dtype=np.float32)
        x_torch = torch.from_numpy(x)
    else:
        h, w = size or spec.input_size
        x = rng.standard_normal((batch, h, w, spec.in_channels), dtype=np.float32)
        x_torch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    # torch side
    tmodel.eval()
    with torch.no_grad():
        t_eval = [o.numpy() for o in _outputs(tmodel(x_torch))]
    tmodel.train()
    t_train_out = _outputs(tmodel(x_torch))
    weights_r = [rng.standard_normal(tuple(o.shape), dtype=np.float32) for o in t_train_out]
    loss = sum((o * torch.from_numpy(r)).sum() for o, r in zip(t_train_out, weights_r)) / batch
    loss.backward()
    t_train = [o.detach().numpy() for o in t_train_out]
    t_grads = {k: p.grad.numpy() for k, p in tmodel.named_parameters() if p.grad is not None}
    t_stats = {k: b.numpy() for k, b in tmodel.named_buffers() if "running" in k}

    # jax side
    rs = [jnp.asarray(r) for r in weights_r]

    def loss_fn(m, xb):
        outs = _outputs(m(xb))
        return sum(jnp.sum(o * r) for o, r in zip(outs, rs)) / batch, outs

    def forward(m, xb):
        m.eval()
        y_eval = _outputs(m(xb))
        m.train()
        (_, y_train), grads = nnx.value_and_grad(loss_fn, has_aux=True)(m, xb)
        return y_eval, y_train, grads

    xj = jnp.asarray(x)
    if jit:
        graphdef, state = nnx.split(fmodel)

        @jax.jit
        def run(state, xb):
            m = nnx.merge(graphdef, state)
            out = forward(m, xb)
            return out, nnx.state(m)

        (f_eval, f_train, grads), new_state = run(state, xj)
        nnx.update(fmodel, new_state)
    else:
        f_eval, f_train, grads = forward(fmodel, xj)
    flat_grads = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(grads)}
    f_grads = {k: v for k, v in flax_to_torch(fmodel, flat_grads).items() if k in t_grads}
    f_stats = {k: v for k, v in to_torch_state_dict(fmodel).items() if "running" in k}

    def outs(tag, f, t):
        return [compare_arrays(f"{tag} output {i}" if len(t) > 1 else f"{tag} logits",
                               {"y": np.asarray(a)}, {"y": b}, tol=OUTPUT_ATOL, on="abs")
                for i, (a, b) in enumerate(zip(f, t))]

    if len(f_eval) != len(t_eval) or len(f_train) != len(t_train):
        raise ValueError(f"{arch}: jax returns {len(f_eval)}/{len(f_train)} outputs in eval/train, "
                         f"torch {len(t_eval)}/{len(t_train)}")
    qs = outs("eval", f_eval, t_eval) + outs("train", f_train, t_train)
    if t_stats:
        qs.append(compare_arrays("BN running stats", f_stats, t_stats, tol=REL_TOL, on="rel"))
    qs.append(compare_arrays("gradients", f_grads, t_grads, tol=REL_TOL, on="rel"))
    n_params = sum(1 for _ in tmodel.parameters())
    if len(t_grads) != n_params:
        raise AssertionError(f"{arch}: only {len(t_grads)} of {n_params} torch parameters "
                             "received a gradient")
    return ParityResult(arch, tuple(x.shape), qs)


def _num_classes(tmodel, spec) -> int | None:
    sd = tmodel.state_dict()
    for k, v in sd.items():
        if re.search(spec.head, k) and k.endswith("weight"):
            return int(v.shape[0])
    return None
