"""What the programs' command lines share."""

from __future__ import annotations

import argparse
import ast
import functools
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["ArgumentParser", "one_line", "parse_model_arg", "model_arg_type", "progress_bar",
           "LOG_PROGRESS_INTERVAL"]

# Seconds between two progress lines when the bar's stream is not a terminal.
LOG_PROGRESS_INTERVAL = 30.0


def one_line(text: str, limit: int = 1500) -> str:
    """``text`` as one line (runs of whitespace, newlines too, made one space) of at
    most about ``limit`` characters: a longer one is cut at its last ``", "`` before
    the limit (between two keys of a list) where there is one, and ends ``" ..."``."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text.rfind(", ", limit // 2, limit)
    return (text[:cut] + ", ..." if cut > 0 else text[:limit] + " ...")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one ``error: ...`` line
    (argparse prints the whole usage first), exit status 2, and which takes flags
    only as written: a shortened ``--lr-m`` is an unknown flag, not ``--lr-mult``
    (``allow_abbrev=False``; an abbreviation would change meaning when a flag is
    added)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_model_arg(text: str, reserved: Mapping[str, str] | None = None) -> tuple[str, Any]:
    """A model constructor option given as ``KEY=VALUE`` (``--model-arg``).

    ``VALUE`` is read as a Python literal (``True``, ``0.1``, ``(2, 2)``, ``'gelu'``);
    ``true``/``false`` in any case are booleans; anything else is the text itself.

    Args:
      text: ``KEY=VALUE``.
      reserved: keys that have their own flag, each with the reason to give.

    Returns:
      ``(key, value)``.

    Raises:
      ValueError: for text that is not ``KEY=VALUE`` with an identifier key, or a
        reserved key.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    if reserved and key in reserved:
        raise ValueError(f"{key} is not a --model-arg: {reserved[key]}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = {"true": True, "false": False}.get(value.lower(), value)
    return key, parsed


def model_arg_type(reserved: Mapping[str, str] | None = None):
    """``parse_model_arg`` as an argparse ``type=``: a bad option is a usage error."""
    def model_arg(text: str) -> tuple[str, Any]:
        try:
            return parse_model_arg(text, reserved)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    model_arg.__name__ = "KEY=VALUE"
    return model_arg


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:  # noqa: BLE001 -- no isatty, a closed stream, an OS error: not one
        return False


# What tqdm writes to redraw a bar in place: carriage returns and cursor-up sequences.
_REDRAW = re.compile(r"\r|\x1b\[A")


class _LineStream:
    """A text stream for tqdm on a log file or pipe: every redraw of a bar becomes a
    line of its own (tqdm's carriage returns made one endless line there), blank
    redraws are dropped, and what the program printed on stdout before comes first
    (tqdm flushes stdout only when writing to sys.stderr itself)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        lines = [line.rstrip() for line in _REDRAW.sub("\n", text).split("\n")]
        lines = [line for line in lines if line]
        if lines:
            if self.stream is not sys.stdout:
                sys.stdout.flush()
            self.stream.write("".join(line + "\n" for line in lines))
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


@functools.cache
def _log_bar():
    """tqdm's class for a log: no line for a redraw of a state already shown (the final
    state drawn again on closing), nothing to clear."""
    from tqdm.std import tqdm

    class LogBar(tqdm):
        _shown = None

        def display(self, msg=None, pos=None):
            if msg is not None and not msg:  # clearing the bar: a log keeps its lines
                return True
            if msg is None:
                state = (self.n, self.total, self.desc, str(self.postfix or ""))
                if state == self._shown:
                    return True
                self._shown = state
            return super().display(msg, pos)

    return LogBar


# tqdm's options that progress_bar sets for a log, unless given or set in the
# environment (tqdm reads TQDM_<NAME> when it is imported).
def _log_defaults() -> dict[str, Any]:
    interval = float(os.environ.get("TQDM_MININTERVAL", LOG_PROGRESS_INTERVAL))
    # tqdm's monitor thread redraws a bar that has not been drawn for maxinterval.
    return {"mininterval": LOG_PROGRESS_INTERVAL, "maxinterval": max(interval, 10.0),
            "ascii": True}


def progress_bar(iterable: Iterable | None = None, **tqdm_kwargs: Any):
    """A tqdm progress bar that also reads well in a log.

    On a terminal (and in a notebook) it is tqdm's bar, its width following the
    window's. Anywhere else (stderr sent to a file, a pipe, ``gcloud ... ssh`` on the
    hosts of a TPU pod) each redraw is a line of its own, in ASCII: the bar's first
    and last lines and, between them, at most one every ``LOG_PROGRESS_INTERVAL``
    seconds (more where the caller refreshes it), none for a redraw that shows nothing
    new; a bar is never cleared (``leave=False`` is taken as True: its last line
    stays); tqdm would write carriage returns there, one line that grows by a redraw
    ten times a second. tqdm's own environment variables (``TQDM_MININTERVAL``,
    ``TQDM_ASCII``, ``TQDM_NCOLS``...) apply as usual.

    Args:
      iterable: what to iterate over (or None with ``total=`` for manual updates).
      **tqdm_kwargs: tqdm's options; ``file`` defaults to ``sys.stderr``.

    Returns:
      The tqdm object.
    """
    from tqdm.auto import tqdm

    stream = tqdm_kwargs.pop("file", None) or sys.stderr
    notebook = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)  # a widget
    if notebook or _is_terminal(stream):
        tqdm_kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, file=stream, **tqdm_kwargs)
    for name, value in _log_defaults().items():
        if f"TQDM_{name.upper()}" not in os.environ:
            tqdm_kwargs.setdefault(name, value)
    tqdm_kwargs["leave"] = True
    return _log_bar()(iterable, file=_LineStream(stream), **tqdm_kwargs)
