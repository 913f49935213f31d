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
:func:`_quiet_late_read_callbacks` keeps those, and only those, off stderr from
the first restore on.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

__all__ = ["CheckpointError", "Checkpointer", "BEST_METRIC", "UNREADABLE_SUFFIX"]

log = logging.getLogger(__name__)
BEST_METRIC = "val_top1"
UNREADABLE_SUFFIX = ".unreadable"


class CheckpointError(RuntimeError):
    """No checkpoint in a run directory could be restored."""


def _late_read_callback(unraisable) -> bool:
    """Whether an unraisable exception is a finished read's callback into a closed
    event loop (tensorstore reports it with no object)."""
    return (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed")


class _UnretrievedReadErrors(logging.Filter):
    """Drops asyncio's "exception was never retrieved" records of tensorstore reads:
    the other reads of a restore that failed on one (their errors name the same
    checkpoint; the first is reported)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, ValueError) and "tensorstore_spec" in str(exc)
                    and record.getMessage().startswith(("Task exception was never retrieved",
                                                        "Future exception was never retrieved")))


def _quiet_late_read_callbacks() -> None:
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
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=True,
        )
        self.manager.wait_until_finished()

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
        _quiet_late_read_callbacks()
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
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log.warning("checkpoint at step %d in %s is unreadable (%s); trying the previous "
                            "one", s, self.directory, first[:300])
                errors.append((s, first))
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}: "
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
