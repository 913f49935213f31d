"""Library chatter the programs keep off stderr where their own line says it."""

from __future__ import annotations

import contextlib
import logging

__all__ = ["absl_errors_only"]


@contextlib.contextmanager
def absl_errors_only():
    """Holds back absl's warnings (tfds, Orbax) for the length of a call whose
    failure the caller reports itself; errors still pass."""
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_log.setLevel(level)
