"""Tests for porting.safetensors_io: single and sharded safetensors I/O."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from porting import safetensors_io
from porting.safetensors_io import SafetensorsFileError, load_safetensors, save_safetensors


def _state_dict() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(8).astype(np.float16),
        "fc.weight": rng.standard_normal((10, 8)).astype(ml_dtypes.bfloat16),
        "bn.num_batches_tracked": np.array(7, np.int64),  # 0-d
        "mask": np.array([True, False, True]),
        "ids": np.arange(-3, 3, dtype=np.int64),
        "empty": np.zeros((0, 3), np.float32),
    }


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert got[k].shape == v.shape, k
        assert got[k].tobytes() == v.tobytes(), k


def test_single_file_round_trip(tmp_path):
    sd = _state_dict()
    written = save_safetensors(sd, tmp_path / "m.safetensors", metadata={"arch": "tiny"})
    assert written == tmp_path / "m.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert_same(load_safetensors(written), sd)
    assert_same(load_safetensors(tmp_path), sd)  # a directory with one file
    with safetensors.safe_open(written, framework="numpy") as f:
        assert f.metadata() == {"arch": "tiny"}


def test_directory_target_uses_model_name(tmp_path):
    sd = _state_dict()
    written = save_safetensors(sd, tmp_path / "ckpt")
    assert written == tmp_path / "ckpt" / "model.safetensors"
    assert_same(load_safetensors(tmp_path / "ckpt"), sd)


def test_sharded_round_trip(tmp_path):
    sd = _state_dict()
    total = sum(v.nbytes for v in sd.values())
    index = save_safetensors(sd, tmp_path / "model.safetensors", metadata={"arch": "tiny"},
                             max_shard_bytes=200)
    assert index == tmp_path / "model.safetensors.index.json"
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    # conv.weight (864 B) exceeds the limit and gets a shard of its own.
    assert shards == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (tmp_path / "model.safetensors").exists()

    doc = json.loads(index.read_text())
    assert doc["metadata"] == {"arch": "tiny", "total_size": total}
    assert list(doc["weight_map"]) == list(sd)
    assert doc["weight_map"]["conv.weight"] == shards[0]
    assert set(doc["weight_map"].values()) == set(shards)
    for shard in shards:
        with safetensors.safe_open(tmp_path / shard, framework="numpy") as f:
            assert f.metadata() == {"arch": "tiny"}
            assert sum(f.get_tensor(k).nbytes for k in f.keys()) <= 200 or len(f.keys()) == 1

    for source in (index, tmp_path):
        loaded = load_safetensors(source)
        assert list(loaded) == list(sd)  # index order is the state_dict order
        assert_same(loaded, sd)


def test_no_sharding_when_under_the_limit(tmp_path):
    sd = _state_dict()
    written = save_safetensors(sd, tmp_path / "model.safetensors", max_shard_bytes=10**6)
    assert written.name == "model.safetensors"
    assert not list(tmp_path.glob("*.index.json"))


def test_resave_removes_stale_shards(tmp_path):
    sd = _state_dict()
    save_safetensors(sd, tmp_path / "model.safetensors", max_shard_bytes=100)
    assert len(list(tmp_path.glob("model-*"))) > 3
    save_safetensors(sd, tmp_path / "model.safetensors", max_shard_bytes=200)
    assert len(list(tmp_path.glob("model-*"))) == 3
    (tmp_path / "other.txt").write_text("keep me")
    small = {"x": np.ones(2, np.float32)}
    save_safetensors(small, tmp_path / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "other.txt"]
    assert_same(load_safetensors(tmp_path), small)


def test_torch_reads_what_we_write_and_bytes_match(tmp_path):
    sd = _state_dict()
    ours = save_safetensors(sd, tmp_path / "ours.safetensors", metadata={"k": "v"})
    loaded = safetensors.torch.load_file(ours)
    assert sorted(loaded) == sorted(sd)
    for k, v in sd.items():
        t = loaded[k]
        if v.dtype == ml_dtypes.bfloat16:
            assert t.dtype == torch.bfloat16
            np.testing.assert_array_equal(t.view(torch.int16).numpy(), v.view(np.int16))
        else:
            np.testing.assert_array_equal(t.numpy(), v)
    theirs = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file(loaded, theirs, metadata={"k": "v"})
    assert ours.read_bytes() == theirs.read_bytes()


def test_we_read_what_torch_writes(tmp_path):
    tensors = {"w": torch.randn(3, 4), "h": torch.randn(5).bfloat16(), "i": torch.arange(4)}
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file(tensors, path)
    loaded = load_safetensors(path)
    np.testing.assert_array_equal(loaded["w"], tensors["w"].numpy())
    h_bits = tensors["h"].view(torch.int16).numpy()
    np.testing.assert_array_equal(loaded["h"].view(np.int16), h_bits)
    assert loaded["h"].dtype == ml_dtypes.bfloat16 and loaded["i"].dtype == np.int64


def test_bf16_fallback_decoder(tmp_path, monkeypatch):
    sd = _state_dict()
    path = save_safetensors(sd, tmp_path / "model.safetensors", max_shard_bytes=200)
    # Force the path taken with safetensors releases that cannot read BF16
    # into numpy themselves.
    monkeypatch.setattr(safetensors_io, "_library_reads_bf16", lambda: False)
    assert_same(load_safetensors(path), sd)


def test_accepts_non_numpy_arrays_and_non_contiguous(tmp_path):
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = save_safetensors({"t": base.T, "l": [1.0, 2.0]}, tmp_path / "x.safetensors")
    loaded = load_safetensors(path)
    np.testing.assert_array_equal(loaded["t"], base.T)
    np.testing.assert_array_equal(loaded["l"], [1.0, 2.0])


def test_index_with_missing_shard(tmp_path):
    index = save_safetensors(_state_dict(), tmp_path / "model.safetensors", max_shard_bytes=200)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    expected = (rf"^cannot load {re.escape(str(index))}: shard "
                r"'model-00002-of-00003\.safetensors' listed in the index does not exist$")
    with pytest.raises(SafetensorsFileError, match=expected):
        load_safetensors(index)


def test_index_key_missing_in_shard(tmp_path):
    index = save_safetensors(_state_dict(), tmp_path / "model.safetensors", max_shard_bytes=200)
    doc = json.loads(index.read_text())
    doc["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(SafetensorsFileError,
                       match=r"key 'ghost\.weight' is listed for shard 'model-00001-of-00003"
                             r"\.safetensors' but that shard does not contain it"):
        load_safetensors(tmp_path)


def test_index_cannot_point_outside_its_directory(tmp_path):
    outside = save_safetensors({"x": np.ones(1, np.float32)}, tmp_path / "secret.safetensors")
    sub = tmp_path / "sub"
    sub.mkdir()
    index = sub / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"x": f"../{outside.name}"}}))
    with pytest.raises(SafetensorsFileError, match="lies outside the index directory"):
        load_safetensors(index)


def test_malformed_index(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(SafetensorsFileError, match=r"not a safetensors index \(JSONDecodeError"):
        load_safetensors(index)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(SafetensorsFileError, match=r"not a safetensors index \(KeyError"):
        load_safetensors(index)


@pytest.mark.parametrize("damage", ["random", "truncated", "bad_header"])
def test_corrupt_file(tmp_path, damage):
    path = save_safetensors(_state_dict(), tmp_path / "model.safetensors")
    data = path.read_bytes()
    if damage == "random":
        data = np.random.default_rng(1).bytes(len(data))
    elif damage == "truncated":
        data = data[: len(data) - 50]
    else:
        data = data[:8] + b"{" * (len(data) - 8)
    path.write_bytes(data)
    expected = rf"^cannot load {re.escape(str(path))}: corrupt safetensors file \("
    with pytest.raises(SafetensorsFileError, match=expected):
        load_safetensors(path)


def test_missing_paths(tmp_path):
    with pytest.raises(SafetensorsFileError, match="file not found"):
        load_safetensors(tmp_path / "absent.safetensors")
    with pytest.raises(SafetensorsFileError, match="file not found"):
        load_safetensors(tmp_path / "absent.safetensors.index.json")
    with pytest.raises(SafetensorsFileError, match="no safetensors file or index in it"):
        load_safetensors(tmp_path)


def test_ambiguous_directory(tmp_path):
    save_safetensors({"a": np.ones(1)}, tmp_path / "a.safetensors")
    save_safetensors({"b": np.ones(1)}, tmp_path / "b.safetensors")
    expected = r"several candidates \(a\.safetensors, b\.safetensors\)"
    with pytest.raises(SafetensorsFileError, match=expected):
        load_safetensors(tmp_path)


def test_bad_inputs_are_rejected(tmp_path):
    with pytest.raises(SafetensorsFileError, match="metadata must map str to str"):
        save_safetensors({"a": np.ones(1)}, tmp_path / "x.safetensors", metadata={"n": 1})
    with pytest.raises(SafetensorsFileError, match="tensor names must be str"):
        save_safetensors({1: np.ones(1)}, tmp_path / "x.safetensors")
    with pytest.raises(SafetensorsFileError, match="'a' is not a numeric array"):
        save_safetensors({"a": np.array([object()])}, tmp_path / "x.safetensors")
    with pytest.raises(SafetensorsFileError, match="max_shard_bytes must be positive"):
        save_safetensors({"a": np.ones(1)}, tmp_path / "x.safetensors", max_shard_bytes=0)
    assert not list(Path(tmp_path).iterdir())
