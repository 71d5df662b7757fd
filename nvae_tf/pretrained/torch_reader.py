"""Read PyTorch checkpoint files without PyTorch, and without executing anything from them.

A ``torch.save`` file is a pickle whose tensors point at raw storages kept next to it, in one of
two containers: the zip format (PyTorch >= 1.6: ``NAME/data.pkl`` plus ``NAME/data/<key>``
per storage) or the legacy format (magic number, protocol and system-info pickles, the object
pickle, the list of storage keys, then each storage as an int64 element count and its bytes).

Checkpoints are untrusted input from the internet, so ``torch.load`` (which runs whatever the
pickle names) is replaced by a restricted unpickler: it resolves exactly the globals NVAE's
checkpoints use (``OrderedDict``, ``argparse.Namespace``, ``torch._utils._rebuild_tensor_v2``
and the ``torch.*Storage`` types) to inert stand-ins here, and refuses every other global.
Tensors come back as ``StoredTensor`` references; ``TorchCheckpoint.array`` rebuilds one as a
numpy array from its storage (dtype, shape, stride, offset) only when asked, so a 1 GB
optimizer state that is never used is never read.
"""

import collections
import dataclasses
import functools
import io
import math
import os
import pickle
import struct
import zipfile

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a legacy torch.save file
LEGACY_PROTOCOL = 1001
_ZIP_SIGNATURE = b"PK\x03\x04"
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,  # widened to float32 on read: numpy has no bfloat16
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class CheckpointReadError(ValueError):
    """A file that cannot be read as a safe PyTorch checkpoint (one-line message)."""


class SavedArgs:
    """Stand-in for ``argparse.Namespace``: an attribute bag filled from the pickle's state."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise CheckpointReadError("the checkpoint's argparse.Namespace has no field dict")
        self.__dict__.update(state)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self):
        return np.dtype(_STORAGE_DTYPES[self.name])


@dataclasses.dataclass(frozen=True)
class StorageRef:
    """One raw storage of the file: its key, element type and element count."""

    key: str
    type_name: str
    numel: int
    element_offset: int = 0  # legacy storage views start inside their root storage


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """A tensor of the checkpoint, not yet read: a strided view of one storage."""

    storage: StorageRef
    offset: int
    shape: tuple
    stride: tuple


def _rebuild_tensor(storage, offset, shape, stride, *_unused):
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` (gradient flags and hooks ignored)."""
    ints = (offset, *shape, *stride)
    if not isinstance(storage, StorageRef) or not all(isinstance(v, int) and v >= 0 for v in ints):
        raise CheckpointReadError("malformed tensor record in the checkpoint's pickle")
    if len(shape) != len(stride):
        raise CheckpointReadError("malformed tensor record: shape and stride differ in rank")
    return StoredTensor(storage, offset, tuple(shape), tuple(stride))


# Each lookup makes a fresh stand-in, so that a pickle's BUILD opcodes (which may set
# attributes on any object it holds) cannot alter this module's objects.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,  # immutable built-in
    ("argparse", "Namespace"): lambda: type("Namespace", (SavedArgs,), {}),
    ("torch._utils", "_rebuild_tensor_v2"): lambda: functools.partial(_rebuild_tensor),
    **{("torch", name): functools.partial(_StorageType, name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ``_ALLOWED_GLOBALS``; storages become ``StorageRef`` records."""

    def __init__(self, file, on_storage):
        super().__init__(file)
        self._on_storage = on_storage

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]()
        except (KeyError, TypeError):
            raise CheckpointReadError(
                f"refused: the pickle asks for {module}.{name}, which a model checkpoint never "
                "needs (nothing from the file was run)"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise CheckpointReadError(f"refused: unexpected persistent id {str(pid)[:60]!r}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if (
            not isinstance(storage_type, _StorageType)
            or storage_type.name not in _STORAGE_DTYPES
            or not isinstance(numel, int)
            or numel < 0
        ):
            raise CheckpointReadError(f"malformed storage record for storage {str(key)[:40]!r}")
        ref = StorageRef(str(key), storage_type.name, numel)
        self._on_storage(ref)
        if view is not None:  # legacy view of a root storage: (view_key, offset, numel)
            try:
                _view_key, offset, size = view
            except (TypeError, ValueError):
                raise CheckpointReadError(f"malformed storage view of storage {ref.key}") from None
            if not (isinstance(offset, int) and isinstance(size, int) and 0 <= offset <= numel):
                raise CheckpointReadError(f"malformed storage view of storage {ref.key}")
            ref = StorageRef(ref.key, ref.type_name, min(size, numel - offset), offset)
        return ref


def _unpickle(file, on_storage=lambda ref: None):
    try:
        return _RestrictedUnpickler(file, on_storage).load()
    except CheckpointReadError:
        raise
    except EOFError:
        raise CheckpointReadError("the file is truncated (its pickle ends early)") from None
    except Exception as e:
        raise CheckpointReadError(f"corrupt pickle: {str(e).splitlines()[0][:120]}") from None
    except (KeyError, struct.error, MemoryError, RecursionError) as e:
        raise CheckpointReadError(f"corrupt pickle ({type(e).__name__})") from None


class TorchCheckpoint:
    """An opened checkpoint: ``content`` is the unpickled object (tensors as ``StoredTensor``).

    Use as a context manager, or call ``close()``.
    """

    def __init__(self, path):
        self.path = str(path)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close())
        except OSError as e:
            raise CheckpointReadError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            head = self._file.read(4)
            self._file.seek(0)
            if head == _ZIP_SIGNATURE:
                self.format = "zip"
                self.content = self._open_zip()
            else:
                self.format = "legacy"
                self.content = self._open_legacy()
        except BaseException:
            self.close()
            raise

    # --- containers ---------------------------------------------------------------------------
    def _open_zip(self):
        try:
            self._zip = zipfile.ZipFile(self._file)
        except (zipfile.BadZipFile, OSError, EOFError):
            raise CheckpointReadError(
                "the file is truncated or corrupt (a zip checkpoint without its directory)"
            ) from None
        pickles = [n for n in self._zip.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointReadError("unknown format: a zip file without one NAME/data.pkl")
        self._prefix = pickles[0][: -len("data.pkl")]
        order = self._zip_member("byteorder", required=False)
        self._byteorder = (order or b"little").decode("ascii", "replace").strip()
        if self._byteorder not in ("little", "big"):
            raise CheckpointReadError(f"unknown byte order {self._byteorder!r}")
        return _unpickle(io.BytesIO(self._zip_member("data.pkl")))

    def _zip_member(self, name, required=True):
        try:
            return self._zip.read(self._prefix + name)
        except KeyError:
            if required:
                raise CheckpointReadError(
                    f"missing storage: {name} is not in the archive"
                ) from None
            return None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
            raise CheckpointReadError(f"corrupt archive member {name}: {e}") from None

    def _open_legacy(self):
        f = self._file
        try:
            magic = _unpickle(f)
        except CheckpointReadError:
            magic = None
        if magic != LEGACY_MAGIC:
            raise CheckpointReadError(
                "unknown format: neither a zip nor a legacy PyTorch checkpoint"
            )
        if _unpickle(f) != LEGACY_PROTOCOL:
            raise CheckpointReadError("unknown format: unsupported legacy protocol version")
        info = _unpickle(f)
        self._byteorder = (
            "little" if not isinstance(info, dict) or info.get("little_endian", True) else "big"
        )
        types = {}
        content = _unpickle(f, lambda ref: types.setdefault(ref.key, ref))
        keys = _unpickle(f)
        if not isinstance(keys, list):
            raise CheckpointReadError("corrupt legacy checkpoint: no storage key list")
        self._legacy_offsets = {}
        size = os.fstat(f.fileno()).st_size
        position = f.tell()
        for key in keys:
            if key not in types:
                raise CheckpointReadError(f"corrupt legacy checkpoint: storage {key} has no type")
            header = f.read(8)
            if len(header) < 8:
                raise CheckpointReadError(f"the file is truncated (storage {key} is missing)")
            (numel,) = struct.unpack("<q" if self._byteorder == "little" else ">q", header)
            nbytes = numel * np.dtype(_STORAGE_DTYPES[types[key].type_name]).itemsize
            self._legacy_offsets[str(key)] = (position + 8, numel)
            position += 8 + nbytes
            if position > size:
                raise CheckpointReadError(
                    f"the file is truncated (storage {key} ends past its end)"
                )
            f.seek(position)
        return content

    # --- tensors ------------------------------------------------------------------------------
    def _storage_bytes(self, ref):
        itemsize = np.dtype(_STORAGE_DTYPES[ref.type_name]).itemsize
        if self.format == "zip":
            name = f"data/{ref.key}"
            try:
                size = self._zip.getinfo(self._prefix + name).file_size
            except KeyError:
                raise CheckpointReadError(
                    f"missing storage: {name} is not in the archive"
                ) from None
            if size > (ref.element_offset + ref.numel) * itemsize + 64:  # a decompression bomb?
                raise CheckpointReadError(f"storage {ref.key} is larger than its record says")
            return self._zip_member(name)
        if ref.key not in self._legacy_offsets:
            raise CheckpointReadError(f"missing storage: {ref.key} is not in the file")
        start, numel = self._legacy_offsets[ref.key]
        self._file.seek(start)
        return self._file.read(numel * itemsize)

    def array(self, tensor: StoredTensor) -> np.ndarray:
        """The tensor as a new C-contiguous numpy array (bfloat16 widened to float32)."""
        ref = tensor.storage
        dtype = np.dtype(_STORAGE_DTYPES[ref.type_name])
        data = self._storage_bytes(ref)
        available = len(data) // dtype.itemsize
        start = ref.element_offset + tensor.offset
        extent = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride))
        if any(n == 0 for n in tensor.shape):
            extent = 0
        elif math.prod(tensor.shape) > max(ref.numel, 1):  # a broadcast view: never a weight
            raise CheckpointReadError(
                f"tensor of shape {tensor.shape} is larger than its storage {ref.key}"
            )
        if start + extent > min(available, ref.element_offset + ref.numel):
            raise CheckpointReadError(
                f"storage {ref.key} is too short for a tensor of shape {tensor.shape} "
                "(truncated or corrupt file)"
            )
        flat = np.frombuffer(data, dtype.newbyteorder("<" if self._byteorder == "little" else ">"))
        view = np.lib.stride_tricks.as_strided(
            flat[start:],
            shape=tensor.shape,
            strides=tuple(s * dtype.itemsize for s in tensor.stride),
            writeable=False,
        )
        out = np.array(view, dtype=dtype.newbyteorder("="))
        if ref.type_name == "BFloat16Storage":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out

    def close(self):
        for name in ("_zip", "_file"):
            handle = getattr(self, name, None)
            if handle is not None:
                handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
