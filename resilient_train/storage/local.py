"""A Store on the local filesystem: plain ``open``, fsync for durability, no fsspec layer.

Reads only regular files reached without symlinks below the root: every path component is
opened with ``O_NOFOLLOW`` relative to its parent's descriptor, the file itself non-blocking
(a FIFO cannot hang the open), and anything that is not a regular file is refused with
:class:`~resilient_train.errors.UnsafeFileError`. Ranged reads never read past ``end``.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from contextlib import contextmanager
from typing import BinaryIO, Iterator

from ..errors import StorageError, StoreConflictError, StoreNotFoundError, StorePermissionError, UnsafeFileError
from .base import check_relpath

__all__ = ["LocalStore"]


class LocalStore:
    """Store rooted at a local folder. Writes are fsynced before ``open_write`` returns.

    The root folder is created on the first write, not at construction (constructors do no I/O).
    """

    def __init__(self, root: str, name: str | None = None):
        self._root = os.path.abspath(os.path.expanduser(root))
        self.name = name or self._root

    @property
    def uri(self) -> str:
        return self._root

    @property
    def root(self) -> str:
        return self._root

    def __repr__(self) -> str:
        return f"LocalStore({self._root!r})"

    def _abs(self, path: str, *, allow_empty: bool = False) -> str:
        rel = check_relpath(path, allow_empty=allow_empty)
        return os.path.join(self._root, *rel.split("/")) if rel else self._root

    def _wrap(self, exc: OSError, path: str) -> StorageError:
        if isinstance(exc, FileNotFoundError) or exc.errno == errno.ENOENT:
            return StoreNotFoundError(f"{path!r} does not exist under {self._root}", provider=self.name, path=path)
        if isinstance(exc, PermissionError):
            return StorePermissionError(f"permission denied for {path!r} under {self._root}", provider=self.name, path=path)
        return StorageError(f"{type(exc).__name__} on {path!r} under {self._root}: {exc.strerror or exc}", provider=self.name, path=path)

    @contextmanager
    def open_write(self, path: str) -> Iterator[BinaryIO]:
        full = self._abs(path)
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            f = open(full, "wb", buffering=0)
        except OSError as exc:
            raise self._wrap(exc, path) from exc
        ok = False
        try:
            yield f  # type: ignore[misc]
            os.fsync(f.fileno())
            ok = True
        except OSError as exc:
            raise self._wrap(exc, path) from exc
        finally:
            f.close()
            if not ok:
                try:
                    os.unlink(full)
                except OSError:
                    pass

    def _open_fd(self, path: str, *, directory: bool = False) -> int:
        """A descriptor of ``path`` opened without following any symlink below the root.
        Raises UnsafeFileError for a symlink, FIFO, device or socket (or a folder when a file
        is asked for), StoreNotFoundError when it does not exist."""
        rel = check_relpath(path, allow_empty=directory)
        parts = rel.split("/") if rel else []
        cloexec = getattr(os, "O_CLOEXEC", 0)
        dir_flags = os.O_RDONLY | os.O_DIRECTORY | cloexec
        try:
            fd = os.open(self._root, dir_flags)
        except OSError as exc:
            raise self._wrap(exc, path) from exc
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                flags = (os.O_RDONLY | os.O_NONBLOCK | cloexec) if last and not directory else dir_flags
                try:
                    nfd = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EMLINK):
                        try:
                            st = os.lstat(part, dir_fd=fd)
                        except OSError:
                            st = None
                        if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
                            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                            raise UnsafeFileError(f"{'/'.join(parts[:i + 1])!r} under {self._root} is {kind}; refusing to read it", provider=self.name, path=path) from None
                    raise self._wrap(exc, path) from exc
                os.close(fd)
                fd = nfd
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISDIR(mode) if directory else stat.S_ISREG(mode)):
                raise UnsafeFileError(f"{path!r} under {self._root} is not a regular {'folder' if directory else 'file'}; refusing to read it", provider=self.name, path=path)
            if not directory:
                os.set_blocking(fd, True)
            return fd
        except BaseException:
            os.close(fd)
            raise

    @contextmanager
    def open_read(self, path: str) -> Iterator[BinaryIO]:
        f = open(self._open_fd(path), "rb", buffering=0)
        with f:
            yield f  # type: ignore[misc]

    def read_bytes(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``path`` (fewer at the end of the file); never reads past
        ``end``. Without ``end`` the whole file is read, bounded by its size when opened."""
        fd = self._open_fd(path)
        try:
            pos = start or 0
            if end is None:
                end = os.fstat(fd).st_size
            want = max(0, end - pos)
            parts = []
            while want > 0:
                chunk = os.pread(fd, want, pos)
                if not chunk:
                    break
                parts.append(chunk)
                pos += len(chunk)
                want -= len(chunk)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        except OSError as exc:
            raise self._wrap(exc, path) from exc
        finally:
            os.close(fd)

    def read_into(self, path: str, start: int, buffers: list) -> int:
        """Read bytes from ``start`` of ``path`` straight into ``buffers`` (writable buffers, filled
        in order: one scatter read, no intermediate copy); returns how many bytes were read
        (fewer at the end of the file). The zero-copy path of a verified load."""
        fd = self._open_fd(path)
        try:
            want = sum(memoryview(b).nbytes for b in buffers)
            got = 0
            views = [memoryview(b).cast("B") for b in buffers]
            while got < want:
                n = os.preadv(fd, views, start + got)
                if n == 0:
                    break
                got += n
                while views and n >= len(views[0]):  # a short read: continue where it stopped
                    n -= len(views[0])
                    views.pop(0)
                if views and n:
                    views[0] = views[0][n:]
            return got
        except OSError as exc:
            raise self._wrap(exc, path) from exc
        finally:
            os.close(fd)

    def write_bytes(self, path: str, data: bytes) -> None:
        with self.open_write(path) as f:
            f.write(data)

    def write_bytes_exclusive(self, path: str, data: bytes) -> None:
        """Write a temporary file, fsync it, then ``os.link`` it to ``path``: the link fails if
        ``path`` exists (create-only, atomic), and a reader never sees a partial file."""
        full = self._abs(path)
        tmp = f"{full}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, full)
            except FileExistsError:
                raise StoreConflictError(f"{path!r} already exists under {self._root}", provider=self.name, path=path) from None
            self.sync_folder(os.path.dirname(path) if "/" in path else "")
        except OSError as exc:
            if isinstance(exc, StoreConflictError):
                raise
            raise self._wrap(exc, path) from exc
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def exists(self, path: str) -> bool:
        return os.path.exists(self._abs(path, allow_empty=True))

    def size(self, path: str) -> int:
        fd = self._open_fd(path)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def list(self, path: str = "") -> list[str]:
        try:
            fd = self._open_fd(path, directory=True)
        except (StoreNotFoundError, UnsafeFileError):
            return []
        except StorageError as exc:
            if isinstance(exc.__cause__, NotADirectoryError):
                return []
            raise
        try:
            return sorted(os.listdir(fd))
        except OSError as exc:
            raise self._wrap(exc, path) from exc
        finally:
            os.close(fd)

    def delete(self, path: str, recursive: bool = False) -> None:
        full = self._abs(path)
        try:
            if os.path.isdir(full) and not os.path.islink(full):
                if recursive:
                    shutil.rmtree(full)
                else:
                    os.rmdir(full)
            else:
                os.unlink(full)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._wrap(exc, path) from exc

    def sync_folder(self, path: str) -> None:
        full = self._abs(path, allow_empty=True)
        try:
            fd = os.open(full, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass  # some filesystems refuse fsync on directories; the data itself was fsynced
        finally:
            os.close(fd)

    def child(self, path: str) -> "LocalStore":
        return LocalStore(self._abs(path), name=self.name)
