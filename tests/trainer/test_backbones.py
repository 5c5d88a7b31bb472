"""The legacy PyTorch checkpoint reader, on small handmade files in the legacy format."""

from __future__ import annotations

import collections
import pickle
import struct
import sys
import types

import numpy as np
import pytest

from cbir.errors import InvalidInput
from trainer.backbones import efficientnet_lite
from trainer.backbones.torch_pickle import LEGACY_MAGIC_NUMBER, read_legacy_state_dict


class _Storage:
    def __init__(self, key: str, values: np.ndarray):
        self.key, self.values = key, values


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


@pytest.fixture
def write_legacy(monkeypatch, tmp_path):
    """Writes objects the way torch.save(..., _use_new_zipfile_serialization=False) does, without torch."""
    torch_mod = types.ModuleType("torch")
    utils_mod = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # only its name is pickled
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    storage_classes = {}
    for name in ("FloatStorage", "LongStorage", "DoubleStorage"):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch_mod, name, cls)
        storage_classes[name] = cls
    torch_mod._utils = utils_mod
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)
    type_names = {
        np.dtype(np.float32): "FloatStorage",
        np.dtype(np.int64): "LongStorage",
        np.dtype(np.float64): "DoubleStorage",
    }

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                cls = storage_classes[type_names[obj.values.dtype]]
                return ("storage", cls, obj.key, "cpu", obj.values.size, None)
            return None

        def reducer_override(self, obj):
            if isinstance(obj, _Tensor):
                args = (obj.storage, obj.offset, obj.size, obj.stride, False, collections.OrderedDict())
                return _rebuild_tensor_v2, args
            return NotImplemented

    def write(obj, storages: list[_Storage], name="ckpt.pth", truncate: int = 0):
        path = tmp_path / name
        with path.open("wb") as f:
            pickle.dump(LEGACY_MAGIC_NUMBER, f, protocol=2)
            pickle.dump(1001, f, protocol=2)
            pickle.dump({"protocol_version": 1001, "little_endian": True, "type_sizes": {}}, f, protocol=2)
            Pickler(f, protocol=2).dump(obj)
            pickle.dump([s.key for s in storages], f, protocol=2)
            for s in storages:
                f.write(struct.pack("<q", s.values.size))
                f.write(s.values.astype(s.values.dtype.newbyteorder("<")).tobytes())
        if truncate:
            data = path.read_bytes()
            path.write_bytes(data[:-truncate])
        return path

    return write


def test_reads_strided_views_offsets_and_shared_storages(write_legacy):
    base = np.arange(24, dtype=np.float32)
    storage = _Storage("1001", base)
    longs = _Storage("77", np.array([5, -3], np.int64))
    state = collections.OrderedDict(
        # A transposed (column-major) view: element [i, j] at offset + i*1 + j*4.
        transposed=_Tensor(storage, 0, (4, 3), (1, 4)),
        # A slice further into the same storage.
        tail=_Tensor(storage, 20, (2, 2), (2, 1)),
        scalar=_Tensor(longs, 1, (), ()),
        conv=_Tensor(storage, 0, (2, 3, 2, 2), (1, 2, 6, 12)),
    )
    got = read_legacy_state_dict(write_legacy(state, [storage, longs]))
    assert list(got) == ["transposed", "tail", "scalar", "conv"]
    np.testing.assert_array_equal(got["transposed"], base[:12].reshape(3, 4).T)
    np.testing.assert_array_equal(got["tail"], np.array([[20, 21], [22, 23]], np.float32))
    assert got["scalar"].shape == () and got["scalar"] == -3 and got["scalar"].dtype == np.int64
    expected_conv = np.lib.stride_tricks.as_strided(base, (2, 3, 2, 2), (4, 8, 24, 48))
    np.testing.assert_array_equal(got["conv"], expected_conv)
    assert got["conv"].flags["C_CONTIGUOUS"] and got["conv"].flags["OWNDATA"]


def test_unwraps_a_nested_state_dict(write_legacy):
    storage = _Storage("1", np.array([1.5, 2.5], np.float64))
    got = read_legacy_state_dict(
        write_legacy({"epoch": 3, "state_dict": {"w": _Tensor(storage, 0, (2,), (1,))}}, [storage])
    )
    np.testing.assert_array_equal(got["w"], [1.5, 2.5])


def test_refuses_arbitrary_globals(write_legacy, tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return os.system, ("echo should-not-run",)

    path = write_legacy({"x": Evil()}, [])
    with pytest.raises(InvalidInput, match="refusing to load"):
        read_legacy_state_dict(path)


def test_rejects_non_legacy_missing_and_truncated_files(write_legacy, tmp_path):
    zipped = tmp_path / "new.pth"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(InvalidInput, match="not a readable legacy PyTorch checkpoint|not a legacy"):
        read_legacy_state_dict(zipped)
    with pytest.raises(InvalidInput, match="cannot read checkpoint"):
        read_legacy_state_dict(tmp_path / "absent.pth")
    storage = _Storage("1", np.arange(8, dtype=np.float32))
    truncated = write_legacy({"w": _Tensor(storage, 0, (8,), (1,))}, [storage], truncate=4)
    with pytest.raises(InvalidInput, match="truncated"):
        read_legacy_state_dict(truncated)
    too_far = write_legacy({"w": _Tensor(storage, 4, (8,), (1,))}, [storage], name="far.pth")
    with pytest.raises(InvalidInput, match="exceeds its storage"):
        read_legacy_state_dict(too_far)


def test_reads_the_packaged_efficientnet_lite0_checkpoint():
    state = read_legacy_state_dict(efficientnet_lite.packaged_weights_path())
    params = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert params == 4_694_024  # EfficientNet-Lite0: 4.69M parameters
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(np.all(np.isfinite(v)) for v in state.values())
