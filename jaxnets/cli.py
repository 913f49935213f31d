"""What the programs' command lines share."""

from __future__ import annotations

import argparse

__all__ = ["ArgumentParser", "one_line"]


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
