"""Attention maps of Vision Transformers: per-layer weights, attention rollout, a CLI.

``attention_weights`` returns what every encoder block's self-attention puts on
each token, per head; ``attention_rollout`` (Abnar & Zuidema 2020,
"Quantifying Attention Flow in Transformers") folds the layers into one map of
how much the class token draws from each patch. The command line draws them
over an image::

    python -m jaxnets.attention_maps --arch vit_b_16 --weights vit_b_16.pth \\
        --image cat.jpg --out cat_attention.png --rollout

(``python -m jaxnets.attention`` runs the same ``main``.)
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Sequence
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnets import compile_cache
from jaxnets.cli import ArgumentParser, model_arg_type, one_line
from jaxnets.imageio import to_rgb
from jaxnets.vit import VIT_VARIANTS, VisionTransformer

__all__ = ["attention_weights", "attention_rollout", "class_token_attention", "main",
           "SAMPLE_IMAGE"]

SAMPLE_IMAGE = "sample.png"  # in jaxnets/assets
_HEAD_FUSIONS = ("mean", "max", "min")
_PANEL_INCHES = 2.5
_DPI = 100
_COLUMNS = 4


# The graph definition is static (hashable): one compile per architecture and input shape.
@functools.partial(jax.jit, static_argnums=0)
def _weights_of(graphdef, state, images):
    model = nnx.merge(graphdef, state)
    return model.tokens(images, need_weights=True, deterministic=True)[1]


def attention_weights(model: VisionTransformer, images) -> list[jax.Array]:
    """Every encoder block's self-attention weights, per head.

    Dropout is off whatever the model's mode (the model is not changed).

    Args:
      model: a ``VisionTransformer`` (e.g. ``create_model("vit_b_16")``).
      images: (batch, image_size, image_size, channels) NHWC images,
        normalised as the model expects.

    Returns:
      One (batch, heads, L, L) array per block, first block first; L is the
      number of tokens (class token first, then the patches row by row) and
      each row sums to 1 (softmax over keys).

    Raises:
      TypeError: for a model that is not a ``VisionTransformer``.
      ValueError: for images of the wrong shape.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError("attention_weights needs a jaxnets VisionTransformer; got "
                        f"{type(model).__name__}")
    images = jnp.asarray(images)
    model.check_input(images)
    graphdef, state = nnx.split(model)
    return list(_weights_of(graphdef, state, images))


def _fuse_heads(w: jax.Array, head_fusion: str) -> jax.Array:
    if head_fusion == "mean":
        return w.mean(axis=1)
    if head_fusion == "max":
        return w.max(axis=1)
    return w.min(axis=1)


def _discard_lowest(a: jax.Array, ratio: float) -> jax.Array:
    """Zero the ``ratio`` weakest entries of each (L, L) map, never class->class."""
    b, n, _ = a.shape
    k = int(n * n * ratio)
    if k <= 0:
        return a
    flat = a.reshape(b, n * n)
    ranks = jnp.argsort(jnp.argsort(flat, axis=-1), axis=-1)
    drop = (ranks < k).at[:, 0].set(False)  # keep the class token's self-attention
    return jnp.where(drop, 0.0, flat).reshape(b, n, n)


def attention_rollout(weights: Sequence[jax.Array], head_fusion: str = "mean",
                      discard_ratio: float = 0.0,
                      grid: tuple[int, int] | None = None) -> jax.Array:
    """Attention rollout (Abnar & Zuidema 2020) from the class token to the patches.

    Each layer's heads are fused into one (L, L) map A; the residual path is
    accounted for with 0.5 * A + 0.5 * I, rows renormalised to sum to 1, and
    the layers multiplied from the first to the last. The class token's row of
    the product, over the patch tokens, is returned on the patch grid.

    Args:
      weights: per-layer (batch, heads, L, L) weights, first layer first, as
        from ``attention_weights`` (or those stacked into one (layers, batch,
        heads, L, L) array; one 4-D array is one layer).
      head_fusion: how heads combine: ``"mean"`` (the paper), ``"max"`` or
        ``"min"``.
      discard_ratio: fraction of each fused map's weakest entries set to 0
        before the identity is added (0 keeps all; the class token's
        attention to itself is never discarded), to suppress noise.
      grid: (height, width) of the patch grid; square when None.

    Returns:
      (batch, height, width) rollout: how much of the class token's final
      representation flows from each patch (the values sum to at most 1 per
      example; the rest stays on the class token).

    Raises:
      ValueError: for an unknown fusion, a ratio outside [0, 1), no layers or
        a token count that does not fit the grid.
    """
    if head_fusion not in _HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {', '.join(_HEAD_FUSIONS)}; "
                         f"got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1); got {discard_ratio}")
    weights = _layers(weights)
    if not weights:
        raise ValueError("attention_rollout needs the weights of at least one layer")
    n = weights[0].shape[-1]
    grid = _grid(n, grid)
    eye = jnp.eye(n, dtype=jnp.float32)
    result = None
    for w in weights:
        a = _discard_lowest(_fuse_heads(jnp.asarray(w, jnp.float32), head_fusion), discard_ratio)
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(axis=-1, keepdims=True)
        result = a if result is None else jnp.einsum(
            "bij,bjk->bik", a, result, precision=jax.lax.Precision.HIGHEST)
    return result[:, 0, 1:].reshape(-1, *grid)


def class_token_attention(weights: jax.Array, grid: tuple[int, int] | None = None) -> jax.Array:
    """Each head's attention from the class token to the patches, on the patch grid.

    Args:
      weights: one layer's (batch, heads, L, L) weights.
      grid: (height, width) of the patch grid; square when None.

    Returns:
      (batch, heads, height, width) maps.

    Raises:
      ValueError: for weights that are not one (batch, heads, L, L) array, or
        a token count that does not fit the grid.
    """
    (weights,) = _layers(weights, one=True)
    b, h, n, _ = weights.shape
    return weights[:, :, 0, 1:].reshape(b, h, *_grid(n, grid))


def _layers(weights, one: bool = False) -> list[jax.Array]:
    """Attention weights as a list of (batch, heads, L, L) arrays."""
    if hasattr(weights, "ndim"):
        weights = [weights] if weights.ndim == 4 else list(weights)
    weights = [jnp.asarray(w) for w in weights]
    bad = [w.shape for w in weights if w.ndim != 4 or w.shape[-1] != w.shape[-2]]
    if bad or (one and len(weights) != 1):
        what = "one layer's" if one else "each layer's"
        raise ValueError(f"expected {what} attention weights as a (batch, heads, L, L) array; "
                         f"got {len(weights)} array(s), shapes {bad or [w.shape for w in weights]}")
    return weights


def _grid(n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """The patch grid of ``n`` tokens (the class token first); square when None."""
    if grid is None:
        g = math.isqrt(n - 1)
        grid = (g, g)
    if len(grid) != 2 or grid[0] * grid[1] != n - 1:
        raise ValueError(f"{n - 1} patch tokens do not fill a "
                         f"{'x'.join(map(str, grid))} grid")
    return tuple(grid)


# ----------------------------------------------------------------------------- CLI


class _CliError(Exception):
    """A problem with the command line's inputs, reported as one line."""


def _parse(argv):
    p = ArgumentParser(
        prog="python -m jaxnets.attention",
        description="Draw a Vision Transformer's attention maps over an image.")
    p.add_argument("--arch", default=None,
                   help=f"a ViT: {', '.join(VIT_VARIANTS)} (default: the run's, else "
                        "vit_b_16)")
    p.add_argument("--weights", default=None,
                   help="a .pth state_dict, a torchvision weights name (e.g. DEFAULT), a "
                        "directory `porting convert` wrote, or a train.finetune run "
                        "(its newest readable checkpoint, its preprocessing); random init "
                        "when left out")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   type=model_arg_type(),
                   help="constructor option (e.g. image_size=384), repeatable: for a bare "
                        "checkpoints folder, named weights or random init (a .pth says "
                        "its own)")
    p.add_argument("--image", default=None,
                   help="image file; the bundled sample image when left out")
    p.add_argument("--out", required=True, help="output PNG file")
    p.add_argument("--layer", type=int, default=-1,
                   help="encoder block whose heads are drawn (negative counts from the "
                        "end; default -1, the last)")
    p.add_argument("--rollout", action="store_true",
                   help="add an attention-rollout panel (all layers)")
    p.add_argument("--head-fusion", default="mean", choices=_HEAD_FUSIONS,
                   help="how the rollout fuses heads (default mean)")
    p.add_argument("--discard-ratio", type=float, default=0.0,
                   help="fraction of the weakest attention discarded in the rollout")
    compile_cache.add_flag(p)
    return p.parse_args(argv)


def _sample_path() -> str:
    return str(resources.files("jaxnets") / "assets" / SAMPLE_IMAGE)


def _read_image(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise _CliError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(to_rgb(im))
    except (UnidentifiedImageError, OSError) as e:
        raise _CliError(f"cannot read image {path}: {e}") from e


def _eval_config(size: int, transforms=None):
    """The eval transform: the weights' own, else ImageNet's resize 256/224, crop, normalise
    (``transforms``: torchvision's ``weights.transforms()`` numbers, or a run's)."""
    from train.augment import AugmentConfig

    if transforms is not None and transforms.crop_size == size:
        return AugmentConfig(crop_size=size, resize_size=transforms.resize_size,
                             interpolation=transforms.interpolation,
                             mean=tuple(transforms.mean), std=tuple(transforms.std),
                             eval_prepared=True)
    return AugmentConfig(crop_size=size, resize_size=int(size * 256 / 224), eval_prepared=True)


def _prepared(path: str, cfg) -> np.ndarray:
    """The image as evaluation shapes it on the host (torchvision's PIL ``Resize`` of the
    shorter side, ``CenterCrop``): uint8 ``[size, size, 3]``."""
    from train.data import DataError, HostTransform, decode_image

    if not os.path.isfile(path):
        raise _CliError(f"image not found: {path}")
    try:
        return decode_image(path, HostTransform("eval", cfg.crop_size, cfg.resize_size,
                                                cfg.interpolation))
    except DataError as e:
        raise _CliError(f"cannot read image {path}: {e}") from None


def _model_from_state_dict(arch: str, state_dict: dict):
    """A model shaped like the checkpoint (classes, representation size, image size).

    Built abstractly and filled, so no random initialisation is computed for
    parameters the checkpoint provides.
    """
    from porting import PortingError, load_torch_state_dict
    from porting.pretrained import build_abstract, materialize

    patch = VIT_VARIANTS[arch][0]
    num_classes, overrides = None, {}
    head = state_dict.get("heads.head.weight")
    if head is not None:
        num_classes = int(head.shape[0])
    pre = state_dict.get("heads.pre_logits.weight")
    if pre is not None:
        overrides["representation_size"] = int(pre.shape[0])
    pos = state_dict.get("encoder.pos_embedding")
    if pos is not None and len(pos.shape) == 3:
        g = math.isqrt(pos.shape[1] - 1)
        if g * g == pos.shape[1] - 1:
            overrides["image_size"] = g * patch
    model = build_abstract(arch, num_classes, **overrides)
    state_dict, notes = model.adapt_torch_state_dict(state_dict)
    try:
        report = load_torch_state_dict(model, state_dict)
    except PortingError as e:
        raise _CliError(one_line(str(e))) from e
    materialize(model, arch, num_classes, 0, **overrides)
    return model, notes + [str(report)]


def _check_arch(arch: str, layer: int) -> None:
    import jaxnets

    if arch not in VIT_VARIANTS:
        jaxnets.get_spec(arch)  # raises UnknownModelError naming close matches
        raise _CliError(f"--arch {arch} is not a Vision Transformer; attention maps need one of "
                        f"{', '.join(VIT_VARIANTS)}")
    n = VIT_VARIANTS[arch][1]
    if not -n <= layer < n:
        raise _CliError(f"--layer {layer} is out of range: {arch} has {n} layers "
                        f"(0..{n - 1}, or -{n}..-1)")


def _load(arch: str | None, weights: str | None, layer: int, model_args: dict):
    """``(arch, model, eval preprocessing or None)`` for ``--arch``/``--weights``: random
    init, a ``.pth`` (its classes, image size and representation size read from it), or
    whatever ``train.predict.load`` reads (a run: its arch and preprocessing; a
    converted directory: its arch; torchvision's weights by name; a safetensors file)."""
    import types

    import jaxnets
    from porting.pretrained import is_converted, is_weights_path
    from train.checkpoint import CheckpointError, locate_run, run_model

    if weights is None:
        arch = arch or "vit_b_16"
        _check_arch(arch, layer)
        print(f"no --weights: {arch} is randomly initialised; the attention maps of an "
              "untrained model are noise")
        try:
            return arch, jaxnets.create_model(arch, **model_args), None
        except (TypeError, ValueError) as e:
            raise _CliError(f"--model-arg: {one_line(str(e), 600)}") from None
    path = os.path.expanduser(weights)
    if is_weights_path(weights) and not weights.endswith((".safetensors", ".json")) \
            and not os.path.isdir(path):
        from porting.pth import PthError, load_state_dict_file

        arch = arch or "vit_b_16"
        _check_arch(arch, layer)
        if model_args:
            raise _CliError("--model-arg is not for a .pth file: the model's options are "
                            "read from its tensors")
        if not os.path.isfile(path):
            raise _CliError(f"weights file not found: {weights}")
        try:
            state_dict, notes = load_state_dict_file(path)
        except PthError as e:
            raise _CliError(str(e)) from e
        model, more = _model_from_state_dict(arch, state_dict)
        print(f"weights {weights}: " + "; ".join(notes + more))
        return arch, model, None
    from train.predict import PredictError, load

    says_arch = os.path.isdir(path) and (is_converted(path) or locate_run(path) is not None)
    try:
        if says_arch and not is_converted(path):  # a run of another model: before its weights
            found = run_model(path)[0]
            if found is not None and found not in VIT_VARIANTS:
                raise _CliError(f"--weights {weights}: a run of {found}, not of a Vision "
                                f"Transformer ({', '.join(VIT_VARIANTS)})")
            if found is not None:
                _check_arch(found, layer)
        elif arch is not None or not says_arch:
            _check_arch(arch or "vit_b_16", layer)
        loaded = load(weights, arch or (None if says_arch else "vit_b_16"),
                      model_args=model_args)
    except CheckpointError as e:
        raise _CliError(f"--weights {weights}: {e}") from None
    except PredictError as e:
        raise _CliError(str(e)) from None
    if loaded.arch not in VIT_VARIANTS:
        raise _CliError(f"--weights {weights} holds {loaded.arch}, not a Vision Transformer "
                        f"({', '.join(VIT_VARIANTS)})")
    _check_arch(loaded.arch, layer)
    print(f"weights {loaded.arch}: {loaded.source}")
    pre = loaded.preprocessing
    return loaded.arch, loaded.model, types.SimpleNamespace(
        crop_size=pre.image_size, resize_size=pre.resize_size,
        interpolation=pre.interpolation, mean=pre.mean, std=pre.std)


def _overlay(ax, image, heat, title):
    ax.imshow(image)
    h, w = image.shape[:2]
    ax.imshow(np.asarray(heat), cmap="inferno", alpha=0.6, extent=(0, w, h, 0),
              interpolation="bilinear")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _figure_shape(panels: int) -> tuple[int, int]:
    cols = min(_COLUMNS, panels)
    return -(-panels // cols), cols


def _draw(out: str, image: np.ndarray, heads: np.ndarray, layer: int, rollout, caption: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + len(heads) + (rollout is not None)
    rows, cols = _figure_shape(panels)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * _PANEL_INCHES, rows * _PANEL_INCHES),
                             dpi=_DPI, squeeze=False)
    axes = axes.ravel()
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=9)
    axes[0].axis("off")
    for i, heat in enumerate(heads):
        _overlay(axes[1 + i], image, heat, f"layer {layer} head {i}")
    if rollout is not None:
        _overlay(axes[1 + len(heads)], image, rollout, "rollout")
    for ax in axes[panels:]:
        ax.axis("off")
    fig.suptitle(caption, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.35 / (rows + 0.35),
                        wspace=0.04, hspace=0.12)
    # Written beside, then renamed: a killed run leaves an earlier file as it was.
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)),
                       f".{os.path.basename(out)}.{os.getpid()}.tmp.png")
    try:
        # No bbox_inches="tight": the image is exactly cols x rows panels.
        fig.savefig(tmp, dpi=_DPI)
        os.replace(tmp, out)
    except OSError as e:
        raise _CliError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _run(args) -> None:
    if not args.out.lower().endswith(".png"):
        raise _CliError(f"--out must name a .png file; got {args.out}")
    if not 0.0 <= args.discard_ratio < 1.0:
        raise _CliError(f"--discard-ratio must be in [0, 1); got {args.discard_ratio}")
    if args.image is None:
        path = _sample_path()
        print(f"no --image: using the bundled sample image {path}")
    else:
        path = args.image
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out):
        raise _CliError(f"cannot write {args.out}: it is a directory")
    if not os.path.isdir(out_dir):
        what = "is a file" if os.path.exists(out_dir) else "does not exist"
        raise _CliError(f"cannot write {args.out}: {out_dir} {what}")
    try:  # before the first compilation
        compile_cache.enable(args.compile_cache)
    except compile_cache.CompileCacheError as e:
        raise _CliError(f"--compile-cache: {e}") from None
    _read_image(path)  # a missing or undecodable image before the model is read
    arch, model, transforms = _load(args.arch, args.weights, args.layer, dict(args.model_arg))
    from train.augment import eval_transform

    cfg = _eval_config(model.image_size, transforms)
    x = eval_transform(jnp.asarray(_prepared(path, cfg))[None], cfg)
    weights = attention_weights(model, x)
    layer = args.layer % len(weights)
    grid = model.grid_size
    heads = np.asarray(class_token_attention(weights[layer], grid)[0])
    rollout = None
    if args.rollout:
        rollout = np.asarray(attention_rollout(weights, args.head_fusion, args.discard_ratio,
                                               grid)[0])
    # Show the crop the model saw, mapped back from the normalisation to 0..1.
    shown = np.clip(np.asarray(x[0]) * np.asarray(cfg.std) + np.asarray(cfg.mean), 0, 1)
    caption = f"{arch} class-token attention, {os.path.basename(path)}"
    _draw(args.out, shown, heads, layer, rollout, caption)
    print(f"wrote {args.out}: {len(heads)} heads of layer {layer}"
          + (" and the rollout over all layers" if rollout is not None else ""))
    if line := compile_cache.summary():
        print(line, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: draw a ViT's per-head attention maps (and rollout) over an image.

    Args:
      argv: arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
      The exit status: 0 on success, 1 after printing ``error: ...`` to stderr.
    """
    from jaxnets.registry import UnknownModelError

    args = _parse(argv)
    try:
        _run(args)
    except (_CliError, UnknownModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
