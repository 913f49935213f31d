"""Fine-tune (or train from scratch) a jaxnets image classifier.

    python -m train.finetune --arch resnet18 --dataset digits --weights none
    python -m train.finetune --arch resnet50 --weights DEFAULT --dataset tfds:cifar10 \\
        --freeze '^(conv1|bn1|layer1)\\.' --lr-mult layer4=0.1

The run directory (``--output-dir``, default ``runs/ARCH-DATASET``) receives
``config.json`` (the resolved config), ``checkpoints/`` (Orbax), ``metrics.jsonl``,
TensorBoard events in ``tb/``, and at the end ``curves.png``,
``confusion.png``, ``predictions.npz`` and ``summary.json``. Rerunning the
same command resumes from the last checkpoint (same data position, RNG and
optimizer state, so it ends where an uninterrupted run ends).

Data parallel over every device (``--coordinator``/``--num-processes``/
``--process-id`` join several hosts into one job): the state is replicated,
each global batch is split over the devices, only process 0 prints and writes
logs, plots and summaries, and every process takes part in checkpoint saves.
``--precision bf16`` computes in bfloat16 with float32 parameters.

Exit status: 0 done; 2 bad input (one ``error: ...`` line on stderr, nothing
written before is touched); 1 non-finite loss (the last good checkpoint is
kept); 3 another process of a multi-process run lost; 74 a checkpoint that
cannot be written (full disk; the earlier ones kept); 130 interrupted by Ctrl-C
(after saving a checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from typing import Any

import numpy as np

from train.interrupt import EXIT_INTERRUPTED, Interrupt

log = logging.getLogger("train.finetune")

EXIT_BAD_INPUT = 2
EXIT_NAN = 1
EXIT_PEER_LOST = 3  # a process of a multi-process job failed or was lost
EXIT_WRITE = 74  # a checkpoint could not be written (sysexits' EX_IOERR)


class RunError(Exception):
    """A problem with the user's input; reported as one ``error:`` line, exit 2."""


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite."""


# --------------------------------------------------------------------------
# Building the pieces.


def _is_path(weights: str) -> bool:
    return (os.sep in weights or weights.startswith((".", "~"))
            or weights.endswith((".pth", ".pt", ".bin", ".safetensors")) or os.path.exists(weights))


def _load_state_dict(path: str, arch: str) -> tuple[dict[str, np.ndarray], list[str]]:
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise RunError(f"--weights {path}: no such file")
    from train import checkpoint as ckpt_lib

    if (os.path.isdir(path) and ckpt_lib.locate_run(path) is not None
            and not os.path.exists(os.path.join(path, "jaxnets.json"))):
        # Another run's model (its newest checkpoint), as a torch state_dict: the
        # head is then replaced like any checkpoint's when the class count differs.
        from porting.state_dict import to_torch_state_dict

        try:
            weights = ckpt_lib.read_run_weights(path)
            if weights.arch is not None and weights.arch != arch:
                raise RunError(f"--weights {path}: a run of {weights.arch}, not {arch}")
            # A bare checkpoints folder does not say its arch: --arch's.
            model = ckpt_lib.model_of(weights._replace(arch=arch))
        except ckpt_lib.CheckpointError as e:
            raise RunError(f"--weights {path}: {e}") from None
        except (ValueError, TypeError) as e:  # PortingError too: what it holds does not fit
            from jaxnets.cli import one_line

            raise RunError(f"--weights {path}: {one_line(e, 600)}") from None
        return to_torch_state_dict(model), [f"step {weights.step} of the run {path}"]
    if path.endswith(".safetensors") or os.path.isdir(path):
        from porting.safetensors_io import load_safetensors

        return load_safetensors(path), []
    from porting.pth import load_state_dict_file

    loaded = load_state_dict_file(path)
    return loaded.state_dict, loaded.notes


def load_checkpoint_into(model, spec, state_dict: dict[str, np.ndarray], what: str) -> str:
    """Loads a torch state_dict strictly, replacing the head if only it differs.

    Args:
        model: Freshly built model with the dataset's class count.
        spec: Its ``ModelSpec``.
        state_dict: torch key -> array.
        what: The checkpoint's name for messages.

    Returns:
        A one-line report of the load.

    Raises:
        RunError: The state_dict does not fit the architecture.
    """
    from jaxnets.cli import one_line
    from porting import PortingError, load_torch_state_dict

    try:
        return str(load_torch_state_dict(model, state_dict, strict=True))
    except PortingError as first:
        try:
            report = load_torch_state_dict(model, state_dict, strict=True, ignore=(spec.head,))
        except PortingError:
            # porting's message without its own "state_dict does not fit X:" lead, cut
            # between keys.
            detail = re.sub(r"^state_dict does not fit \w+:\s*", "", one_line(str(first), 10**9))
            raise RunError(f"{what} does not fit {spec.name}: {one_line(detail, 600)}") from None
        return f"{report} (head {spec.head!r} replaced: class count differs)"


def _pretrained(cfg, spec, num_classes: int):
    """(weights metadata, model builder) for a named torchvision weights entry."""
    try:
        from porting import pretrained, weights as weights_lib
    except ImportError as e:
        raise RunError(f"--weights {cfg.weights}: pretrained weights need porting.pretrained "
                       f"({e}); use --weights none or a PATH") from None
    try:
        meta = weights_lib.get_weights(cfg.weights if "." in cfg.weights
                                       else f"{spec.name}.{cfg.weights}")
    except Exception as e:  # noqa: BLE001 -- any lookup failure is the user's spec.
        raise RunError(f"--weights {cfg.weights} for {spec.name}: {str(e).splitlines()[0]}") from None

    def build(overrides):
        try:
            model, report = pretrained.load_torchvision(
                spec.name, cfg.weights, num_classes=num_classes, seed=cfg.seed,
                progress=cfg.progress, **overrides)
        except Exception as e:  # noqa: BLE001 -- missing file, no network, bad checkpoint.
            raise RunError(f"--weights {cfg.weights}: {str(e).splitlines()[0]}") from None
        return model, str(report)

    return meta, build


def _model_overrides(cfg, spec) -> dict:
    """The constructor options of the run's model (``--model-arg``, a vector model's
    input width)."""
    overrides = dict(cfg.model_args)
    if spec.kind == "vector":
        overrides.setdefault("in_features", cfg.image_size ** 2 * spec.in_channels)
    return overrides


def _create_model(cfg, num_classes: int, overrides: dict):
    import jaxnets

    try:
        return jaxnets.create_model(cfg.arch, num_classes=num_classes, seed=cfg.seed,
                                    **overrides)
    except (TypeError, ValueError) as e:  # an unknown option, or a value out of range
        raise RunError(f"--model-arg: {e}") from None


def check_input_size(cfg, spec, num_classes: int, weights_meta=None) -> None:
    """Fails fast when the model cannot take ``--image-size`` images.

    Traced on a model built without values (``nnx.eval_shape``), in eval mode and, for
    a training run, in train mode (Inception v3's auxiliary classifier needs larger
    inputs): before any weights are read, downloaded or initialised.

    Args:
        cfg: Resolved config.
        spec: The model's spec.
        num_classes: The dataset's class count.
        weights_meta: Named pretrained weights' metadata: the model is built with their
            constructor options too, as ``porting.pretrained.load_torchvision`` builds it.

    Raises:
        RunError: Naming the size and the model's own error.
    """
    import jax
    from flax import nnx

    overrides = {**getattr(weights_meta, "model_overrides", {}), **_model_overrides(cfg, spec)}
    graphdef, state = nnx.split(nnx.eval_shape(lambda: _create_model(cfg, num_classes,
                                                                     overrides)))

    def forward(state, x, train):
        model = nnx.merge(graphdef, state)
        model.train() if train else model.eval()
        return model(x)

    for train in (False,) if cfg.eval_only else (False, True):
        # Training's own batch: a train-mode BatchNorm needs more than one value per
        # channel (a batch of 1 where the last maps are 1x1).
        batch = cfg.batch_size if train else 2
        x = jax.ShapeDtypeStruct((batch, cfg.image_size, cfg.image_size, spec.in_channels),
                                 np.float32)
        try:
            jax.eval_shape(functools.partial(forward, train=train), state, x)
        except Exception as e:  # noqa: BLE001 -- shape errors surface as several types.
            if "value per channel" in str(e):
                raise RunError(f"--batch-size {cfg.batch_size} at --image-size {cfg.image_size} "
                               f"leaves one value per channel in a train-mode BatchNorm of "
                               f"{cfg.arch} (torch refuses it too): use --batch-size 2 or more "
                               "or a larger --image-size") from None
            raise RunError(f"{cfg.arch} cannot take --image-size {cfg.image_size}"
                           f"{' in training' if train else ''}: "
                           f"{str(e).splitlines()[0][:300]}") from None


def build_model(cfg, spec, num_classes: int, build_pretrained=None):
    """Creates the model as ``--weights`` says.

    Args:
        cfg: Resolved config.
        spec: The model's spec.
        num_classes: The dataset's class count.
        build_pretrained: From ``_pretrained`` for named weights.

    Returns:
        (model, one-line load report).
    """
    overrides = _model_overrides(cfg, spec)
    if build_pretrained is not None:
        return build_pretrained(overrides)
    model = _create_model(cfg, num_classes, overrides)
    if cfg.weights.lower() == "none":
        return model, "random init (--weights none)"
    state_dict, notes = _load_state_dict(cfg.weights, spec.name)
    report = load_checkpoint_into(model, spec, state_dict, cfg.weights)
    return model, "; ".join([report] + notes)


def augment_config(cfg, spec, train: bool):
    """The ``AugmentConfig`` of a resolved config."""
    from train.augment import AugmentConfig

    brightness, contrast, saturation, hue = cfg.color_jitter or (0.0,) * 4
    return AugmentConfig(
        crop_size=cfg.image_size,
        resize_size=cfg.resize_size,
        scale=(cfg.crop_scale_min, 1.0),
        flip_prob=cfg.hflip,
        brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        channels=spec.in_channels,
        interpolation=cfg.interpolation,
    )


# --------------------------------------------------------------------------
# Evaluation.


def evaluate(eval_step, state, source, batch_size: int, num_workers: int, desc: str = "eval",
             progress: bool = True, mesh=None) -> dict[str, Any]:
    """Runs the eval step over a whole split.

    With several processes each one loads its slice of every global batch; the
    outputs (sharded over all processes' devices) and the slices' labels,
    masks and indices are gathered on every host in process order, so every
    process returns the metrics of the whole split.

    Args:
        eval_step: From ``train.steps.make_eval_step``.
        state: Train state.
        source: The split's ``Source``.
        batch_size: Eval batch (the last batch is padded and masked).
        num_workers: Decoding threads.
        desc: Progress bar label.
        progress: Show the bar (process 0 only).
        mesh: The mesh the eval step was built for (batches are assembled
            with ``train.distributed.global_batch``); None for the default device.

    Returns:
        ``top1``, ``top5``, ``loss`` (means), ``count``, and per-example
        ``labels``, ``preds``, ``top5_hit``, ``losses``, ``indices``, ``logits``.
    """
    import jax

    from train import distributed
    from train.data import Loader

    multi = jax.process_count() > 1
    if multi:
        from jax.experimental import multihost_utils
    loader = Loader(source, batch_size, shuffle=False, drop_remainder=False, num_epochs=1,
                    process_index=jax.process_index(), process_count=jax.process_count(),
                    num_workers=num_workers)
    out = {k: [] for k in ("labels", "preds", "top5_hit", "losses", "indices", "logits")}
    with distributed.progress(total=loader.steps_per_epoch, desc=desc, leave=False,
                              disable=not (progress and distributed.is_main_process())) as bar:
        for batch in loader:
            inputs = {k: batch[k] for k in ("image", "label", "mask")}
            if mesh is not None:
                inputs = distributed.global_batch(inputs, mesh)
            res = eval_step(state, inputs)
            if multi:
                # Each host holds only its devices' rows: gather all of them,
                # and the other hosts' labels/masks/indices in the same order.
                res = multihost_utils.process_allgather(res, tiled=True)
                batch = multihost_utils.process_allgather(
                    {k: batch[k] for k in ("label", "mask", "index")}, tiled=True)
            else:
                res = jax.device_get(res)
            m = np.asarray(batch["mask"])
            out["labels"].append(np.asarray(batch["label"])[m])
            out["preds"].append(np.asarray(res["pred"])[m])
            out["top5_hit"].append(np.asarray(res["top5"])[m])
            out["losses"].append(np.asarray(res["loss"])[m])
            out["indices"].append(np.asarray(batch["index"])[m])
            out["logits"].append(np.asarray(res["logits"])[m])
            bar.update(1)
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    n = max(len(arrays["labels"]), 1)
    return {
        "top1": float(np.sum(arrays["preds"] == arrays["labels"]) / n),
        "top5": float(np.sum(arrays["top5_hit"]) / n),
        "loss": float(np.mean(arrays["losses"])) if len(arrays["losses"]) else float("nan"),
        "count": int(len(arrays["labels"])),
        **arrays,
    }


def _read_split(path: str) -> dict | None:
    """A run's ``split.json``, or None where it has none (or an unreadable one)."""
    try:
        with open(path) as f:
            then = json.load(f)
    except (OSError, ValueError):
        return None
    return then if isinstance(then, dict) and {"train", "val"} <= set(then) else None


def _skipped(cfg, train_src, val_src, target_loader) -> list[str] | None:
    """With --skip-bad, the image files this process could not decode (noted on stderr)."""
    if not cfg.skip_bad:
        return None
    sources = [train_src, val_src] + ([target_loader.source] if target_loader else [])
    files = sorted(set().union(*(getattr(s, "bad_files", set()) for s in sources)))
    if files:
        print(f"note: --skip-bad skipped {len(files)} image file(s) that cannot be decoded "
              f"(listed in summary.json): {files[0]}" + (" ..." if len(files) > 1 else ""),
              file=sys.stderr)
    return files


def _finish(run_dir: str, result: dict, source, metrics_log, step: int, seconds: float,
            skipped: list[str] | None = None, run_seconds: float | None = None) -> str:
    from train import config as config_lib
    from train import metrics as metrics_lib

    cm = metrics_lib.confusion_matrix(result["labels"], result["preds"], source.num_classes)
    metrics_lib.plot_confusion(cm, source.class_names, os.path.join(run_dir, "confusion.png"))
    if metrics_log is not None:
        metrics_lib.plot_curves(metrics_log.records(), os.path.join(run_dir, "curves.png"))
    np.savez(os.path.join(run_dir, "predictions.npz"), index=result["indices"],
             label=result["labels"], pred=result["preds"], logits=result["logits"])
    summary = {"step": step, "val_top1": result["top1"], "val_top5": result["top5"],
               "val_loss": result["loss"], "val_count": result["count"],
               "seconds": round(seconds, 1)}
    if run_seconds is not None:  # a resumed run: its earlier invocations too (to their
        summary["run_seconds"] = round(run_seconds, 1)  # last checkpoints)
    if skipped is not None:  # --skip-bad: the files this process could not decode
        summary["skipped_files"] = skipped
    config_lib.write_json(os.path.join(run_dir, "summary.json"), summary)
    return (f"val top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
            f"loss {result['loss']:.4f}  ({result['count']} images, step {step}, "
            f"{seconds:.0f}s)  -> {run_dir}")


# --------------------------------------------------------------------------
# The run.


def _check_identity(run_dir: str, cfg, given=None, auto_features=None
                    ) -> tuple[bool, list[str]]:
    """Refuses to resume (or, with ``--eval-only``, to evaluate) a run directory made
    by a different run. Returns whether the directory holds a run to keep, and the
    other flags that differ from its config (``lr 0.1 -> 0.05``; ``(auto)`` marks a
    value worked out anew, not given: ``given`` is the config before resolving;
    ``auto_features``: the tfds features a run that recorded none read)."""
    from train import config as config_lib

    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        if config_lib.holds_files(run_dir):
            raise RunError(f"--output-dir {run_dir} holds other files and no run (no "
                           "config.json); pass a new or empty folder")
        return False, []
    saved = config_lib.load(path)
    if "arch" not in saved:
        other = "a train.seq2seq run" if "task" in saved else "another program's config.json"
        raise RunError(f"--output-dir {run_dir} holds {other}, not a train.finetune run; "
                       "pass another folder")
    if not _has_steps(run_dir) and not {"metrics.jsonl", "tb"} & set(os.listdir(run_dir)):
        # An evaluation, or a run stopped by bad input before its first step: nothing to
        # resume and no training record to keep, so no flags to hold a new run to. (A run
        # killed before its first checkpoint keeps its metrics: it is still refused.)
        return False, []
    for k, v in (auto_features or {}).items():  # runs from before the feature flags
        if saved.get(k) is None and saved.get("dataset") == cfg.dataset:
            saved[k] = v
    if saved.get("val_fraction") is None and "dataset" in saved:  # runs before it was resolved
        from train.data import default_val_fraction

        saved["val_fraction"] = default_val_fraction(saved["dataset"])
    current = json.loads(cfg.to_json())
    fields = config_lib.EVAL_IDENTITY_FIELDS if cfg.eval_only else config_lib.IDENTITY_FIELDS
    if saved.get("optimizer") == current["optimizer"] == "adamw":  # SGD's flags, unused
        fields = [f for f in fields if f not in ("momentum", "nesterov")]
    if saved.get("nesterov") and saved.get("momentum") == 0:  # plain SGD, accepted before
        saved["nesterov"] = False
    diff = [f"{k}: {saved.get(k)!r} there, {current[k]!r} now"
            for k in fields if _same_value(k, saved.get(k)) != _same_value(k, current[k])]
    decay = saved.get("weight_decay"), current["weight_decay"]
    if (not cfg.eval_only and current["optimizer"] == "sgd" and decay[0] is not None
            and (decay[0] == 0) != (decay[1] == 0)):
        # A rate may change on resume, but SGD's decay on or off shapes its state.
        diff.append(f"weight_decay: {decay[0]!r} there, {decay[1]!r} now")
    if diff:
        raise RunError(f"{run_dir} holds a different run ({'; '.join(diff)}); pass another "
                       "--output-dir")
    skip = (*config_lib.IDENTITY_FIELDS, *config_lib.RUNTIME_FIELDS)
    changed = [f"{k.replace('_', '-')} {_flag_value(saved.get(k))} -> {_flag_value(v)}"
               + (" (auto)" if given is not None and getattr(given, k, 0) is None else "")
               for k, v in current.items() if k not in skip and k in saved and saved[k] != v
               # --steps given: --epochs is not used, whatever its value
               and not (k == "epochs" and given is not None and given.steps is not None)]
    return True, changed


# What an evaluation takes from the run unless the command line gives it.
_EVAL_PREPROCESSING = ("mean", "std", "resize_size", "interpolation")


def _run_preprocessing(run_dir: str, given, cfg):
    """``--eval-only`` on a run: the run's own eval preprocessing for the flags the
    command line leaves unset; returns (config, notes on those it sets otherwise)."""
    from train import config as config_lib

    saved = config_lib.load(os.path.join(run_dir, "config.json"))
    taken, changed = {}, []
    for field in _EVAL_PREPROCESSING:
        if saved.get(field) is None:
            continue
        value = tuple(saved[field]) if isinstance(saved[field], list) else saved[field]
        if getattr(given, field) is None:
            taken[field] = value
        elif getattr(cfg, field) != value:
            changed.append(f"{field.replace('_', '-')} {_flag_value(saved[field])} -> "
                           f"{_flag_value(getattr(cfg, field))}")
    return dataclasses.replace(cfg, **taken), changed


def _flag_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(_flag_value, value)) or "(none)"
    return "(default)" if value is None else str(value)


def _same_value(field: str, value):
    """A config value in the form two runs are compared in: ``--model-arg`` in any
    order, a ``--weights`` path however it was spelled."""
    if field == "model_args" and value:
        return sorted((k, repr(v)) for k, v in value)
    if field == "clip_grad_norm" and not value:  # 0 (accepted before it was refused): off
        return None
    if field == "weights" and isinstance(value, str) and _is_path(value):
        return os.path.realpath(os.path.expanduser(value))
    return value


def _has_steps(run_dir: str) -> bool:
    """Whether a run directory holds a step checkpoint (readable or not)."""
    checkpoints = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(checkpoints) and any(
        n.isdigit() and os.path.isdir(os.path.join(checkpoints, n, "state"))
        for n in os.listdir(checkpoints))


def _restore_weights(run_dir: str, state: dict) -> int | None:
    """``--eval-only`` on a run: its newest readable checkpoint's parameters and
    BatchNorm statistics into ``state`` (the optimizer state is not read, so the
    training flags need not match). Returns the step, or None without checkpoints."""
    import jax.numpy as jnp

    from train import checkpoint as ckpt_lib

    if not _has_steps(run_dir):
        return None
    try:
        weights = ckpt_lib.read_run_weights(run_dir, fall_back=True)
    except ckpt_lib.CheckpointError as e:
        raise RunError(str(e)) from None
    for part in ("params", "batch_stats"):
        wrong = [k for k, v in state[part].items()
                 if k not in weights.arrays or weights.arrays[k].shape != v.shape]
        if wrong:
            raise RunError(f"step {weights.step} of {run_dir} does not fit this model "
                           f"({len(wrong)} of its {part} missing or of other shapes: "
                           f"{', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''})")
        state[part] = {k: jnp.asarray(weights.arrays[k], v.dtype) for k, v in state[part].items()}
    return weights.step


def run(cfg) -> int:
    """Runs training and/or evaluation for a parsed config.

    Args:
        cfg: From ``train.config.parse_args``.

    Returns:
        The exit status.

    Raises:
        RunError: Bad input, reported by ``main``.
    """
    import jax

    import jaxnets
    from jaxnets import compile_cache
    from train import checkpoint as ckpt_lib
    from train import config as config_lib
    from train import distributed
    from train import optim, steps as steps_lib
    from train.data import (DataError, Loader, TfdsSource, load_dataset, set_host_transforms,
                            split_fingerprint)
    from train.metrics import MetricsLog

    started = time.time()
    try:  # before the first compilation
        compile_cache.enable(cfg.compile_cache)
    except compile_cache.CompileCacheError as e:
        raise RunError(f"--compile-cache: {e}") from None
    # Joining the job must come before anything touches a device.
    try:
        distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)
    except ValueError as e:
        raise RunError(f"--coordinator: {e}") from None
    mesh = distributed.make_mesh()
    main = distributed.is_main_process()
    if cfg.batch_size % mesh.size:
        raise RunError(f"--batch-size {cfg.batch_size} must be divisible by the {mesh.size} "
                       "devices of the run (each takes an equal share)")
    spec = jaxnets.get_spec(cfg.arch)
    if spec.kind not in ("image", "vector"):
        raise RunError(f"--arch {cfg.arch} is a {spec.kind} model; finetune trains image "
                       "classifiers")
    pcount, pindex = jax.process_count(), jax.process_index()
    load = dict(data_dir=cfg.data_dir, seed=cfg.seed, val_fraction=cfg.val_fraction,
                skip_bad=cfg.skip_bad)
    features = dict(image_feature=cfg.image_feature, label_feature=cfg.label_feature)
    train_src = load_dataset(cfg.dataset, split="train", **load, **features)
    val_src = load_dataset(cfg.dataset, split="val", **load, **features)
    if not len(val_src):
        raise RunError(f"--dataset {cfg.dataset}: its validation split {val_src.name} holds no "
                       "images (a class of one image keeps it for training); give more "
                       "images, a val/ folder or a larger --val-fraction")
    auto_features = {}
    if isinstance(train_src, TfdsSource):  # the run records the features it reads
        cfg = dataclasses.replace(cfg, image_feature=train_src.image_key,
                                  label_feature=train_src.label_key)
        auto_features = dict(zip(("image_feature", "label_feature"), train_src.auto_keys))
    num_classes = train_src.num_classes
    if num_classes < 2:
        raise RunError(f"--dataset {cfg.dataset} has {num_classes} class; a classifier needs "
                       "at least 2")
    native = int(np.asarray(train_src[0][0]).shape[0])

    weights_meta, build_pretrained = None, None
    if cfg.weights.lower() != "none" and not _is_path(cfg.weights):
        weights_meta, build_pretrained = _pretrained(cfg, spec, num_classes)
    train_loader = Loader(train_src, cfg.batch_size, shuffle=True, seed=cfg.seed,
                          drop_remainder=True, process_index=pindex, process_count=pcount,
                          num_workers=cfg.num_workers)
    given = cfg
    cfg = config_lib.resolve(cfg, spec=spec, native_size=native,
                             transforms=getattr(weights_meta, "transforms", weights_meta),
                             steps_per_epoch=train_loader.steps_per_epoch)
    if cfg.steps == 0:  # --epochs 0 / --steps 0: an evaluation, as --eval-only
        cfg = dataclasses.replace(cfg, eval_only=True)
    if cfg.eval_batch_size % mesh.size:
        raise RunError(f"--eval-batch-size {cfg.eval_batch_size} must be divisible by the "
                       f"{mesh.size} devices of the run")
    run_dir = cfg.output_dir
    config_lib.check_output_dir(run_dir, "--output-dir")  # before any compiling
    is_run, changed = _check_identity(run_dir, cfg, given, auto_features)
    if cfg.eval_only and is_run:
        cfg, changed = _run_preprocessing(run_dir, given, cfg)
        if changed:  # given on the command line: used, but not silently
            distributed.print0("note: evaluating with other preprocessing than the run's: "
                               + "; ".join(changed), file=sys.stderr)
    for note in config_lib.doubtful(cfg):
        if not (cfg.eval_only and note.startswith("--warmup")):
            distributed.print0(f"note: {note}", file=sys.stderr)

    check_input_size(cfg, spec, num_classes, weights_meta)
    if is_run and _has_steps(run_dir):
        # Its checkpoint replaces every value: the weights need not be read, nor exist.
        model = _create_model(cfg, num_classes, {**getattr(weights_meta, "model_overrides", {}),
                                                 **_model_overrides(cfg, spec)})
        load_report = "checkpoint of this run"
    else:
        model, load_report = build_model(cfg, spec, num_classes, build_pretrained)
    parts, params, stats = steps_lib.split_model(model, spec.head)
    del model
    try:
        # An evaluation trains nothing: its --freeze and --lr-mult are not checked.
        groups = optim.param_groups(list(params), list(stats), model_or_class=parts.model_class,
                                    freeze=() if cfg.eval_only else cfg.freeze,
                                    lr_mult=() if cfg.eval_only else cfg.lr_mult,
                                    freeze_bn_stats=cfg.freeze_bn_stats)
    except ValueError as e:
        raise RunError(str(e)) from None
    if len(groups.frozen) == len(groups.labels) and not (cfg.eval_only or cfg.steps == 0):
        raise RunError(f"--freeze {' '.join(cfg.freeze)} freezes every parameter of "
                       f"{cfg.arch}: nothing would train")
    # The base rate of each step (before --lr-mult), for the logs.
    schedule = optim.make_schedule(cfg.lr, max(cfg.steps, 1), cfg.warmup_steps, cfg.schedule)
    tx = optim.make_optimizer(params, groups, name=cfg.optimizer, lr=cfg.lr,
                              total_steps=max(cfg.steps, 1), warmup_steps=cfg.warmup_steps,
                              schedule=cfg.schedule, momentum=cfg.momentum,
                              nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                              clip_norm=cfg.clip_grad_norm)
    state = steps_lib.init_state(params, stats, tx, cfg.seed)
    del params, stats

    # The target domain's data is checked before anything is written in the run folder.
    mmd = bool(cfg.target_dataset) and cfg.mmd_weight > 0
    target_loader = None
    if mmd and not (cfg.eval_only or cfg.steps == 0):
        target_src = load_dataset(cfg.target_dataset, split="train", **load)
        target_loader = Loader(target_src, cfg.batch_size, shuffle=True, seed=cfg.seed + 1,
                               drop_remainder=True, process_index=pindex, process_count=pcount,
                               num_workers=cfg.num_workers)
    # Images of varying size are shaped on the host: evaluation ones as torchvision would.
    eval_prepared = set_host_transforms(
        train_src, val_src, crop_size=cfg.image_size, resize_size=cfg.resize_size,
        interpolation=cfg.interpolation, extra=[target_loader.source] if target_loader else [])

    os.makedirs(run_dir, exist_ok=True)
    if cfg.eval_only:  # the parameters and statistics alone: any training flags will do
        checkpointer, restored_meta = None, {}
        start_step = _restore_weights(run_dir, state)
        restored = start_step is not None
        start_step = start_step or 0
    else:
        checkpointer = ckpt_lib.Checkpointer(os.path.join(run_dir, "checkpoints"), keep=cfg.keep)
        try:
            restored = checkpointer.restore(state)
        except ckpt_lib.CheckpointError as e:
            checkpointer.close()  # else Orbax's threads fail at exit, after the error line
            if isinstance(e, ckpt_lib.CheckpointStructureError):
                raise RunError(f"{e}: its optimizer setup differs (--optimizer, --momentum, "
                               "--nesterov, --clip-grad-norm, --freeze, --lr-mult, "
                               "--weight-decay); rerun with the run's own flags or pass "
                               "another --output-dir") from None
            raise RunError(str(e)) from None
        start_step, seconds_before, restored_meta = 0, 0.0, {}
        if restored is not None:
            start_step, state, restored_meta = restored
            seconds_before = float(restored_meta.get("seconds", 0.0))
            distributed.print0(f"resuming {run_dir} from step {start_step}", file=sys.stderr)
            if changed:  # allowed (a longer run, a lower rate), but not silently
                distributed.print0("note: flags changed since the run last started: "
                                   + "; ".join(changed), file=sys.stderr)
    state = distributed.replicate(state, mesh)
    split_path, split = os.path.join(run_dir, "split.json"), split_fingerprint(train_src, val_src)
    then = _read_split(split_path) if is_run else None
    if then is not None:
        same_val = (then["val"], then.get("val_digest")) == (split["val"], split["val_digest"])
        if same_val and then["train"] != split["train"]:
            distributed.print0(
                f"note: the dataset has {split['train']} training images, {then['train']} "
                "when this run started; its validation images are the same", file=sys.stderr)
        elif not same_val:
            distributed.print0(
                f"note: the dataset's split is not the one this run started with ({then['train']} "
                f"train / {then['val']} val images then, {split['train']} / {split['val']} now"
                + ("" if then["val"] != split["val"] else ", other validation images")
                + "): validation images may have been trained on", file=sys.stderr)
    if main and not (cfg.eval_only and is_run):  # an evaluation keeps the run's config
        config_lib.save(cfg, os.path.join(run_dir, "config.json"))
        if not is_run:  # the split a new run starts with (a run from before has none)
            config_lib.write_json(split_path, split)
        # What builds this model again (python -m porting export RUN_DIR).
        ckpt_lib.write_model_info(run_dir, cfg.arch, num_classes, {
            **getattr(weights_meta, "model_overrides", {}), **_model_overrides(cfg, spec)},
            classes=train_src.class_names)
    if restored:
        load_report = f"step {start_step} of this run"
    elif cfg.eval_only and cfg.weights.lower() == "none":
        load_report = "random init (--weights none, no checkpoint here): evaluating untrained"
    distributed.print0(f"{cfg.arch}: {load_report}; {groups.summary()}; {len(train_src)} train / "
          f"{len(val_src)} val images, {num_classes} classes, {cfg.image_size}px, {cfg.precision}, {mesh.size} device(s) in "
        f"{pcount} process(es)", file=sys.stderr)

    aug = augment_config(cfg, spec, train=True)
    eval_aug = dataclasses.replace(aug, eval_prepared=eval_prepared)
    eval_step = steps_lib.make_eval_step(parts, augment=eval_aug, num_classes=num_classes,
                                         mesh=mesh, precision=cfg.precision)
    eval_bs = cfg.eval_batch_size

    if cfg.eval_only or cfg.steps == 0:
        result = evaluate(eval_step, state, val_src, eval_bs, cfg.num_workers,
                          progress=cfg.progress, mesh=mesh)
        if main:
            print(_finish(run_dir, result, val_src, None, start_step, time.time() - started,
                          _skipped(cfg, train_src, val_src, target_loader)))
        if checkpointer is not None:
            checkpointer.close()
        return 0

    if target_loader is not None:
        target_loader.start_step = start_step
    train_step = steps_lib.make_train_step(
        parts, tx, augment=aug, num_classes=num_classes, frozen=groups.frozen,
        frozen_stats=groups.frozen_stats, label_smoothing=cfg.label_smoothing,
        aux_weight=cfg.aux_weight,
        mmd_weight=cfg.mmd_weight if mmd else 0.0, mesh=mesh, precision=cfg.precision)

    # Only process 0 writes metrics, plots and summaries; all save checkpoints.
    metrics_log = MetricsLog(run_dir, resume_step=start_step if restored else None) if main else None
    spe = train_loader.steps_per_epoch
    train_loader.start_step = start_step
    total = cfg.steps
    meta = lambda step: {"step": step, "epoch": step // spe, "arch": cfg.arch,  # noqa: E731
                         "dataset": cfg.dataset,
                         # wall time of the run so far, earlier invocations included
                         "seconds": round(seconds_before + time.time() - started, 1)}
    last_saved = start_step if restored else None
    status, last_eval = 0, None
    window = {"loss": 0.0, "ce": 0.0, "correct": 0.0, "count": 0.0, "n": 0}
    t_window, images_window = time.time(), 0
    step = start_step
    it = iter(train_loader)
    target_it = iter(target_loader) if target_loader is not None else None
    bar = distributed.progress(total=total, initial=start_step, desc=f"{cfg.arch} train",
                               disable=not (cfg.progress and main))
    say = bar.write if main else (lambda *a, **k: None)

    def epoch_evaluated(step, res):
        if metrics_log is not None:
            metrics_log.log("val", step, loss=res["loss"], top1=res["top1"],
                            top5=res["top5"], epoch=math.ceil(step / spe))
        say(f"epoch {math.ceil(step / spe)} step {step}: val top-1 "
            f"{100 * res['top1']:.2f}% top-5 {100 * res['top5']:.2f}% loss {res['loss']:.4f}")

    try:
        with Interrupt() as interrupt:
            if (restored_meta.get("evaluated") is False and pcount == 1 and main
                    and not any(r.get("split") == "val" and r.get("step") == step
                                for r in metrics_log.records())):
                # An epoch end whose evaluation failed (an unreadable image) after its
                # checkpoint was written: evaluated now, before training goes on, once
                # (its row stays in metrics.jsonl); the checkpoint stays without the
                # result, so it is no candidate for the best.
                last_eval = (step, evaluate(eval_step, state, val_src, eval_bs,
                                            cfg.num_workers, progress=cfg.progress, mesh=mesh))
                epoch_evaluated(*last_eval)
            while step < total:
                batch = next(it)
                batch = {k: batch[k] for k in ("image", "label", "mask", "extent") if k in batch}
                if target_it is not None:
                    target = next(target_it)
                    batch["target_image"] = target["image"]
                    if "extent" in target:
                        batch["target_extent"] = target["extent"]
                local_images = len(batch["label"])
                batch = distributed.global_batch(batch, mesh)
                if cfg.debug_nan_at_step is not None and step + 1 == cfg.debug_nan_at_step:
                    state = _poison(state)
                state, m = train_step(state, batch)
                loss = float(m["loss"])
                if not math.isfinite(loss):
                    raise NonFiniteLoss(f"loss is {loss} at step {step + 1}")
                step += 1
                window["loss"] += loss
                window["ce"] += float(m["ce"])
                window["correct"] += float(m["correct"])
                window["count"] += float(m["count"])
                window["n"] += 1
                images_window += local_images * pcount
                if step % cfg.log_every == 0 or step == total:
                    speed = images_window / max(time.time() - t_window, 1e-9)
                    row = {"loss": window["loss"] / window["n"],
                           "ce": window["ce"] / window["n"], "lr": float(schedule(step - 1)),
                           "top1": window["correct"] / max(window["count"], 1),
                           "images_per_s": speed, "mmd": float(m["mmd"]),
                           "grad_norm": float(m["grad_norm"])}
                    if metrics_log is not None:
                        metrics_log.log("train", step, **row)
                    # Drawn by the update below: a redraw of its own would be a line per
                    # --log-every steps in a log (jaxnets.cli.progress_bar).
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{100 * row['top1']:.1f}%",
                                    img_s=f"{speed:.0f}", refresh=False)
                    window = {"loss": 0.0, "ce": 0.0, "correct": 0.0, "count": 0.0, "n": 0}
                    t_window, images_window = time.time(), 0
                bar.update(1)
                epoch_end = step % spe == 0 or step == total
                if epoch_end:
                    bar.refresh()  # the epoch's last loss, shown through its evaluation
                    try:
                        res = evaluate(eval_step, state, val_src, eval_bs, cfg.num_workers,
                                       progress=cfg.progress, mesh=mesh)
                    except DataError:  # an unreadable val image: the epoch's training is kept
                        if pcount == 1:  # (a save is collective: the others are elsewhere)
                            # marked, for the rerun to evaluate the epoch first
                            checkpointer.save(step, state, {**meta(step), "evaluated": False})
                        raise
                    epoch_evaluated(step, res)
                    checkpointer.save(step, state, meta(step), val_top1=res["top1"])
                    last_eval = (step, res)
                    last_saved = step
                    t_window, images_window = time.time(), 0
                elif cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpointer.save(step, state, meta(step))
                    last_saved = step
                if interrupt.requested:
                    checkpointer.save(step, state, meta(step))
                    say(f"interrupted: checkpoint saved at step {step} in {run_dir}; "
                              "rerun the same command to resume")
                    status = EXIT_INTERRUPTED
                    break
    except NonFiniteLoss as e:
        bar.close()
        where = (f"the last good checkpoint (step {last_saved}) is kept"
                 if last_saved is not None else "no checkpoint was written")
        distributed.print0(f"error: {e}; stopping ({where} in {run_dir}). Rerun with a lower "
                           "--lr to resume from it, or start again in another --output-dir "
                           "with --clip-grad-norm.", file=sys.stderr)
        if metrics_log is not None:
            metrics_log.close()
        checkpointer.close()
        return EXIT_NAN
    finally:
        bar.close()
        it.close()
        if target_it is not None:
            target_it.close()
    if status == 0:
        result = last_eval if last_eval is not None and last_eval[0] == step else None
        result = result[1] if result else evaluate(
            eval_step, state, val_src, eval_bs, cfg.num_workers, progress=cfg.progress, mesh=mesh)
        if main:
            print(_finish(run_dir, result, val_src, metrics_log, step, time.time() - started,
                          _skipped(cfg, train_src, val_src, target_loader),
                          run_seconds=(seconds_before + time.time() - started
                                       if restored else None)))
    if metrics_log is not None:
        metrics_log.close()
    checkpointer.close()
    return status


def _poison(state):
    """Debug hook (--debug-nan-at-step): makes one parameter NaN."""
    import jax.numpy as jnp

    params = dict(state["params"])
    key = next(iter(params))
    params[key] = params[key] * jnp.nan
    return {**state, "params": params}


def main(argv: list[str] | None = None) -> int:
    """The CLI entry point.

    Args:
        argv: Arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit status.
    """
    from jaxnets.xla_cpu import prepare_cpu

    prepare_cpu()  # before jax starts: jaxnets/hostmem.py, jaxnets/xla_cpu.py
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
    from train import config as config_lib

    cfg = config_lib.parse_args(argv)
    user_errors = _user_errors()
    import jax

    from jaxnets.cli import one_line
    from train.checkpoint import CheckpointWriteError

    try:
        status = run(cfg)
    except CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_WRITE
    except user_errors as e:
        message = " ".join(str(e).split("\n")[0:1]) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 -- a lost peer surfaces as any of several kinds
        if jax.process_count() == 1 or not _peer_lost(e):
            raise
        # A collective with a dead peer fails at once (Gloo: "Connection closed by peer").
        print(f"error: process {jax.process_index()}: a process of the job failed or was "
              f"lost ({one_line(e, 300)}); the checkpoints written are kept: start every "
              "process again with the same command to resume", file=sys.stderr)
        return EXIT_PEER_LOST
    if status == 0:
        _report_compile_cache()
    return status


def _peer_lost(error: BaseException) -> bool:
    """Whether an error of a multi-process run says another process is gone: a failed
    collective (a ``JaxRuntimeError``, or the ``ValueError`` of Orbax's barrier) or the
    coordination service's report (other errors, an out-of-memory one, keep their
    traceback)."""
    text = str(error)
    return any(w in text for w in ("Gloo", "Connection closed by peer", "Connection reset by peer",
                                   "heartbeat", "coordination service", "Socket closed"))


def _report_compile_cache() -> None:
    """The compilation cache's line (process 0, stderr), when the cache was on."""
    from jaxnets import compile_cache
    from train import distributed

    line = compile_cache.summary()
    if line:
        distributed.print0(line, file=sys.stderr)


def _user_errors() -> tuple[type[BaseException], ...]:
    import jaxnets
    from porting.pth import PthError
    from porting.state_dict import PortingError
    from train.config import ConfigError
    from train.data import DataError

    errors: list[type[BaseException]] = [RunError, ConfigError, DataError, PthError, PortingError,
                                         jaxnets.UnknownModelError]
    try:
        from porting.safetensors_io import SafetensorsFileError

        errors.append(SafetensorsFileError)
    except ImportError:
        pass
    return tuple(errors)


def _exit(status: int) -> None:
    """Exits with ``status``; after a lost peer or a failed checkpoint write at once, as
    JAX's distributed shutdown would wait for the lost peer and Orbax's writer threads
    report their own failure again at interpreter exit."""
    if status in (EXIT_PEER_LOST, EXIT_WRITE):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    _exit(main())
