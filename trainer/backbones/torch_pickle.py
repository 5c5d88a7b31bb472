"""Reads PyTorch's legacy (non-zip) checkpoint format into NumPy arrays, without importing torch.

The legacy format (torch.save before 1.6, or with _use_new_zipfile_serialization=False) is a sequence of
pickles: a magic number, the protocol version, system info, the object itself (tensors appear as
persistent ids naming a storage), the list of storage keys, then each storage as a little-endian int64
element count followed by its raw bytes. Tensors are views (offset, size, stride) into those storages.
"""

from __future__ import annotations

import collections
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cbir.errors import InvalidInput

__all__ = ["LEGACY_MAGIC_NUMBER", "read_legacy_state_dict"]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch.<Name>Storage -> element type, as torch writes it (always little-endian here; checked below).
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int
    view: tuple[str, int, int] | None  # (base key, offset, size) for old-style storage views


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *_):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_):
    return data


class _LegacyUnpickler(pickle.Unpickler):
    """Resolves only the handful of globals a state dict needs; anything else is refused (no code runs)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils":
            known = {
                "_rebuild_tensor_v2": _rebuild_tensor_v2,
                "_rebuild_tensor": _rebuild_tensor,
                "_rebuild_parameter": _rebuild_parameter,
            }
            if name in known:
                return known[name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint")

    def persistent_load(self, pid) -> _StorageRef:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        return _StorageRef(str(key), storage_type.dtype, int(numel), view)


def _read_storages(f: BinaryIO, refs: dict[str, _StorageRef], keys: list[str]) -> dict[str, np.ndarray]:
    data = {}
    for key in keys:
        ref = refs.get(key)
        if ref is None:
            raise InvalidInput(f"storage {key} listed in the checkpoint but used by no tensor")
        header = f.read(8)
        if len(header) != 8:
            raise InvalidInput(f"checkpoint truncated before storage {key}")
        numel = int(np.frombuffer(header, "<i8")[0])
        dtype = ref.dtype.newbyteorder("<")
        raw = f.read(numel * dtype.itemsize)
        if len(raw) != numel * dtype.itemsize:
            raise InvalidInput(f"checkpoint truncated inside storage {key}")
        data[key] = np.frombuffer(raw, dtype=dtype).astype(ref.dtype.newbyteorder("="))
    return data


def _materialise(t: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    ref = t.storage
    if ref.view is not None:
        base_key, view_offset, view_size = ref.view
        flat = storages[str(base_key)][int(view_offset) : int(view_offset) + int(view_size)]
    else:
        flat = storages[ref.key]
    if len(t.size) != len(t.stride):
        raise InvalidInput(f"tensor with size {t.size} and stride {t.stride} in storage {ref.key}")
    if t.size and min(t.size) > 0:
        last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride, strict=True))
        if t.offset < 0 or last >= len(flat):
            raise InvalidInput(f"tensor view exceeds its storage {ref.key} ({last} >= {len(flat)})")
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[t.offset :], shape=t.size, strides=tuple(s * itemsize for s in t.stride), writeable=False
    )
    return np.array(view, order="C")  # a contiguous copy that owns its memory


def _resolve(obj: Any, storages: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, _TensorRef):
        return _materialise(obj, storages)
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v, storages)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_resolve(v, storages) for v in obj)
    return obj


def _collect_refs(obj: Any, out: dict[str, _StorageRef]) -> None:
    if isinstance(obj, _TensorRef):
        out[obj.storage.key] = obj.storage
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_refs(v, out)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _collect_refs(v, out)


def read_legacy_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a legacy-format .pth/.pt file as {name: array} (a nested 'state_dict' is unwrapped)."""
    path = Path(path)
    try:
        f = path.open("rb")
    except OSError as e:
        raise InvalidInput(f"cannot read checkpoint {path}: {e.strerror}") from None
    with f:
        try:
            magic = pickle.load(f)
            if magic != LEGACY_MAGIC_NUMBER:
                raise InvalidInput(
                    f"{path} is not a legacy PyTorch checkpoint (zip-format files need torch to convert)"
                )
            version = pickle.load(f)
            if version != LEGACY_PROTOCOL_VERSION:
                raise InvalidInput(f"{path}: unsupported legacy protocol version {version}")
            sys_info = pickle.load(f)
            if not sys_info.get("little_endian", True):
                raise InvalidInput(f"{path} was written on a big-endian machine; not supported")
            obj = _LegacyUnpickler(f).load()
            keys = pickle.load(f)
        except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, TypeError) as e:
            raise InvalidInput(f"{path} is not a readable legacy PyTorch checkpoint: {e}") from None
        refs: dict[str, _StorageRef] = {}
        _collect_refs(obj, refs)
        storages = _read_storages(f, refs, [str(k) for k in keys])
    state = _resolve(obj, storages)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InvalidInput(f"{path} does not hold a state dict (found {type(state).__name__})")
    return dict(state)
