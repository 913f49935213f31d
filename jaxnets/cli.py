"""What the programs' command lines share."""

from __future__ import annotations

import argparse
import ast
from collections.abc import Mapping
from typing import Any

__all__ = ["ArgumentParser", "one_line", "parse_model_arg", "model_arg_type"]


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
