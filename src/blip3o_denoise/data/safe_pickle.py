"""Reading seed-format pickle shards without executing code and without loading tensor bytes.

The seed's extractor writes each shard with ``pickle.dump`` of a dict of torch tensors. Torch
pickles a tensor as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` and
its storage as ``torch.storage._load_from_bytes(b)``, where ``b`` is the storage written in torch's
legacy serialisation format: a few small pickles (magic number, version, system info, a storage
descriptor, the storage keys), then an 8-byte element count and the raw little-endian data.

:class:`SafeShardUnpickler` admits only those two callables (replaced by our own, inert versions)
and ``collections.OrderedDict``; any other global, an extension code or a persistent id is refused
with :class:`UnsafePickleError` before anything runs. Large byte strings (the tensor data) are
not read at all: the unpickler records their position in the file and skips them, so a 14 GB
shard is opened by reading a few kilobytes, and samples are later read with positioned reads
(:class:`FileTensor`), keeping memory bounded whatever the shard size.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass

import torch

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# Byte strings at least this long that sit outside a pickle frame are skipped, not read.
_LAZY_MIN_BYTES = 1 << 16

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something other than tensors and plain containers."""


class ShardFormatError(ValueError):
    """A shard file is malformed (truncated, wrong layout, wrong field)."""


@dataclass
class _Span:
    """A byte string of the pickle left on disk: ``length`` bytes at ``offset``."""

    offset: int
    length: int


@dataclass
class _Storage:
    dtype: torch.dtype
    numel: int
    offset: int | None  # absolute file offset of the data, or None when held in memory
    data: bytes | None = None


class FileTensor:
    """A contiguous tensor stored at ``offset`` in ``path``; rows are read on demand.

    ``rows(i, j)`` returns a new tensor ``[j - i, *shape[1:]]`` read with one positioned read,
    so memory use is bounded by what is asked for, not by the file size.
    """

    def __init__(self, path: str, offset: int, dtype: torch.dtype, shape: tuple[int, ...]):
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, tuple(shape)
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.row_bytes = math.prod(self.shape[1:]) * self.itemsize
        self._fd = None
        self._pid = None

    def __len__(self):
        return self.shape[0]

    def _fileno(self):
        # One descriptor per process: DataLoader workers are forked and must not share offsets
        # (positioned reads do not use offsets, but a descriptor closed by one process would
        # break the others).
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = None
        return state

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"{self.path}: rows {start}:{stop} out of range for {self.shape[0]}")
        n = (stop - start) * self.row_bytes
        buf = bytearray(n)
        view = memoryview(buf)
        fd, pos, got = self._fileno(), self.offset + start * self.row_bytes, 0
        while got < n:
            k = os.preadv(fd, [view[got:]], pos + got)
            if k <= 0:
                raise ShardFormatError(f"{self.path}: file ended while reading rows {start}:{stop} (truncated?)")
            got += k
        if n == 0:
            return torch.empty((0,) + self.shape[1:], dtype=self.dtype)
        return torch.frombuffer(buf, dtype=self.dtype).view((stop - start,) + self.shape[1:])

    def read_all(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])


class MemoryTensor:
    """The :class:`FileTensor` interface over a tensor already in memory."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.shape, self.dtype = tuple(tensor.shape), tensor.dtype

    def __len__(self):
        return self.shape[0]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop].clone()

    def read_all(self) -> torch.Tensor:
        return self.tensor


class _StorageType:
    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES[name]


class _LegacyHeadUnpickler(pickle._Unpickler):
    """The small pickles at the head of a legacy storage: admits only torch storage types.

    The pure-Python unpickler over an in-memory head: its reads return at most what the head
    holds, where the C unpickler allocates whatever length a damaged byte claims before reading.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BytesIO, where: str):
        super().__init__(file)
        self.where = where
        self.limit = len(file.getbuffer())

    def load_bytearray8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self.limit:
            raise ShardFormatError(f"{self.where}: a {n}-byte array in a tensor storage header: damaged file")
        self.append(bytearray(self.read(n)))

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(f"{self.where}: refused global {module}.{name} inside a tensor storage")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafePickleError(f"{self.where}: unexpected storage reference {pid!r:.200}")
        if type(pid[4]) is not int:
            raise ShardFormatError(f"{self.where}: storage size {pid[4]!r:.40} is not an integer")
        return ("storage", pid[1].dtype, pid[4])


def _parse_legacy_storage(head: bytes, where: str) -> tuple[torch.dtype, int, int]:
    """Parse a legacy storage's head; return (dtype, numel, offset of the data within the bytes)."""
    bio = io.BytesIO(head)
    try:
        magic = _LegacyHeadUnpickler(bio, where).load()
        if magic != _LEGACY_MAGIC:
            raise ShardFormatError(f"{where}: tensor storage has an unknown serialisation (magic {magic!r:.40})")
        _LegacyHeadUnpickler(bio, where).load()  # protocol version
        sys_info = _LegacyHeadUnpickler(bio, where).load()
        desc = _LegacyHeadUnpickler(bio, where).load()
        _LegacyHeadUnpickler(bio, where).load()  # storage keys
    except (EOFError, pickle.UnpicklingError) as e:
        if isinstance(e, UnsafePickleError):
            raise
        raise ShardFormatError(f"{where}: cannot parse a tensor storage header ({e})") from e
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", True)):
        raise ShardFormatError(f"{where}: big-endian tensor storage is not supported")
    if not (isinstance(desc, tuple) and len(desc) == 3 and desc[0] == "storage" and isinstance(desc[1], torch.dtype)
            and type(desc[2]) is int and desc[2] >= 0):
        raise ShardFormatError(f"{where}: tensor storage descriptor is not a single storage")
    _, dtype, numel = desc
    raw = bio.read(8)
    if len(raw) != 8:
        raise ShardFormatError(f"{where}: tensor storage header is truncated")
    (count,) = struct.unpack("<q", raw)
    if count != numel:
        raise ShardFormatError(f"{where}: storage says {numel} elements but its data block says {count}")
    return dtype, numel, bio.tell()


# Pickle frames are ~64 KB (large byte strings are written outside them); a bigger one is damage.
_MAX_FRAME = 1 << 26
_MAX_LINE = 1 << 20


class _BoundedFile:
    """A file whose reads never ask for more than the bytes left in it: a length read from a damaged
    pickle then costs at most the file's size, never a multi-GB allocation."""

    def __init__(self, f, size: int):
        self._f, self.size = f, size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self._f.tell())
        return self._f.read(left if n is None or n < 0 else min(n, left))

    def readline(self, limit: int = -1) -> bytes:
        return self._f.readline(_MAX_LINE if limit is None or limit < 0 else min(limit, _MAX_LINE))

    def readinto(self, buf) -> int:
        return self._f.readinto(buf)

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, *args) -> int:
        return self._f.seek(*args)

    def fileno(self) -> int:
        return self._f.fileno()


class SafeShardUnpickler(pickle._Unpickler):  # the pure-Python unpickler, so opcodes can be overridden
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, path: str):
        self.file_size = os.fstat(file.fileno()).st_size
        file = _BoundedFile(file, self.file_size)
        super().__init__(file)
        self._file = file
        self.path = path

    # ---- only these globals exist for this unpickler
    def find_class(self, module, name):
        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch.storage", "_load_from_bytes"): self._load_storage,
            ("collections", "OrderedDict"): OrderedDict,
        }
        fn = allowed.get((module, name))
        if fn is None:
            raise UnsafePickleError(
                f"{self.path}: refused to load global '{module}.{name}': a shard may hold only tensors "
                "and plain containers (a pickle can run arbitrary code, so nothing else is admitted)"
            )
        return fn

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.path}: refused persistent id {pid!r:.100}")

    # ---- large byte strings stay on disk
    def _in_frame(self) -> bool:
        frame = self._unframer.current_frame
        return frame is not None and frame.tell() < len(frame.getbuffer())

    def _bytes(self, n: int):
        if n > self.file_size:
            raise ShardFormatError(f"{self.path}: a {n}-byte string in a {self.file_size}-byte file: damaged file")
        if n >= _LAZY_MIN_BYTES and not self._in_frame():
            self._unframer.current_frame = None
            off = self._file.tell()
            if off + n > self.file_size:
                raise ShardFormatError(
                    f"{self.path}: file is truncated: a {n}-byte block at offset {off} runs past the end "
                    f"({self.file_size} bytes)"
                )
            self._file.seek(n, os.SEEK_CUR)
            self.append(_Span(off, n))
            return
        data = self.read(n)
        if len(data) != n:
            raise ShardFormatError(f"{self.path}: file is truncated (wanted {n} bytes, got {len(data)})")
        self.append(data)

    def load_binbytes8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        self._bytes(n)

    def load_binbytes(self):
        (n,) = struct.unpack("<I", self.read(4))
        self._bytes(n)

    def load_frame(self):
        (n,) = struct.unpack("<Q", self.read(8))
        if n > _MAX_FRAME:
            raise ShardFormatError(
                f"{self.path}: pickle frame of {n} bytes (at most {_MAX_FRAME} expected): damaged file"
            )
        self._unframer.load_frame(n)

    def load_bytearray8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self.file_size:
            raise ShardFormatError(f"{self.path}: a {n}-byte array in a {self.file_size}-byte file: damaged file")
        b = bytearray(n)
        if self.readinto(b) != n:
            raise ShardFormatError(f"{self.path}: file is truncated (a {n}-byte array)")
        self.append(b)

    def load_build(self):
        # torch tensors and dicts are rebuilt without BUILD; setting attributes on our stand-ins
        # (a FileTensor's path, say) could only come from a crafted file
        if not isinstance(self.stack[-2], OrderedDict):
            raise UnsafePickleError(f"{self.path}: refused to set the state of a {type(self.stack[-2]).__name__}")
        super().load_build()

    dispatch[pickle.BINBYTES8[0]] = load_binbytes8
    dispatch[pickle.BINBYTES[0]] = load_binbytes
    dispatch[pickle.FRAME[0]] = load_frame
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8
    dispatch[pickle.BUILD[0]] = load_build

    def _refuse(self):
        raise UnsafePickleError(f"{self.path}: refused an extension-registry reference")

    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _refuse
    del _op

    # ---- inert stand-ins for torch's reconstruction functions
    def _load_storage(self, b) -> _Storage:
        if isinstance(b, _Span):
            with open(self.path, "rb") as f:
                f.seek(b.offset)
                head = f.read(min(b.length, 1 << 16))
            dtype, numel, data_at = _parse_legacy_storage(head, self.path)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if data_at + numel * itemsize != b.length:
                raise ShardFormatError(f"{self.path}: tensor storage size does not match its data block")
            return _Storage(dtype, numel, b.offset + data_at)
        if not isinstance(b, (bytes, bytearray)):
            raise ShardFormatError(f"{self.path}: tensor storage is not a byte string")
        dtype, numel, data_at = _parse_legacy_storage(bytes(b), self.path)
        itemsize = torch.empty((), dtype=dtype).element_size()
        data = bytes(b[data_at:])
        if len(data) != numel * itemsize:
            raise ShardFormatError(f"{self.path}: tensor storage is truncated")
        return _Storage(dtype, numel, None, data)

    def _rebuild_tensor(self, storage, storage_offset, size, stride, *rest):
        if not isinstance(storage, _Storage):
            raise ShardFormatError(f"{self.path}: tensor without a storage")
        ints = (lambda v: isinstance(v, tuple) and all(type(x) is int and x >= 0 for x in v))
        if not (type(storage_offset) is int and storage_offset >= 0 and ints(size) and ints(stride)
                and len(size) == len(stride)):
            raise ShardFormatError(f"{self.path}: malformed tensor (offset {storage_offset!r:.40}, size {size!r:.80}, "
                                   f"stride {stride!r:.80})")
        expected = tuple(math.prod(size[i + 1:]) for i in range(len(size)))
        if any(a != b for a, b, n in zip(stride, expected, size) if n > 1):
            raise ShardFormatError(f"{self.path}: only contiguous tensors are supported (stride {stride})")
        numel = math.prod(size)
        if storage_offset + numel > storage.numel:
            raise ShardFormatError(f"{self.path}: tensor of shape {size} does not fit its storage")
        itemsize = torch.empty((), dtype=storage.dtype).element_size()
        if storage.offset is None:
            t = (torch.frombuffer(bytearray(storage.data), dtype=storage.dtype) if storage.numel
                 else torch.empty(0, dtype=storage.dtype))
            return MemoryTensor(t[storage_offset:storage_offset + numel].view(size))
        return FileTensor(self.path, storage.offset + storage_offset * itemsize, storage.dtype, size)


def load_pickle_shard(path: str) -> dict:
    """Unpickle a seed shard safely; tensors come back as :class:`FileTensor` / :class:`MemoryTensor`."""
    with open(path, "rb") as f:
        try:
            return SafeShardUnpickler(f, path).load()
        except (UnsafePickleError, ShardFormatError):
            raise
        except Exception as e:  # a damaged pickle fails in many ways (TypeError, MemoryError, struct.error...)
            raise ShardFormatError(f"{path}: not a readable shard pickle ({type(e).__name__}: {str(e):.200})") from e


def load_torch_save_shard(path: str) -> dict:
    """A shard written with ``torch.save`` (zip format): torch's own restricted loader, memory-mapped."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"{path}: refused by torch's weights-only loader: {e}") from e
    except Exception as e:  # torch raises RuntimeError for truncated or corrupt archives
        raise ShardFormatError(f"{path}: not a readable torch.save archive ({e})") from e
    if isinstance(obj, dict):
        return {k: MemoryTensor(v) if isinstance(v, torch.Tensor) else v for k, v in obj.items()}
    return obj


def load_shard_file(path: str) -> dict:
    """Load a seed shard written either by ``pickle.dump`` or by ``torch.save``."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK":
        return load_torch_save_shard(path)
    return load_pickle_shard(path)
