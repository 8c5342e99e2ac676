"""Output files: checked before any work, written atomically, and failures said in one line.

Every file snca writes goes through :func:`atomic_write`: the content goes to a temporary file
beside the target, is flushed to disk, and is renamed over the target, so a crash, a full disk
or a kill leaves either the previous file or the new one, never half of one. A failed write
raises :class:`OutputError` naming the file, the cause (no space left, read-only file system,
permission denied) and whether the previous version is intact.

Commands call :func:`check_writable` on their output locations before loading data or models:
a run that can only fail at its first checkpoint should fail in its first second.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SncaError

# What an OS error number means for someone who has to fix it.
_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than this system allows",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


# torch.save reports a failed or short write as a RuntimeError from its zip writer.
_TORCH_WRITE_FAILURE = re.compile(r"unexpected pos|file write failed|PytorchStreamWriter failed|inline_container")


def is_write_failure(err: BaseException) -> bool:
    """An error from writing bytes (an OSError, or torch's writer reporting one), as opposed to
    one from producing them (e.g. an object that cannot be pickled)."""
    if isinstance(err, SncaError):
        return False
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and bool(_TORCH_WRITE_FAILURE.search(str(err))))


class OutputError(SncaError):
    """An output could not be written (or its location cannot be written to)."""


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _cause(err: BaseException, directory: Path, written: int = 0) -> str:
    """The reason a write failed, in words. torch.save reports a short write as a RuntimeError
    ("unexpected pos ...") without the errno: the disk counts as full when, with the partial
    file removed, about no more space is free than that file held."""
    code = getattr(err, "errno", None)
    if code in _CAUSES:
        return _CAUSES[code]
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return first
    if free <= 1.1 * written + (1 << 20):
        return f"no space left on the device ({_size(free)} free; {first})"
    return f"{first}; {_size(free)} free there"


def write_error(path: str | os.PathLike, err: BaseException, kept: bool | None = None, written: int = 0) -> OutputError:
    """The one-line error for a failed write of ``path`` (``written`` bytes of it had gone to a
    temporary file). ``kept``: whether a previous version of ``path`` is still there, untouched
    (None: say nothing about it)."""
    path = Path(path)
    what = f"writing {path} failed: {_cause(err, path.parent if path.parent.exists() else Path('.'), written)}"
    if kept is True:
        what += f"; the previous {path.name} is intact"
    elif kept is False:
        what += f"; nothing was written to {path}"
    return OutputError(f"{what}; free some space or choose another location")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: str | os.PathLike, what: str = "output", is_dir: bool = False) -> Path:
    """Refuse, before any work, an output location that cannot be written: ``path`` (a file, or
    a directory when ``is_dir``) or the nearest of its parents that exists must be a directory
    in which a file can be created. This is probed by creating and removing a file: ``access()``
    says yes to root on a ``chmod 555`` directory, and on some mounts to anyone."""
    path = Path(path)
    target = path if is_dir else path.parent
    if path.exists() and path.is_dir() and not is_dir:
        raise OutputError(f"the {what} {path} is a directory; name a file")
    if path.exists() and not path.is_dir() and is_dir:
        raise OutputError(f"the {what} directory {path} is a file; name a directory")
    existing = _nearest_existing(target)
    if not existing.is_dir():
        raise OutputError(f"cannot write the {what} {path}: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".snca-write-check.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        cause = _CAUSES.get(err.errno, err.strerror or str(err))
        where = "" if existing == target.absolute() else f" (in {existing}, its nearest existing parent)"
        raise OutputError(f"cannot write the {what} {path}{where}: {cause}; choose another location") from None
    return path


def replace_path(new: Path, path: Path) -> None:
    """Rename ``new`` (a file or a sharded directory) to ``path``, replacing what is there
    (either layout: a run resumed on another number of ranks changes it); a previous directory
    is removed only after the rename."""
    if not path.is_dir() and not new.is_dir():
        os.replace(new, path)  # atomic
        return
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.is_dir():
        path.rename(old)
    elif path.exists():
        path.unlink()
    new.rename(path)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path``: write it inside the block; on success it replaces
    ``path`` (fsync, then rename); on any failure it is removed and the error is an
    :class:`OutputError` (the previous ``path``, if any, is untouched)."""
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make every output private
        os.close(fd)
    except OSError as err:
        raise write_error(path, err, kept=existed or None) from None
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        replace_path(tmp, path)
    except BaseException as err:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if is_write_failure(err):
            raise write_error(path, err, kept=existed or None, written=written) from None
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], suffix: str = "") -> Path:
    """``write(tmp)`` then move ``tmp`` into place at ``path`` (see :func:`atomic_path`)."""
    with atomic_path(path, suffix) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
