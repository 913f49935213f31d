"""Run checkpoints with Orbax: periodic and epoch-end saves, last K + best, resume.

Each checkpoint is a step directory holding the whole train state (params,
batch statistics, optimizer state, step, RNG key data) and a JSON ``meta``
item (epoch, validation accuracy, what the run was). Orbax writes into a
temporary directory and renames it when complete, so a crash or SIGKILL
mid-save leaves the previous checkpoints as they were. Kept: the last
``keep`` checkpoints plus the best one by validation top-1 (only epoch-end
checkpoints carry that metric).

Restoring tries the newest step first; if it cannot be read (a truncated or
corrupted file), it warns and falls back to the previous one. Once an older step
restored, each newer unreadable one is moved aside to ``<step>.unreadable`` (kept,
out of Orbax's sight): left in place it would hold its step number, so the resumed
run's own checkpoint at that step would not be written (the run's final state lost
when the run ends there) and it would take one of the ``keep`` places. When no step
can be read, nothing is moved.

A failed restore leaves tensorstore reads of the other arrays in flight; when
they finish, their callbacks find Orbax's event loop already closed, and Python
would print each one's ``RuntimeError: Event loop is closed`` traceback (42 of
them for a LeNet-5 run), and asyncio logs their own errors as never retrieved:
:func:`quiet_failed_reads` keeps those, and only those, off stderr from
the first restore on.
"""

from __future__ import annotations

import io
import json
import logging
import numbers
import os
import sys
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jaxnets.cli import one_line
from train.quiet import absl_errors_only

__all__ = ["CheckpointError", "CheckpointStructureError", "Checkpointer", "BEST_METRIC",
           "UNREADABLE_SUFFIX", "MODEL_INFO", "RunWeights", "load_model", "locate_run", "model_of",
           "quiet_failed_reads", "read_error", "read_run_weights", "run_model",
           "write_model_info"]

log = logging.getLogger(__name__)
BEST_METRIC = "val_top1"
UNREADABLE_SUFFIX = ".unreadable"


class CheckpointError(RuntimeError):
    """No checkpoint in a run directory could be restored."""


class _HeldOutput:
    """Holds back stderr and log records while a checkpoint is written; ``replay()``
    lets them out (a failed write's many copies of its error are dropped instead)."""

    def __init__(self):
        self.records: list[logging.LogRecord] = []
        self.text = io.StringIO()
        self._handlers: list[logging.Handler] = []
        self._stderr = None

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(r is record for r in self.records):  # each handler asks: keep it once
            self.records.append(record)
        return False

    def __enter__(self):
        self._handlers = list(logging.getLogger().handlers)
        for handler in self._handlers:
            handler.addFilter(self)
        self._stderr, sys.stderr = sys.stderr, self.text
        return self

    def __exit__(self, *exc):
        sys.stderr = self._stderr
        for handler in self._handlers:
            handler.removeFilter(self)

    def replay(self, keep=lambda record: True, text: bool = True) -> None:
        """Writes what was held back (once): the records ``keep`` accepts, and the
        stderr text unless ``text`` is False."""
        if text and self.text.getvalue():
            sys.stderr.write(self.text.getvalue())
        for record in self.records:
            if keep(record):
                logging.getLogger(record.name).handle(record)
        self.text, self.records = io.StringIO(), []


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a lost mount); the earlier
    checkpoints are as they were."""


class CheckpointStructureError(CheckpointError):
    """A checkpoint is readable but holds a state of another structure than the
    template (another optimizer setup): older steps would not fit either."""


def _late_read_callback(unraisable) -> bool:
    """Whether an unraisable exception is a finished read's callback into a closed
    event loop (tensorstore reports it with no object)."""
    return (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed")


def read_error(e: BaseException) -> str:
    """A failed read's error in one short line: its first line, without the
    tensorstore spec (a few kB of JSON) that tensorstore's messages end with."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    for marker in (" [tensorstore_spec", "<bound method"):
        if (i := first.find(marker)) > 0:
            first = first[:i].rstrip(" ;:(")
    return first if len(first) <= 300 else first[:300] + " ..."


class _UnretrievedReadErrors(logging.Filter):
    """Drops asyncio's "exception was never retrieved" records of tensorstore reads:
    the other reads of a restore that failed on one (their errors name the same
    checkpoint; the first is reported)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, ValueError) and "tensorstore_spec" in str(exc)
                    and record.getMessage().startswith(("Task exception was never retrieved",
                                                        "Future exception was never retrieved")))


def quiet_failed_reads() -> None:
    """Keep a failed restore's reads still in flight off stderr (see the module
    docstring): their ``Event loop is closed`` reports (every other unraisable
    exception goes to the hook in place before) and asyncio's records of their
    unretrieved errors. Installed once per process."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedReadErrors) for f in asyncio_log.filters):
        asyncio_log.addFilter(_UnretrievedReadErrors())
    previous = sys.unraisablehook
    if getattr(previous, "_drops_late_read_callbacks", False):
        return

    def hook(unraisable):
        if not _late_read_callback(unraisable):
            previous(unraisable)

    hook._drops_late_read_callbacks = True
    sys.unraisablehook = hook


class _NoMetricsNote(logging.Filter):
    """Drops Orbax's warning on every save without metrics (mid-epoch and Ctrl-C
    saves carry none by design: only epoch ends have a validation accuracy)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Requested `tracked_metric`; did not provide")


class Checkpointer:
    """Saves and restores the train state of one run directory.

    Args:
        directory: Where step directories go (created if missing).
        keep: How many of the latest checkpoints to keep (plus the best).
    """

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        preservation = policies.AnyPreservationPolicy([
            policies.LatestN(n=max(keep, 1)),
            policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            best_fn=lambda m: m[BEST_METRIC],
            best_mode="max",
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        absl_log = logging.getLogger("absl")
        if not any(isinstance(f, _NoMetricsNote) for f in absl_log.filters):
            absl_log.addFilter(_NoMetricsNote())

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict, meta: dict[str, Any],
             val_top1: float | None = None) -> None:
        """Writes a checkpoint (synchronously, atomically).

        Args:
            step: Global step the state is at (train steps done).
            state: The train state pytree.
            meta: JSON-serialisable facts about the run position.
            val_top1: Validation top-1 at this step, for the best-checkpoint
                policy (None for mid-epoch saves).
        """
        if step in self.manager.all_steps():
            return
        metrics = None if val_top1 is None else {BEST_METRIC: float(val_top1)}
        held = _HeldOutput()
        try:
            with held:
                self.manager.save(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)),
                    metrics=metrics,
                    force=True,
                )
                self.manager.wait_until_finished()
        except (OSError, ValueError) as e:  # tensorstore reports write failures as ValueError
            text = str(e)
            if not isinstance(e, OSError) and not any(
                    w in text for w in ("RESOURCE_EXHAUSTED", "Failed writing", "os_error")):
                held.replay()
                raise
            # Orbax's writer threads logged this failure many times over: it is said once
            # (other loggers' records of the moment are let through).
            held.replay(keep=lambda r: not r.name.startswith(("absl", "orbax", "asyncio")),
                        text=False)
            reason = ("no space left on the device" if "No space left" in text or
                      getattr(e, "errno", None) == 28 else one_line(text, 200))
            raise CheckpointWriteError(
                f"cannot write the checkpoint of step {step} in {self.directory}: {reason} "
                "(the earlier checkpoints are kept; rerun the same command to resume once "
                "there is room)") from e
        except BaseException:
            held.replay()
            raise
        held.replay()

    def best_step(self) -> int | None:
        """The step of the best checkpoint by validation top-1, if any has the metric."""
        best = self.manager.best_step()
        return None if best is None else int(best)

    def restore(self, template: dict, step: int | None = None) -> tuple[int, dict, dict] | None:
        """Restores the newest readable checkpoint (or ``step``).

        Args:
            template: A train state of the right structure, shapes and dtypes
                (its values are not used).
            step: A specific step; None tries the newest first and falls back
                to older ones with a warning when one cannot be read.

        Returns:
            (step, state, meta), or None when the directory has no checkpoint.

        Raises:
            CheckpointError: Checkpoints exist but none could be read.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if not candidates:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        # Before the first attempt: a failed one's late callbacks can come before
        # its exception reaches the handler below.
        quiet_failed_reads()
        errors = []
        for s in candidates:
            try:
                restored = self.manager.restore(
                    s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                               meta=ocp.args.JsonRestore()))
                if errors:
                    moved = self._set_aside([e[0] for e in errors])
                    log.warning("resumed from step %d instead of %s%s", s,
                                ", ".join(str(e[0]) for e in errors),
                                f"; moved aside: {', '.join(moved)}" if moved else "")
                return s, restored["state"], restored["meta"]
            except Exception as e:  # noqa: BLE001 -- any read failure means "try the previous one".
                first = read_error(e)
                if "tree structures do not match" in str(e):
                    raise CheckpointStructureError(
                        f"the checkpoint at step {s} in {self.directory} holds a state of "
                        "another structure than this run's") from None
                log.warning("checkpoint at step %d in %s is unreadable (%s); trying the previous "
                            "one", s, self.directory, first[:300])
                errors.append((s, first))
        raise CheckpointError(
            f"no readable checkpoint in {self.directory} (pass another --output-dir, or "
            "move that folder aside to start the run again): "
            + "; ".join(f"step {s}: {msg[:200]}" for s, msg in errors))

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Renames unreadable step directories to ``<step>.unreadable`` (``.2``, ...
        when taken), on the primary process, and has every process's manager read
        the directory again. Returns the new names."""
        moved = []
        if ocp.multihost.is_primary_host(0):
            for step in steps:
                src = os.path.join(self.directory, str(step))
                if not os.path.isdir(src):
                    continue
                dst, n = src + UNREADABLE_SUFFIX, 1
                while os.path.exists(dst):
                    n += 1
                    dst = f"{src}{UNREADABLE_SUFFIX}.{n}"
                os.rename(src, dst)
                moved.append(dst)
        ocp.multihost.sync_global_processes("jaxnets_checkpoint_set_aside")
        self.manager.reload()
        return moved

    def close(self) -> None:
        """Finishes pending work and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


# --------------------------------------------------------------------------
# Reading a run's weights back (``python -m porting export`` of a run).

MODEL_INFO = "model.json"


def write_model_info(run_dir: str, arch: str, num_classes: int, overrides: dict,
                     classes: list[str] | None = None) -> None:
    """Writes ``model.json`` into a run directory: what builds the run's model
    (registry name, class count, constructor options, those the pretrained
    weights needed included), so that its checkpoints can be read without the
    dataset or the weights, and the name of each output (``classes``, for
    ``train.predict``)."""
    from train.config import write_json

    info = {"arch": arch, "num_classes": int(num_classes), "model_overrides": dict(overrides)}
    if classes is not None:
        info["classes"] = [str(c) for c in classes]
    write_json(os.path.join(run_dir, MODEL_INFO), info, sort_keys=True)


class RunWeights(NamedTuple):
    """A run checkpoint's model: ``arrays`` maps flax paths (``nnx.state``'s,
    dotted) to the parameters and BatchNorm statistics; ``arch`` is None when the
    run directory does not say (a bare checkpoints folder)."""

    arch: str | None
    num_classes: int | None
    overrides: dict
    step: int
    arrays: dict[str, np.ndarray]
    directory: str  # the step directory read


def _step_dirs(checkpoints: str) -> list[int]:
    return sorted(int(n) for n in os.listdir(checkpoints)
                  if n.isdigit() and os.path.isdir(os.path.join(checkpoints, n, "state")))


def locate_run(path: str) -> tuple[str | None, str, int | None] | None:
    """Where a path leads in a ``train.finetune`` run: ``(run directory or None,
    checkpoints directory, step the path names or None)``, or None when it is not
    a run directory, its ``checkpoints`` folder or one step directory of it."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return path, os.path.join(path, "checkpoints"), None
    if os.path.isdir(path) and os.path.basename(path) == "checkpoints":
        return os.path.dirname(path), path, None
    name = os.path.basename(path)
    if name.isdigit() and os.path.isdir(os.path.join(path, "state")):
        parent = os.path.dirname(path)
        return os.path.dirname(parent), parent, int(name)
    return None


def _best_step(checkpoints: str, steps: list[int]) -> int | None:
    """The step with the highest validation top-1 in its saved metrics (read as
    files: a CheckpointManager would also clean up the temporary folder of a save
    in progress, were the run still going)."""
    best = None
    for s in steps:
        try:
            with open(os.path.join(checkpoints, str(s), "metrics", "metrics")) as f:
                top1 = json.load(f).get(BEST_METRIC)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(top1, (int, float)) and (best is None or top1 > best[0]):
            best = (top1, s)
    return None if best is None else best[1]


def _run_model(run_dir: str | None) -> tuple[str | None, int | None, dict]:
    """(arch, num_classes, overrides) from ``model.json``, else ``config.json``
    (runs made before ``model.json`` existed: the ``--model-arg`` options)."""
    if run_dir is None:
        return None, None, {}
    for name in (MODEL_INFO, "config.json"):
        path = os.path.join(run_dir, name)
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                info = json.load(f)
            if not isinstance(info, dict):
                raise ValueError(f"a JSON {type(info).__name__}, not an object")
            if name == MODEL_INFO:
                found = (info.get("arch"), info.get("num_classes"),
                         dict(info.get("model_overrides", {})))
            else:
                found = info.get("arch"), None, {k: v for k, v in info.get("model_args", [])}
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path} is unreadable: {e}") from None
        if found[0] is not None:  # a model.json without its arch: config.json's
            return found
    return None, None, {}


def run_model(path: str) -> tuple[str | None, int | None, dict]:
    """``(arch, num_classes, constructor options)`` that a run records (``model.json``,
    else ``config.json``; Nones for a bare checkpoints folder), without reading a
    checkpoint.

    Raises:
        CheckpointError: Not a run, or its record is unreadable.
    """
    found = locate_run(os.path.expanduser(os.fspath(path)))
    if found is None:
        raise CheckpointError(f"{path} is not a train.finetune run directory (no checkpoints/)")
    return _run_model(found[0])


def read_run_weights(path: str, step: int | str | None = None, *,
                     fall_back: bool = False) -> RunWeights:
    """The model of one checkpoint of a ``train.finetune`` run: its parameters and
    BatchNorm statistics, as numpy (the optimizer state is not read).

    Args:
        path: The run directory, its ``checkpoints`` folder, or a step directory.
        step: A step, ``"best"`` (the best by validation top-1), or None: the step
            directory ``path`` names, else the newest.
        fall_back: With ``step`` None and ``path`` naming no step: when the newest
            step cannot be read, warn and read the one before (as a resume does;
            nothing is moved).

    Raises:
        CheckpointError: Not a run, no such step, or the step cannot be read
            (the message lists the other steps).
    """
    if isinstance(step, str) and step != "best":
        if not step.strip().isdigit():
            raise CheckpointError(f"step must be a step number, 'best' or None (the newest); "
                                  f"got {step!r}")
        step = int(step)
    elif step is not None and step != "best" and (isinstance(step, bool) or not isinstance(
            step, numbers.Integral) or step < 0):
        raise CheckpointError(f"step must be a step number, 'best' or None (the newest); "
                              f"got {step!r}")
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist")
    found = locate_run(path)
    if found is None:
        raise CheckpointError(f"{path} is not a train.finetune run directory (no checkpoints/)")
    run_dir, checkpoints, named = found
    # The run's model first: a damaged model.json is the run's problem, not a step's.
    arch, num_classes, overrides = _run_model(run_dir)
    if named is not None and step is not None and step != named:
        raise CheckpointError(f"{path} is the directory of step {named}, not of step {step}; "
                              "pass the run directory to choose a step")
    steps = _step_dirs(checkpoints) if os.path.isdir(checkpoints) else []
    if not steps:
        raise CheckpointError(f"no checkpoint in {checkpoints}")
    if step == "best":
        step = _best_step(checkpoints, steps)
        if step is None:
            raise CheckpointError(f"no checkpoint in {checkpoints} has a validation accuracy "
                                  "(only epoch-end checkpoints do); pass --step N")
    elif step is None and named is None and fall_back:
        errors = []
        for s in reversed(steps):
            try:
                weights = read_run_weights(path, s)
            except CheckpointError as e:
                errors.append((s, str(e).split(" (other steps")[0]))
                if s != steps[0]:
                    log.warning("%s; trying the previous one", errors[-1][1])
                continue
            if errors:
                log.warning("read step %d instead of %s", s,
                            ", ".join(str(bad) for bad, _ in errors))
            return weights
        if len(steps) == 1:
            raise CheckpointError(errors[0][1])
        raise CheckpointError(f"no readable checkpoint in {checkpoints} (steps "
                              f"{', '.join(map(str, steps))}); the newest: {errors[0][1]}")
    elif step is None:
        step = named if named is not None else steps[-1]
    if step not in steps:
        raise CheckpointError(f"no step {step} in {checkpoints} (steps: "
                              f"{', '.join(map(str, steps))})")
    state_dir = os.path.join(checkpoints, str(step), "state")
    quiet_failed_reads()
    ck = ocp.PyTreeCheckpointer()
    try:
        with absl_errors_only():  # "no _CHECKPOINT_METADATA" (it is one level up)
            tree = ck.metadata(state_dir).item_metadata
        wanted = {k: tree[k] for k in ("params", "batch_stats") if k in tree}
        if "params" not in wanted:
            raise ValueError("no 'params' in the state")
        restored = ck.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=jax.tree.map(lambda _: np.zeros(0), wanted),
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                      wanted),
            partial_restore=True))
    except Exception as e:  # noqa: BLE001 -- orbax raises assorted types for damaged files.
        first = read_error(e)
        others = [s for s in steps if s != step]
        raise CheckpointError(
            f"cannot read step {step} in {checkpoints}: {first}"
            + (f" (other steps: {', '.join(map(str, others))}; pass --step)" if others else "")
        ) from None
    arrays = {k: np.asarray(v) for part in ("params", "batch_stats")
              for k, v in restored.get(part, {}).items()}
    return RunWeights(arch, num_classes, overrides, int(step), arrays,
                      os.path.join(checkpoints, str(step)))


def load_model(path: str, step: int | str | None = None, *, seed: int = 0):
    """A ``train.finetune`` run's model, in eval mode, from one of its checkpoints.

    Args:
        path: The run directory, its ``checkpoints`` folder, or a step directory.
        step: As for :func:`read_run_weights` (None: the newest).
        seed: Seeds what a checkpoint does not hold (dropout's RNG state).

    Returns:
        ``(model, step)``.

    Raises:
        CheckpointError: As :func:`read_run_weights`, or the run does not say
            which model it holds.
    """
    weights = read_run_weights(path, step)
    return model_of(weights, seed=seed), weights.step


def model_of(weights: RunWeights, *, seed: int = 0):
    """The model (eval mode) that :func:`read_run_weights`' result describes; its
    arrays are handed over to the model.

    Raises:
        CheckpointError: The run does not say which model it holds.
    """
    from porting.pretrained import load_into_abstract, materialize

    if weights.arch is None:
        raise CheckpointError(f"{weights.directory} does not say which model it holds (no "
                              "model.json or config.json in the run directory)")
    model, _, num_classes = load_into_abstract(
        weights.arch, weights.arrays, torch_keys=False, label=weights.directory,
        default_classes=weights.num_classes, overrides=weights.overrides, consume=True)
    materialize(model, weights.arch, num_classes, seed, **weights.overrides)
    model.eval()
    return model
