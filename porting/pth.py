"""Read ``torch.save`` checkpoints without torch and without running pickled code.

Two on-disk formats are supported:

* the zip format (torch >= 1.6 default): ``<prefix>/data.pkl`` holds the object
  graph, ``<prefix>/data/<key>`` the raw bytes of each storage and
  ``<prefix>/byteorder`` the byte order they were written in;
* the legacy format (``_use_new_zipfile_serialization=False``): five pickles in
  a row (magic number, protocol version, sys info, the object graph, the sorted
  storage keys) followed by each storage as an int64 element count and its raw
  little-endian bytes.

The pickles are read with an unpickler whose ``find_class`` hands out only
tensor-rebuilding functions implemented here, inert stand-ins for torch storage
and dtype objects, and ``collections.OrderedDict``. Any other global (for
example ``os.system`` in a crafted file) is refused before it can be called.
Tensors come back as numpy arrays (``bfloat16`` and ``float8`` via
``ml_dtypes``). The very old tar format (torch < 0.4) is not supported.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

__all__ = [
    "LoadedStateDict",
    "PthError",
    "TorchDtype",
    "load_pth",
    "load_state_dict_file",
    "unwrap_state_dict",
]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"
_TAR_MAGIC_OFFSET = 257
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
# DataParallel/DDP, torch.compile.
_STRIP_PREFIXES = ("module.", "_orig_mod.")

_NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(t)
    for name, t in {
        "float64": np.float64,
        "float32": np.float32,
        "float16": np.float16,
        "bfloat16": ml_dtypes.bfloat16,
        "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
        "float8_e5m2": ml_dtypes.float8_e5m2,
        "complex128": np.complex128,
        "complex64": np.complex64,
        "int64": np.int64,
        "int32": np.int32,
        "int16": np.int16,
        "int8": np.int8,
        "uint64": np.uint64,
        "uint32": np.uint32,
        "uint16": np.uint16,
        "uint8": np.uint8,
        "bool": np.bool_,
    }.items()
}

_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    # Untyped storages are raw bytes; the dtype arrives with the tensor.
    "UntypedStorage": "uint8",
}


class PthError(ValueError):
    """A checkpoint file is missing, malformed, or asks for something refused."""


class _RefusedGlobal(PthError):
    """A pickle asked for a global outside the allow-list (message names the file)."""


class TorchDtype(NamedTuple):
    """Stand-in for a pickled ``torch.dtype`` such as ``torch.float32``.

    A tuple rather than a numpy dtype so that a crafted pickle cannot mutate a
    shared object through the BUILD opcode.
    """

    name: str

    @property
    def numpy_dtype(self) -> np.dtype:
        """The matching numpy dtype."""
        return _NUMPY_DTYPES[self.name]


class _StorageType(NamedTuple):
    name: str
    dtype_name: str


class _Storage(NamedTuple):
    key: str
    dtype_name: str
    data: np.ndarray | None  # flat uint8 bytes; None while only scanning


class LoadedStateDict(NamedTuple):
    """Result of :func:`load_state_dict_file`.

    Attributes:
        state_dict: Parameter/buffer name -> numpy array.
        notes: Human-readable notes on the unwrapping that was done.
    """

    state_dict: dict[str, np.ndarray]
    notes: list[str]


# --------------------------------------------------------------------------
# Tensor rebuilding (the pickled calls torch would make, done in numpy)
# --------------------------------------------------------------------------


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        type(v) is int for v in value
    ):
        raise PthError(f"malformed tensor record: {what} must be a tuple of ints")
    return tuple(value)


def _tensor_from_storage(
    storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype | None = None
) -> np.ndarray | None:
    if not isinstance(storage, _Storage):
        raise PthError("malformed tensor record: expected a storage reference")
    if storage.data is None:  # scanning pass of the legacy reader
        return None
    shape = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if type(offset) is not int or offset < 0 or len(shape) != len(strides):
        raise PthError("malformed tensor record: bad storage offset or rank")
    if any(n < 0 for n in shape) or any(s < 0 for s in strides):
        raise PthError("malformed tensor record: negative size or stride")
    dtype = dtype if dtype is not None else _NUMPY_DTYPES[storage.dtype_name]
    buf = storage.data
    if len(buf) % dtype.itemsize:
        raise PthError(f"storage '{storage.key}' is not a whole number of {dtype}")
    elems = buf.view(dtype)
    if 0 in shape:
        return np.empty(shape, dtype)
    # Bounds are checked here because as_strided would otherwise read outside
    # the buffer for a crafted size/stride.
    last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
    if last >= len(elems):
        raise PthError(
            f"tensor of size {shape} stride {strides} offset {offset} runs past "
            f"the end of storage '{storage.key}' ({len(elems)} elements)"
        )
    numel = math.prod(shape)
    contiguous = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    if all(n == 1 or s == c for n, s, c in zip(shape, strides, contiguous)):
        # Row-major tensors (views into a shared storage included) are exposed
        # as views, so each storage byte is copied exactly once overall.
        return elems[offset : offset + numel].reshape(shape)
    view = np.lib.stride_tricks.as_strided(
        elems[offset:],
        shape=shape,
        strides=tuple(s * dtype.itemsize for s in strides),
        writeable=False,
    )
    return np.ascontiguousarray(view)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor_from_storage(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
):
    return _tensor_from_storage(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage,
    storage_offset,
    size,
    stride,
    requires_grad,
    backward_hooks,
    dtype,
    metadata=None,
):
    if not isinstance(dtype, TorchDtype):
        raise PthError("malformed tensor record: expected a torch dtype")
    return _tensor_from_storage(
        storage, storage_offset, size, stride, dtype.numpy_dtype
    )


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        # torch.Size pickles as Size(tuple); a plain tuple is the faithful value.
        ("torch", "Size"): tuple,
    }
    for fn in (
        _rebuild_tensor,
        _rebuild_tensor_v2,
        _rebuild_tensor_v3,
        _rebuild_parameter,
        _rebuild_parameter_with_state,
    ):
        allowed[("torch._utils", fn.__name__)] = fn
    for name, dtype_name in _STORAGE_DTYPES.items():
        for module in ("torch", "torch.storage"):
            allowed[(module, name)] = _StorageType(name, dtype_name)
    for name in _NUMPY_DTYPES:
        allowed[("torch", name)] = TorchDtype(name)
    return allowed


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in ``_ALLOWED``."""

    def __init__(
        self, file: Any, path: str, persistent_load: Callable[[Any], Any]
    ) -> None:
        super().__init__(file, encoding="utf-8")
        self._path = path
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _RefusedGlobal(
                f"refusing to unpickle global '{module}.{name}' in {self._path}: "
                "only tensors and plain containers are allowed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        return self._persistent_load(pid)


def _parse_storage_id(pid: Any, legacy: bool) -> tuple[_StorageType, str, int, Any]:
    length = 6 if legacy else 5
    if not (isinstance(pid, tuple) and len(pid) == length and pid[0] == "storage"):
        raise PthError(f"unexpected persistent id {pid!r:.80}")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
        raise PthError(f"unexpected storage type {storage_type!r:.80}")
    if not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise PthError(f"malformed storage reference {pid!r:.80}")
    return storage_type, key, numel, pid[5] if legacy else None


# --------------------------------------------------------------------------
# Zip format
# --------------------------------------------------------------------------


def _read_zip_member(
    f: io.BufferedReader, zf: zipfile.ZipFile, info: zipfile.ZipInfo, nbytes: int
) -> np.ndarray:
    if info.compress_type != zipfile.ZIP_STORED:
        buf = np.empty(nbytes, np.uint8)
        with zf.open(info) as member:
            got = member.readinto(memoryview(buf))
    else:
        # torch stores records uncompressed, so the bytes can be read straight
        # into the destination buffer: one copy, no intermediate bytes object.
        f.seek(info.header_offset)
        header = f.read(30)
        if len(header) != 30 or header[:4] != _ZIP_MAGIC:
            raise PthError(f"bad local header for record '{info.filename}'")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        # Checked before allocating, so a forged size cannot exhaust memory.
        if start + nbytes > os.fstat(f.fileno()).st_size:
            raise PthError(f"record '{info.filename}' runs past the end of the file")
        buf = np.empty(nbytes, np.uint8)
        f.seek(start)
        got = f.readinto(memoryview(buf))
    if got != nbytes:
        raise PthError(
            f"record '{info.filename}' is truncated ({got} of {nbytes} bytes)"
        )
    return buf


def _load_zip(path: str, f: io.BufferedReader) -> Any:
    try:
        zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        detail = "no central directory" if "not a zip file" in str(e) else str(e)
        raise PthError(f"zip archive is truncated or corrupt ({detail})") from None
    with zf:
        names = zf.namelist()
        # torch nests every record under one top-level folder of any name.
        pkl = [n for n in names if n.split("/")[-1] == "data.pkl" and n.count("/") <= 1]
        if not pkl:
            raise PthError("zip archive has no data.pkl record: not a torch.save checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        if prefix + "constants.pkl" in names:
            raise PthError(
                "this is a TorchScript archive (torch.jit.save), not a torch.save "
                "checkpoint; save its state_dict() with torch.save instead"
            )
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace")
            if byteorder not in ("little", "big"):
                raise PthError(f"unknown byteorder record {byteorder!r}")
        storages: dict[str, _Storage] = {}

        def persistent_load(pid: Any) -> _Storage:
            storage_type, key, numel, _ = _parse_storage_id(pid, legacy=False)
            if key in storages:
                return storages[key]
            name = f"{prefix}data/{key}"
            try:
                info = zf.getinfo(name)
            except KeyError:
                raise PthError(f"missing storage record '{name}'") from None
            itemsize = _NUMPY_DTYPES[storage_type.dtype_name].itemsize
            nbytes = numel * itemsize
            if info.file_size < nbytes:
                raise PthError(f"storage record '{name}' holds {info.file_size} "
                               f"bytes, expected {nbytes}")
            data = _read_zip_member(f, zf, info, nbytes)
            if byteorder == "big" and itemsize > 1:
                data = data.view(f">u{itemsize}").astype(f"<u{itemsize}").view(np.uint8)
            storages[key] = _Storage(key, storage_type.dtype_name, data)
            return storages[key]

        data_pkl = zf.read(pkl[0])
        return _RestrictedUnpickler(io.BytesIO(data_pkl), path, persistent_load).load()


# --------------------------------------------------------------------------
# Legacy format
# --------------------------------------------------------------------------


def _load_legacy(path: str, f: io.BufferedReader) -> Any:
    def no_persistent(pid: Any) -> Any:
        raise PthError("unexpected storage reference in a legacy header pickle")

    def load_plain() -> Any:
        return _RestrictedUnpickler(f, path, no_persistent).load()

    if load_plain() != _LEGACY_MAGIC:
        raise PthError("not a PyTorch checkpoint (a pickle without torch's magic number)")
    protocol = load_plain()
    if protocol != _LEGACY_PROTOCOL:
        raise PthError(f"unsupported legacy protocol version {protocol!r}")
    load_plain()  # sys_info: legacy storages are always written little-endian
    main_start = f.tell()

    # Pass 1 walks the object graph only to learn each storage's dtype, since
    # the raw storage bytes sit after the graph and their keys.
    dtypes: dict[str, str] = {}

    def scan(pid: Any) -> _Storage:
        storage_type, key, _, _ = _parse_storage_id(pid, legacy=True)
        dtypes.setdefault(key, storage_type.dtype_name)
        return _Storage(key, storage_type.dtype_name, None)

    _RestrictedUnpickler(f, path, scan).load()
    keys = load_plain()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise PthError("malformed storage key list")
    roots: dict[str, _Storage] = {}
    for key in keys:
        if key not in dtypes:
            raise PthError(f"storage '{key}' is listed but never referenced")
        header = f.read(8)
        if len(header) != 8:
            raise PthError(f"file is truncated: it ends before storage '{key}'")
        (numel,) = struct.unpack("<q", header)
        nbytes = numel * _NUMPY_DTYPES[dtypes[key]].itemsize
        if numel < 0 or nbytes > os.fstat(f.fileno()).st_size - f.tell():
            raise PthError(f"file is truncated: storage '{key}' ({nbytes} bytes) "
                           "runs past the end of the file")
        data = np.empty(nbytes, np.uint8)
        f.readinto(memoryview(data))
        roots[key] = _Storage(key, dtypes[key], data)

    def resolve(pid: Any) -> _Storage:
        storage_type, key, _, view = _parse_storage_id(pid, legacy=True)
        if key not in roots:
            raise PthError(f"missing storage '{key}'")
        root = roots[key]
        if view is None:
            return root
        # Pre-1.0 files may reference a slice of a storage as its own storage.
        view_key, offset, size = view
        itemsize = _NUMPY_DTYPES[root.dtype_name].itemsize
        data = root.data[offset * itemsize : (offset + size) * itemsize]
        return _Storage(view_key, root.dtype_name, data)

    f.seek(main_start)
    return _RestrictedUnpickler(f, path, resolve).load()


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def _load_raw(path: str | os.PathLike) -> Any:
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise PthError(f"cannot load {path}: file not found") from None
    except IsADirectoryError:
        raise PthError(f"cannot load {path}: is a directory") from None
    except OSError as e:
        raise PthError(f"cannot load {path}: {e.strerror or e}") from None
    with f:
        head = f.read(512)
        f.seek(0)
        try:
            if not head:
                raise PthError("file is empty")
            if head.startswith(_ZIP_MAGIC):
                return _load_zip(path, f)
            if head[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar":
                raise PthError("legacy tar checkpoint format (torch < 0.4) is not supported")
            if head[:1] == b"\x80":
                return _load_legacy(path, f)
            raise PthError("not a PyTorch checkpoint (neither a zip archive nor a legacy pickle)")
        except _RefusedGlobal:
            raise
        except PthError as e:
            raise PthError(f"cannot load {path}: {e}") from None
        except EOFError:
            raise PthError(f"cannot load {path}: file is truncated") from None
        except pickle.UnpicklingError as e:
            problem = "file is truncated" if "truncated" in str(e) else "corrupt pickle"
            raise PthError(f"cannot load {path}: {problem} ({e})") from None
        except Exception as e:  # malformed pickles raise assorted types
            raise PthError(
                f"cannot load {path}: corrupt checkpoint ({type(e).__name__}: {e})"
            ) from None


def _is_tensor(value: Any) -> bool:
    # numpy arrays from a file; torch tensors or jax arrays from memory.
    return isinstance(value, np.ndarray) or (
        hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, Mapping)
    )


def _is_flat_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(_is_tensor(v) for v in obj.values())


def _holds_tensors(obj: Any, depth: int = 4) -> bool:
    # Bounded because a crafted pickle can make a dict that contains itself.
    return depth > 0 and isinstance(obj, Mapping) and any(
        _is_tensor(v) or _holds_tensors(v, depth - 1) for v in obj.values()
    )


def unwrap_state_dict(obj: Any, *, source: str = "state_dict") -> LoadedStateDict:
    """Extracts the model state_dict from a checkpoint object, loaded or in memory.

    Wrapper dicts such as ``{"epoch": 3, "state_dict": {...}}`` are unwrapped
    (keys ``state_dict``, ``model_state_dict``, ``model``, ``module``, repeatedly,
    unless the current dict is already a flat name -> tensor dict), non-tensor
    entries are dropped, and a ``module.`` (DataParallel/DDP) or ``_orig_mod.``
    (``torch.compile``) prefix shared by every key is stripped, repeatedly.

    Args:
        obj: The checkpoint: name -> tensor (numpy arrays, torch tensors or jax
            arrays), possibly wrapped.
        source: How to spell ``obj`` in code, for the hint given when its
            state_dicts sit under keys that are not known wrappers.

    Returns:
        ``LoadedStateDict(state_dict, notes)``: the state_dict (``obj`` itself
        when there was nothing to do) and a note per unwrapping step taken.

    Raises:
        PthError: ``obj`` is not a mapping, holds no tensors (naming the keys
            that hold state_dicts, if any) or has non-string keys.
    """
    notes: list[str] = []
    # Bounded because a crafted pickle can make a dict that contains itself.
    for _ in range(8):
        if _is_flat_tensor_dict(obj) or not isinstance(obj, Mapping):
            break
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        notes.append(f"unwrapped '{key}'")
        source += f"[{key!r}]"
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise PthError(f"holds a {type(obj).__name__}, not a state_dict")
    state = obj if _is_flat_tensor_dict(obj) else {
        k: v for k, v in obj.items() if _is_tensor(v)}
    if not state:
        nested = [k for k, v in obj.items() if _holds_tensors(v)]
        if nested:
            raise PthError(
                f"no tensors at the top level of the state_dict, but state_dicts under "
                f"{', '.join(map(repr, nested))}: pick one and load it with "
                f"porting.load_torch_state_dict(model, {source}[{nested[0]!r}])"
            )
        raise PthError("no tensors found in the state_dict")
    if not all(isinstance(k, str) for k in state):
        raise PthError("state_dict has non-string keys")
    dropped = [str(k) for k in obj if k not in state]
    if dropped:
        shown = ", ".join(dropped[:5]) + (", ..." if len(dropped) > 5 else "")
        notes.append(f"dropped {len(dropped)} non-tensor entries ({shown})")
    for _ in range(len(_STRIP_PREFIXES) * 2):
        prefix = next((p for p in _STRIP_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
        notes.append(f"stripped '{prefix}' prefix from {len(state)} keys")
    return LoadedStateDict(state, notes)


def load_state_dict_file(path: str | os.PathLike) -> LoadedStateDict:
    """Loads a checkpoint and extracts its model state_dict.

    The state_dict is taken out as :func:`unwrap_state_dict` does: wrappers
    such as ``{"epoch": 3, "state_dict": {...}}`` removed, non-tensor entries
    dropped, a ``module.`` (DataParallel/DDP) or ``_orig_mod.``
    (``torch.compile``) prefix shared by every key stripped.

    Args:
        path: A ``.pth``/``.pt`` file written by ``torch.save``.

    Returns:
        ``LoadedStateDict(state_dict, notes)``: a plain dict of numpy arrays and
        a list of notes describing each unwrapping step taken.

    Raises:
        PthError: The file cannot be read, is refused, or holds no tensors
            (naming the keys of nested state_dicts to pick from, if any).
    """
    path = os.fspath(path)
    obj = _load_raw(path)
    try:
        state, notes = unwrap_state_dict(
            obj, source=f"porting.pth.load_pth({path!r}, unwrap=False)")
    except PthError as e:
        raise PthError(f"cannot load {path}: {e}") from None
    # A plain dict, whatever container the pickle held.
    return LoadedStateDict(dict(state), notes)


def load_pth(path: str | os.PathLike, *, unwrap: bool = True) -> dict[str, np.ndarray] | Any:
    """Loads a ``torch.save`` checkpoint without torch and without running code.

    Args:
        path: A file written by ``torch.save`` (zip or legacy format).
        unwrap: If True, return only the model state_dict, as
            :func:`load_state_dict_file` does (wrappers removed, ``module.``/
            ``_orig_mod.`` prefix stripped). If False, return the whole pickled
            object, as ``torch.load(path, weights_only=True)`` would, with numpy arrays in
            place of tensors and parameters, tuples in place of ``torch.Size``
            and :class:`TorchDtype` in place of ``torch.dtype``.

    Returns:
        A dict of numpy arrays (``unwrap=True``) or the checkpoint object.

    Raises:
        PthError: The file is missing, truncated, not a checkpoint, lacks a
            record, references a global other than tensors and containers, or
            (``unwrap=True``) holds no state_dict.
    """
    if unwrap:
        return load_state_dict_file(path).state_dict
    return _load_raw(path)
