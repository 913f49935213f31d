"""The fine-tuning run's configuration: one frozen dataclass, parsed once.

``parse_args(argv)`` builds a ``Config`` from the command line; fields left
``None`` mean "auto" and are filled by ``resolve`` from the model spec, the
weights' transforms and the dataset (the rules are in each flag's help). The
resolved config is what the run uses and what ``save`` writes to
``config.json`` beside its checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from typing import Any

from train.optim import parse_lr_mult

__all__ = ["Config", "ConfigError", "build_parser", "parse_args", "resolve", "save", "load",
           "IDENTITY_FIELDS", "EVAL_IDENTITY_FIELDS", "RUNTIME_FIELDS", "doubtful"]

# A run directory's checkpoints only make sense for a run that agrees on these.
IDENTITY_FIELDS = ("arch", "weights", "dataset", "image_feature", "label_feature",
                   "val_fraction", "target_dataset", "image_size", "batch_size", "seed",
                   "model_args",
                   # these shape the optimizer state a checkpoint holds
                   "optimizer", "momentum", "nesterov", "clip_grad_norm", "freeze", "lr_mult")
# Flags that only say how this process runs, not what the run computes: a resume
# with others is not worth a note.
RUNTIME_FIELDS = ("output_dir", "eval_only", "eval_batch_size", "log_every", "num_workers",
                  "progress", "debug_nan_at_step", "compile_cache", "coordinator",
                  "num_processes", "process_id", "checkpoint_every", "keep")
# An evaluation (--eval-only) reads a run's parameters and statistics alone: it must
# build the same model and see the same validation images (the split follows the
# seed), whatever the training flags.
EVAL_IDENTITY_FIELDS = ("arch", "weights", "dataset", "image_feature", "label_feature",
                        "val_fraction", "image_size", "seed", "model_args")


class ConfigError(ValueError):
    """A flag value that cannot be used; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a fine-tuning run (see ``build_parser`` for each one's meaning)."""

    arch: str
    dataset: str
    weights: str = "DEFAULT"
    data_dir: str | None = None
    image_feature: str | None = None
    label_feature: str | None = None
    val_fraction: float | None = None
    target_dataset: str | None = None
    mmd_weight: float = 1.0
    image_size: int | None = None
    resize_size: int | None = None
    crop_scale_min: float | None = None
    hflip: float | None = None
    color_jitter: tuple[float, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    batch_size: int = 64
    eval_batch_size: int | None = None
    epochs: int = 10
    steps: int | None = None
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float | None = None
    warmup_steps: int | None = None
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    aux_weight: float = 0.4
    clip_grad_norm: float | None = None
    freeze: tuple[str, ...] = ()
    lr_mult: tuple[tuple[str, float], ...] = ()
    freeze_bn_stats: bool = True
    model_args: tuple[tuple[str, Any], ...] = ()
    seed: int = 0
    output_dir: str | None = None
    checkpoint_every: int = 500
    keep: int = 2
    eval_only: bool = False
    log_every: int = 10
    num_workers: int = 4
    skip_bad: bool = False
    progress: bool = True
    debug_nan_at_step: int | None = None
    precision: str = "fp32"
    compile_cache: str | None = None
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def to_json(self) -> str:
        """The config as indented JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _nonneg_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0.0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0.0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {text}")
    return value


def _crop_scale(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _open_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1): both splits need images, got {text}")
    return value


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _jitter(text: str) -> tuple[float, float, float, float]:
    """``B,C,S,H`` (torchvision's ColorJitter) or one ``V``: ``V,V,V,0`` (timm's)."""
    values = _floats(text)
    if len(values) == 1:
        values = (values[0],) * 3 + (0.0,)
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected V or B,C,S,H, got {text!r}")
    if not all(math.isfinite(v) and v >= 0 for v in values) or values[3] > 0.5:
        raise argparse.ArgumentTypeError(f"needs finite values >= 0 and hue <= 0.5, got {text!r}")
    return values


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regex: {e}") from None
    return text


def _lr_mult(text: str) -> tuple[str, float]:
    try:
        return parse_lr_mult(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# argparse names a type by its function's name in "invalid <name> value: 'x'".
for _type, _name in ((_positive_int, "positive integer"), (_nonneg_int, "non-negative integer"),
                     (_fraction, "fraction"), (_nonneg_float, "non-negative number"),
                     (_seed, "seed"), (_crop_scale, "fraction"), (_open_fraction, "fraction")):
    _type.__name__ = _name


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser; ``--help`` documents every option."""
    from jaxnets import compile_cache
    from jaxnets.cli import ArgumentParser, model_arg_type

    p = ArgumentParser(
        prog="python -m train.finetune",
        description="Fine-tune (or train from scratch) a jaxnets image classifier. Rerunning the "
                    "same command resumes from the run's last checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--arch", required=True, help="registered model name (jaxnets.list_models())")
    g.add_argument("--weights", default="DEFAULT",
                   help="'DEFAULT' or a torchvision weights name (pretrained, via porting."
                        "pretrained), a .pth/.pt/.safetensors PATH (torch state_dict), another "
                        "run's directory (its newest checkpoint), or 'none' (random init). The "
                        "head is replaced when the class count differs.")
    g.add_argument("--dataset", required=True,
                   help="'digits', 'tfds:NAME[:TRAIN_SPLIT[:VAL_SPLIT]]', 'folder:PATH' or a PATH "
                        "(see train/data.py)")
    g.add_argument("--data-dir", default=None, help="TFDS data directory")
    g.add_argument("--image-feature", default=None, metavar="KEY",
                   help="tfds --dataset: the feature holding the image (auto: 'image' where "
                        "the dataset has it, else its first image feature)")
    g.add_argument("--label-feature", default=None, metavar="KEY",
                   help="tfds --dataset: the ClassLabel feature to learn (auto: 'label' "
                        "where the dataset has it, else its first ClassLabel; e.g. "
                        "coarse_label for cifar100's 20 superclasses)")
    g.add_argument("--val-fraction", type=_open_fraction, default=None,
                   help="held-out fraction where a val split is carved (auto: 0.2 digits, 0.1 "
                        "otherwise)")
    g.add_argument("--target-dataset", default=None,
                   help="unlabelled target-domain dataset (same spec syntax): adds "
                        "mmd_weight * MMD^2 between source and target head-input features")
    g.add_argument("--mmd-weight", type=_nonneg_float, default=1.0,
                   help="lambda of the MMD^2 term (with --target-dataset)")
    why = "the class count comes from the dataset, the seed from --seed"
    g.add_argument("--model-arg", dest="model_args", action="append",
                   type=model_arg_type({"num_classes": why, "seed": why}),
                   default=[], metavar="KEY=VALUE",
                   help="constructor option of the architecture, repeatable "
                        "(e.g. zero_init_residual=True)")

    g = p.add_argument_group("input pipeline")
    g.add_argument("--image-size", type=_positive_int, default=None,
                   help="crop size fed to the model (auto: the weights' crop size; without "
                        "weights 4x the dataset's native size clamped to the model's "
                        "[min_size, input_size])")
    g.add_argument("--resize-size", type=_positive_int, default=None,
                   help="eval resize before the center crop (auto: the weights' ratio, else "
                        "image size)")
    g.add_argument("--crop-scale-min", type=_crop_scale, default=None,
                   help="smallest RandomResizedCrop area fraction (auto: 0.08 for pretrained "
                        "weights, 0.35 otherwise)")
    g.add_argument("--hflip", type=_fraction, default=None,
                   help="horizontal flip probability (auto: 0 for digits and characters: "
                        "digits, tfds mnist, emnist, kmnist, binarized_mnist, svhn_cropped, "
                        "omniglot; 0.5 otherwise)")
    g.add_argument("--color-jitter", type=_jitter, default=None, metavar="B,C,S,H",
                   help="ColorJitter of training images, as torchvision's (brightness, "
                        "contrast, saturation, hue; hue <= 0.5), or one V for V,V,V,0; "
                        "none by default")
    g.add_argument("--mean", type=_floats, default=None,
                   help="normalisation mean per channel (auto: the weights', else ImageNet's)")
    g.add_argument("--std", type=_floats, default=None, help="normalisation std per channel")
    g.add_argument("--interpolation", choices=("bilinear", "bicubic"), default=None,
                   help="resize interpolation (auto: the weights', else bilinear)")
    g.add_argument("--batch-size", type=_positive_int, default=64, help="global train batch")
    g.add_argument("--eval-batch-size", type=_positive_int, default=None,
                   help="eval batch (auto: batch size)")
    g.add_argument("--num-workers", type=_positive_int, default=4, help="image decoding threads")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip image files that cannot be decoded (each logged once; "
                        "training reads the next readable file in its place, evaluation "
                        "leaves it out; listed in summary.json) rather than stop at the first "
                        "with one line naming it")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_nonneg_int, default=10,
                   help="training epochs (0 with a checkpoint = evaluate only)")
    g.add_argument("--steps", type=_nonneg_int, default=None,
                   help="total train steps, overriding --epochs")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="SGD with torch semantics, or AdamW")
    g.add_argument("--lr", type=_nonneg_float, default=None,
                   help="peak learning rate (auto: sgd 0.1 from scratch / 0.01 pretrained, "
                        "adamw 1e-3 / 1e-4)")
    g.add_argument("--momentum", type=_fraction, default=0.9, help="SGD momentum (0 = plain SGD)")
    g.add_argument("--nesterov", action="store_true", help="SGD Nesterov momentum")
    g.add_argument("--weight-decay", type=_nonneg_float, default=None,
                   help="weight decay, never on biases and norm parameters (auto: sgd 5e-4, "
                        "adamw 0.05)")
    g.add_argument("--warmup-steps", type=_nonneg_int, default=None,
                   help="linear warmup steps (auto: one epoch, at most 10%% of the run)")
    g.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="learning-rate shape after warmup")
    g.add_argument("--label-smoothing", type=_fraction, default=0.0, help="label smoothing")
    g.add_argument("--aux-weight", type=_nonneg_float, default=0.4,
                   help="weight of each auxiliary classifier's loss (GoogLeNet, Inception v3 "
                        "in training; PyTorch's fine-tuning tutorial uses 0.4); 0 ignores them, "
                        "--model-arg aux_logits=False drops them")
    g.add_argument("--clip-grad-norm", type=_positive_float, default=None,
                   help="clip the trainable gradients' global norm to this value (> 0; leave "
                        "the flag out for no clipping)")
    g.add_argument("--freeze", action="append", type=_regex, default=[], metavar="REGEX",
                   help="freeze parameters whose torch key (layer1.0.conv1.weight) or flax path "
                        "(layer1.0.conv1.kernel) matches (re.search); repeatable")
    g.add_argument("--lr-mult", action="append", type=_lr_mult, default=[],
                   metavar="REGEX=FACTOR",
                   help="scale the learning rate of matching parameters (first match wins; "
                        "others x1); repeatable, e.g. --lr-mult layer4=0.1 --lr-mult fc=1.0")
    g.add_argument("--freeze-bn-stats", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the BatchNorm running statistics of frozen layers fixed (off: "
                        "torch's requires_grad=False behaviour, statistics still update)")
    g.add_argument("--seed", type=_seed, default=0,
                   help="seed of init, data order and augmentation, in [0, 2**32)")

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None,
                   help="run directory: config, checkpoints, metrics, plots (auto: "
                        "runs/ARCH-DATASET)")
    g.add_argument("--checkpoint-every", type=_nonneg_int, default=500,
                   help="save every N steps (0: epoch ends only); also at each epoch end")
    g.add_argument("--keep", type=_positive_int, default=2,
                   help="latest checkpoints kept (the best by val top-1 is kept too)")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate the weights (or the run's checkpoint) on the val split; no "
                        "training")
    g.add_argument("--log-every", type=_positive_int, default=10,
                   help="train metrics logged every N steps")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar")
    g.add_argument("--debug-nan-at-step", type=_positive_int, default=None, metavar="N",
                   help="debugging: make one parameter NaN before step N (counted from 1, as "
                        "the logs count), to exercise the non-finite-loss stop")
    g.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="compute precision of the steps: bf16 runs forward/backward in bfloat16 "
                        "while parameters, optimizer state and BatchNorm statistics stay float32")
    compile_cache.add_flag(g)

    g = p.add_argument_group("multi-host (data parallel over all devices of all processes)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordination service; start the same command "
                        "on every host with its own --process-id. Needs --num-processes and "
                        "--process-id (all three or none). Without it: every local device")
    g.add_argument("--num-processes", type=_positive_int, default=None, metavar="N",
                   help="total processes of a multi-host run (with --coordinator)")
    g.add_argument("--process-id", type=_nonneg_int, default=None, metavar="I",
                   help="this process's index in [0, N) (with --coordinator)")
    return p


def parse_args(argv: list[str] | None = None) -> Config:
    """Parses the command line into an unresolved ``Config``.

    Args:
        argv: Arguments (``sys.argv[1:]`` when None).

    Returns:
        The config; ``None`` fields are resolved later by ``resolve``.
    """
    parser = build_parser()
    ns = parser.parse_args(argv)
    multi = {"--coordinator": ns.coordinator, "--num-processes": ns.num_processes,
             "--process-id": ns.process_id}
    given = [k for k, v in multi.items() if v is not None]
    if given and len(given) != len(multi):
        missing = ", ".join(k for k in multi if k not in given)
        parser.error(f"{', '.join(given)} needs {missing} too (all three or none)")
    if ns.coordinator is not None and ns.process_id >= ns.num_processes:
        parser.error(f"--process-id {ns.process_id} is not in [0, {ns.num_processes})")
    if ns.coordinator is not None and not re.fullmatch(r"\S+:\d+", ns.coordinator):
        parser.error(f"--coordinator must be HOST:PORT, got {ns.coordinator!r}")
    values = vars(ns)
    values["freeze"] = tuple(values["freeze"])
    values["lr_mult"] = tuple(values["lr_mult"])
    values["model_args"] = tuple(values["model_args"])
    return Config(**values)


def default_normalization(channels: int, transforms=None
                          ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation mean and std of a model's input when no flag gives them:
    the weights' (``transforms``), else ImageNet's; one value each, their average,
    for a 1-channel model (it sees luma). ``train.predict`` uses the same."""
    if transforms is not None:
        mean, std = tuple(transforms.mean), tuple(transforms.std)
    else:
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if len(mean) == 3 and channels == 1:
        # A 1-channel model sees luma; ImageNet's per-channel stats average to it.
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return mean, std


def resolve(
    cfg: Config,
    *,
    spec,
    native_size: int,
    transforms=None,
    steps_per_epoch: int,
) -> Config:
    """Fills every auto (``None``) field.

    Args:
        cfg: The parsed config.
        spec: The model's ``jaxnets.ModelSpec``.
        native_size: Side of the dataset's stored images.
        transforms: The weights' transforms (``resize_size``, ``crop_size``,
            ``interpolation``, ``mean``, ``std``) or None without weights.
        steps_per_epoch: Train steps per epoch.

    Returns:
        The resolved config.

    Raises:
        ConfigError: Inconsistent values (e.g. mean of the wrong length).
    """
    pretrained = transforms is not None
    channels = spec.in_channels
    if cfg.nesterov and cfg.optimizer != "sgd":
        raise ConfigError(f"--nesterov is SGD's; --optimizer {cfg.optimizer} has no Nesterov form")
    if cfg.nesterov and cfg.momentum == 0:
        raise ConfigError("--nesterov needs --momentum > 0 (as torch.optim.SGD)")
    lo, hi = spec.min_size[0], spec.input_size[0]
    if spec.kind == "vector":
        # A vector model takes the flattened image: any size, default its input length.
        lo, hi = 1, math.isqrt(spec.input_size[0] // channels)
    image_size = cfg.image_size
    if image_size is None:
        image_size = (int(transforms.crop_size) if pretrained
                      else min(max(4 * native_size, lo), hi))
    resize_size = cfg.resize_size
    if resize_size is None:
        resize_size = (round(image_size * transforms.resize_size / transforms.crop_size)
                       if pretrained else image_size)
    mean, std = default_normalization(channels, transforms)
    # A flag given alone replaces only its own default.
    mean, std = cfg.mean or mean, cfg.std or std
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(f"--mean has {len(mean)} value(s) and --std {len(std)}; {spec.name} "
                          f"takes {channels} channel(s): give {channels} each")
    if not all(math.isfinite(m) for m in mean) or not all(
            math.isfinite(v) and v > 0 for v in std):
        raise ConfigError(f"--mean must be finite and --std finite and > 0, got mean {mean}, "
                          f"std {std}")
    if image_size < lo:
        raise ConfigError(f"--image-size {image_size} is below {spec.name}'s minimum {lo}")
    steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps
    if warmup is None:
        warmup = min(steps_per_epoch, steps // 10)
    lr = cfg.lr
    if lr is None:
        lr = {("sgd", False): 0.1, ("sgd", True): 0.01,
              ("adamw", False): 1e-3, ("adamw", True): 1e-4}[cfg.optimizer, pretrained]
    wd = cfg.weight_decay
    if wd is None:
        wd = 5e-4 if cfg.optimizer == "sgd" else 0.05
    output_dir = cfg.output_dir
    if output_dir is None:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", cfg.dataset.strip("/")).strip("_")
        output_dir = os.path.join("runs", f"{cfg.arch}-{slug}")
    from train.data import default_val_fraction

    return dataclasses.replace(
        cfg,
        val_fraction=(cfg.val_fraction if cfg.val_fraction is not None
                      else default_val_fraction(cfg.dataset)),
        image_size=image_size,
        resize_size=resize_size,
        crop_scale_min=cfg.crop_scale_min if cfg.crop_scale_min is not None
        else (0.08 if pretrained else 0.35),
        hflip=cfg.hflip if cfg.hflip is not None else (0.0 if _of_glyphs(cfg.dataset) else 0.5),
        mean=tuple(mean),
        std=tuple(std),
        interpolation=cfg.interpolation or _interpolation(transforms),
        eval_batch_size=cfg.eval_batch_size or cfg.batch_size,
        steps=steps,
        lr=lr,
        weight_decay=wd,
        warmup_steps=warmup,
        output_dir=output_dir,
    )


def doubtful(cfg: Config) -> list[str]:
    """Notes on resolved values that run but are probably not what was meant."""
    notes = []
    if cfg.warmup_steps > cfg.steps and cfg.steps > 0:
        notes.append(f"--warmup-steps {cfg.warmup_steps} is more than the run's {cfg.steps} "
                     "steps: the learning rate never reaches --lr")
    if cfg.mmd_weight != 1.0 and not cfg.target_dataset:
        notes.append(f"--mmd-weight {cfg.mmd_weight} is for --target-dataset, which is not "
                     "given: no MMD term")
    if cfg.optimizer == "adamw" and cfg.momentum != 0.9:
        notes.append(f"--momentum {cfg.momentum} is SGD's: adamw ignores it (its betas are "
                     "0.9, 0.999)")
    if cfg.resize_size < cfg.image_size:
        notes.append(f"--resize-size {cfg.resize_size} is below --image-size "
                     f"{cfg.image_size}: evaluation's center crop is padded with zeros")
    return notes


# Datasets of digits and characters, which a mirror image turns into other glyphs.
GLYPH_DATASETS = ("digits", "mnist", "emnist", "kmnist", "binarized_mnist", "svhn_cropped",
                  "omniglot")


def _of_glyphs(dataset: str) -> bool:
    """Whether ``--dataset`` names one of ``GLYPH_DATASETS`` (a tfds one with any config,
    version or splits): its default ``--hflip`` is 0."""
    name = dataset.removeprefix("tfds:").split(":")[0].split("/")[0]
    return dataset == "digits" or (dataset.startswith("tfds:") and name in GLYPH_DATASETS)


def _interpolation(transforms) -> str:
    # Weights may name it as an enum (InterpolationMode.BICUBIC) or a string.
    name = str(getattr(transforms, "interpolation", "bilinear")).lower().rsplit(".", 1)[-1]
    return name if name in ("bilinear", "bicubic") else "bilinear"


def holds_files(path: str) -> bool:
    """Whether ``path`` is a folder with anything in it but hidden entries."""
    return os.path.isdir(path) and any(not e.name.startswith(".") for e in os.scandir(path))


def check_output_dir(path: str, flag: str) -> None:
    """Checks, before any work, that a program's output directory exists or can be
    made (nothing is created here).

    Raises:
        ConfigError: A file in the way, or no permission, naming ``flag``.
    """
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{flag} {path}: a file, not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {path}: no permission to write in it")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: no permission to create it in {parent}")


def write_json(path: str, value: Any, sort_keys: bool = False) -> None:
    """Writes ``value`` as indented JSON by a temporary file and a rename: a reader,
    or a run killed meanwhile, never sees half a file.

    Args:
        path: Target file.
        value: A JSON-serialisable value.
        sort_keys: Sort the keys of objects.
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=sort_keys)
        f.write("\n")
    os.replace(tmp, path)


def save(cfg: Config, path: str) -> None:
    """Writes the config as JSON (atomically: temp file + rename).

    Args:
        cfg: The resolved config.
        path: Target file.
    """
    write_json(path, dataclasses.asdict(cfg), sort_keys=True)


def load(path: str) -> dict[str, Any]:
    """Reads a saved config as a plain dict (JSON lists where tuples were).

    Raises:
        ConfigError: The file is not a JSON object (damaged), naming it.
    """
    with open(path) as f:
        try:
            saved = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is damaged ({e}); move it aside or pass another "
                              "folder") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is damaged (not a JSON object); move it aside or pass "
                          "another folder")
    return saved
