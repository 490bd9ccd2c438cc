"""Writing outputs so that a failure never leaves a partial result behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_directory", "atomic_file", "check_target"]

PathLike = Union[str, os.PathLike]


def check_target(target: PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty directory or an existing file unless `overwrite`."""
    target = Path(target)
    if target.exists() and not overwrite:
        if target.is_dir() and not any(target.iterdir()):
            return target
        raise FileExistsError(f"{target} already exists and is not empty; pass overwrite=True to replace it")
    return target


@contextlib.contextmanager
def atomic_directory(target: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; on success it becomes `target`.

    On an exception the temporary directory is removed and `target` is left
    as it was. With `overwrite`, an existing `target` is replaced only after
    the new one is complete.
    """
    target = check_target(target, overwrite).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
