"""Helpers of the store-fault tests: a real small file system (tmpfs) and a disk-quota store.

* :func:`tmpfs` mounts a tmpfs of a given size (needs root with ``CAP_SYS_ADMIN``, as in this
  project's containers); :func:`can_mount_tmpfs` says whether that works here.
* :class:`QuotaStore` is a real ``zarr.storage.LocalStore`` whose "disk" holds at most
  ``max_chunks`` chunk files of the ``influences`` array: a further new chunk raises
  ``OSError(ENOSPC)`` before a byte is written, as a full disk does under zarr's atomic write
  (temporary file unlinked on error). Picklable with its quota, so Dask workers use it too (the
  workers import this module by name: the test adds this folder to ``sys.path`` before the
  cluster starts and spawned workers inherit it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zarr.storage import LocalStore

PAGE = 4096


def _chunk_files(root: Path) -> int:
    d = root / "influences" / "c"
    if not d.is_dir():
        return 0
    return sum(1 for _, _, files in os.walk(d) for f in files if f.isdigit())


class QuotaStore(LocalStore):
    """A ``LocalStore`` with room for ``max_chunks`` influence chunk files (``None``: no limit;
    the same location, so a rerun "after space is back" is ``QuotaStore(root)``)."""

    def __init__(self, root: Path | str, *, read_only: bool = False,
                 max_chunks: int | None = None) -> None:
        super().__init__(root, read_only=read_only)
        self.max_chunks = max_chunks

    def with_read_only(self, read_only: bool = False) -> QuotaStore:
        return type(self)(self.root, read_only=read_only, max_chunks=self.max_chunks)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    async def set(self, key: str, value: Any) -> None:
        if (self.max_chunks is not None and key.startswith("influences/c/")
                and not (self.root / key).exists()
                and _chunk_files(self.root) >= self.max_chunks):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.root / key))
        await super().set(key, value)


def _mount(path: Path, size: int) -> bool:
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def can_mount_tmpfs(where: Path) -> bool:
    probe = where / "tmpfs-probe"
    ok = _mount(probe, 64 * 1024)
    if ok:
        _umount(probe)
    return ok


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted at ``path`` (unmounted afterwards)."""
    if not _mount(path, size):
        raise RuntimeError(f"cannot mount a tmpfs at {path}")
    try:
        yield path
    finally:
        _umount(path)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def pages(path: Path, skip: str | None = None) -> int:
    """File-system pages the files under ``path`` take (files under ``skip`` left out)."""
    n = 0
    for d, _, files in os.walk(path):
        if skip is not None and Path(d).is_relative_to(path / skip):
            continue
        n += sum(-(-os.path.getsize(os.path.join(d, f)) // PAGE) for f in files)
    return n
