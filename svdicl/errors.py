"""The one exception type users see: raised where bad input enters, printed by the CLI as one line."""

from __future__ import annotations

import errno
import re
from pathlib import Path


class SvdiclError(ValueError):
    """A problem with the user's input or environment, with a message that names the fix."""


# Why a write failed, for the errors a user fixes by freeing space or choosing another folder.
_WRITE_PROBLEMS = {
    errno.ENOSPC: "no space left on the device; free disk space or write somewhere else",
    errno.EDQUOT: "the disk quota is used up; free disk space or write somewhere else",
    errno.EROFS: "the file system is read-only; write to another folder",
    errno.EACCES: "permission denied; fix its permissions or use another path",
    errno.EPERM: "operation not permitted; fix its permissions or use another path",
}


def write_error(exc: BaseException, path: str | Path | None = None, *, writing: bool = True) -> SvdiclError | None:
    """A one-line SvdiclError for a write that failed for lack of space or permission; None for any other error.

    Reads `errno` from an OSError, or the `(os error N)` that Rust-based writers (safetensors) put in their message.
    `writing=False` (an error whose operation is unknown) words a permission error as access rather than write.
    """
    code = getattr(exc, "errno", None)
    if code is None:
        match = re.search(r"os error (\d+)", str(exc))
        code = int(match.group(1)) if match else None
    if code not in _WRITE_PROBLEMS:
        return None
    where = getattr(exc, "filename", None) or path
    verb = "write" if writing or code not in (errno.EACCES, errno.EPERM) else "access"
    return SvdiclError(f"cannot {verb} {where or 'the output'}: {_WRITE_PROBLEMS[code]}")


def read_text(path: str | Path) -> str:
    """A user's file as UTF-8 text; a byte that is not UTF-8 is one line naming the file, line and column."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SvdiclError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}); save the file as UTF-8"
        ) from None
