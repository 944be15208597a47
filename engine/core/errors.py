"""The engine's one error type for bad input. Ground floor: no torch, no Qt.

Whatever the user gave that cannot be used (a config value, a file, a run id, a flag) raises
``InputError`` with a message that names the problem, and the config key and/or file it is about.
The CLI turns it into exit code 2 and one line on stderr (plus an ``error`` event where stdout
carries events); a training stage records it on the run as ``failed``; the studio shows it next to
the field ``key`` names.

A file system that refuses a read or write the engine needs (a full disk, the file-size limit, a
read-only or immutable folder) is not bad input: ``FileSystemError`` names the path and the errno,
and the CLI exits with EXIT_IO_ERROR (3) and that one line; a run it hits ends ``failed`` with it.
"""
from __future__ import annotations

import errno
import os


class InputError(ValueError):
    """Bad user input: ``key`` is the dotted config key (``train.lr``) or flag (``run_id``) it concerns,
    ``path`` the file, when there is one."""

    def __init__(self, message: str, key: str | None = None, path: str | None = None):
        super().__init__(message)
        self.key = key
        self.path = path


EXIT_BAD_INPUT = 2  # what every command exits with on bad input


def error_line(message: str) -> None:
    """The one line on stderr that bad input gets: ``mediswift: error: ...``."""
    import sys

    sys.stderr.write(f"mediswift: error: {message}\n")
    sys.stderr.flush()


EXIT_IO_ERROR = 3  # a file-system or disk error (full disk, file-size limit, read-only or immutable folder)

WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                          errno.EDQUOT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG})


class FileSystemError(OSError):
    """A file or folder the engine must read or write cannot be: the path and the errno, said as one
    line (``cannot write PATH: No space left on device (ENOSPC)``). Exit code EXIT_IO_ERROR, not the
    bad-input code: what was asked was fine, the file system refused it."""

    def __init__(self, code: int, path: str | os.PathLike, action: str = "write", detail: str | None = None):
        super().__init__(code, os.strerror(code) if code else (detail or "input/output error"), str(path))
        self.action = action
        self.detail = detail

    @property
    def code_name(self) -> str:
        return errno.errorcode.get(self.errno, str(self.errno)) if self.errno else "EIO"

    def __str__(self) -> str:
        if self.filename in (None, "?"):
            return f"a file-system operation failed: {self.strerror} ({self.code_name})"
        return f"cannot {self.action} {self.filename}: {self.strerror} ({self.code_name})"

    @classmethod
    def of(cls, e: OSError, path: str | os.PathLike | None = None, action: str = "write") -> "FileSystemError":
        """``e`` as a FileSystemError naming ``path`` (else the file ``e`` names)."""
        if isinstance(e, FileSystemError):
            return e
        where = path if path is not None else (e.filename if e.filename is not None else "?")
        return cls(e.errno or errno.EIO, where, action)


def fs_error_line(e: FileSystemError) -> None:
    """The one line on stderr of a file-system error: ``mediswift: error: cannot write PATH: ... (ENOSPC)``."""
    error_line(str(e))
