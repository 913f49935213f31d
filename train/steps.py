"""jit-compiled train and eval steps over a flat, checkpointable train state.

The model is split once (``nnx.split``) into its graph definitions (train and
eval mode) and flat ``{dotted path: array}`` dicts of parameters and batch
statistics; each step merges them back inside ``jax.jit`` (measured ~25%
faster per step than ``nnx.jit`` here). The train state is a plain dict::

    {"params": {path: array}, "batch_stats": {path: array},
     "opt_state": optax state, "step": int32, "rng": uint32[2] key data}

so it checkpoints with Orbax as is, and the step's PRNG key is
``fold_in(rng, step)``: resuming from a step reproduces every later draw.

Sharding: ``make_train_step(..., mesh=mesh)`` passes ``in_shardings`` /
``out_shardings`` to ``jax.jit``: the state replicated, every batch array
split along the mesh's first axis. With ``mesh=None`` jit places everything
on the default device. Batch shapes are fixed (the train loader drops the
remainder, eval pads with a mask), so each step compiles exactly once.

Precision: ``precision="bf16"`` (``train.precision``) casts a bfloat16 copy of
the parameters inside the step (gradients flow back to the float32 ones), the
augmented inputs to bfloat16 and the logits/features back to float32 before
the loss. Parameters, optimizer state and BatchNorm statistics stay float32.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from porting.rules import rules_for, torch_key
from train import mmd as mmd_lib
from train.augment import AugmentConfig, eval_transform, train_transform
from train.precision import get_policy

__all__ = ["ModelParts", "split_model", "merge_model", "init_state", "make_train_step",
           "make_eval_step", "head_path", "forward_with_head_input", "logits_and_aux",
           "TrainStep"]

TrainStep = Callable[[dict, dict], tuple[dict, dict]]


@dataclasses.dataclass(frozen=True, eq=False)
class ModelParts:
    """What the steps need to rebuild the model from flat arrays.

    Attributes:
        train_def: Graph definition in train mode.
        eval_def: Graph definition in eval mode.
        rest: Variables that are neither ``Param`` nor ``BatchStat`` (RNG state).
        param_paths: Dotted path -> path tuple of each parameter.
        stat_paths: Dotted path -> path tuple of each batch statistic.
        templates: Path tuple -> an empty ``Variable`` of the right type.
        model_class: The model class (its porting rules name the parameters).
        head: Dotted path of the classifier head module (the last Linear whose
            torch key matches the spec's head regex), or None.
    """

    train_def: Any
    eval_def: Any
    rest: Any
    param_paths: Mapping[str, tuple]
    stat_paths: Mapping[str, tuple]
    templates: Mapping[tuple, nnx.Variable]
    model_class: type
    head: str | None


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _flat(state) -> tuple[dict[str, jax.Array], dict[str, tuple], dict[tuple, nnx.Variable]]:
    arrays, paths, templates = {}, {}, {}
    for path, var in nnx.to_flat_state(state):
        key = _dotted(path)
        arrays[key] = var.get_value()
        paths[key] = tuple(path)
        templates[tuple(path)] = var
    return arrays, paths, templates


def head_path(model: nnx.Module, head_regex: str | None) -> str | None:
    """The module path of the classifier head.

    Args:
        model: The model.
        head_regex: Regex over torch keys (``ModelSpec.head``).

    Returns:
        Dotted module path (e.g. ``"fc"``), or None if nothing matches.
    """
    if not head_regex:
        return None
    rules = rules_for(model)
    pattern = re.compile(head_regex)
    found = None
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and path and path[-1] == "kernel":
            if pattern.search(torch_key(_dotted(path), rules)[0]):
                found = _dotted(path[:-1])
    return found


def split_model(model: nnx.Module, head_regex: str | None = None
                ) -> tuple[ModelParts, dict[str, jax.Array], dict[str, jax.Array]]:
    """Splits a model into ``ModelParts`` and flat parameter / statistic dicts.

    Args:
        model: The model (its train/eval mode is set here and left in eval).
        head_regex: ``ModelSpec.head``, to locate the head for MMD features.

    Returns:
        (parts, params, batch_stats).
    """
    head = head_path(model, head_regex)
    model.eval()
    eval_def, _, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.train()
    train_def, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    p_arrays, p_paths, p_tmpl = _flat(params)
    s_arrays, s_paths, s_tmpl = _flat(stats)
    parts = ModelParts(train_def, eval_def, rest, p_paths, s_paths, {**p_tmpl, **s_tmpl},
                       type(model), head)
    return parts, p_arrays, s_arrays


def _state(parts: ModelParts, flat: Mapping[str, jax.Array], paths: Mapping[str, tuple]):
    return nnx.from_flat_state(
        [(paths[k], parts.templates[paths[k]].replace(v)) for k, v in flat.items()])


def merge_model(parts: ModelParts, params: Mapping[str, jax.Array],
                batch_stats: Mapping[str, jax.Array], *, train: bool) -> nnx.Module:
    """Rebuilds the model from flat dicts (inside or outside jit).

    Args:
        parts: From ``split_model``.
        params: Flat parameters.
        batch_stats: Flat batch statistics.
        train: Train mode (batch statistics, dropout) or eval mode.

    Returns:
        The model.
    """
    graphdef = parts.train_def if train else parts.eval_def
    # copy: ``parts.rest`` holds the split's own Variables (dropout's RNG key and
    # count among them); merged as they are, a step's ``nnx.reseed`` under jit would
    # write a traced key into Variables created outside it (flax's TraceContextError).
    return nnx.merge(graphdef, _state(parts, params, parts.param_paths),
                     _state(parts, batch_stats, parts.stat_paths), parts.rest, copy=True)


def _flat_stats(model: nnx.Module) -> dict[str, jax.Array]:
    return {_dotted(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}


_CAPTURE_CLASSES: dict[type, type] = {}


def forward_with_head_input(model: nnx.Module, x: jax.Array, head: str) -> tuple[jax.Array, jax.Array]:
    """Runs the model and returns (logits, the input of its head module).

    The head's input is the penultimate feature vector of every classifier
    (for ResNet and LeNet5 it equals ``model.features(x)``), which works for
    models whose ``features`` attribute is a layer stack (AlexNet, VGG). The
    head instance's class is swapped for a subclass that records its input,
    for this call only.

    Args:
        model: The model.
        x: Input batch.
        head: Dotted path of the head module (``head_path``).

    Returns:
        (logits, features ``[N, D]``).
    """
    module = model
    for part in head.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    base = type(module)
    if base not in _CAPTURE_CLASSES:
        def __call__(self, inputs, *args, **kwargs):
            type(self).captured.append(inputs)
            return base.__call__(self, inputs, *args, **kwargs)
        _CAPTURE_CLASSES[base] = type(f"Capturing{base.__name__}", (base,),
                                      {"__call__": __call__, "captured": []})
    capture = _CAPTURE_CLASSES[base]
    capture.captured = []
    module.__class__ = capture
    try:
        logits = model(x)
    finally:
        module.__class__ = base
    if len(capture.captured) != 1:
        raise ValueError(f"head {head!r} was called {len(capture.captured)} times, expected once")
    features = capture.captured.pop()
    return logits, features.reshape(features.shape[0], -1)


def init_state(params: Mapping[str, jax.Array], batch_stats: Mapping[str, jax.Array],
               tx: optax.GradientTransformation, seed: int) -> dict:
    """The initial train state.

    Args:
        params: Flat parameters.
        batch_stats: Flat batch statistics.
        tx: The optimizer.
        seed: Seed of all training randomness (augmentation, dropout).

    Returns:
        The state dict (see the module docstring).
    """
    params = {k: jnp.asarray(v) for k, v in params.items()}
    return {
        "params": params,
        "batch_stats": {k: jnp.asarray(v) for k, v in batch_stats.items()},
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def logits_and_aux(out) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """A classifier's output as (logits, auxiliary logits).

    GoogLeNet and Inception v3 in train mode return a NamedTuple with the main
    logits first (``GoogLeNetOutputs``, ``InceptionOutputs``, torchvision's order);
    every other model returns its logits.
    """
    if isinstance(out, tuple):
        return out[0], tuple(out[1:])
    return out, ()


def _cross_entropy(logits, labels, num_classes, smoothing):
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _jit(fn, mesh, donate: bool, per_example_out: bool):
    kw = {"donate_argnums": (0,)} if donate else {}
    if mesh is None:
        return jax.jit(fn, **kw)
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())
    data = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
    out = (replicated, replicated) if not per_example_out else data
    return jax.jit(fn, in_shardings=(replicated, data), out_shardings=out, **kw)


def make_train_step(
    parts: ModelParts,
    tx: optax.GradientTransformation,
    *,
    augment: AugmentConfig,
    num_classes: int,
    frozen: frozenset[str] = frozenset(),
    frozen_stats: frozenset[str] = frozenset(),
    label_smoothing: float = 0.0,
    aux_weight: float = 0.4,
    mmd_weight: float = 0.0,
    mmd_multipliers: tuple[float, ...] = mmd_lib.DEFAULT_MULTIPLIERS,
    mesh: jax.sharding.Mesh | None = None,
    precision: str = "fp32",
) -> TrainStep:
    """Builds the jitted ``train_step(state, batch) -> (state, metrics)``.

    ``batch`` holds ``image`` (uint8 NHWC), ``label`` (int32), ``mask``
    (bool) and, with ``mmd_weight > 0``, ``target_image`` (unlabelled target
    domain, same batch size); ``extent`` / ``target_extent`` (int32 ``[B, 2]``)
    where images are padded (``train.data``'s ``"fit"`` storage) limit the random
    crops to each image. The augmentation runs inside the step. The
    state argument is donated. Frozen parameters and statistics are carried
    over unchanged (bit-identical), whatever the optimizer does.

    Args:
        parts: From ``split_model``.
        tx: The optimizer (``train.optim.make_optimizer``).
        augment: Train transform settings (static).
        num_classes: Classes of the task.
        frozen: Paths of frozen parameters.
        frozen_stats: Paths of batch statistics kept fixed.
        label_smoothing: Cross-entropy label smoothing.
        aux_weight: Weight of each auxiliary classifier's cross-entropy, for
            models whose train-mode output has them (``logits_and_aux``).
        mmd_weight: Lambda of the MMD^2 term on the head's input features.
        mmd_multipliers: Kernel bandwidth multipliers.
        mesh: Device mesh for data parallelism (batch on its first axis,
            state replicated); None for the default device.
        precision: ``"fp32"`` or ``"bf16"`` (see the module docstring).

    Returns:
        The jitted step. Its metrics are scalars: ``loss`` (total),
        ``ce``, ``mmd``, ``correct`` (count), ``count`` and ``grad_norm`` (before clipping).
    """
    policy = get_policy(precision)
    if mmd_weight and parts.head is None:
        raise ValueError("MMD needs the model's head module; the spec's head regex matched none")

    def step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        k_aug, k_target, k_dropout = jax.random.split(key, 3)
        x = train_transform(k_aug, batch["image"], augment, batch.get("extent"))
        n = x.shape[0]
        if mmd_weight:
            x = jnp.concatenate([x, train_transform(k_target, batch["target_image"], augment,
                                                    batch.get("target_extent"))])
        x = policy.cast_inputs(x)
        mask = batch["mask"].astype(jnp.float32)

        def loss_fn(params):
            model = merge_model(parts, policy.cast_param_tree(params), state["batch_stats"],
                                train=True)
            nnx.reseed(model, dropout=k_dropout, default=k_dropout)
            if mmd_weight:
                out, feats = policy.cast_output(forward_with_head_input(model, x, parts.head))
                mmd = mmd_lib.mmd2(feats[:n], feats[n:], multipliers=mmd_multipliers)
                out = jax.tree.map(lambda a: a[:n], out)
            else:
                out, mmd = policy.cast_output(model(x)), jnp.zeros((), jnp.float32)
            logits, aux = logits_and_aux(out)

            def masked_ce(z, smoothing=label_smoothing):
                ce = _cross_entropy(z, batch["label"], num_classes, smoothing)
                return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

            ce = masked_ce(logits)
            loss = ce + mmd_weight * mmd
            if aux_weight:
                loss = loss + aux_weight * sum(masked_ce(z) for z in aux)
            if label_smoothing:  # the logged ce is plain cross-entropy, as the eval loss
                ce = masked_ce(jax.lax.stop_gradient(logits), 0.0)
            return loss, (logits, _flat_stats(model), ce, mmd)

        (loss, (logits, new_stats, ce, mmd)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        # Carrying frozen entries over keeps them bit-identical (x + 0.0 would
        # turn -0.0 into 0.0) and makes frozen statistics ignore the batch.
        params = {k: state["params"][k] if k in frozen else v for k, v in new_params.items()}
        stats = {k: state["batch_stats"][k] if k in frozen_stats else v
                 for k, v in new_stats.items()}
        correct = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask)
        trainable = {k: g for k, g in grads.items() if k not in frozen}
        metrics = {
            "loss": loss, "ce": ce, "mmd": mmd, "correct": correct, "count": jnp.sum(mask),
            "grad_norm": optax.tree.norm(trainable) if trainable else jnp.zeros(()),
        }
        new_state = {"params": params, "batch_stats": stats, "opt_state": opt_state,
                     "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, metrics

    return _jit(step, mesh, donate=True, per_example_out=False)


def make_eval_step(
    parts: ModelParts,
    *,
    augment: AugmentConfig,
    num_classes: int,
    mesh: jax.sharding.Mesh | None = None,
    precision: str = "fp32",
) -> Callable[[dict, dict], dict]:
    """Builds the jitted ``eval_step(state, batch) -> per-example outputs``.

    Args:
        parts: From ``split_model``.
        augment: Eval transform settings (static).
        num_classes: Classes of the task.
        mesh: As in ``make_train_step``.
        precision: As in ``make_train_step``.

    Returns:
        The jitted step, returning ``loss`` (float32 ``[B]``), ``pred``
        (int32 top-1 class), ``top5`` (bool: label among the top-5) and
        ``logits``; padded examples are left to the caller's mask.
    """
    k = min(5, num_classes)
    policy = get_policy(precision)

    def step(state, batch):
        x = policy.cast_inputs(eval_transform(batch["image"], augment))
        model = merge_model(parts, policy.cast_param_tree(state["params"]), state["batch_stats"],
                            train=False)
        logits = policy.cast_output(model(x)).astype(jnp.float32)
        loss = _cross_entropy(logits, batch["label"], num_classes, 0.0)
        _, top = jax.lax.top_k(logits, k)
        return {"loss": loss, "pred": jnp.argmax(logits, -1).astype(jnp.int32),
                "top5": jnp.any(top == batch["label"][:, None], axis=-1), "logits": logits}

    return _jit(step, mesh, donate=False, per_example_out=True)
