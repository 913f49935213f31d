"""The fine-tuning optimizer: parameter groups by regex, schedules, masks.

Parameters are addressed by their dotted flax path (``layer1.0.conv1.kernel``)
*and* by the torch state_dict key the porting rules map it to
(``layer1.0.conv1.weight``): users know the torch names, the flax names are
what the tree holds, and a regex matching either selects the parameter.

The transform is::

    masked(set_to_zero, frozen)        # frozen grads are not gradients at all
    -> clip_by_global_norm             # over the trainable gradients only
    -> multi_transform({"frozen": set_to_zero,
                        "group<i>": base optimizer with lr * mult_i})

The base optimizer is torch's SGD (decay added to the gradient, then heavy-ball
momentum) or AdamW (decoupled decay); in both, weight decay is masked off for
biases and normalisation parameters (every parameter of rank <= 1).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import optax

from porting.rules import rules_for, torch_key

__all__ = ["ParamGroups", "param_groups", "make_schedule", "make_optimizer", "parse_lr_mult",
           "torch_names"]

FROZEN = "frozen"


def parse_lr_mult(text: str) -> tuple[str, float]:
    """Parses one ``--lr-mult REGEX=FACTOR`` value.

    Args:
        text: e.g. ``"layer4=0.1"``; the last ``=`` separates the factor.

    Returns:
        (regex, factor).

    Raises:
        ValueError: no ``=``, a bad regex or a factor that is not a number >= 0.
    """
    regex, sep, factor = text.rpartition("=")
    if not sep or not regex:
        raise ValueError(f"--lr-mult {text!r}: expected REGEX=FACTOR, e.g. layer4=0.1")
    try:
        value = float(factor)
    except ValueError:
        raise ValueError(f"--lr-mult {text!r}: factor {factor!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"--lr-mult {text!r}: factor must be a finite number >= 0")
    _compile(regex, "--lr-mult")
    return regex, value


def _compile(regex: str, flag: str) -> re.Pattern:
    try:
        return re.compile(regex)
    except re.error as e:
        raise ValueError(f"{flag} {regex!r} is not a valid regex: {e}") from None


def torch_names(model_or_class, paths: Sequence[str]) -> dict[str, str]:
    """The torch state_dict key of each dotted flax path (the porting rules' mapping).

    Args:
        model_or_class: The model (or class) whose rule table applies.
        paths: Dotted flax paths.

    Returns:
        flax path -> torch key.
    """
    rules = rules_for(model_or_class)
    return {p: torch_key(p, rules)[0] for p in paths}


@dataclasses.dataclass(frozen=True)
class ParamGroups:
    """Which optimizer group every parameter belongs to.

    Attributes:
        labels: flax path -> ``"frozen"`` or ``"group<i>"``.
        multipliers: ``"group<i>"`` -> learning-rate multiplier.
        frozen_stats: flax paths of BatchNorm statistics to keep fixed.
    """

    labels: Mapping[str, str]
    multipliers: Mapping[str, float]
    frozen_stats: frozenset[str] = frozenset()

    @property
    def frozen(self) -> frozenset[str]:
        """Paths of the frozen parameters."""
        return frozenset(k for k, v in self.labels.items() if v == FROZEN)

    def summary(self) -> str:
        """One line: how many parameters each group has."""
        counts: dict[str, int] = {}
        for label in self.labels.values():
            counts[label] = counts.get(label, 0) + 1
        parts = [f"{counts.get(FROZEN, 0)} frozen"]
        for label, mult in self.multipliers.items():
            parts.append(f"{counts.get(label, 0)} at lr x{mult:g}")
        if self.frozen_stats:
            parts.append(f"{len(self.frozen_stats)} BatchNorm statistics fixed")
        return ", ".join(parts)


def param_groups(
    params: Sequence[str],
    stats: Sequence[str] = (),
    *,
    model_or_class=None,
    freeze: Sequence[str] = (),
    lr_mult: Sequence[tuple[str, float]] = (),
    freeze_bn_stats: bool = True,
) -> ParamGroups:
    """Assigns parameters to groups: frozen, or the first matching ``--lr-mult``.

    A regex (``re.search``) matches a parameter if it matches its flax path or
    its torch key. Parameters matched by no ``--lr-mult`` regex get factor 1.
    With ``freeze_bn_stats``, the statistics (``mean``/``var``/
    ``num_batches_tracked``) of a normalisation layer are fixed when its
    ``scale`` parameter is frozen or a freeze regex matches them directly.

    Args:
        params: Dotted flax paths of the parameters.
        stats: Dotted flax paths of the batch statistics.
        model_or_class: Model (or class) giving the torch names; None uses the
            default rules.
        freeze: Regexes of parameters to freeze.
        lr_mult: (regex, factor) pairs, first match wins.
        freeze_bn_stats: Keep the statistics of frozen norm layers fixed.

    Returns:
        The grouping.

    Raises:
        ValueError: A regex is invalid, or matches no parameter (a typo
            would otherwise silently train everything).
    """
    cls = model_or_class if model_or_class is not None else object
    names = torch_names(cls, list(params) + list(stats))
    freeze_re = [_compile(r, "--freeze") for r in freeze]
    mult_re = [(_compile(r, "--lr-mult"), f) for r, f in lr_mult]

    def hit(pattern: re.Pattern, path: str) -> bool:
        return bool(pattern.search(path) or pattern.search(names[path]))

    for pattern in freeze_re + [p for p, _ in mult_re]:
        if not any(hit(pattern, p) for p in params):
            first, path = names[params[0]], params[0]
            example = repr(first) if first == path else f"{first!r} / {path!r}"
            tops = list(dict.fromkeys(names[p].split(".")[0] for p in params))
            shown = ", ".join(tops[:8]) + (", ..." if len(tops) > 8 else "")
            raise ValueError(f"regex {pattern.pattern!r} matches no parameter of the model "
                             f"(e.g. {example}; its top-level modules: {shown})")
    labels, multipliers = {}, {}
    for path in params:
        if any(hit(p, path) for p in freeze_re):
            labels[path] = FROZEN
            continue
        factor = next((f for p, f in mult_re if hit(p, path)), 1.0)
        label = next((k for k, v in multipliers.items() if v == factor), None)
        if label is None:
            label = f"group{len(multipliers)}"
            multipliers[label] = factor
        labels[path] = label
    frozen_stats = set()
    if freeze_bn_stats:
        for path in stats:
            prefix = path.rpartition(".")[0]
            if labels.get(f"{prefix}.scale") == FROZEN or any(hit(p, path) for p in freeze_re):
                frozen_stats.add(path)
    return ParamGroups(labels, multipliers, frozenset(frozen_stats))


def make_schedule(peak: float, total_steps: int, warmup_steps: int = 0, kind: str = "cosine",
                  final_fraction: float = 0.0):
    """Linear warmup to ``peak``, then cosine decay (or constant) over the rest.

    Warmup step ``s`` uses ``peak * (s + 1) / warmup_steps`` (never 0, so the
    first step trains); after warmup the factor is exactly 1 at its first step.

    Args:
        peak: Peak learning rate.
        total_steps: Length of the run in optimizer steps.
        warmup_steps: Warmup length.
        kind: "cosine" or "constant".
        final_fraction: Cosine floor as a fraction of ``peak``.

    Returns:
        ``schedule(step) -> float32 learning rate``.
    """
    if kind not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {kind!r}")
    peak32 = jnp.float32(peak)
    decay = max(total_steps - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        factor = jnp.float32(1.0)
        if warmup_steps > 0:
            factor = jnp.minimum((step + 1.0) / warmup_steps, 1.0)
        if kind == "cosine":
            t = jnp.clip((step - warmup_steps) / decay, 0.0, 1.0)
            cos = 0.5 * (1.0 + jnp.cos(jnp.pi * t))
            factor = factor * (final_fraction + (1.0 - final_fraction) * cos)
        return peak32 * factor

    return schedule


def _decay_mask(params):
    # torch recipes exclude biases and norm affine terms from weight decay.
    return {k: jnp.ndim(v) > 1 for k, v in params.items()}


def make_optimizer(
    params: Mapping[str, jnp.ndarray],
    groups: ParamGroups,
    *,
    name: str = "sgd",
    lr: float = 0.1,
    total_steps: int = 1,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """Builds the optax transform over a flat ``{path: array}`` parameter dict.

    Args:
        params: The parameters (only their paths and ranks are used).
        groups: From ``param_groups``.
        name: "sgd" (torch semantics, ``momentum=0`` is plain SGD) or "adamw".
        lr: Peak learning rate (times each group's multiplier).
        total_steps: Steps of the whole run (cosine length).
        warmup_steps: Linear warmup steps.
        schedule: "cosine" or "constant".
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        weight_decay: L2 (SGD) / decoupled (AdamW) decay, off for rank <= 1.
        betas: AdamW betas.
        clip_norm: Clip trainable gradients to this global norm; None: off.

    Returns:
        The gradient transformation.
    """
    if name not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")
    mask = _decay_mask(params)

    def base(mult: float) -> optax.GradientTransformation:
        sched = make_schedule(lr * mult, total_steps, warmup_steps, schedule)
        if name == "adamw":
            return optax.adamw(sched, b1=betas[0], b2=betas[1], weight_decay=weight_decay,
                               mask=mask)
        parts = []
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay, mask))
        if momentum:
            parts.append(optax.trace(decay=momentum, nesterov=nesterov))
        parts.append(optax.scale_by_learning_rate(sched))
        return optax.chain(*parts)

    transforms = {FROZEN: optax.set_to_zero()}
    transforms.update({label: base(mult) for label, mult in groups.multipliers.items()})
    labels = dict(groups.labels)
    frozen_mask = {k: v == FROZEN for k, v in labels.items()}
    chain = [optax.masked(optax.set_to_zero(), frozen_mask)]
    if clip_norm:
        chain.append(optax.clip_by_global_norm(clip_norm))
    chain.append(optax.multi_transform(transforms, labels))
    return optax.chain(*chain)
