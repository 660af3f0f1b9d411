"""Writing files safely: atomic replacement, and one process per run directory.

`atomic_open(path)` writes to a hidden temporary file next to `path` and renames it over `path` only once the
content is complete and on disk, so a crash, a kill or an error leaves the old file as it was (and at
worst a stale `.<name>.*.tmp`, which `remove_stale_temps` deletes). The temporary file is created with
mode 0666 minus the umask, like any file a program writes (tempfile.mkstemp would make it 0600).

`DirectoryLock` is an exclusive `flock` on `<folder>/.lock`: the kernel drops it when the process ends, even
on SIGKILL, so a lock is never stale.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import time
from pathlib import Path


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """A file object for `path` ("wb" or "w") that replaces `path` when the block ends without an error."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def remove_stale_temps(folder, name: str) -> list[Path]:
    """Delete the temporary files a killed writer of `folder/name` left behind; only safe while no other
    process writes there (hold the folder's DirectoryLock)."""
    removed = []
    for tmp in Path(folder).glob(f".{name}.*"):
        if tmp.is_file():
            tmp.unlink()
            removed.append(tmp)
    return removed


class DirectoryInUseError(RuntimeError):
    """Another process holds the folder's lock; the message names it."""


class DirectoryLock:
    """Exclusive ownership of a folder while held (`with DirectoryLock(folder, "ltm train"):`)."""

    LOCK_NAME = ".lock"

    def __init__(self, folder, owner: str = "process"):
        self.folder, self.owner = Path(folder), owner
        self.path = self.folder / self.LOCK_NAME
        self._fd = None

    def acquire(self) -> DirectoryLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise DirectoryInUseError(
                f"{self.folder} is in use by another {self.owner} ({holder}); wait for it "
                "to finish or use another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} on {os.uname().nodename}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0
        )
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
