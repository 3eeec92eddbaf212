"""Files written whole or not at all: the one atomic write every layer uses.

A reader, a crash or a full disk never leaves half a file under the real name: the content goes
to a temporary file in the same folder (so the rename stays on one file system), is fsynced,
then `os.replace`-d over the target and the folder is fsynced (so the rename survives a power
cut).  On any error the temporary file is removed and the target is as it was.

    with replaced(path) as partial:                      # any writer that takes a path
        save_file(tensors, str(partial))
    write_atomic(path, json.dumps(value, indent=2) + "\\n")   # text, the common case
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replaced(path: str | Path, *, unique: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends, fsync what was written there and rename it to `path`.

    The temporary name is `<name>.partial`, so the next write replaces one a killed writer left (the caller
    holds the only writer, e.g. under a lock); `unique` gives every call its own name, for files that several
    processes or threads may write at once (caches).
    """
    path = Path(path)
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.partial" if unique else f"{path.name}.partial")
    try:
        yield partial
        fd = os.open(partial, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, path)
    except BaseException:  # a full disk, a bad value, an interrupt: no temporary file is left behind
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | Path, text: str, *, unique: bool = False) -> Path:
    """Write UTF-8 `text` to `path` atomically (`replaced`); returns `path`."""
    with replaced(path, unique=unique) as partial:
        partial.write_text(text, encoding="utf-8")
    return Path(path)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
