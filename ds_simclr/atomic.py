"""Replace files atomically: readers see the old file or the new one, never half of one.

The one way the package writes a file that something else may read (run directory files, the
store index, manifests, preprocessed volumes): write a temporary file beside the target, flush it to
disk, then `rename` it over the target (atomic on POSIX file systems, also NFS and Lustre). A
failed or killed writer leaves the old file and, at worst, a hidden `.<name>.tmp<pid>` beside it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk (before a marker that vouches for it is written)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed.

    For writers that want a file name (`np.save`, `torch.save`). The suffix is kept so that such
    writers do not append their own (`x.npy` -> `.x.npy.tmp123.npy`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        fsync_file(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: str | bytes | memoryview | Iterable[str]) -> None:
    """Write `data` to `path` atomically: bytes (or a memoryview of them, not copied), text (UTF-8),
    or text chunks (written as they come, so a large file need not be in memory)."""
    with atomic_path(path) as tmp:
        if isinstance(data, (bytes, memoryview)):
            tmp.write_bytes(data)
        else:
            with tmp.open("w", encoding="utf-8") as out:
                out.writelines([data] if isinstance(data, str) else data)
