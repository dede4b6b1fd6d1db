"""Writing a checkpoint directory so that a killed or failed write leaves nothing that looks like one.

Everything is written into a hidden sibling `.<name>.partial-<pid>` and renamed to `<name>` last, in one
`os.rename`; a failure removes the partial directory, and a partial one left by a killed process is removed
by the next write to the same place. A full disk (or a file-size limit) becomes one CheckpointError line.
"""
import contextlib
import errno
import logging
import os
import shutil
from typing import Iterator

from models.errors import CheckpointError

logger = logging.getLogger(__name__)

PARTIAL_MARKER = ".partial-"
_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def check_new_output_dir(out_dir: str, what: str = "output directory") -> None:
    """Refuse an existing file or non-empty directory as the place to write a checkpoint."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        kind = "a file" if not os.path.isdir(out_dir) else "not empty"
        raise CheckpointError(f"{what} '{out_dir}' exists and is {kind}; choose a new directory or remove it")


def _partial_dir(out_dir: str) -> str:
    parent, name = os.path.split(os.path.abspath(out_dir))
    return os.path.join(parent, f".{name}{PARTIAL_MARKER}{os.getpid()}")


def _remove_abandoned_partials(out_dir: str) -> None:
    parent, name = os.path.split(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if not entry.startswith(f".{name}{PARTIAL_MARKER}"):
            continue
        pid = entry.rsplit(PARTIAL_MARKER, 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            logger.info("removing %s, left by an interrupted write", entry)
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (an OSError, or a library error wrapping one in its text) means no space was left."""
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return True
    text = str(error)
    return any(marker in text for marker in ("No space left", "File too large", "unexpected pos", "Disk quota"))


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, what: str = "output directory") -> Iterator[str]:
    """Yield a temporary directory to write into; on success it becomes `out_dir` (which must be new or an
    empty directory), on any failure it is removed."""
    check_new_output_dir(out_dir, what)
    _remove_abandoned_partials(out_dir)
    partial = _partial_dir(out_dir)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        os.makedirs(partial)
        yield partial
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above); rename needs the name free
        os.rename(partial, out_dir)
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if is_disk_full(error):
            raise CheckpointError(f"no space left while writing {out_dir} ({type(error).__name__}); nothing was "
                                  "written: free disk space (or raise the file-size limit) and run again") from None
        if isinstance(error, OSError) and not isinstance(error, CheckpointError):
            raise CheckpointError(f"cannot write {out_dir} ({error.strerror or error}); nothing was written") from None
        raise


def write_text(path: str, text: str) -> None:
    """Write a small file through a temporary name (never half a file under the final name)."""
    tmp = f"{path}{PARTIAL_MARKER}{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
