"""Run checkpoints with Orbax: periodic and epoch-end saves, last K + best, resume.

Each checkpoint is a step directory holding the whole train state (params,
batch statistics, optimizer state, step, RNG key data) and a JSON ``meta``
item (epoch, validation accuracy, what the run was). Orbax writes into a
temporary directory and renames it when complete, so a crash or SIGKILL
mid-save leaves the previous checkpoints as they were. Kept: the last
``keep`` checkpoints plus the best one by validation top-1 (only epoch-end
checkpoints carry that metric).

Restoring tries the newest step first; if it cannot be read (a truncated or
corrupted file), it warns and falls back to the previous one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

__all__ = ["CheckpointError", "Checkpointer", "BEST_METRIC"]

log = logging.getLogger(__name__)
BEST_METRIC = "val_top1"


class CheckpointError(RuntimeError):
    """No checkpoint in a run directory could be restored."""


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
        errors = []
        for s in candidates:
            try:
                restored = self.manager.restore(
                    s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                               meta=ocp.args.JsonRestore()))
                if errors:
                    log.warning("resumed from step %d instead of %s", s,
                                ", ".join(str(e[0]) for e in errors))
                return s, restored["state"], restored["meta"]
            except Exception as e:  # noqa: BLE001 -- any read failure means "try the previous one".
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log.warning("checkpoint at step %d in %s is unreadable (%s); trying the previous "
                            "one", s, self.directory, first[:300])
                errors.append((s, first))
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {msg[:200]}" for s, msg in errors))

    def close(self) -> None:
        """Finishes pending work and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
