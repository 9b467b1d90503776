"""The settlement journal: settlements not yet applied, kept on local disk (ARCHITECTURE.md section 7).

``BUDGET_JOURNAL=<dir>``. Each process (each ``Journal``) appends to a file of its own,
``journal-<pid>-<random>.jsonl``, and holds an exclusive ``flock`` on it for as long as it lives, so
another process can tell a live journal from the journal of a process that ended. Records are JSON
lines: ``{"op":"settle",...}`` with every field a settle needs, and ``{"op":"applied","id":...}``.
Every write is one ``os.write`` and one ``fsync``; a crash mid-write leaves at most a torn last line,
which readers skip.

Each file opens with the identity of the ledger it belongs to, ``{"op":"ledger","id":<digest>}``: a
digest of the ledger's kind, its location without credentials (scheme, hosts, database) and its key
prefix (``ledger_identity``), never a password. A process claims only the files of its own ledger, so
deployments that share a directory (another prefix, another Redis) never replay each other's spend
into the wrong store. Files of older versions carry no identity: they are claimed as before, with a
warning.

At start-up the finalizer ``claim``\\ s the files nobody holds: their unapplied settlements are copied
into its own file (fsync'd) and the dead files deleted, so they are applied like its own, with retries,
and a process dying during the replay leaves them in its own file for the next one. Replaying is safe
because settlement is idempotent (ARCHITECTURE.md section 4): a settlement applied twice is a
``duplicate``.

Compaction: when the own file has grown past ``compact_bytes`` (and twice its size after the last
compaction), it is rewritten with only its unapplied settlements, atomically (a new locked file
renamed over the old one), or simply truncated when everything in it was applied.

All methods are blocking and thread-safe; the finalizer calls them from a worker thread, never from
the request path.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from ._journal_records import (
    _header,
    _identity,
    _lines,
    _parse,
    decode_settlement,
    encode_settlement,
    ledger_identity,
)
from .ledger import Settlement

__all__ = ["Journal", "decode_settlement", "encode_settlement", "ledger_identity", "read_unapplied"]

logger = logging.getLogger("budget_middleware")

PREFIX = "journal-"
SUFFIX = ".jsonl"
_TMP_PREFIX = ".journal-"  # files being created or compacted: locked, never read as journals
_TMP_SUFFIX = ".tmp"
DEFAULT_COMPACT_BYTES = 4 << 20


def _read_fd(fd: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def read_unapplied(path: str | os.PathLike[str]) -> list[Settlement]:
    """The unapplied settlements in one journal file (for operators and tests; takes no lock)."""
    return list(_parse(Path(path).read_bytes(), path).values())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """One process's append-only settlement journal in ``directory`` (created if missing).

    The file is created lazily, on first use, so a journal made before a fork (a server's master
    process) opens a file of its own in each worker. ``identity`` names the ledger its settlements
    belong to (``ledger_identity``; the finalizer sets it from its ledger when it is None): it opens
    every file, and only files of the same identity (or of none) are claimed.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        compact_bytes: int = DEFAULT_COMPACT_BYTES,
        identity: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise PermissionError(f"journal directory {str(self.directory)!r} is not writable")
        self.compact_bytes = compact_bytes
        self.identity = identity
        self._foreign_logged: set[str] = set()
        self.path: Path | None = None
        self._fd: int | None = None
        self._pid = 0
        self._size = 0
        self._compact_at = compact_bytes
        self._lock = threading.Lock()
        self._torn = False
        self.compactions = 0

    def __repr__(self) -> str:
        return f"Journal({str(self.directory)!r})"

    # -- the own file ---------------------------------------------------------------------------

    def _new_locked_file(self) -> tuple[int, Path]:
        """A new file, locked before it gets a name readers look at (so no reader can ever take a
        live journal for a dead one). Returns its fd and its temporary path."""
        tag = f"{os.getpid()}-{secrets.token_hex(6)}"
        tmp = self.directory / f"{_TMP_PREFIX}{tag}{_TMP_SUFFIX}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, _header(self.identity))  # durable with the first record's fsync
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return fd, tmp

    def _open(self) -> int:
        """The own file's fd (lock held), created on first use and again in a forked child."""
        if self._fd is not None and self._pid == os.getpid():
            return self._fd
        if self._fd is not None:  # a copy inherited across fork: the lock stays the parent's
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        fd, tmp = self._new_locked_file()
        path = self.directory / f"{PREFIX}{tmp.name[len(_TMP_PREFIX) : -len(_TMP_SUFFIX)]}{SUFFIX}"
        try:
            os.rename(tmp, path)
            _fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._fd, self.path, self._pid = fd, path, os.getpid()
        self._size = os.fstat(fd).st_size  # the identity line
        self._torn = False
        self._compact_at = self.compact_bytes
        return fd

    def open(self) -> Path:
        """Create (if needed) and lock the own file; returns its path."""
        with self._lock:
            self._open()
            assert self.path is not None
            return self.path

    def write(self, settlements: Sequence[Settlement] = (), applied: Iterable[str] = ()) -> None:
        """Append settlements and ``applied`` marks: one ``os.write``, one ``fsync``.

        On failure (a full disk, say) the file is cut back to its last whole record and OSError is
        raised: nothing of this call is in the journal."""
        data = _lines(settlements, applied)
        if not data:
            return
        with self._lock:
            fd = self._open()
            self._append(fd, data)
            if self._size > self._compact_at:
                try:
                    self._compact(fd)
                except OSError as exc:  # the records are safe; only the file stays larger
                    logger.warning("budget: compacting journal %s failed: %s", self.path, exc)
                    self._compact_at = 2 * self._size

    def _append(self, fd: int, data: bytes) -> None:
        """One write and one fsync (lock held); on failure the file is cut back to its last whole
        record (or, if even that fails, the next write starts on a new line)."""
        if self._torn:
            data = b"\n" + data
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, self._size)
            except OSError:
                self._torn = True
            raise
        self._torn = False
        self._size = os.fstat(fd).st_size

    def unapplied(self, limit: int | None = None) -> tuple[list[Settlement], bool]:
        """Up to ``limit`` unapplied settlements of the own file, and whether there are more."""
        with self._lock:
            if self._fd is None or self._pid != os.getpid():
                return [], False
            pending = list(_parse(_read_fd(self._fd), self.path).values())
        if limit is not None and len(pending) > limit:
            return pending[:limit], True
        return pending, False

    def _compact(self, fd: int) -> None:
        """Keep only the unapplied settlements (lock held). Never loses one: a rewrite goes to a new
        locked file that is fsync'd, then renamed over the own file."""
        assert self.path is not None
        keep = list(_parse(_read_fd(fd), self.path).values())
        if not keep:
            self._size = len(_header(self.identity))  # the identity line stays
            os.ftruncate(fd, self._size)
            os.fsync(fd)
        else:
            data = _lines(keep, ())
            new_fd, tmp = self._new_locked_file()
            try:
                _write_all(new_fd, data)
                os.fsync(new_fd)
                os.rename(tmp, self.path)
                _fsync_dir(self.directory)
            except BaseException:
                os.close(new_fd)
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            os.close(fd)  # the old inode: unlinked by the rename; its lock goes with it
            self._fd = new_fd
            self._size = os.fstat(new_fd).st_size
        self._compact_at = max(self.compact_bytes, 2 * self._size)
        self.compactions += 1
        logger.debug("budget: journal %s compacted to %d settlements", self.path, len(keep))

    def close(self) -> None:
        """Release the own file: deleted when everything in it was applied, otherwise left (and
        unlocked) for the next start to replay."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            if self._pid != os.getpid():  # a copy inherited across fork: not ours to delete
                os.close(fd)
                return
            try:
                if self.path is not None and not _parse(_read_fd(fd), self.path):
                    self.path.unlink()
            except OSError as exc:
                logger.warning("budget: closing journal %s: %s", self.path, exc)
            finally:
                os.close(fd)

    # -- the files of processes that ended --------------------------------------------------------

    def claim(self) -> int:
        """Take over every journal in the directory that no live process holds: copy its unapplied
        settlements into the own file (fsync'd), then delete it. Returns how many were copied;
        read them back with ``unapplied``."""
        with self._lock:
            own_fd = self._open()
            copied = 0
            for path in sorted(self.directory.iterdir()):
                name = path.name
                if path == self.path:
                    continue
                try:
                    if name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX):
                        self._take(path, None)  # its creator died before naming it: nothing in it
                    elif name.startswith(PREFIX) and name.endswith(SUFFIX):
                        copied += self._take(path, own_fd)
                except OSError as exc:  # left in place: the next start tries again
                    logger.error("budget: cannot take over journal %s: %s", path, exc)
            return copied

    def _take(self, path: Path, own_fd: int | None) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0  # claimed or compacted away meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # a live process holds it
            # Locked, but maybe an inode another claimer already deleted, or a compaction replaced.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                return 0
            if own_fd is None:
                path.unlink()
                return 0
            data = _read_fd(fd)
            if not self._is_own(path, _identity(data)):
                return 0
            settlements = list(_parse(data, path).values())
            if settlements:
                self._append(own_fd, _lines(settlements, ()))
                logger.warning(
                    "budget: journal %s of a process that ended holds %d unapplied settlements; "
                    "replaying them",
                    path,
                    len(settlements),
                )
            path.unlink()  # only once its settlements are safe in the own file
            _fsync_dir(self.directory)
            return len(settlements)
        finally:
            os.close(fd)

    def _is_own(self, path: Path, identity: str | None) -> bool:
        """Whether a file of a process that ended is this journal's to claim."""
        if identity == self.identity:
            return True
        if identity is None:
            logger.warning(
                "budget: journal %s carries no ledger identity (an older version wrote it); "
                "replaying it into this ledger",
                path,
            )
            return True
        if identity not in self._foreign_logged:
            self._foreign_logged.add(identity)
            logger.info(
                "budget: journal %s belongs to another ledger (identity %s); left to it", path, identity
            )
        return False
