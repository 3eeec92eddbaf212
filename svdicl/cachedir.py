"""The model cache folder: where it is, one locked entry at a time, and digests remembered in it.

On by default in the XDG user cache (`default_cache_dir`); SVDICL_CACHE or --cache-dir move it and
`off` turns it off.  It keeps assembled GGUF files, float copies of GGUF models, file digests,
fingerprints and condition numbers.  An entry is written under a lock into a temporary name renamed
when complete, so concurrent first loads write it once and a killed writer leaves nothing a later
load would read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from svdicl.errors import SvdiclError, write_error
from svdicl.files import write_atomic

CACHE_OFF = ("off", "none", "0", "false")  # --cache-dir / SVDICL_CACHE values that turn the cache off


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/svdicl, else ~/.cache/svdicl: the user cache of the XDG base directory rules."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "svdicl"


def default_cache_dir() -> Path | None:
    """Where assembled GGUF files, float copies, fingerprints and condition numbers are kept: SVDICL_CACHE if set
    (`off` turns the cache off), else the user cache (`user_cache_dir`)."""
    return cache_dir_from(os.environ.get("SVDICL_CACHE") or None)


def cache_dir_from(value: str | Path | None) -> Path | None:
    """The cache folder a --cache-dir value names: the default when None, no cache for `off`."""
    if value is None:
        value = os.environ.get("SVDICL_CACHE") or user_cache_dir()
    if str(value).strip().lower() in CACHE_OFF:
        return None
    return Path(value).expanduser()


@contextlib.contextmanager
def cache_entry(target: Path) -> Iterator[Path]:
    """Hold the lock of one cache entry and yield its temporary path, removed again whatever happens.

    A second process waits here until the first has renamed the temporary path to `target`, then
    finds it complete.  A temporary path that exists when the lock is taken was left by a killed
    writer (the lock dies with its process), so it is removed first.
    """
    from filelock import FileLock

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(target.with_name(target.name + ".lock"))
        lock.acquire()
    except OSError as exc:
        raise write_error(exc, target.parent) or SvdiclError(
            f"cannot make the model cache folder {target.parent} ({exc.strerror}); point --cache-dir or SVDICL_CACHE at a folder"
        ) from None
    partial = target.with_name(target.name + ".partial")
    try:
        remove_entry(partial)
        yield partial
    finally:
        remove_entry(partial)
        lock.release()


def remove_entry(path: Path) -> None:
    """Remove a cache entry, a file or a folder, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path, cache: Path | None) -> str:
    """SHA-256 of a file, remembered in the cache under its path, size, inode and modification time, so
    a file read once is not read again (a changed file has another size or time, and is read anew)."""
    if cache is None:
        return sha256_file(path)
    stat = path.resolve().stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_ino}|{stat.st_mtime_ns}"
    return remembered(cache / "digests", key, lambda: sha256_file(path))


def remembered(folder: Path, key: str, compute: Callable[[], str]) -> str:
    """The value remembered under `key` in `folder`, else `compute()`, remembered."""
    entry = folder / hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    known = _read_entry(entry)
    if known is None:
        known = compute()
        _write_entry(entry, known)
    return known


def _read_entry(path: Path) -> str | None:
    """A small cache entry's text (a hex digest), or None if absent or not one."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text and all(c in "0123456789abcdef" for c in text) else None


def _write_entry(path: Path, text: str) -> None:
    """Write a small cache entry atomically (a temporary file renamed); a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text + "\n", unique=True)
    except OSError:
        pass
