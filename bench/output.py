"""Writing the benchmarks' result files: checked before the run, written whole.

A ``--json`` path is checked before any measuring (a typo is one error line in
a second, not a traceback after minutes), written to a temporary file beside it
and renamed into place (a killed run leaves the earlier file as it was), and
holds strict JSON: a figure that was not measured (NaN) is ``null``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

__all__ = ["json_path_problem", "strict", "write_json"]


def json_path_problem(path: str) -> str | None:
    """Why ``path`` cannot take a result file, or None when it can."""
    if os.path.isdir(path):
        return f"{path} is a directory"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"no permission to write in {folder}"
    return None


def strict(value: Any) -> Any:
    """``value`` with every non-finite float (nested in dicts, lists, tuples) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def write_json(path: str, value: Any, indent: int = 1) -> None:
    """Writes ``strict(value)`` to ``path`` by a temporary file and a rename."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(strict(value), f, indent=indent, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
