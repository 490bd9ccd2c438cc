"""Writing outputs so that a failure never leaves a partial result behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_directory", "atomic_file", "check_target", "write_text_atomic"]

PathLike = Union[str, os.PathLike]


def check_target(target: PathLike, overwrite: bool) -> bool:
    """The rule for an output directory: True when it exists and may be replaced.

    A file (or a link) is always refused; a non-empty directory is refused
    unless `overwrite` (FileExistsError).
    """
    target = Path(target)
    if not os.path.lexists(target):
        return False
    if not target.is_dir() or target.is_symlink():
        raise FileExistsError(f"{str(target)!r} exists and is not a directory")
    if not overwrite and any(target.iterdir()):
        raise FileExistsError(f"{str(target)!r} exists and is not empty; pass overwrite=True to replace it")
    return True


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    # Some file systems cannot sync a directory; the rename itself has happened either way.
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def _sibling(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def atomic_directory(target: PathLike, overwrite: bool = False, fsync: bool = True) -> Iterator[Path]:
    """Write a directory all at once: yields an empty temporary directory beside `target`.

    Write everything into the yielded path; when the block ends without an
    error it is renamed to `target` (parent directories are created). On an
    error the temporary directory is removed and `target` is not touched, so
    no partial output is ever visible at `target`.

    An existing non-empty `target` is refused (FileExistsError) unless
    `overwrite`; then the whole old directory is replaced, and removed only
    after the new one is in place. A `target` that is a file is always
    refused. With `fsync` the files are flushed to disk before the rename.
    """
    target = Path(os.path.abspath(os.fspath(target)))
    if target.parent == target:
        raise ValueError(f"cannot write a directory over {str(target)!r}")
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    os.mkdir(tmp)
    try:
        yield tmp
        if fsync:
            _fsync_tree(tmp)
        old = None
        if check_target(target, overwrite):
            old = _sibling(target, "old")
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fsync:
        _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        if os.path.lexists(old):
            warnings.warn(f"could not remove the replaced directory {str(old)!r}")


@contextlib.contextmanager
def atomic_file(target: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed to `target`."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write `text` to `path` (replacing it) through a temporary file, so readers never see a partial file."""
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(text)
