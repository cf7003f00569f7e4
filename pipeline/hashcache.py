"""The job's persistent hash cache: ``output_dir/manifest/_hashes.json``.

Finished work is identified by the content (sha256) of every input, and every shard file and
merged adapter is checked against the sha256 recorded when it was written. Reading a 100 GB batch
again on every rerun would cost minutes, so the sha256 of each file is kept here with the version
it was computed from: (device, inode, size, mtime_ns, ctime_ns), what ``fstat`` says. An entry is
trusted only for exactly that version (see :mod:`coremerge.safetensors_file`): a file rewritten
with its size and mtime kept (``cp -p``, ``rsync -t``, ``touch -r``) gets a new ctime, and a file
replaced by another a new inode, and is hashed again.

It is a cache: a missing or damaged file costs one re-hash of each file, never a wrong result
(load ignores what it cannot read; save failures are reported by the caller and ignored).

Example:
    >>> load(Path("out"))            # doctest: +SKIP
    >>> save(Path("out"), [Path("adapters/snli/adapter_model.safetensors")])   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from coremerge.safetensors_file import FileVersion, known_hashes, remember_sha256

from pipeline.files import atomic_write_bytes
from pipeline.manifest import MANIFEST_DIR

CACHE_NAME = "_hashes.json"  # "_": pyarrow reading output_dir/manifest as a dataset skips it
FORMAT = 1
MAX_CACHE_BYTES = 256 << 20  # far beyond any real job (an entry is ~150 bytes); bigger is not ours


def cache_path(output_dir: Path) -> Path:
    return output_dir / MANIFEST_DIR / CACHE_NAME


def load(output_dir: Path) -> int:
    """Trust the cached hashes of ``output_dir``'s job (each for its recorded version only); how many."""
    path = cache_path(output_dir)
    try:
        if path.stat().st_size > MAX_CACHE_BYTES:
            return 0
        data = json.loads(path.read_bytes())
        files = data["files"] if data.get("format") == FORMAT else {}
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return 0  # no cache, or a damaged one: everything is hashed again
    count = 0
    for name, entry in files.items() if isinstance(files, dict) else ():
        if (isinstance(entry, list) and len(entry) == 6 and all(type(v) is int for v in entry[:5])
                and isinstance(entry[5], str) and len(entry[5]) == 64):
            remember_sha256(name, entry[5], FileVersion(*entry[:5]))
            count += 1
    return count


def save(output_dir: Path, inputs: Iterable[str | os.PathLike]) -> None:
    """Write the hashes this process knows of files under ``output_dir`` and of ``inputs``. OSError if
    it cannot be written (nothing half-written: a temp file renamed into place)."""
    root = str(output_dir.resolve()) + os.sep
    wanted = {str(Path(p).resolve()) for p in inputs}
    files = {name: [*version, sha] for name, (version, sha) in sorted(known_hashes().items())
             if name.startswith(root) or name in wanted}
    text = json.dumps({"format": FORMAT, "files": files}, separators=(",", ":"))
    atomic_write_bytes(cache_path(output_dir), text.encode())
