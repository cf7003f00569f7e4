"""Where a merge may write: never into, over or around one of its own inputs.

An output directory that *is* an input adapter, *lies inside* one, or *contains* one would be
destroyed or polluted by the write (``--force`` replaces the whole directory). Paths are compared
resolved (symlinks followed, ``..`` removed) and by identity (device and inode), so a symlinked or
bind-mounted path to an adapter is caught too. Each adapter counts as its directory plus the
resolved parents of its weights file and config: ``adapter_model.safetensors`` may be a symlink
into another directory (the Hugging Face cache keeps the bytes in ``blobs/``).

Example:
    >>> check_output_not_input("adapters/snli/merged", ["adapters/snli"], where="--out")  # doctest: +SKIP
    Traceback (most recent call last):
    OutputOverlapError: --out adapters/snli/merged lies inside adapter 'adapters/snli' (...); ...
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

# the files of an adapter directory whose (resolved) parents count as the adapter too
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json")


class OutputPathError(ValueError):
    """An output path that may not be written (a file, a symlink, a directory this tool did not write,
    not writable); the message is one line."""


class OutputOverlapError(OutputPathError):
    """An output directory is, contains or lies inside an input adapter; the message is one line."""


def existing_ancestor(path: str | os.PathLike) -> Path:
    """``path`` made absolute, or its nearest ancestor that exists (where it would be created).

    Example:
        >>> existing_ancestor("/tmp/no/such/dir")
        PosixPath('/tmp')
    """
    path = Path(os.path.abspath(path))
    return next((p for p in (path, *path.parents) if os.path.lexists(p)), Path(path.anchor))


class _Source(Protocol):  # coremerge.peft_io.AdapterSource, without importing torch here
    name: str
    path: Path
    weights_file: Path


def adapter_dirs(adapter: _Source | str | os.PathLike) -> list[Path]:
    """The resolved directories that hold ``adapter``'s files: its own directory, and where its
    weights file and config really lie (their symlinks followed). A name that is no local path
    (a Hub id given without opening it) has none."""
    if isinstance(adapter, (str, os.PathLike)):
        path = Path(adapter).expanduser()
        if not path.is_absolute() and not path.exists():
            return []  # a Hub id: only an opened AdapterSource knows its cache directory
        files = [path / name for name in _ADAPTER_FILES]
    else:
        path = Path(adapter.path)
        files = [Path(adapter.weights_file), *(path / name for name in _ADAPTER_FILES)]
    dirs = [_resolved(path)]
    for file in files:
        if os.path.lexists(file):
            dirs.append(_resolved(file).parent)
    return list(dict.fromkeys(dirs))


def check_output_not_input(out: str | os.PathLike, inputs: Iterable[_Source | str | os.PathLike], *,
                           where: str = "output directory") -> None:
    """Refuse an output directory ``out`` that is, contains or lies inside an input adapter.

    ``inputs`` are opened adapters (:class:`coremerge.peft_io.AdapterSource`: their resolved
    directories, Hub ids included) or paths as given (not opened: the directory and the files in
    it). ``where`` names ``out`` in the message (``--out``, ``job.yaml: merges[0]``). Raises
    :class:`OutputOverlapError` (a ValueError) with one line naming the adapter.

    Example:
        >>> check_output_not_input("/tmp/merged", ["/tmp/adapters/snli"])  # fine: nothing is raised
    """
    target = _resolved(Path(out).expanduser())
    target_chain = _chain(target)  # the output and every directory above it
    for adapter in inputs:
        name = adapter if isinstance(adapter, (str, os.PathLike)) else adapter.name
        for directory in adapter_dirs(adapter):
            relation = _relation(target, target_chain, directory)
            if relation is not None:
                shown = "" if str(directory) == os.fspath(name) else f" ({directory})"
                raise OutputOverlapError(
                    f"{where} {os.fspath(out)} {relation} adapter {os.fspath(name)!r}{shown}; writing there would "
                    f"destroy an input: choose an output directory outside every input adapter")


def _relation(target: Path, target_chain: Sequence[tuple[Path, tuple[int, int] | None]],
              directory: Path) -> str | None:
    """How the output ``target`` sits relative to an input ``directory``: "is", "lies inside",
    "contains" or None (apart)."""
    ident = _identity(directory)
    for i, (path, path_id) in enumerate(target_chain):
        if path == directory or (ident is not None and path_id == ident):
            return "is" if i == 0 else "lies inside"
    target_id = target_chain[0][1]
    for path, path_id in _chain(directory)[1:]:
        if path == target or (target_id is not None and path_id == target_id):
            return "contains"
    return None


def _chain(path: Path) -> list[tuple[Path, tuple[int, int] | None]]:
    return [(p, _identity(p)) for p in (path, *path.parents)]


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _resolved(path: Path) -> Path:
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError):  # a symlink loop, a NUL byte
        return Path(os.path.abspath(path))
