"""safetensors files at the byte level: untrusted headers parsed and checked, tensors read, files written.

Threat model. The files read here come from anyone (adapters downloaded from the Hub, files on a
shared disk). A hostile or damaged file may hold any bytes, and the path may name a directory, a FIFO,
a device, a dangling symlink or a symlink loop, or change while it is read. Reading one must end in a
result or in ONE :class:`~coremerge.errors.AdapterError` line naming the file and what was expected:
never another exception, never a hang, never an allocation the file's own size does not justify.
What is checked, before anything is allocated from it:

- the path opens without blocking (``O_NONBLOCK``: a FIFO does not wait for a writer) and is a
  regular file (``fstat`` of the open descriptor, not a second look at the path);
- the 8-byte little-endian header length is at most :data:`MAX_HEADER_SIZE` (the safetensors
  library's cap) and fits the file, checked BEFORE the header is read;
- the header is strict UTF-8 JSON (no NaN/Infinity, no duplicate keys; too deep nesting is an error,
  not a RecursionError), an object whose ``__metadata__`` is null or a str -> str map and whose other
  entries are exactly ``{"dtype", "shape", "data_offsets"}``: a known dtype, a shape of non-negative
  ints, two offsets ``0 <= begin <= end``, ``end - begin == prod(shape) * itemsize`` (exact integers,
  so no overflow can fake equality);
- the tensors tile the data section: contiguous, non-overlapping, from byte 0 to the file's end
  (what ``safetensors`` itself requires), so the file's size is exactly header + data;
- every string is valid Unicode (no lone surrogate escapes) and error messages show hostile values cut
  short (:func:`show`).

At least as strict as the ``safetensors`` library (0.8, ``Metadata::validate`` and ``read_metadata``):
the same 100 MB header cap, header fitting the file, offsets contiguous from 0 without overlap or gap,
``end - begin`` equal to the shape's byte size with overflow refused, data ending exactly at the end of
the file, a JSON nesting limit (serde's 128 levels; here Python's recursion limit). Stricter where the
library is lenient: duplicate keys (the library keeps one silently) and unknown fields in an entry are
refused, and so are dimensions of 2**63 and more and the sub-byte dtypes (F4, F6), which torch cannot
hold. The tests check the direction that matters: every malformed file of the corpus that the library
refuses is refused here, and whatever this module accepts the library accepts and reads to the same
tensors (tests/test_safetensors_file.py, 3000 fuzzed headers) -- so ``coremerge.peft_io`` no longer
cross-checks each file with ``safe_open``.

The version read is the version hashed: a :class:`FileVersion` (device, inode, size, mtime, ctime) is
taken with ``fstat`` of the descriptor that reads; the parsed header is cached per (path, version), and
:func:`open_safetensors` refuses a file whose version differs from the one expected, or changed while it
was read. Content hashes (:func:`known_sha256`) are cached per version too; ctime catches a rewrite
that kept size and mtime (``cp -p``, ``touch -r``). A version observed less than :data:`RACY_NS` after
its last change is not cached from a read (as git treats "racily clean" files): on file systems with
coarse timestamps a second write within the same tick, of the same size, would leave the version
unchanged.

Writing: :func:`safetensors_header`, :func:`tensor_bytes` and :func:`write_hashed` write the format
byte for byte as ``safetensors.torch.save_file`` does. PEFT's meaning of the tensors lives in
``coremerge.peft_io``; nothing here knows it. Example::

    with open_safetensors("adapter_model.safetensors") as f:
        f.header.entries["base_model.model.x.lora_A.weight"].shape   # (r, n), from the header alone
        a = f.tensor("base_model.model.x.lora_A.weight")              # one read, memory of its own
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import reprlib
import stat
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, BinaryIO, NamedTuple

import torch
from torch import Tensor

from coremerge.errors import AdapterChangedError, AdapterError

MAX_HEADER_SIZE = 100_000_000  # bytes: the safetensors library's own limit
# safetensors dtype name -> bytes per element (the sub-byte F4/F6 types are not read here)
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
            "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8}
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# what a merged adapter can be written in
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}
_BIG = 1 << 63  # offsets and dimensions are u64 in safetensors, int64 in torch
RACY_NS = 2_000_000_000  # a version this recent (ctime vs now) is not cached from a read: see the module docstring


class FileVersion(NamedTuple):
    """One version of a file: what ``fstat`` says of the descriptor that read it.

    Example:
        >>> fd = os.open(__file__, os.O_RDONLY); v = FileVersion.of(fd); os.close(fd)
        >>> v == FileVersion.of_path(__file__), v.size == os.path.getsize(__file__)
        (True, True)
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, fd: int) -> FileVersion:
        st = os.fstat(fd)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @classmethod
    def of_path(cls, path: str | os.PathLike) -> FileVersion:
        st = os.stat(path)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def change_from(self, old: FileVersion) -> str:
        """What differs from ``old``, in words: ``"size 10 -> 12, mtime changed"``."""
        words = [f"{field} {a} -> {b}" for field, a, b in zip(("device", "inode", "size"), old[:3], self[:3])
                 if a != b]
        words += [f"{field} changed" for field, a, b in zip(("mtime", "ctime"), old[3:], self[3:]) if a != b]
        return ", ".join(words) or "unchanged"


class TensorEntry(NamedTuple):
    """One checked header entry; ``begin``/``end`` are absolute byte offsets in the file."""

    dtype: str  # safetensors name: "F32", "BF16", ...
    shape: tuple[int, ...]
    begin: int
    end: int


class Header(NamedTuple):
    """A checked safetensors header (shared by every reader of that file version: treat as read-only)."""

    entries: dict[str, TensorEntry]  # in the header's order
    metadata: dict[str, str]
    data_start: int  # 8 + header length


_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxlong = 3, 100, 100, 6, 4, 40


def show(value: Any, limit: int = 120) -> str:
    """``repr(value)``, cut short (at most ``limit`` characters, 3 levels, 6 items, work bounded the same way):
    hostile names and values stay one short line.

    Example:
        >>> show(list(range(10**6)))
        '[0, 1, 2, 3, 4, 5, ...]'
        >>> show("x" * 10**6, 20)
        "'xxxxxxxxxxxxxxxxxx... (100 characters)"
    """
    try:
        text = _SHOW.repr(value)
    except (ValueError, RecursionError):  # an int of over 4300 digits; nesting beyond the stack
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit - 1]}... ({len(text)} characters)"


# ------------------------------------------------------------------------------------------ opening
def open_fd(path: str | os.PathLike) -> int:
    """An O_RDONLY descriptor of a regular file, opened without blocking; OSError for anything else."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                    else "a device or socket")
            raise OSError(errno.EINVAL, f"is {kind}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: str | os.PathLike, where: str) -> int:
    """:func:`open_fd`, each failure one :class:`AdapterError` line beginning with ``where``.

    Example:
        >>> open_regular("/tmp", "adapter 'x': adapter_config.json")
        Traceback (most recent call last):
        coremerge.errors.AdapterError: adapter 'x': adapter_config.json is a directory, not a regular file
    """
    try:
        return open_fd(path)
    except ValueError as exc:  # a NUL in the path
        raise AdapterError(f"{where}: the path is not valid ({exc})") from exc
    except FileNotFoundError as exc:
        dangling = os.path.islink(path)
        raise AdapterError(f"{where} is a dangling symlink" if dangling else f"{where} does not exist") from exc
    except PermissionError as exc:
        raise AdapterError(f"{where} cannot be read: permission denied") from exc
    except OSError as exc:
        why = {errno.ELOOP: "is a symlink loop (or a chain of too many symlinks)",
               errno.ENOTDIR: "has a path component that is not a directory"}.get(exc.errno, exc.strerror)
        raise AdapterError(f"{where} {why}") from exc


def read_exact(fd: int, size: int, offset: int, where: str, into: bytearray | None = None) -> bytearray:
    """``size`` bytes at ``offset`` (into a fresh buffer, or ``into``); AdapterError if the file ends first."""
    try:
        buffer = into if into is not None else bytearray(size)
    except MemoryError:
        raise AdapterError(f"{where}: {size} bytes at byte {offset} do not fit in memory") from None
    view, done = memoryview(buffer), 0
    try:
        while done < size:
            got = os.preadv(fd, [view[done:size]], offset + done)
            if not got:
                raise AdapterError(f"{where} ended {size - done} bytes early at byte {offset + done} (changed while "
                                   f"it was read?)")
            done += got
    except OSError as exc:
        raise AdapterError(f"{where} cannot be read ({exc.strerror})") from exc
    return buffer


def read_capped(path: str | os.PathLike, where: str, limit: int) -> tuple[bytes, FileVersion]:
    """A whole small regular file (at most ``limit`` bytes) and the version read.

    Example:
        >>> data, version = read_capped(__file__, "this module", 1 << 20)
        >>> len(data) == version.size
        True
    """
    fd = open_regular(path, where)
    try:
        version = FileVersion.of(fd)
        if version.size > limit:
            raise AdapterError(f"{where} is {version.size} bytes; expected at most {limit}")
        data = bytes(read_exact(fd, version.size, 0, where))
        _check_unchanged(fd, version, where)
    finally:
        os.close(fd)
    return data, version


def _check_unchanged(fd: int, expected: FileVersion, where: str) -> None:
    now = FileVersion.of(fd)
    if now != expected:
        raise AdapterChangedError(f"{where} changed while it was being read ({now.change_from(expected)}); "
                                  f"nothing built from it is kept; run again")


# ----------------------------------------------------------------------------------------- the header
def read_header(fd: int, size: int, where: str) -> Header:
    """The checked header of the open safetensors file ``fd`` of ``size`` bytes (see the module docstring)."""
    if size < 8:
        raise AdapterError(f"{where}: {size} bytes; a safetensors file starts with an 8-byte header length")
    n = int.from_bytes(read_exact(fd, 8, 0, where), "little")
    if n > MAX_HEADER_SIZE or n > size - 8:
        limit = f"over the {MAX_HEADER_SIZE}-byte limit" if n > MAX_HEADER_SIZE else f"past the file's {size} bytes"
        raise AdapterError(f"{where}: header length {n} is {limit}; the file is truncated or not safetensors")
    return parse_header(bytes(read_exact(fd, n, 8, where)), size, where)


def parse_header(text: bytes, file_size: int, where: str) -> Header:
    """Check the JSON header ``text`` of a safetensors file of ``file_size`` bytes; AdapterError if it is not one.

    Example:
        >>> h = b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
        >>> parse_header(h, 8 + len(h) + 8, "f").entries["x"]
        TensorEntry(dtype='F32', shape=(2,), begin=62, end=70)
    """
    try:
        obj = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except RecursionError:
        raise AdapterError(f"{where}: corrupt safetensors header (JSON nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise AdapterError(f"{where}: corrupt safetensors header (not UTF-8 JSON: {show(str(exc), 200)})") from None
    if not isinstance(obj, dict):
        raise AdapterError(f"{where}: corrupt safetensors header (a JSON {type(obj).__name__}, expected an object)")
    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterError(f"{where}: corrupt safetensors header (__metadata__ {show(metadata)}; expected a "
                           f"string -> string map)")
    try:
        for value in metadata.values():
            _check_text(value)
    except ValueError as exc:
        raise AdapterError(f"{where}: corrupt safetensors header (__metadata__: {exc})") from None
    data_start = 8 + len(text)
    data_size = file_size - data_start
    entries = {key: _entry(key, info, data_start, data_size, where) for key, info in obj.items()}
    position = data_start
    for begin, end, key in sorted((e.begin, e.end, k) for k, e in entries.items()):
        if begin != position:
            raise AdapterError(f"{where}: corrupt safetensors header (tensor {show(key)} starts at data byte "
                               f"{begin - data_start}, expected {position - data_start}: tensors must be "
                               f"contiguous and must not overlap)")
        position = end
    if position != file_size:
        raise AdapterError(f"{where}: the header describes {position} bytes but the file has {file_size}; the file "
                           f"is truncated or corrupt")
    return Header(entries=entries, metadata=metadata, data_start=data_start)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {show(duplicate)}")
    for key in out:
        _check_text(key)
    return out


def _check_text(text: str) -> None:
    """ValueError for a string that is not valid Unicode (a lone surrogate from a ``\\ud800`` escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"the string {show(text)} holds a lone surrogate (invalid Unicode)") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _is_u63(value: Any) -> bool:
    return type(value) is int and 0 <= value < _BIG


def _entry(key: str, info: Any, data_start: int, data_size: int, where: str) -> TensorEntry:
    what = f"{where}: corrupt safetensors header (tensor {show(key)}:"
    if not isinstance(info, dict) or set(info) != _ENTRY_FIELDS:
        raise AdapterError(f"{what} {show(info)}; expected {{\"dtype\", \"shape\", \"data_offsets\"}})")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise AdapterError(f"{what} dtype {show(dtype)}; expected one of {sorted(ITEMSIZE)})")
    if not isinstance(shape, list) or not all(_is_u63(d) for d in shape):
        raise AdapterError(f"{what} shape {show(shape)}; expected a list of non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u63(o) for o in offsets):
        raise AdapterError(f"{what} data_offsets {show(offsets)}; expected [begin, end], non-negative integers)")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise AdapterError(f"{what} data_offsets [{begin}, {end}] are not 0 <= begin <= end <= {data_size}, the "
                           f"size of the data section)")
    nbytes = _nbytes(shape, ITEMSIZE[dtype], data_size)
    if nbytes != end - begin:
        shown = "more than the file holds" if nbytes < 0 else f"{nbytes} bytes"
        raise AdapterError(f"{what} shape {show(shape)} of {dtype} is {shown}, but data_offsets span {end - begin})")
    return TensorEntry(dtype=dtype, shape=tuple(shape), begin=data_start + begin, end=data_start + end)


def _nbytes(shape: Sequence[int], itemsize: int, limit: int) -> int:
    """prod(shape) * itemsize, or -1 as soon as it exceeds ``limit`` (exact: Python integers do not overflow)."""
    if 0 in shape:
        return 0
    total = itemsize
    for d in shape:
        total *= d
        if total > limit:
            return -1
    return total


# ----------------------------------------------------------------------------------------- reading
_HEADERS: OrderedDict[tuple[str, FileVersion], Header] = OrderedDict()
_HEADERS_MAX = 64
_HEADERS_LOCK = threading.Lock()


def cached_header(fd: int, path: str | os.PathLike, version: FileVersion, where: str) -> Header:
    """:func:`read_header` of ``fd`` (of ``path``, at ``version``), parsed once per (path, version) in a process:
    a 1B merge reads 112 modules from each adapter, each through a header parsed once."""
    key = (os.fspath(path), version)
    with _HEADERS_LOCK:
        header = _HEADERS.get(key)
        if header is not None:
            _HEADERS.move_to_end(key)
            return header
    header = read_header(fd, version.size, where)
    if not _racy(version):
        with _HEADERS_LOCK:
            _HEADERS[key] = header
            while len(_HEADERS) > _HEADERS_MAX:
                _HEADERS.popitem(last=False)
    return header


def _racy(version: FileVersion) -> bool:
    """Whether ``version`` changed so recently that a same-size rewrite in the same timestamp tick could
    still leave it looking unchanged: then what was read from it is not cached."""
    return time.time_ns() - max(version.mtime_ns, version.ctime_ns) < RACY_NS


class SafetensorsReader:
    """An open safetensors file at one version: its checked header, and its tensors read one at a time."""

    def __init__(self, fd: int, version: FileVersion, header: Header, where: str) -> None:
        self.fd, self.version, self.header, self.where = fd, version, header, where

    def tensor(self, key: str) -> Tensor:
        """One float tensor, read with one read into memory of its own (nothing of the file stays mapped:
        a 70B adapter set would otherwise count in the process's RSS). KeyError if the file has no
        float tensor ``key``."""
        entry = self.header.entries[key]
        if entry.dtype not in FLOAT_DTYPES:
            raise KeyError(key)
        if sys.byteorder != "little":
            raise OSError("reading safetensors files needs a little-endian machine")
        dtype = FLOAT_DTYPES[entry.dtype]
        if entry.end == entry.begin:
            return torch.empty(entry.shape, dtype=dtype)
        buffer = read_exact(self.fd, entry.end - entry.begin, entry.begin, self.where)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry.shape)


def open_expected(path: str | os.PathLike, where: str, expect: FileVersion | None) -> tuple[int, FileVersion]:
    """:func:`open_regular` and the version opened, which must be ``expect`` when given (else
    :class:`AdapterChangedError`, the descriptor closed)."""
    fd = open_regular(path, where)
    version = FileVersion.of(fd)
    if expect is not None and version != expect:
        os.close(fd)
        raise AdapterChangedError(f"{where} changed since it was opened ({version.change_from(expect)}); nothing "
                                  f"built from it is kept; run again")
    return fd, version


@contextmanager
def open_safetensors(path: str | os.PathLike, *, where: str | None = None,
                     expect: FileVersion | None = None) -> Iterator[SafetensorsReader]:
    """Open and check a safetensors file; its version must be ``expect`` (when given) on opening and unchanged
    when the block ends, else :class:`AdapterChangedError`. ``where`` names the file in errors (default: path).

    Example:
        >>> with open_safetensors("shard.safetensors") as f:         # doctest: +SKIP
        ...     a = f.tensor("model.layers.0.self_attn.q_proj.a")    # (q, n)
    """
    where = where or str(path)
    fd, version = open_expected(path, where, expect)
    try:
        try:
            yield SafetensorsReader(fd, version, cached_header(fd, path, version, where), where)
        except AdapterError:
            _check_unchanged(fd, version, where)  # a file cut short while it was read: say that it changed
            raise
        _check_unchanged(fd, version, where)
    finally:
        os.close(fd)


def safetensors_index(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """({key: shape} of a safetensors file's float tensors, its metadata), from its header alone.

    Example:
        >>> shapes, metadata = safetensors_index("adapter_model.safetensors")   # doctest: +SKIP
    """
    with open_safetensors(path) as f:
        entries, metadata = f.header.entries, f.header.metadata
    return {key: e.shape for key, e in entries.items() if e.dtype in FLOAT_DTYPES}, dict(metadata)


def read_tensors(path: str | os.PathLike, keys: Sequence[str]) -> dict[str, Tensor]:
    """Float tensors of a safetensors file, each read into memory of its own, all from one version of it.

    Example:
        >>> read_tensors("shard.safetensors", ["m.a", "m.b"])["m.a"].shape   # doctest: +SKIP
    """
    with open_safetensors(path) as f:
        return {key: f.tensor(key) for key in keys}


# ----------------------------------------------------------------------------------------- hashing
_KNOWN: OrderedDict[str, tuple[FileVersion, str]] = OrderedDict()  # resolved path -> (version, sha256)
_KNOWN_MAX = 65536  # ~10 MB of entries: a 70B sweep's shard files
_KNOWN_LOCK = threading.Lock()  # writers run in threads (the pipeline writes two shard files at a time)


def _hash_fd(fd: int) -> str:
    """Hex SHA-256 of an open file's content from its start, read in 1 MiB blocks."""
    digest, buffer = hashlib.sha256(), bytearray(1 << 20)
    view, offset = memoryview(buffer), 0
    while got := os.preadv(fd, [view], offset):
        digest.update(view[:got])
        offset += got
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (no cache). OSError if it is missing or not a regular file.

    Example:
        >>> len(file_sha256(__file__))
        64
    """
    fd = open_fd(path)
    try:
        return _hash_fd(fd)
    finally:
        os.close(fd)


def _remember(key: str, version: FileVersion, sha: str) -> None:
    with _KNOWN_LOCK:
        _KNOWN[key] = (version, sha)
        _KNOWN.move_to_end(key)
        while len(_KNOWN) > _KNOWN_MAX:
            _KNOWN.popitem(last=False)


def _known(key: str, version: FileVersion) -> str | None:
    with _KNOWN_LOCK:
        seen = _KNOWN.get(key)
    return seen[1] if seen is not None and seen[0] == version else None


def _key(path: str | os.PathLike) -> str:
    """The cache key of a path: its real path (``Path.resolve`` would raise RuntimeError on a symlink loop)."""
    return os.path.realpath(path)


def remember_sha256(path: str | os.PathLike, sha: str, version: FileVersion | None = None) -> None:
    """Note that ``path`` (whole and closed), as of ``version`` (default: its version now), hashes to ``sha``.

    A persistent hash cache is pre-loaded through this: its entries are trusted for exactly that
    version (device, inode, size, mtime and ctime), so a rewritten file is hashed again.

    Example:
        >>> remember_sha256("out/adapter_model.safetensors", sha, version)   # doctest: +SKIP
    """
    _remember(_key(path), FileVersion.of_path(path) if version is None else version, sha)


def known_sha256(path: str | os.PathLike) -> str:
    """:func:`file_sha256`, read and computed once per :class:`FileVersion` of the file in a process.

    A file this process wrote (``write_adapter``, the pipeline's shard files) was hashed as it was
    written and is not read back; a sweep's 16 merge reports hash their 4 input files once, not 16
    times. A file that changes while it is hashed is hashed but not remembered. Raises OSError if the
    file is missing or not a regular file.

    Example:
        >>> known_sha256(__file__) == file_sha256(__file__)
        True
    """
    key = _key(path)
    fd = open_fd(path)
    try:
        version = FileVersion.of(fd)
        sha = _known(key, version)
        if sha is None:
            sha = _hash_fd(fd)
            if FileVersion.of(fd) == version and not _racy(version):
                _remember(key, version, sha)
    finally:
        os.close(fd)
    return sha


def version_sha256(path: str | os.PathLike, version: FileVersion, where: str) -> str:
    """Hex SHA-256 of ``path`` as of ``version``: :class:`AdapterChangedError` if the file is no longer that
    version (checked every time, with ``fstat``); hashed once per (real path, version) in a process, from a
    descriptor whose version is ``version`` before and after hashing.

    Example:
        >>> version_sha256(__file__, FileVersion.of_path(__file__), "this module") == file_sha256(__file__)
        True
    """
    fd = open_regular(path, where)
    try:
        now = FileVersion.of(fd)
        if now != version:
            raise AdapterChangedError(f"{where} changed since it was opened ({now.change_from(version)}); nothing "
                                      f"built from it is kept; run again")
        key = _key(path)
        sha = _known(key, version)
        if sha is None:
            sha = _hash_fd(fd)
            _check_unchanged(fd, version, where)
            if not _racy(version):
                _remember(key, version, sha)
    finally:
        os.close(fd)
    return sha


# ----------------------------------------------------------------------------------------- writing
def safetensors_header(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype, metadata: Mapping[str, str]) -> bytes:
    """The first bytes of a single-dtype safetensors file, as ``safetensors.torch.save`` writes them.

    An 8-byte little-endian length, then the JSON header (``__metadata__`` first, then each tensor's
    dtype, shape and data offsets, in sorted name order) padded with spaces to a multiple of 8. The
    tensors' bytes follow in sorted name order.

    Example:
        >>> safetensors_header({"x": (2,)}, torch.float32, {})[8:].rstrip()
        b'{"__metadata__":{},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in sorted(shapes):
        size = math.prod(shapes[name]) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def tensor_bytes(t: Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes as they lie in memory, which is safetensors' layout (little-endian).

    Example:
        >>> bytes(tensor_bytes(torch.tensor([1.0])))
        b'\\x00\\x00\\x80?'
    """
    if sys.byteorder != "little":
        raise OSError("writing safetensors files needs a little-endian machine")
    # reshape(-1): a contiguous tensor with a last dimension of size 1 may have any stride there
    return t.reshape(-1).view(torch.uint8).numpy().data


def write_hashed(f: BinaryIO, chunks: Iterable[bytes | memoryview]) -> tuple[str, int]:
    """Write ``chunks`` to the open file ``f``, hashing them on the way out; (sha256, bytes written).

    Example:
        >>> write_hashed(io.BytesIO(), [b"ab", b"c"])[1]   # doctest: +SKIP
        3
    """
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        f.write(chunk)
        digest.update(chunk)
        size += memoryview(chunk).nbytes
    return digest.hexdigest(), size


def known_entry(path: str | os.PathLike) -> tuple[FileVersion, str] | None:
    """(version, sha256) this process knows for ``path``, whatever the file is now; None if none."""
    with _KNOWN_LOCK:
        return _KNOWN.get(_key(path))


def known_hashes() -> dict[str, tuple[FileVersion, str]]:
    """Every (resolved path -> (version, sha256)) this process knows: what a persistent cache saves
    (pipeline/hashcache.py) and pre-loads again through :func:`remember_sha256`."""
    with _KNOWN_LOCK:
        return dict(_KNOWN)
