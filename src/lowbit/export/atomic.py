"""An output directory appears only when complete: write to a sibling temp dir, then rename.

Also what makes the output location safe to use: it is checked before any work (exists, not writable, under a
file), one run at a time holds it (`output_lock`), files get the user's normal permissions, and a disk-full or
permission error while writing leaves nothing behind and says which path and how much space.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.export.space import format_bytes, free_bytes, nearest_existing

log = logging.getLogger(__name__)

_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_PERMISSION_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)
_OS_ERROR_CODE = re.compile(r"os error (\d+)")  # how safetensors' Rust writer reports an errno


def check_output_location(out: str | Path) -> Path:
    """Refuse an --out that cannot be created: under a file, or in a directory this user cannot write."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise LowbitError(f"output path '{path}' exists and is a file, not a directory; choose another --out")
    ancestor = nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise LowbitError(
            f"cannot create output '{path}': '{ancestor}' is a file, not a directory; choose another --out"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LowbitError(
            f"cannot write output '{path}': directory '{ancestor}' is not writable (permissions or a read-only "
            "filesystem); choose an --out in a directory you can write"
        )
    return path


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) when `out` exists and may not be replaced, or cannot be written."""
    path = check_output_location(out)
    if path.exists() and not overwrite:
        raise LowbitError(f"output directory '{path}' already exists; choose another --out or pass --overwrite")
    return path


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on `out` for a whole run, so two runs never write the same directory.

    The lock is a `flock` on `.<name>.lock` in out's parent (created, like the parents, when missing); a second
    process fails at once. The lock file and the parents this call created are removed at the end.
    """
    path = check_output_location(out)
    created = _make_parents(path.parent)
    lock_path = path.parent / f".{path.name}.lock"
    fd = _acquire(lock_path, path)
    try:
        yield lock_path
    finally:
        with contextlib.suppress(OSError):
            if _same_file(fd, lock_path):
                lock_path.unlink()
        os.close(fd)  # releases the flock
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()  # only while still empty


def _make_parents(parent: Path) -> list[Path]:
    missing = []
    probe = parent
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            pass
        except OSError as e:
            raise write_error(e, directory, None) from None
    return list(reversed(missing))


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _acquire(lock_path: Path, out: Path) -> int:
    """Open and flock the lock file; retry when a finishing run unlinked the file we opened."""
    for _ in range(5):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise write_error(e, lock_path, None) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LowbitError(
                f"another lowbit run is writing '{out}' (lock {lock_path} is held); wait for it to finish or choose "
                "another --out"
            ) from None
        if _same_file(fd, lock_path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # for a person wondering who holds it
            return fd
        os.close(fd)  # we locked a file that was just removed: lock the new one
    raise LowbitError(f"could not take the lock {lock_path} for '{out}'; retry, or choose another --out")


def _umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalize_permissions(directory: Path) -> None:
    """Directories 0777 and files 0666, minus the umask: mkdtemp's 0700 would hide the export from other users."""
    mask = _umask()
    for root, dirs, files in os.walk(directory):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
    os.chmod(directory, 0o777 & ~mask)


def _error_code(error: BaseException) -> int | None:
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno
    match = _OS_ERROR_CODE.search(str(error))
    return int(match.group(1)) if match else None


def write_error(error: BaseException, path: Path, needed_bytes: int | None) -> LowbitError | BaseException:
    """A LowbitError for disk-full and permission errors (naming path and space), else the error itself.

    Handles OSError and safetensors' SafetensorError, which reports the errno only in its text ("os error 28").
    """
    code = _error_code(error)
    if code in _SPACE_ERRNOS:
        need = f"about {format_bytes(needed_bytes)}" if needed_bytes else "more space"
        free = free_bytes(path)
        have = format_bytes(free) if free is not None else "an unknown amount"
        return LowbitError(
            f"disk full while writing '{path}': the export needs {need} and the filesystem has {have} free; free "
            "some space or choose an --out on another disk"
        )
    if code in _PERMISSION_ERRNOS:
        return LowbitError(
            f"permission denied writing '{path}' ({os.strerror(code)}); choose an --out in a directory you can write"
        )
    return error


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool, *, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temp directory next to `out`; on success replace `out` with it, on error remove it.

    `needed_bytes` (the export's estimated size) goes into the message of a disk-full error.
    """
    final = check_output_dir(out, overwrite)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    except OSError as e:
        raise write_error(e, final, needed_bytes) from None
    try:
        yield temp
        normalize_permissions(temp)
    except BaseException as e:
        shutil.rmtree(temp, ignore_errors=True)
        convertible = isinstance(e, Exception) and not isinstance(e, LowbitError)
        converted = write_error(e, final, needed_bytes) if convertible else e
        if converted is not e:
            raise converted from None
        raise
    _publish(temp, final, overwrite)


@contextlib.contextmanager
def resumable_output_dir(
    out: str | Path, overwrite: bool, partial: Path, *, needed_bytes: int | None = None
) -> Iterator[Path]:
    """Yield `partial` (a resumable run's partial export, kept on error so that --resume continues it); on success
    it replaces `out` as `atomic_output_dir`'s temp directory does."""
    final = check_output_dir(out, overwrite)
    try:
        yield partial
        normalize_permissions(partial)
    except Exception as e:
        if isinstance(e, LowbitError):
            raise
        converted = write_error(e, final, needed_bytes)
        if converted is not e:
            raise converted from None
        raise
    _publish(partial, final, overwrite)


def _publish(temp: Path, final: Path, overwrite: bool) -> None:
    """Rename into place; never mix with a directory that appeared meanwhile unless overwriting."""
    if final.exists() and not overwrite:
        shutil.rmtree(temp, ignore_errors=True)
        raise LowbitError(
            f"output directory '{final}' appeared while this run was writing; nothing was replaced: choose another "
            "--out or pass --overwrite"
        )
    try:
        if final.exists():
            backup = final.with_name(f".{final.name}.old-{temp.name[-8:]}")
            final.rename(backup)
            temp.rename(final)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(temp, final)  # fails (ENOTEMPTY/EEXIST) rather than merge when a directory appeared
    except OSError as e:
        shutil.rmtree(temp, ignore_errors=True)
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise LowbitError(
                f"output directory '{final}' appeared while this run was writing; nothing was replaced: choose "
                "another --out or pass --overwrite"
            ) from None
        raise write_error(e, final, None) from None
