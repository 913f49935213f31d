"""Load torch state_dicts into NNX models and export them back: one generic walker.

The walker visits every ``nnx.Param`` and ``nnx.BatchStat`` of a model, maps
its dotted path to a torch key with the model's rule table
(``porting.rules``), and moves the array through the rule's layout. Nothing is
skipped silently: every missing, unexpected, mis-shaped or ignored key is in
the report, and a strict load that does not match raises one error naming
them all, before the model is touched.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from porting.pth import PthError, unwrap_state_dict
from porting.rules import rules_for, torch_key

__all__ = ["PortingError", "LoadReport", "load_torch_state_dict", "to_torch_state_dict",
           "flax_to_torch", "flax_variables", "to_numpy", "to_torch_tensor", "to_device",
           "as_contiguous"]


class PortingError(ValueError):
    """A state_dict that does not fit the model."""


@dataclasses.dataclass
class LoadReport:
    """What a load did.

    Attributes:
      loaded: torch keys copied into the model.
      missing: model keys absent from the state_dict (left as initialised).
      unexpected: state_dict keys the model has no place for.
      mismatched: ``(key, expected_shape, got_shape)`` for wrong shapes.
      ignored: keys left out on purpose by an ``ignore`` pattern.
      notes: anything else done on the way (dtype casts...).
    """

    loaded: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every key matched (ignored keys aside)."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} ({_short(self.ignored)})")
        if self.missing:
            parts.append(f"missing {len(self.missing)} ({_short(self.missing)})")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} ({_short(self.unexpected)})")
        if self.mismatched:
            parts.append(f"shape mismatch {len(self.mismatched)}")
        return "; ".join(parts + self.notes)


def _short(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... {len(keys) - n} more" if len(keys) > n else "")


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor, jax array or array-like as a numpy array (bf16 kept as bf16).

    Args:
      value: the tensor.

    Returns:
      A numpy array; torch tensors share memory where torch allows it.
    """
    if type(value).__module__.startswith("torch"):
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            import ml_dtypes

            return t.contiguous().view(_torch_int16()).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(value)


def _torch_int16():
    import torch

    return torch.int16


def to_torch_tensor(array: Any):
    """A numpy (or jax) array as a torch tensor, ``bfloat16`` and ``float8`` included.

    ``torch.from_numpy`` refuses ``ml_dtypes`` arrays (numpy has no bf16): those
    go through their bits, an integer array of the same width, viewed back as
    torch's dtype of the same name. Needs torch.

    Args:
      array: the array.

    Returns:
      A CPU tensor; it shares memory with ``array`` where that is a C-contiguous,
      writeable numpy array.
    """
    import torch

    array = np.require(np.asarray(array), requirements="CW")
    if array.dtype.type.__module__.startswith("ml_dtypes"):  # bf16, float8s, int4s
        dtype = getattr(torch, array.dtype.name, None)
        if (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
                or dtype.itemsize != array.dtype.itemsize):
            raise TypeError(f"torch has no floating {array.dtype.name} dtype to hold it bit "
                            "for bit; cast the array to float32 first")
        return torch.from_numpy(array.view(f"i{array.dtype.itemsize}")).view(dtype)
    return torch.from_numpy(array)


def _require_module(model: Any, what: str) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(f"{what} takes an nnx.Module (e.g. jaxnets.create_model(...)), got "
                        f"{type(model).__name__}")


def flax_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Every parameter and batch statistic of a model by dotted path.

    Args:
      model: the NNX model.

    Returns:
      ``{"layer1.0.conv1.kernel": Variable, ...}`` in graph order.
    """
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (nnx.Param, nnx.BatchStat)):
            out[".".join(str(p) for p in path)] = node
    return out


def _torch_index(model) -> dict[str, tuple[str, Any, Any]]:
    rules = rules_for(model)
    index = {}
    for path, var in flax_variables(model).items():
        key, layout = torch_key(path, rules)
        if key in index:
            raise AssertionError(f"rule table maps both {index[key][0]!r} and {path!r} to {key!r}")
        index[key] = (path, var, layout)
    return index


def _compile(patterns: Iterable[str]) -> list[re.Pattern]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    return [re.compile(p) for p in patterns]


def load_torch_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], *,
                          strict: bool = True, ignore: Iterable[str] = (),
                          consume: bool = False) -> LoadReport:
    """Fill an NNX model in place from a torch state_dict.

    Every key and shape is checked before anything is converted; then the
    tensors are converted and moved to the device one at a time.

    Args:
      model: the model, e.g. from ``jaxnets.create_model`` (or a shape-only
        model from ``porting.pretrained.build_abstract``).
      state_dict: torch key -> torch tensor or numpy array. Unwrapped as a
        ``.pth`` file is (``porting.pth.unwrap_state_dict``): a
        ``{"state_dict": ...}``/``{"model": ...}`` wrapper, non-tensor entries
        and a ``module.`` (DataParallel) or ``_orig_mod.`` (``torch.compile``)
        prefix of every key are taken off, each noted in the report.
      strict: raise unless every key matches (as ``torch.nn.Module.load_state_dict``).
      ignore: regexes (``re.search``) of torch keys to leave out on purpose on
        both sides, e.g. ``(r"^fc\\.",)`` to keep a freshly initialised head.
      consume: the state_dict (a mutable mapping of numpy arrays) is handed
        over: each loaded entry is removed from it as it is converted and its
        memory may be adopted by the model without a copy, so a load's peak
        memory stays near one checkpoint instead of two. It is only touched
        once the checks have passed. (A state_dict whose keys lose a prefix
        is read through a renamed copy: its own entries are not removed.)

    Returns:
      A ``LoadReport``.

    Raises:
      TypeError: ``model`` is not an ``nnx.Module``.
      PortingError: with ``strict`` and any missing or unexpected key, or
        always on a shape mismatch, or a state_dict without tensors; it names
        every offending key and the model (and a consumed state_dict) is left
        unchanged.
    """
    _require_module(model, "load_torch_state_dict")
    if not isinstance(state_dict, Mapping):
        raise PortingError(f"expected a state_dict mapping, got {type(state_dict).__name__}")
    unwrap_notes: list[str] = []
    if state_dict:
        try:
            state_dict, unwrap_notes = unwrap_state_dict(state_dict)
        except PthError as e:
            raise PortingError(str(e)) from None
    ignore_re = _compile(ignore)
    ignored = lambda k: any(p.search(k) for p in ignore_re)  # noqa: E731
    index = _torch_index(model)
    report = LoadReport(notes=list(unwrap_notes))
    plan = []
    for key, (path, var, layout) in index.items():
        if ignored(key):
            report.ignored.append(key)
            continue
        if key not in state_dict:
            report.missing.append(key)
            continue
        current = var.get_value()
        want = layout.torch_shape(tuple(current.shape))
        got = tuple(np.shape(state_dict[key]))
        if got != want:
            report.mismatched.append((key, want, got))
            continue
        plan.append((key, var, layout, current.dtype))
        report.loaded.append(key)
    for key in state_dict:
        if key not in index:
            (report.ignored if ignored(key) else report.unexpected).append(key)
    if report.mismatched or (strict and not report.ok):
        raise PortingError(_mismatch_message(model, report, state_dict))
    casts: dict[str, int] = {}
    for key, var, layout, dtype in plan:
        raw = state_dict.pop(key) if consume else state_dict[key]
        value = layout.from_torch(to_numpy(raw))
        if value.dtype != dtype:
            name = f"{value.dtype}->{np.dtype(dtype)}"
            casts[name] = casts.get(name, 0) + 1
        # Only a handed-over numpy array is adopted: a torch tensor's memory may
        # still belong to a live torch model.
        var.set_value(to_device(value, dtype, owned=consume and isinstance(raw, np.ndarray)))
        del value, raw
    report.notes += [f"cast {n} tensors {c}" for c, n in casts.items()]
    return report


_ALIGN = 64
# Transposed copies of arrays above this many elements go in slabs (see _copy_into).
_SLAB_MIN = 1 << 16
_SLAB = 256


def _copy_into(out: np.ndarray, src: np.ndarray) -> np.ndarray:
    """``np.copyto(out, src)`` (casting), cache-blocked when ``src`` is a transposed view.

    One ``copyto`` of a transposed view walks the source a cache line per
    element: for a big Linear kernel (VGG's 25088x4096) that is ~4x slower
    than copying it in slabs of ``_SLAB`` along the source's outermost axis,
    whose lines stay in cache while the output is written row by row.
    """
    if src.flags.c_contiguous:
        np.copyto(out, src, casting="unsafe")
        return out
    for index in slabs(src):
        np.copyto(out[index], src[index], casting="unsafe")
    return out


def slabs(array: np.ndarray):
    """Index tuples cutting ``array`` into slabs of ``_SLAB`` along its
    largest-stride axis: the order in which a transposed view is read with
    its cache lines reused (one slab, everything, for small arrays)."""
    if array.ndim < 2 or array.size < _SLAB_MIN:
        yield (...,)
        return
    axis = int(np.argmax(np.abs(array.strides)))
    index = [slice(None)] * array.ndim
    for start in range(0, array.shape[axis], _SLAB):
        index[axis] = slice(start, start + _SLAB)
        yield tuple(index)


def as_contiguous(array: Any, dtype: Any = None) -> np.ndarray:
    """A C-contiguous numpy array (``array`` itself when it already is one of ``dtype``).

    Unlike ``np.ascontiguousarray`` it keeps 0-d arrays 0-d (torch's
    ``num_batches_tracked``), and it copies transposed views of big kernels
    cache-blocked (see ``_copy_into``).
    """
    array = np.asarray(array)
    dtype = array.dtype if dtype is None else np.dtype(dtype)
    if array.flags.c_contiguous and array.dtype == dtype:
        return array
    return _copy_into(np.empty(array.shape, dtype), array)


def _aligned_copy(array: np.ndarray, dtype: Any) -> np.ndarray:
    """A C-contiguous copy on a 64-byte boundary, which ``jax.device_put`` on CPU
    adopts without copying again."""
    dtype = np.dtype(dtype)
    nbytes = array.size * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    out = raw[start:start + nbytes].view(dtype).reshape(array.shape)
    return _copy_into(out, array)


def to_device(value: np.ndarray, dtype: Any, *, owned: bool) -> jax.Array:
    """A host array on the default device as ``dtype``.

    Args:
      value: the array.
      dtype: the dtype wanted.
      owned: nobody else holds ``value``: it may be adopted without a copy.
        Arrays that are not owned are always copied here, on the host: the
        caller's array (often a torch tensor's memory) stays independent of
        the model. ``jax.device_put(may_alias=False)`` is not enough for that
        on CPU: the transfer is asynchronous and was seen to read the array
        after the caller had changed it.

    Returns:
      The device array.
    """
    value = np.asarray(value)
    if owned and value.dtype == dtype and value.flags.c_contiguous:
        return jax.device_put(value, may_alias=True)
    return jax.device_put(_aligned_copy(value, dtype), may_alias=True)


def _mismatch_message(model, report: LoadReport, state_dict: Mapping[str, Any]) -> str:
    name, n_given = type(model).__name__, len(state_dict)
    lines = [f"state_dict does not fit {name}:"]
    matched = len(report.loaded)
    if n_given and matched < 0.5 * n_given:
        lines[0] += (f" only {matched} of its {n_given} tensors fit the model; is it a "
                     "checkpoint for another architecture?")
    if report.missing:
        lines.append(f"  {len(report.missing)} missing: " + ", ".join(report.missing))
    if report.unexpected:
        lines.append(f"  {len(report.unexpected)} unexpected: " + ", ".join(report.unexpected))
    if report.mismatched:
        lines.append(f"  {len(report.mismatched)} shape mismatch: " + ", ".join(
            f"{k} expected {list(e)} got {list(g)}" for k, e, g in report.mismatched))
        if all(len(e) == len(g) and tuple(e[1:]) == tuple(g[1:])
               for _, e, g in report.mismatched):
            # Only output counts differ: what another class count looks like.
            lines.append("  (a checkpoint with another class count: pass num_classes to get "
                         "a fresh head, or ignore=(<head regex>,))")
    adapted = _adapt_notes(model, state_dict)
    if adapted:
        lines.append(f"  (hint: the model's own fix-ups would change this checkpoint "
                     f"({'; '.join(adapted)}): state_dict, notes = "
                     "model.adapt_torch_state_dict(state_dict) before loading; "
                     "porting.load_torchvision does it itself)")
    return "\n".join(lines)


def _adapt_notes(model, state_dict: Mapping[str, Any]) -> list[str]:
    """What the family's ``adapt_torch_state_dict`` hook (ViT: a position embedding of
    another image size, old key names) would change in ``state_dict``: the loaders of
    ``porting.pretrained`` apply it, ``load_torch_state_dict`` does not."""
    if not hasattr(model, "adapt_torch_state_dict"):
        return []
    try:
        return list(model.adapt_torch_state_dict(state_dict)[1])
    except Exception:  # only a hint: the mismatch itself is the error to report
        return []


def _is_numeric(dtype: np.dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.number) or dtype == np.bool_)


def flax_to_torch(model_or_class, flat: Mapping[str, Any] | nnx.State, *,
                  contiguous: bool = True) -> dict[str, np.ndarray]:
    """Map flax parameters or gradients to torch keys and layouts.

    Args:
      model_or_class: the model whose rule table applies. Given a model, every
        path must be one of its parameters or statistics, of the same shape;
        given only its class, paths are not checked.
      flat: dotted flax paths to arrays (``{"conv1.kernel": ...}``), or an
        ``nnx.State`` such as ``nnx.grad`` returns; RNG state in it
        (``nnx.RngState``), which no torch state_dict holds, is left out.
      contiguous: return C-contiguous arrays, as torch wants them; False
        returns (possibly transposed) views, which is enough to compare values
        and saves a copy of every kernel.

    Returns:
      torch key -> numpy array in torch layout.

    Raises:
      TypeError: ``model_or_class`` is neither an ``nnx.Module`` nor its class.
      PortingError: a value that is not a numeric array, or (given a model) a
        path that is not a parameter or statistic of it or a shape that differs
        from it; naming them.
    """
    if not (isinstance(model_or_class, nnx.Module) or (
            isinstance(model_or_class, type) and issubclass(model_or_class, nnx.Module))):
        raise TypeError("flax_to_torch takes an nnx.Module or its class (e.g. "
                        f"jaxnets.create_model(...)), got {type(model_or_class).__name__}")
    if isinstance(flat, nnx.State):
        flat = {".".join(map(str, path)): value for path, value in nnx.to_flat_state(flat)
                if not isinstance(value, nnx.RngState)}
    elif not isinstance(flat, Mapping):
        raise PortingError(f"flax_to_torch takes a mapping of flax paths to arrays or an "
                           f"nnx.State, got {type(flat).__name__}")
    arrays = {path: np.asarray(value) for path, value in flat.items()}
    bad = [f"{p} ({type(flat[p]).__name__})" for p, a in arrays.items()
           if not _is_numeric(a.dtype)]
    if bad:
        raise PortingError(f"flax_to_torch takes numeric arrays by dotted flax path (or an "
                           f"nnx.State); not numeric: {_short(bad)}")
    if isinstance(model_or_class, nnx.Module):
        variables = flax_variables(model_or_class)
        name = type(model_or_class).__name__
        unknown = [p for p in arrays if p not in variables]
        if unknown:
            raise PortingError(f"{name} has no parameter or statistic at {len(unknown)} of "
                               f"the paths given: {_short(unknown)} (its paths look like "
                               f"{_short(list(variables), 2)})")
        shapes = {p: tuple(variables[p].get_value().shape) for p in arrays}
        wrong = [f"{p} expected {list(shapes[p])} got {list(a.shape)}"
                 for p, a in arrays.items() if tuple(a.shape) != shapes[p]]
        if wrong:
            raise PortingError(f"{len(wrong)} arrays of another shape than {name}'s "
                               f"variables: {_short(wrong)}")
    rules = rules_for(model_or_class)
    out = {}
    for path, array in arrays.items():
        key, layout = torch_key(path, rules)
        array = layout.to_torch(array)
        out[key] = as_contiguous(array) if contiguous else array
    return out


def to_torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters and statistics as a torch state_dict of numpy arrays.

    The exact inverse of ``load_torch_state_dict``: it loads into the torch
    model with ``strict=True`` (``torch.from_numpy`` each value). Each array
    keeps the model's dtype: a ``bfloat16`` model gives ``ml_dtypes.bfloat16``
    arrays, which ``torch.from_numpy`` refuses; ``porting.to_torch_tensor``
    converts them (and any other value) bit for bit.

    Args:
      model: the NNX model.

    Returns:
      torch key -> numpy array.

    Raises:
      TypeError: ``model`` is not an ``nnx.Module``.
    """
    _require_module(model, "to_torch_state_dict")
    flat = {path: var.get_value() for path, var in flax_variables(model).items()}
    return flax_to_torch(model, flat)
