"""Pretrained jaxnets models from torchvision weights, without torch.

``from_torchvision("resnet50")`` finds the weights in this order:

1. the converted cache: flax parameters stored by an earlier load
   (``$JAXNETS_CACHE``, else ``$XDG_CACHE_HOME/jaxnets``, else
   ``~/.cache/jaxnets``; one directory ``<arch>.<NAME>`` per weights entry),
   which needs neither the ``.pth`` nor a conversion;
2. the torch hub cache (``porting.hub``), shared with torchvision;
3. a verified download into the torch hub cache.

A local file or directory can be given instead of a name: a ``.pth``/``.pt``
/``.bin`` from ``torch.save``, a ``.safetensors`` file, shard index or
directory of torch-named tensors, or a *converted directory*.

Converted directory format (the cache entries and ``python -m porting
convert`` output alike): ``model.safetensors`` holding every parameter and
batch statistic under its dotted flax path (``layer1.0.conv1.kernel``) in flax
layout, and ``jaxnets.json`` with ``format``, ``arch``, ``num_classes``,
``model_overrides``, ``weights`` and ``source``.

Models are built abstractly (``nnx.eval_shape``) and filled from the
checkpoint, so the random initialisation of parameters that are about to be
overwritten is never computed. Whatever the checkpoint does not fill (a fresh
head for another class count, dropout RNG state) is initialised by one jitted
call to the model's own initialiser from which XLA prunes everything else, so
those values are the ones ``jaxnets.create_model(arch, seed=seed)`` gives.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

import jaxnets
from jaxnets.cli import one_line
from porting import hub
from porting.pth import load_state_dict_file
from porting.rules import rules_for, torch_key
from porting.safetensors_io import load_safetensors, save_safetensors
from porting.state_dict import LoadReport, PortingError, as_contiguous, flax_variables, \
    load_torch_state_dict, to_device
from porting.weights import UnknownWeightsError, Weights, get_weights

__all__ = ["CONVERTED_FORMAT", "from_torchvision", "load_torchvision", "converted_cache_dir",
           "read_converted", "write_converted", "is_converted", "model_flat", "head_classes",
           "build_abstract", "fill_from_flax", "materialize", "load_into_abstract",
           "is_weights_path", "resolve_weights"]

log = logging.getLogger(__name__)

CONVERTED_FORMAT = "jaxnets-flax-safetensors-v1"
_META = "jaxnets.json"
_TENSORS = "model.safetensors"
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")

# flax path -> (variable, torch key, layout) of a model's parameters and statistics.
_Index = dict[str, tuple[nnx.Variable, str, Any]]
_ABSTRACT: dict[tuple, tuple] = {}
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# Auxiliary classifiers present in torchvision's pretrained checkpoints; a model
# built without them leaves these keys out on purpose (they are reported).
_OPTIONAL_KEYS = {
    "googlenet": r"^aux[12]\.",
    "inception_v3": r"^AuxLogits\.",
}


# --------------------------------------------------------------------------
# Building and filling models
# --------------------------------------------------------------------------


def _variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Variable)}


def _is_abstract(var: nnx.Variable) -> bool:
    return isinstance(var.get_value(), jax.ShapeDtypeStruct)


@contextlib.contextmanager
def _traced_init():
    """While a model's constructor is traced (``nnx.eval_shape``, ``jax.jit``): jax's
    tracers skip the "origin" part of their error messages.

    Every random draw of an initialiser counts its ``nnx.RngStream`` up, and flax's
    ``Variable.set_value`` then compares the new count's ``sharding`` with the old one's
    (flax 0.12 ``variablelib``); a tracer has none, and the AttributeError jax raises
    for it (``getattr`` catches it) first walks every equation traced so far to say
    where the tracer came from (``DynamicJaxprTracer._origin_msg``, jax 0.10): a cost
    that grows with the square of the model's size. Measured here:
    ``build_abstract("vit_h_14")`` 4.1 s with the walk, 0.75 s without. Where jax has
    no such method (another version), nothing changes.
    """
    from jax._src.interpreters import partial_eval

    tracer = getattr(partial_eval, "DynamicJaxprTracer", None)
    original = getattr(tracer, "_origin_msg", None)
    if original is None:
        yield
        return
    tracer._origin_msg = _NO_ORIGIN
    try:
        yield
    finally:
        tracer._origin_msg = original


def _NO_ORIGIN(self) -> str:  # noqa: N802 -- stands in for a method
    return ""


def build_abstract(arch: str, num_classes: int | None = None, **overrides: Any) -> nnx.Module:
    """A model whose variables are shapes only (no initialisation computed).

    Args:
      arch: registry name.
      num_classes: classifier outputs; the spec's default when None.
      **overrides: constructor options.

    Returns:
      The model, in training mode, with ``jax.ShapeDtypeStruct`` values to be
      filled by :func:`fill_from_flax` / ``load_torch_state_dict`` and
      :func:`materialize`.
    """
    if num_classes is None and jaxnets.get_spec(arch).kind == "image":
        num_classes = jaxnets.get_spec(arch).num_classes  # one cache entry for both spellings
    key = (arch, num_classes, repr(sorted(overrides.items())))
    if key not in _ABSTRACT:
        with _traced_init():
            model = nnx.eval_shape(lambda: jaxnets.create_model(arch, num_classes=num_classes,
                                                                **overrides))
        # Tracing the initialisers is most of the build time: keep the result.
        _ABSTRACT[key] = nnx.split(model)
    # copy=True: each model gets its own Variables; filling one must not fill the cache.
    return nnx.merge(*_ABSTRACT[key], copy=True)


# Sequence models (torch.nn.Transformer): source and target lengths when no size is given.
SEQUENCE_SIZE = (10, 9)


def input_shapes(model, arch: str, size: tuple[int, int] | None = None,
                 batch: int = 1) -> list[tuple[int, ...]]:
    """The shapes of the inputs a model takes (a jaxnets model or its torch reference).

    Args:
      model: the model; its own ``image_size`` (a ViT), ``in_channels`` (LeNet-5,
        AlexNet), ``in_features`` (MLP), ``d_model``/``batch_first`` (transformer)
        decide where it has them.
      arch: its registry name.
      size: image (height, width), or a sequence model's (source, target) lengths;
        None: the model's own, else the spec's (``SEQUENCE_SIZE`` for sequences).
      batch: batch size.

    Returns:
      ``[NHWC]`` for an image model (channels last, also for a torch model),
      ``[(N, features)]`` for a vector model, ``[source, target]`` for a sequence
      model (``(S, N, E)``, or ``(N, S, E)`` with ``batch_first``).
    """
    spec = jaxnets.get_spec(arch)
    if spec.kind == "sequence":
        e = model.d_model
        return [(batch, n, e) if model.batch_first else (n, batch, e)
                for n in (size or SEQUENCE_SIZE)]
    if spec.kind == "vector":
        return [(batch, getattr(model, "in_features", spec.input_size[0]))]
    fixed = getattr(model, "image_size", None)  # a ViT takes its own size only
    h, w = size or ((fixed, fixed) if isinstance(fixed, int) else spec.input_size)
    channels = getattr(model, "in_channels", None)
    return [(batch, h, w, channels if isinstance(channels, int) else spec.in_channels)]


def check_forward(model: nnx.Module, arch: str, size: tuple[int, int] | None = None,
                  batch: int = 1) -> tuple[int, ...]:
    """Traces one eval-mode forward pass of a model, values left out (a model from
    :func:`build_abstract` costs no initialisation), so that an input it cannot take
    or a constructor option it only uses in the forward pass (a string where a number
    belongs) fails before anything is read or computed.

    Args:
      model: the model (abstract or concrete; it is not changed).
      arch: its registry name.
      size, batch: the input, as for :func:`input_shapes`.

    Returns:
      The input shape traced (a sequence model's source).

    Raises:
      ValueError, TypeError: the model's own message.
    """
    import jax.numpy as jnp

    shapes = input_shapes(model, arch, size, batch)
    graphdef, state = nnx.split(model)

    def forward(state, *xs):
        m = nnx.merge(graphdef, state)
        m.eval()
        return m(*xs)

    jax.eval_shape(forward, state, *(jax.ShapeDtypeStruct(x, jnp.float32) for x in shapes))
    return shapes[0]


def model_problem(arch: str, overrides: Mapping[str, Any] | None = None, *,
                  num_classes: int | None = None, size: tuple[int, int] | None = None,
                  batch: int = 1) -> str | None:
    """What the jaxnets model refuses, found without computing anything: an option it
    does not have or a value it cannot use, at its build or in one forward pass traced
    without values (:func:`check_forward`), or an input it cannot take (LeNet-5 takes
    32x32 only, a ViT its ``image_size``). The shape-only build is kept for the load.

    Args:
      arch: registry name.
      overrides: constructor options (``--model-arg``).
      num_classes: classifier outputs; the spec's default when None.
      size, batch: the input, as for :func:`check_forward`.

    Returns:
      The problem as one line (``--model-arg: ...`` for an option, ``ARCH: ...`` for the
      input size given), or None.
    """
    try:
        model = build_abstract(arch, num_classes, **dict(overrides or {}))
    except (TypeError, ValueError) as e:
        return f"--model-arg: {one_line(str(e), 600)}"
    try:
        check_forward(model, arch, size, batch)
    except (TypeError, ValueError) as e:
        if size is not None and "image" in str(e):  # the size or channels given
            return f"{arch}: {one_line(str(e), 600)}"
        return f"--model-arg: {arch}'s forward pass: {one_line(str(e), 600)}"
    return None


def same_option(recorded: Any, given: Any) -> bool:
    """Whether a constructor option's value as a run or converted directory records it
    (JSON: lists) and as ``--model-arg`` gives it (tuples too) are the same."""
    try:
        return json.loads(json.dumps(recorded)) == json.loads(json.dumps(given))
    except (TypeError, ValueError):  # not JSON: as they are
        return recorded == given


def materialize(model: nnx.Module, arch: str, num_classes: int | None = None, seed: int = 0,
                **overrides: Any) -> list[str]:
    """Initialises the variables still abstract, as ``create_model(seed=seed)`` would.

    Args:
      model: a model from :func:`build_abstract`, partly filled.
      arch: its registry name.
      num_classes: the class count it was built with.
      seed: initialisation seed.
      **overrides: the constructor options it was built with.

    Returns:
      The dotted paths that were initialised.
    """
    pending = {p: v for p, v in _variables(model).items() if _is_abstract(v)}
    if not pending:
        return []

    def init():
        fresh = _variables(jaxnets.create_model(arch, num_classes=num_classes, seed=seed,
                                                **overrides))
        return {p: fresh[p].get_value() for p in pending}

    # Only the pending values are outputs, so XLA drops the rest of the init.
    # A one-off program: unoptimised code compiles ~10x faster and runs in ms.
    with _traced_init():
        lowered = jax.jit(init).lower()
    try:
        compiled = lowered.compile(compiler_options=_FAST_COMPILE)
    except Exception:  # a backend that does not know these options
        compiled = lowered.compile()
    for path, value in compiled().items():
        pending[path].set_value(value)
    return sorted(pending)


def _index(model: nnx.Module) -> _Index:
    """flax path -> (variable, torch key, layout) for every parameter and statistic."""
    rules = rules_for(model)
    return {path: (var, *torch_key(path, rules)) for path, var in flax_variables(model).items()}


def fill_from_flax(model: nnx.Module, flat: Mapping[str, Any], *,
                   ignore: tuple[str, ...] = ()) -> LoadReport:
    """Fills a model from ``{flax path: array}`` in flax layout, strictly.

    Args:
      model: the model (abstract or concrete).
      flat: dotted flax paths to arrays (e.g. a converted directory's tensors);
        RNG state saved with ``nnx.state`` (``....rngs.key``/``count``) is skipped.
      ignore: regexes over *torch* keys to leave out (e.g. the head).

    Returns:
      The report, keyed by torch names like ``load_torch_state_dict``'s.

    Raises:
      PortingError: a parameter missing or of the wrong shape, or an entry the
        model has no place for (a deeper model's layers), naming them all; the
        model is left unchanged.
    """
    return _fill_index(type(model).__name__, _index(model), flat, tuple(ignore), owned=False)


def _fill_index(name: str, index: _Index, flat: Mapping[str, Any], ignore: tuple[str, ...],
                *, owned: bool) -> LoadReport:
    ignore_re = [re.compile(p) for p in ignore]
    report = LoadReport()
    updates = []
    for path, (var, key, _) in index.items():
        if any(p.search(key) for p in ignore_re):
            report.ignored.append(key)
            continue
        if path not in flat:
            report.missing.append(path)
            continue
        value = np.asarray(flat[path])
        current = var.get_value()
        if tuple(value.shape) != tuple(current.shape):
            report.mismatched.append((path, tuple(current.shape), tuple(value.shape)))
            continue
        updates.append((var, value, current.dtype))
        report.loaded.append(key)
    report.unexpected = [k for k in flat if k not in index and not _rng_state(k)]
    if report.missing or report.mismatched or report.unexpected:
        lines = [f"parameters do not fit {name}:"]
        if report.missing and all(isinstance(index[k][0], nnx.BatchStat)
                                  for k in report.missing):
            lines[0] = (f"parameters do not fit {name} (no BatchNorm statistics: save "
                        "nnx.state(model), not only its nnx.Param):")
        if report.missing:
            lines.append(f"  {len(report.missing)} missing: " + ", ".join(report.missing))
        if report.unexpected:
            lines.append(f"  {len(report.unexpected)} unexpected (the model has no place for "
                         "them): " + ", ".join(report.unexpected))
        if report.mismatched:
            lines.append(f"  {len(report.mismatched)} shape mismatch: " + ", ".join(
                f"{k} expected {list(e)} got {list(g)}" for k, e, g in report.mismatched))
        raise PortingError("\n".join(lines))
    for var, value, dtype in updates:
        var.set_value(to_device(value, dtype, owned=owned))
    return report


def _rng_state(path: str) -> bool:
    """Whether a flax path is RNG state (a dropout layer's ``rngs.key``/``rngs.count``)."""
    parts = path.split(".")
    return "rngs" in parts[:-1] and parts[-1] in ("key", "count")


def head_classes(model: nnx.Module, arch: str) -> int | None:
    """The output count of a model's classifier head.

    Args:
      model: the model (abstract or concrete).
      arch: its registry name (for the head regex).

    Returns:
      The first torch dimension of the last head weight, or None without one.
    """
    head_re = re.compile(jaxnets.get_spec(arch).head)
    found = None
    for var, key, layout in _index(model).values():
        if head_re.search(key) and key.endswith(".weight"):
            found = layout.torch_shape(tuple(var.get_value().shape))[0]
    return found


def _head_mismatch(index: _Index, shapes: Mapping[str, tuple[int, ...]], head: str,
                   torch_layout: bool) -> int | None:
    """The checkpoint's class count when its head differs in shape from the model's.

    Args:
      index: the model's ``_index``.
      shapes: checkpoint key -> shape (torch keys, or flax paths).
      head: the spec's head regex over torch keys.
      torch_layout: whether ``shapes`` is keyed by torch keys.

    Returns:
      The checkpoint head's output count (first dim of the last mismatched head
      weight, torch layout), or None when the head fits.
    """
    head_re = re.compile(head)
    found = None
    for path, (var, key, layout) in index.items():
        if not head_re.search(key):
            continue
        var_shape = tuple(var.get_value().shape)
        name = key if torch_layout else path
        if name not in shapes:
            continue
        want = layout.torch_shape(var_shape) if torch_layout else var_shape
        got = tuple(shapes[name])
        if got != want and got:
            found = got[0] if torch_layout else layout.torch_shape(got)[0]
    return found


# --------------------------------------------------------------------------
# Converted directories
# --------------------------------------------------------------------------


def converted_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Root of the converted cache.

    Args:
      cache_dir: explicit root; wins over the environment.

    Returns:
      ``cache_dir``, else ``$JAXNETS_CACHE``, else ``$XDG_CACHE_HOME/jaxnets``,
      else ``~/.cache/jaxnets``.
    """
    from jaxnets.compile_cache import cache_root

    return Path(cache_dir) if cache_dir is not None else Path(cache_root())


def is_converted(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a converted directory (``jaxnets.json`` inside).

    Args:
      path: a path.

    Returns:
      True for a converted directory.
    """
    return (Path(path) / _META).is_file()


def replaceable(path: str | os.PathLike) -> bool:
    """Whether :func:`write_converted` may put a converted directory at ``path``:
    nothing there, an empty folder, or a converted directory (never a file or a
    folder of other things)."""
    path = Path(path)
    return not path.exists() or (path.is_dir() and (is_converted(path)
                                                    or not any(path.iterdir())))


def read_converted(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads a converted directory.

    Args:
      path: the directory.

    Returns:
      ``(flat, meta)``: flax path -> array, and the ``jaxnets.json`` contents.

    Raises:
      ValueError: not a converted directory of this format.
    """
    path = Path(path)
    try:
        meta = json.loads((path / _META).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a converted jaxnets checkpoint ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != CONVERTED_FORMAT:
        raise ValueError(f"{path}: {_META} has format {meta.get('format')!r}, "
                         f"expected {CONVERTED_FORMAT!r}")
    return load_safetensors(path / _TENSORS), meta


def write_converted(path: str | os.PathLike, flat: Mapping[str, Any], meta: Mapping[str, Any],
                    *, replace: bool = True) -> Path:
    """Writes a converted directory atomically (temporary directory, then rename).

    Args:
      path: the directory to create.
      flat: flax path -> array.
      meta: metadata; ``format`` is added.
      replace: replace an existing converted directory (or an empty one);
        otherwise keep it.

    Returns:
      ``path``.

    Raises:
      FileExistsError: ``replace`` and ``path`` is a file, or a directory with
        other contents than a converted checkpoint's: nothing is written, it is
        left as it was.
    """
    path = Path(path)
    if replace and not replaceable(path):
        raise FileExistsError(f"{path} exists and is not a converted directory (no {_META}); "
                              "not replacing it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        save_safetensors(flat, tmp / _TENSORS)
        (tmp / _META).write_text(json.dumps({"format": CONVERTED_FORMAT, **meta}, indent=1))
        hub.usual_permissions(tmp)
        if path.exists():
            if not replace:
                shutil.rmtree(tmp)
                return path
            # Directories cannot be swapped in one rename; move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def model_flat(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every parameter and statistic of a model, by flax path, as numpy.

    Args:
      model: a concrete model.

    Returns:
      flax path -> numpy array.
    """
    return {p: np.asarray(v.get_value()) for p, v in flax_variables(model).items()}


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def _read_torch_like(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """A torch-keyed state_dict from a ``.pth``-like or safetensors path."""
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.is_dir() or path.name.endswith((".safetensors", ".json")):
        return load_safetensors(path), []
    loaded = load_state_dict_file(path)
    return loaded.state_dict, list(loaded.notes)


def _refuse_run_directory(path: Path) -> None:
    """A ``train.finetune`` run directory holds Orbax checkpoints, not torch weights:
    say what loads one instead of failing to read it as safetensors."""
    if not path.is_dir() or any(path.glob("*.safetensors*")):
        return  # weights, whatever the folder is called
    try:
        from train.checkpoint import locate_run
    except ImportError:  # pragma: no cover -- train is part of this distribution
        return
    found = locate_run(str(path))
    steps = found is not None and any(
        n.isdigit() and (Path(found[1]) / n / "state").is_dir() for n in os.listdir(found[1]))
    if steps:
        raise PortingError(f"{path} is a train.finetune run directory, not a weights file: "
                           f"load its model with train.checkpoint.load_model({str(path)!r}) "
                           "(returns (model, step)), or write a .pth with python -m porting "
                           f"export --checkpoint {path} --out FILE.pth")


def is_weights_path(weights: Any) -> bool:
    """Whether a ``weights`` argument names a file/directory rather than registry weights.

    Args:
      weights: the argument.

    Returns:
      True for path objects and for strings with a path separator, a checkpoint
      suffix, or naming something that exists.
    """
    if isinstance(weights, os.PathLike):
        return True
    return isinstance(weights, str) and (
        os.sep in weights or weights.endswith(_TORCH_SUFFIXES + (".safetensors", ".json"))
        or os.path.exists(weights))


def resolve_weights(arch: str, weights: str | Weights) -> Weights:
    """The registry entry meant by a ``weights`` argument for ``arch``.

    Args:
      arch: registry name.
      weights: ``"DEFAULT"``, ``"IMAGENET1K_V1"``, ``"resnet50.IMAGENET1K_V1"``,
        a torchvision weights enum member (``ResNet50_Weights.DEFAULT``) or a
        ``Weights``.

    Returns:
      The ``Weights``.

    Raises:
      UnknownWeightsError: unknown, or for another architecture.
    """
    if isinstance(weights, Weights):
        w = weights
    elif isinstance(weights, enum.Enum) or (isinstance(weights, str) and "." in weights):
        w = get_weights(weights)
    else:
        w = get_weights((arch, str(weights)))
    if w.arch != arch:
        raise UnknownWeightsError(f"weights {w.spec} are for {w.arch}, not {arch}")
    return w


def _optional_ignores(arch: str, index: _Index
                      ) -> tuple[str, ...]:
    pattern = _OPTIONAL_KEYS.get(arch)
    if pattern is None:
        return ()
    has = any(re.search(pattern, key) for _, key, _ in index.values())
    return () if has else (pattern,)


def load_into_abstract(arch: str, data: Mapping[str, Any], *, torch_keys: bool, label: str,
                       num_classes: int | None = None, default_classes: int | None = None,
                       overrides: Mapping[str, Any] | None = None, consume: bool = False,
                       ) -> tuple[nnx.Module, LoadReport, int | None]:
    """Builds ``arch`` abstractly and fills it strictly from a checkpoint.

    Variables the checkpoint does not provide (a head left out, RNG state)
    stay abstract; :func:`materialize` initialises them.

    Args:
      arch: registry name.
      data: torch state_dict (``torch_keys=True``) or ``{flax path: array}``.
      torch_keys: which of the two ``data`` is.
      label: prefixed to load errors (the file name).
      num_classes: the class count asked for; a checkpoint head of another
        size is then left out. None: ``default_classes``, or else the
        checkpoint head's own size.
      default_classes: the class count to try first when ``num_classes`` is None.
      overrides: constructor options.
      consume: ``data`` is handed over: its arrays may be adopted by the model
        without a copy, and loaded torch entries are removed from it while
        converting, which keeps peak memory near one checkpoint.

    Returns:
      ``(model, report, num_classes)``.

    Raises:
      PortingError: the checkpoint does not fit (message starts with ``label``).
    """
    spec = jaxnets.get_spec(arch)
    overrides = dict(overrides or {})
    classes = num_classes if num_classes is not None else default_classes
    model = build_abstract(arch, classes, **overrides)
    index = _index(model)
    notes = []
    if torch_keys and hasattr(model, "adapt_torch_state_dict"):
        # A family's own checkpoint fix-ups (old key names, resized embeddings).
        data, adapt_notes = model.adapt_torch_state_dict(data)
        notes += adapt_notes
    shapes = {k: tuple(np.shape(v)) for k, v in data.items()}
    ckpt_classes = _head_mismatch(index, shapes, spec.head, torch_layout=torch_keys)
    ignore = list(_optional_ignores(arch, index)) if torch_keys else []
    if ckpt_classes is not None:
        if num_classes is None:
            # No class count asked for: take the checkpoint's (a fine-tuned file).
            classes = ckpt_classes
            model = build_abstract(arch, classes, **overrides)
            index = _index(model)
            notes.append(f"num_classes={classes} taken from the checkpoint's head")
        else:
            ignore.append(spec.head)
            notes.append(f"head ({spec.head}) left out: the checkpoint has {ckpt_classes} "
                         f"classes, the model {classes}; freshly initialised")
    try:
        if torch_keys:
            report = load_torch_state_dict(model, data, strict=True, ignore=tuple(ignore),
                                           consume=consume)
        else:
            report = _fill_index(type(model).__name__, index, data, tuple(ignore),
                                 owned=consume)
    except PortingError as e:
        raise PortingError(f"{label}: {e}") from None
    report.notes += notes
    return model, report, classes


def _cache_entry(root: Path, w: Weights) -> Path:
    return root / f"{w.arch}.{w.name}"


def _try_cache(entry: Path, w: Weights, overrides: Mapping[str, Any], num_classes: int | None):
    if not is_converted(entry):
        return None
    meta: dict = {}
    try:
        flat, meta = read_converted(entry)
        if (meta.get("arch"), meta.get("weights"), meta.get("url")) != (w.arch, w.spec, w.url):
            raise ValueError("it was made from other weights")
        return load_into_abstract(w.arch, flat, torch_keys=False, label=str(entry),
                                  num_classes=num_classes, default_classes=w.num_classes,
                                  overrides=overrides, consume=True)
    except (ValueError, OSError) as e:
        # A stale or damaged entry is rebuilt from the source below. The entry holds
        # the weights' own model: one built with other options that do not fit it (a
        # ViT's image_size) converts from the source, with nothing to warn about.
        if isinstance(e, PortingError) and overrides != meta.get("model_overrides"):
            return None
        log.warning("ignoring converted cache %s: %s", entry, one_line(str(e), 300))
        return None


def _write_cache(entry: Path, w: Weights, model: nnx.Module, report: LoadReport,
                 sd: Mapping[str, np.ndarray], source: Path) -> str:
    # The checkpoint's own values are cached, also for a head this load left out and
    # for auxiliary classifiers the model was built without (GoogLeNet's default with
    # torchvision's weights), so one entry serves a later load that keeps them.
    index = _index(model)
    if w.arch in _OPTIONAL_KEYS:
        full = build_abstract(w.arch, w.num_classes, **{**w.model_overrides, "aux_logits": True})
        index = {**_index(full), **index}
    flat = {}
    loaded = set(report.loaded)
    for path, (var, key, layout) in index.items():
        if key in sd or key in loaded:
            if key in loaded:
                flat[path] = np.asarray(var.get_value())
            else:
                flat[path] = as_contiguous(layout.from_torch(sd[key]))
    # The entry is the checkpoint as the weights' own model takes it. A model built with
    # other options may hold it adapted (a ViT's image_size resizes the position
    # embedding): that is not cached under the weights' name.
    own = _index(build_abstract(w.arch, w.num_classes, **w.model_overrides))
    if any(path in own and tuple(own[path][0].get_value().shape) != value.shape
           for path, value in flat.items()):
        return "not cached (the model's options change the checkpoint's values)"
    meta = {"arch": w.arch, "weights": w.spec, "url": w.url, "hash_prefix": w.hash_prefix,
            "num_classes": w.num_classes, "model_overrides": w.model_overrides,
            "source": str(source)}
    try:
        write_converted(entry, flat, meta)
    except OSError as e:
        return f"could not write the converted cache {entry} ({e})"
    return f"converted parameters cached in {entry}"


def load_torchvision(arch: str, weights: Any = "DEFAULT", *, num_classes: int | None = None,
                     seed: int = 0, cache_dir: str | os.PathLike | None = None,
                     progress: bool = True, **overrides: Any) -> tuple[nnx.Module, LoadReport]:
    """A jaxnets model with torchvision (or local) weights, and what was loaded.

    Args:
      arch: registry name, e.g. ``"resnet50"``.
      weights: ``"DEFAULT"``, a weights name (``"IMAGENET1K_V1"`` or
        ``"resnet50.IMAGENET1K_V1"``), a torchvision weights enum member
        (``ResNet50_Weights.DEFAULT``), a ``porting.weights.Weights``, a path
        (``.pth``/``.pt``/``.bin``, ``.safetensors`` file/index/directory, or a
        converted directory), or None for random initialisation.
      num_classes: classifier outputs. When it differs from the checkpoint's,
        the head (``jaxnets.get_spec(arch).head``) is left out of the load and
        freshly initialised. None: the checkpoint's own class count.
      seed: seed of whatever is freshly initialised.
      cache_dir: root of the converted cache (see :func:`converted_cache_dir`).
      progress: show a progress bar while downloading.
      **overrides: constructor options; registry weights add the options they
        need (``model_overrides``, e.g. GoogLeNet's ``transform_input``).

    Returns:
      ``(model, report)``: the model in training mode (call ``model.eval()``
      for inference) and a ``LoadReport`` whose ``notes`` say where the
      weights came from and what was left out.

    Raises:
      jaxnets.UnknownModelError: unknown arch.
      UnknownWeightsError: unknown weights name (the message lists the names).
      FileNotFoundError: a weights path that does not exist.
      porting.hub.DownloadError: the file is neither cached nor downloadable
        (the message gives the URL and where to put the file).
      ValueError: a corrupt checkpoint (``PthError``, ``SafetensorsFileError``)
        or one for another architecture (``PortingError``, prefixed by the
        file name and naming the keys); a ``train.finetune`` run directory
        (``PortingError`` naming ``train.checkpoint.load_model``).
    """
    jaxnets.get_spec(arch)
    if weights is None:
        model = jaxnets.create_model(arch, num_classes=num_classes, seed=seed, **overrides)
        return model, LoadReport(notes=["no weights: random initialisation"])
    cache_write = None
    if is_weights_path(weights) and not isinstance(weights, Weights):
        path = Path(weights).expanduser()
        if is_converted(path):
            flat, meta = read_converted(path)
            if meta.get("arch") != arch:
                raise PortingError(f"{path.name}: a converted {meta.get('arch')} checkpoint, "
                                   f"not {arch}")
            overrides = {**meta.get("model_overrides", {}), **overrides}
            model, report, nc = load_into_abstract(
                arch, flat, torch_keys=False, label=path.name, num_classes=num_classes,
                default_classes=meta.get("num_classes"), overrides=overrides, consume=True)
            source_notes = [f"source: converted directory {path}"]
        else:
            _refuse_run_directory(path)
            sd, pth_notes = _read_torch_like(path)
            model, report, nc = load_into_abstract(
                arch, sd, torch_keys=True, label=path.name, num_classes=num_classes,
                overrides=overrides, consume=True)
            source_notes = [f"source: {path}"] + pth_notes
    else:
        w = resolve_weights(arch, weights)
        overrides = {**w.model_overrides, **overrides}
        entry = _cache_entry(converted_cache_dir(cache_dir), w)
        hit = _try_cache(entry, w, overrides, num_classes)
        if hit is not None:
            model, report, nc = hit
            source_notes = [f"source: converted cache {entry}"]
        else:
            try:
                file = hub.cached_download(w.url, w.hash_prefix, progress=progress)
            except hub.DownloadError as e:
                raise hub.DownloadError(f"{w.spec}: {e}") from None
            sd, pth_notes = _read_torch_like(file)
            model, report, nc = load_into_abstract(
                arch, sd, torch_keys=True, label=file.name, num_classes=num_classes,
                default_classes=w.num_classes, overrides=overrides, consume=True)
            source_notes = [f"source: {file}"] + pth_notes
            cache_write = (entry, w, sd, file)
    if cache_write is not None:
        entry, w, sd, file = cache_write
        source_notes.append(_write_cache(entry, w, model, report, sd, file))
    fresh = materialize(model, arch, nc, seed, **overrides)
    report.notes = source_notes + report.notes
    # Dropout's RNG state (``...rngs.key``/``.count``) is in no checkpoint, torch's
    # included: seeded, not a weight left out.
    rng = [p for p in fresh if _rng_state(p)]
    weights = [p for p in fresh if p not in rng]
    if weights:
        shown = ", ".join(weights[:4]) + (", ..." if len(weights) > 4 else "")
        report.notes.append(f"freshly initialised {len(weights)} variables the checkpoint does "
                            f"not hold ({shown})")
    if rng:
        report.notes.append(f"dropout RNG state seeded ({len(rng)} variables, seed {seed})")
    return model, report


def from_torchvision(arch: str, weights: Any = "DEFAULT", *, num_classes: int | None = None,
                     seed: int = 0, cache_dir: str | os.PathLike | None = None,
                     progress: bool = True, **overrides: Any) -> nnx.Module:
    """A jaxnets model with torchvision (or local) weights.

    The same as :func:`load_torchvision` without the report; its notes (the
    source, unwrapping done, keys left out) are logged at INFO level.

    Args:
      arch: registry name.
      weights: see :func:`load_torchvision`.
      num_classes: see :func:`load_torchvision`.
      seed: seed of whatever is freshly initialised.
      cache_dir: root of the converted cache.
      progress: show a progress bar while downloading.
      **overrides: constructor options.

    Returns:
      The model, in training mode.
    """
    model, report = load_torchvision(arch, weights, num_classes=num_classes, seed=seed,
                                     cache_dir=cache_dir, progress=progress, **overrides)
    log.info("%s: %s", arch, report)
    return model
