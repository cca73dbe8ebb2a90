"""A Store on the local filesystem: plain ``open``, fsync for durability, no fsspec layer."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from contextlib import contextmanager
from typing import BinaryIO, Iterator

from ..errors import StorageError, StoreConflictError, StoreNotFoundError, StorePermissionError
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

    @contextmanager
    def open_read(self, path: str) -> Iterator[BinaryIO]:
        full = self._abs(path)
        try:
            f = open(full, "rb", buffering=0)
        except OSError as exc:
            raise self._wrap(exc, path) from exc
        with f:
            yield f  # type: ignore[misc]

    def read_bytes(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        with self.open_read(path) as f:
            try:
                if start:
                    f.seek(start)
                if end is None:
                    return f.read()
                return f.read(max(0, end - (start or 0)))
            except OSError as exc:
                raise self._wrap(exc, path) from exc

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
        try:
            return os.stat(self._abs(path)).st_size
        except OSError as exc:
            raise self._wrap(exc, path) from exc

    def list(self, path: str = "") -> list[str]:
        full = self._abs(path, allow_empty=True)
        try:
            return sorted(os.listdir(full))
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            return []
        except OSError as exc:
            raise self._wrap(exc, path) from exc

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
