"""Read and write safetensors files, single or sharded Hugging Face style.

Tensor data goes through the ``safetensors`` library's numpy API; this module
only adds sharding (``model-00001-of-00003.safetensors`` plus a
``model.safetensors.index.json`` with ``metadata`` and ``weight_map``),
directory resolution and one-line errors.

bfloat16: the installed ``safetensors`` (0.8) reads and writes
``ml_dtypes.bfloat16`` numpy arrays natively, so no format code is needed
here. Releases still allowed by the project's ``safetensors>=0.4`` pin (up to
at least 0.5.3, see safetensors issue #598) fail to read ``BF16`` into numpy
("data type 'bfloat16' not understood"). A one-time probe detects that, and
only then are files decoded with the library's own ``safetensors.deserialize``
plus a dtype table that knows ``ml_dtypes`` (:func:`_load_file_fallback`).
Writing always goes through ``safetensors.numpy.save_file``.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

__all__ = ["SafetensorsFileError", "load_safetensors", "save_safetensors"]

_SUFFIX = ".safetensors"
_INDEX_SUFFIX = ".safetensors.index.json"
_DEFAULT_STEM = "model"

_FALLBACK_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "C64": np.complex64,
}


class SafetensorsFileError(ValueError):
    """A safetensors file, shard or index is missing, corrupt or inconsistent."""


@functools.cache
def _library_reads_bf16() -> bool:
    probe = {"x": np.zeros(1, ml_dtypes.bfloat16)}
    try:
        loaded = safetensors.numpy.load(safetensors.numpy.save(probe))
        return loaded["x"].dtype == probe["x"].dtype
    except Exception:  # older releases raise KeyError or TypeError here
        return False


def _load_file_fallback(path: Path) -> dict[str, np.ndarray]:
    """Decodes a file with the library's parser and an ml_dtypes-aware table."""
    with open(path, "rb") as f:
        raw = f.read()
    out = {}
    for name, info in safetensors.deserialize(raw):
        if info["dtype"] not in _FALLBACK_DTYPES:
            raise SafetensorsFileError(
                f"cannot load {path}: unsupported dtype {info['dtype']} for '{name}'"
            )
        dtype = _FALLBACK_DTYPES[info["dtype"]]
        out[name] = np.frombuffer(info["data"], dtype).reshape(info["shape"])
    return out


def _load_file(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise SafetensorsFileError(f"cannot load {path}: file not found")
    try:
        if not _library_reads_bf16():
            return _load_file_fallback(path)
        with safetensors.safe_open(path, framework="numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorsFileError:
        raise
    except Exception as e:  # the library raises SafetensorError, OSError, ...
        raise SafetensorsFileError(
            f"cannot load {path}: corrupt safetensors file ({e})"
        ) from None


def _load_index(index: Path) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except FileNotFoundError:
        raise SafetensorsFileError(f"cannot load {index}: file not found") from None
    except (ValueError, KeyError, TypeError) as e:
        raise SafetensorsFileError(
            f"cannot load {index}: not a safetensors index ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) for v in weight_map.values()
    ):
        raise SafetensorsFileError(f"cannot load {index}: malformed weight_map")
    root = index.parent.resolve()
    shards: dict[str, dict[str, np.ndarray]] = {}
    out = {}
    for key, shard in weight_map.items():
        if shard not in shards:
            shard_path = (index.parent / shard).resolve()
            # An index must not make us read files outside its own directory.
            if not shard_path.is_relative_to(root):
                raise SafetensorsFileError(
                    f"cannot load {index}: shard '{shard}' lies outside the index directory"
                )
            if not shard_path.is_file():
                raise SafetensorsFileError(
                    f"cannot load {index}: shard '{shard}' listed in the index does not exist"
                )
            shards[shard] = _load_file(shard_path)
        if key not in shards[shard]:
            raise SafetensorsFileError(
                f"cannot load {index}: key '{key}' is listed for shard '{shard}' "
                "but that shard does not contain it"
            )
        out[key] = shards[shard][key]
    return out


def _resolve_directory(directory: Path) -> Path:
    for name in (_DEFAULT_STEM + _INDEX_SUFFIX, _DEFAULT_STEM + _SUFFIX):
        if (directory / name).is_file():
            return directory / name
    for pattern in ("*" + _INDEX_SUFFIX, "*" + _SUFFIX):
        found = sorted(directory.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found[:4])
            raise SafetensorsFileError(
                f"cannot load {directory}: several candidates ({names}); pass one file"
            )
    raise SafetensorsFileError(f"cannot load {directory}: no safetensors file or index in it")


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a safetensors checkpoint into numpy arrays.

    Args:
        path: A ``.safetensors`` file, a ``.safetensors.index.json`` shard
            index, or a directory holding one of them (``model.*`` preferred).

    Returns:
        Tensor name -> numpy array. For sharded checkpoints the order follows
        the index's ``weight_map``; single files come back in the file's
        (sorted) order, as safetensors does not record insertion order.

    Raises:
        SafetensorsFileError: The path, a shard or a key is missing, or a file
            is not valid safetensors.
    """
    path = Path(path)
    if path.is_dir():
        path = _resolve_directory(path)
    if path.name.endswith(_INDEX_SUFFIX):
        return _load_index(path)
    return _load_file(path)


def _target(path: Path) -> tuple[Path, str]:
    """Splits a save target into (directory, stem)."""
    for suffix in (_INDEX_SUFFIX, _SUFFIX):
        if path.name.endswith(suffix):
            return path.parent, path.name[: -len(suffix)]
    return path, _DEFAULT_STEM


def _plan_shards(
    arrays: dict[str, np.ndarray], max_shard_bytes: int
) -> list[dict[str, np.ndarray]]:
    # Greedy in key order like Hugging Face: a tensor larger than the limit
    # gets a shard of its own rather than being split.
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, arr in arrays.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = arr
        size += arr.nbytes
    return shards


def _remove_stale(directory: Path, stem: str, keep: set[str]) -> None:
    # Leftovers from an earlier save with a different shard count would make
    # directory loading ambiguous or silently load old weights.
    shard_re = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}" + re.escape(_SUFFIX))
    for p in directory.iterdir():
        stale_shard = shard_re.fullmatch(p.name) is not None
        if p.name not in keep and (
            stale_shard or p.name in (stem + _SUFFIX, stem + _INDEX_SUFFIX)
        ):
            p.unlink()


def _check_inputs(
    state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None
) -> dict[str, np.ndarray]:
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafetensorsFileError("safetensors metadata must map str to str")
    arrays = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise SafetensorsFileError(f"tensor names must be str, got {key!r}")
        arr = np.asarray(value)
        if arr.dtype == object:
            raise SafetensorsFileError(f"'{key}' is not a numeric array")
        # Not np.ascontiguousarray: it turns 0-d arrays into shape (1,).
        arrays[key] = arr if arr.flags.c_contiguous else arr.copy(order="C")
    return arrays


def save_safetensors(
    state_dict: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Writes arrays to a safetensors file, or to shards plus an index.

    Args:
        state_dict: Tensor name -> array (numpy, or anything ``np.asarray``
            accepts, e.g. jax arrays).
        path: Target ``.safetensors`` file (or ``.safetensors.index.json``);
            any other path is taken as a directory to hold ``model.safetensors``.
        metadata: Optional str -> str metadata, written into every file header
            and, for sharded output, into the index next to ``total_size``.
        max_shard_bytes: If given and the tensors total more than this, write
            ``<stem>-0000i-of-0000n.safetensors`` shards and
            ``<stem>.safetensors.index.json``.

    Returns:
        The path of the single file or of the index that was written.

    Raises:
        SafetensorsFileError: Bad names, values, metadata or shard limit.
    """
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise SafetensorsFileError("max_shard_bytes must be positive")
    arrays = _check_inputs(state_dict, metadata)
    directory, stem = _target(Path(path))
    directory.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata) if metadata is not None else None
    total = sum(a.nbytes for a in arrays.values())

    if max_shard_bytes is None or total <= max_shard_bytes:
        target = directory / (stem + _SUFFIX)
        safetensors.numpy.save_file(arrays, target, metadata=meta)
        _remove_stale(directory, stem, keep={target.name})
        return target

    shards = _plan_shards(arrays, max_shard_bytes)
    names = [f"{stem}-{i:05d}-of-{len(shards):05d}{_SUFFIX}" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for name, shard in zip(names, shards):
        safetensors.numpy.save_file(shard, directory / name, metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    index = directory / (stem + _INDEX_SUFFIX)
    index_meta = {**(meta or {}), "total_size": total}
    index.write_text(json.dumps({"metadata": index_meta, "weight_map": weight_map}, indent=2))
    _remove_stale(directory, stem, keep={index.name, *names})
    return index
