"""Ctrl-C as a request the training loops act on between steps.

The first SIGINT sets :attr:`Interrupt.requested`; the loop then stops at the end
of its step, saves, and the program exits 130 with one line. A second SIGINT
raises ``KeyboardInterrupt`` at once, as usual.
"""

from __future__ import annotations

import signal

__all__ = ["Interrupt", "EXIT_INTERRUPTED"]

EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's status for a Ctrl-C


class Interrupt:
    """Turns the first SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:  # a second Ctrl-C means now
                raise KeyboardInterrupt
            self.requested = True
        self._previous = signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)
