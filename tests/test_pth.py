"""Tests for porting.pth: torch-free, code-free reading of torch.save files."""

from __future__ import annotations

import collections
import os
import pickle
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from porting.pth import PthError, TorchDtype, load_pth, load_state_dict_file

REPO = Path(__file__).resolve().parents[1]
FORMATS = ["zip", "legacy"]


def _save(obj, path: Path, fmt: str) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


def _tensor_bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    # numpy has no bfloat16: compare its raw 16-bit patterns instead.
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _array_bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.int16) if a.dtype.name == "bfloat16" else a


def assert_same(ours, ref, where="root"):
    """Asserts our loaded object equals torch.load's, tensor for tensor."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, np.ndarray), where
        expected = _tensor_bits(ref)
        got = _array_bits(ours)
        assert got.dtype == expected.dtype, where
        assert got.shape == expected.shape, where
        assert got.tobytes() == np.ascontiguousarray(expected).tobytes(), where
    elif isinstance(ref, torch.dtype):
        assert ours == TorchDtype(str(ref).removeprefix("torch.")), where
    elif isinstance(ref, dict):
        assert type(ours) is type(ref), where
        assert list(ours) == list(ref), where
        for k in ref:
            assert_same(ours[k], ref[k], f"{where}[{k!r}]")
        assert getattr(ours, "_metadata", None) == getattr(ref, "_metadata", None), where
    elif isinstance(ref, (list, tuple)):
        assert type(ours) is (tuple if isinstance(ref, torch.Size) else type(ref)), where
        assert len(ours) == len(ref), where
        for i, (o, r) in enumerate(zip(ours, ref)):
            assert_same(o, r, f"{where}[{i}]")
    else:
        assert type(ours) is type(ref) and ours == ref, where


def _mixed_checkpoint(fmt: str) -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=g)
    obj = {
        "fp32": torch.randn(3, 4, generator=g),
        "fp16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "fp64": torch.randn(2, generator=g).double(),
        "int64": torch.arange(-5, 5),
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 3),
        "param": torch.nn.Parameter(torch.randn(3, generator=g)),
        # Shared storage: three tensors viewing one buffer.
        "base": base,
        "tail": base[1:],
        "transposed": base.t(),
        "strided": torch.arange(48).reshape(2, 4, 6).permute(2, 0, 1)[::2, :, 1:],
        "expanded": torch.randn(3, 1, generator=g).expand(3, 4),
        "half_view": torch.randn(10, generator=g).half()[1::3],
        "nested": {"list": [torch.ones(2), 1, "x", None], "tuple": (2.5, torch.zeros(1))},
        "dtype": torch.float16,
        "size": torch.Size([2, 3]),
        "module_sd": torch.nn.Linear(3, 2).state_dict(),
    }
    if fmt == "zip":
        # Newer dtypes use _rebuild_tensor_v3 + UntypedStorage; torch itself
        # cannot read them back from the legacy format.
        obj["uint16"] = torch.tensor([1, 65535], dtype=torch.int32).to(torch.uint16)
    return obj


@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_torch_load(tmp_path, fmt):
    path = _save(_mixed_checkpoint(fmt), tmp_path / "mixed.pth", fmt)
    ref = torch.load(path, weights_only=True)
    ours = load_pth(path, unwrap=False)
    if fmt == "zip":
        u16, ref_u16 = ours.pop("uint16"), ref.pop("uint16")
        assert u16.dtype == np.uint16
        np.testing.assert_array_equal(u16, ref_u16.to(torch.int32).numpy())
    assert_same(ours, ref)
    assert isinstance(ours["module_sd"], collections.OrderedDict)


@pytest.mark.parametrize("fmt", FORMATS)
def test_shared_storage_views_copy_once(tmp_path, fmt):
    base = torch.arange(12.0).reshape(3, 4)
    path = _save({"a": base, "b": base[1:], "c": base.t()}, tmp_path / "s.pth", fmt)
    out = load_pth(path, unwrap=False)
    np.testing.assert_array_equal(out["c"], base.t().numpy())
    # Row-major views share the one storage buffer, as in torch; the
    # transposed tensor is materialised as a contiguous copy.
    assert np.shares_memory(out["a"], out["b"])
    assert out["c"].flags["C_CONTIGUOUS"] and not np.shares_memory(out["a"], out["c"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_resnet18_state_dict_round_trip(tmp_path, fmt):
    torchvision = pytest.importorskip("torchvision")
    sd = torchvision.models.resnet18().state_dict()
    path = _save(sd, tmp_path / "resnet18.pth", fmt)
    assert_same(load_pth(path, unwrap=False), torch.load(path, weights_only=True))
    loaded, notes = load_state_dict_file(path)
    assert notes == [] and list(loaded) == list(sd) and len(loaded) == 122
    assert loaded["layer4.1.bn2.num_batches_tracked"].dtype == np.int64


def _small_sd() -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.randn(2, 1, 3, 3), "bn.num_batches_tracked": torch.tensor(7)}


@pytest.mark.parametrize(
    ("wrap", "notes"),
    [
        (lambda sd: sd, []),
        (lambda sd: {"epoch": 3, "state_dict": sd}, ["unwrapped 'state_dict'"]),
        (lambda sd: {"model": sd, "optimizer": {"lr": 0.1}}, ["unwrapped 'model'"]),
        (lambda sd: {"model_state_dict": sd}, ["unwrapped 'model_state_dict'"]),
        (lambda sd: {"module": sd}, ["unwrapped 'module'"]),
        (
            lambda sd: {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}},
            ["unwrapped 'state_dict'", "stripped 'module.' prefix from 2 keys"],
        ),
        (
            lambda sd: {**sd, "epoch": 3, "arch": "tiny"},
            ["dropped 2 non-tensor entries (epoch, arch)"],
        ),
    ],
)
def test_load_state_dict_file_unwraps(tmp_path, wrap, notes):
    sd = _small_sd()
    path = _save(wrap(sd), tmp_path / "w.pth", "zip")
    loaded, got_notes = load_state_dict_file(path)
    assert got_notes == notes
    assert list(loaded) == list(sd) and type(loaded) is dict
    for k, v in sd.items():
        np.testing.assert_array_equal(loaded[k], v.numpy())
    assert list(load_pth(path)) == list(sd)  # unwrap=True is the same view


def test_dataparallel_model_prefix_stripped(tmp_path):
    dp = torch.nn.DataParallel(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()))
    path = _save(dp.state_dict(), tmp_path / "dp.pth", "legacy")
    loaded, notes = load_state_dict_file(path)
    assert notes == ["stripped 'module.' prefix from 2 keys"]
    assert list(loaded) == ["0.weight", "0.bias"]


def test_non_state_dict_is_rejected_by_unwrap(tmp_path):
    path = _save([torch.ones(2)], tmp_path / "list.pth", "zip")
    assert isinstance(load_pth(path, unwrap=False), list)
    with pytest.raises(PthError, match=r"list\.pth: holds a list, not a state_dict"):
        load_pth(path)


def test_reader_works_when_torch_cannot_be_imported(tmp_path):
    sd = {"w": torch.randn(3, 4), "h": torch.randn(5).bfloat16(), "n": torch.tensor(9)}
    _save({"state_dict": sd}, tmp_path / "zip.pth", "zip")
    _save(sd, tmp_path / "legacy.pth", "legacy")
    np.savez(tmp_path / "expected.npz", w=sd["w"].numpy(),
             h=sd["h"].view(torch.int16).numpy(), n=sd["n"].numpy())
    script = textwrap.dedent(
        """
        import importlib.abc, sys
        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, NoTorch())
        try:
            import torch
            sys.exit("torch import was not blocked")
        except ImportError:
            pass
        import numpy as np
        from porting.pth import load_pth
        expected = np.load(sys.argv[1] + "/expected.npz")
        for name in ("zip.pth", "legacy.pth"):
            sd = load_pth(sys.argv[1] + "/" + name)
            assert sorted(sd) == ["h", "n", "w"], sd.keys()
            np.testing.assert_array_equal(sd["w"], expected["w"])
            np.testing.assert_array_equal(sd["h"].view(np.int16), expected["h"])
            assert sd["h"].dtype.name == "bfloat16" and sd["n"].shape == ()
            assert sd["n"] == expected["n"]
        assert not any(m.startswith("torch") for m in sys.modules), "torch leaked in"
        print("TORCH_FREE_OK")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_FREE_OK" in proc.stdout


class _Evil:
    """Pickles as a call to a dangerous global that creates a marker file."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path):
    return {
        "posix.system": _Evil(os.system, (f"touch {marker}",)),
        # torch pickles with protocol 2, which spells builtins as __builtin__.
        "__builtin__.exec": _Evil(exec, (f"open({str(marker)!r}, 'w').close()",)),
    }


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("global_name", ["posix.system", "__builtin__.exec"])
def test_malicious_pickle_is_refused(tmp_path, fmt, global_name):
    if global_name == "posix.system" and os.name != "posix":
        pytest.skip("os.system pickles as posix.system only on POSIX")
    marker = tmp_path / "MARKER"
    evil = {"weight": torch.ones(2), "payload": _payloads(marker)[global_name]}
    path = _save(evil, tmp_path / "evil.pth", fmt)

    with pytest.raises(PthError) as info:
        load_pth(path, unwrap=False)
    assert str(info.value) == (
        f"refusing to unpickle global '{global_name}' in {path}: "
        "only tensors and plain containers are allowed"
    )
    with pytest.raises(PthError, match="refusing to unpickle"):
        load_state_dict_file(path)
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler does create the marker.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_handwritten_os_system_global_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    cmd = f"touch {marker}".encode()
    payload = b"\x80\x02cos\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R."
    path = tmp_path / "os_system.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")
    expected = r"refusing to unpickle global 'os\.system' in .*os_system\.pth"
    with pytest.raises(PthError, match=expected):
        load_pth(path)
    assert not marker.exists()


class _StorageRef:
    """A storage reference for hand-written legacy pickles."""

    def __init__(self, key, numel, view=None):
        self.key, self.numel, self.view = key, numel, view


class _OldTensor:
    """Pickles as torch._utils._rebuild_tensor, as pre-1.0 torch wrote tensors."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride)


class _OldTorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel, obj.view)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _OldTensor):
            return torch._utils._rebuild_tensor, obj.args
        return NotImplemented


def test_pre_1_0_legacy_storage_views_and_rebuild_tensor(tmp_path):
    # Old files could reference a slice of a storage ("view metadata") and
    # used the 4-argument _rebuild_tensor; torch.load still reads them.
    root = _StorageRef("root", 10)
    view = _StorageRef("root", 10, ("v", 2, 5))
    obj = {"full": _OldTensor(root, 0, (2, 5), (5, 1)),
           "viewed": _OldTensor(view, 1, (2, 2), (1, 2))}
    path = tmp_path / "old.pth"
    sys_info = {"protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, sys_info):
            pickle.dump(header, f, protocol=2)
        _OldTorchPickler(f, protocol=2).dump(obj)
        pickle.dump(["root"], f, protocol=2)
        f.write((10).to_bytes(8, "little") + np.arange(10, dtype=np.float32).tobytes())
    ref = torch.load(path, weights_only=True)
    assert ref["viewed"].tolist() == [[3.0, 5.0], [4.0, 6.0]]
    assert_same(load_pth(path, unwrap=False), ref)


def _rewrite_zip(src: Path, dst: Path, edit) -> Path:
    """Copies a zip, passing each (name, bytes) through edit (None drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


def test_big_endian_zip_is_byteswapped(tmp_path):
    sd = {"f": torch.randn(3, 2), "h": torch.randn(4).bfloat16(), "i": torch.arange(5)}
    src = _save(sd, tmp_path / "le.pth", "zip")
    itemsizes = {"0": 4, "1": 2, "2": 8}

    def to_big(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        key = name.rsplit("/", 1)[-1]
        if "/data/" in name:
            size = itemsizes[key]
            return np.frombuffer(data, f"<u{size}").astype(f">u{size}").tobytes()
        return data

    out = load_pth(_rewrite_zip(src, tmp_path / "be.pth", to_big), unwrap=False)
    assert_same(out, sd)


def _zip_checkpoint(tmp_path: Path) -> Path:
    return _save({"w": torch.arange(6.0).reshape(2, 3)}, tmp_path / "ok.pth", "zip")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(PthError, match=rf"^cannot load {re.escape(str(path))}: file not found$"):
        load_pth(path)


def test_directory_and_empty_file(tmp_path):
    with pytest.raises(PthError, match="is a directory"):
        load_pth(tmp_path)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(PthError, match=r"empty\.pth: file is empty"):
        load_pth(tmp_path / "empty.pth")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keep", [0.001, 0.01, 0.3, 0.999])
def test_truncated_file(tmp_path, fmt, keep):
    full = _save({"w": torch.randn(64, 64), "b": torch.randn(64)}, tmp_path / "full.pth", fmt)
    data = full.read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(PthError) as info:
        load_pth(path)
    msg = str(info.value)
    assert msg.startswith(f"cannot load {path}: ") and "\n" not in msg
    assert "truncated" in msg


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.pth"
    # A leading 0x00 rules out the zip and pickle signatures by construction.
    path.write_bytes(b"\x00" + np.random.default_rng(0).bytes(4095))
    expected = rf"^cannot load {re.escape(str(path))}: not a PyTorch checkpoint"
    with pytest.raises(PthError, match=expected):
        load_pth(path)


def test_plain_pickle_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(PthError, match="torch's magic number"):
        load_pth(path)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/readme.txt", "hello")
    expected = rf"^cannot load {re.escape(str(path))}: zip archive has no data\.pkl record"
    with pytest.raises(PthError, match=expected):
        load_pth(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_named(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(PthError, match=r"scripted\.pt: this is a TorchScript archive"):
        load_pth(path)


def test_missing_storage_record(tmp_path):
    src = _zip_checkpoint(tmp_path)
    path = _rewrite_zip(src, tmp_path / "nodata.pth",
                        lambda name, data: None if name.endswith("/data/0") else data)
    with pytest.raises(PthError, match=r"nodata\.pth: missing storage record 'ok/data/0'"):
        load_pth(path)


def test_short_storage_record(tmp_path):
    src = _zip_checkpoint(tmp_path)
    path = _rewrite_zip(src, tmp_path / "short.pth",
                        lambda name, data: data[:8] if name.endswith("/data/0") else data)
    with pytest.raises(PthError, match=r"storage record 'ok/data/0' holds 8 bytes, expected 24"):
        load_pth(path)


def test_out_of_bounds_tensor_is_rejected(tmp_path):
    src = _zip_checkpoint(tmp_path)
    # Claim a (2, 9) tensor on a 6-element storage: as_strided would read
    # past the buffer if sizes were not checked.
    path = _rewrite_zip(src, tmp_path / "oob.pth", lambda name, data: (
        data.replace(b"K\x02K\x03\x86", b"K\x02K\x09\x86", 1)
        if name.endswith("data.pkl") else data))
    assert b"K\x02K\x09\x86" in zipfile.ZipFile(path).read("ok/data.pkl")
    with pytest.raises(PthError, match=r"runs past the end of storage '0'"):
        load_pth(path)


def test_compressed_zip_records_are_read(tmp_path):
    src = _save({"w": torch.randn(5, 5)}, tmp_path / "plain.pth", "zip")
    dst = tmp_path / "deflated.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    assert_same(load_pth(dst, unwrap=False), torch.load(src, weights_only=True))


def test_load_pth_accepts_str_paths(tmp_path):
    out = load_pth(str(_zip_checkpoint(tmp_path)))
    np.testing.assert_array_equal(out["w"], np.arange(6.0, dtype=np.float32).reshape(2, 3))


def test_torch_compile_prefix_stripped(tmp_path):
    compiled = torch.compile(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()))
    dp = {f"module.{k}": v for k, v in compiled.state_dict().items()}
    assert list(compiled.state_dict()) == ["_orig_mod.0.weight", "_orig_mod.0.bias"]
    path = _save({"state_dict": dp}, tmp_path / "compiled.pth", "zip")
    loaded, notes = load_state_dict_file(path)
    assert notes == ["unwrapped 'state_dict'", "stripped 'module.' prefix from 2 keys",
                     "stripped '_orig_mod.' prefix from 2 keys"]
    assert list(loaded) == ["0.weight", "0.bias"] and type(loaded) is dict


@pytest.mark.parametrize(("obj", "keys", "pick"), [
    ({"net": "sd", "ema": "sd", "epoch": 3}, "'net', 'ema'", "['net']"),
    ({"model_state": "sd"}, "'model_state'", "['model_state']"),
    ({"model": {"generator": "sd", "discriminator": "sd"}}, "'generator', 'discriminator'",
     "['model']['generator']"),
])
def test_state_dicts_under_other_keys_are_named(tmp_path, obj, keys, pick):
    def fill(o):
        return _small_sd() if o == "sd" else {k: fill(v) for k, v in o.items()} \
            if isinstance(o, dict) else o

    path = _save(fill(obj), tmp_path / "w.pth", "zip")
    with pytest.raises(PthError) as e:
        load_pth(path)
    msg = str(e.value)
    assert msg.startswith(f"cannot load {path}: no tensors at the top level") and keys in msg
    expr = f"porting.pth.load_pth({str(path)!r}, unwrap=False){pick}"
    assert f"porting.load_torch_state_dict(model, {expr})" in msg
    # The expression named picks a state_dict.
    picked = eval(expr.removeprefix("porting.pth."), {"load_pth": load_pth})
    assert list(picked) == list(_small_sd())
    # A file without any tensor keeps the plain message.
    empty = _save({"epoch": 3}, tmp_path / "none.pth", "zip")
    with pytest.raises(PthError, match=r"none\.pth: no tensors found in the state_dict$"):
        load_pth(empty)
