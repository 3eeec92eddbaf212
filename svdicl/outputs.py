"""Output folders svdicl owns: `--overwrite` removes only what svdicl wrote, and only once every input is valid.

A command that writes a folder of files (a pruned model, a linreg run) first checks the folder
(`check_output`: deletes nothing, so a bad flag found later costs nothing), then, when every
input has been validated and it is about to write, takes it (`prepare_output`), and at the end
records what it wrote (`finish_output`).  Ownership is the manifest `.svdicl-manifest.json`:

    {"svdicl": "output manifest", "complete": true, "files": [...], "kept": [...]}

`files` lists what svdicl wrote (complete), `kept` what was in the folder before and is not
svdicl's.  `--overwrite` removes the listed files (for an interrupted write, everything but
`kept`) and nothing else; a folder without a manifest, the current folder and its parents are
never cleared: that is refused with one line.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from svdicl.errors import SvdiclError
from svdicl.files import write_atomic

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one run per folder there
    fcntl = None

MANIFEST = ".svdicl-manifest.json"
LOCK = ".svdicl-lock"  # flock-ed by the one run writing the folder (eval, theory linreg)


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """The folder, if svdicl may write it (new, empty, or `overwrite` of one svdicl wrote); deletes nothing."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SvdiclError(f"output {folder} is a file; choose a folder path")
    if is_empty(folder):
        return folder
    if not overwrite:
        raise SvdiclError(f"output folder {folder} is not empty; choose a new folder or pass --overwrite")
    check_clearable(folder)
    return folder


def is_empty(folder: str | Path) -> bool:
    """No files in the folder (or no folder) but svdicl's own bookkeeping: its manifest and lock."""
    folder = Path(folder)
    return not folder.is_dir() or not _files(folder)


@contextlib.contextmanager
def exclusive(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold `folder` for one run: a second run on it at the same time is refused with one line.  The lock is
    an flock on DIR/.svdicl-lock, which the kernel drops when the process ends however it ends: never stale."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SvdiclError(f"output {folder} is a file; choose a folder path")
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SvdiclError(
                    f"another svdicl {command} is writing {folder} right now; wait for it to finish or choose another --output"
                ) from None
        yield folder
    finally:
        os.close(fd)


def check_clearable(folder: Path) -> None:
    """Refuse, with one line, to clear the current folder (or one holding it) or a folder svdicl did not write."""
    here = Path.cwd().resolve()
    if folder.resolve() == here or folder.resolve() in here.parents:
        raise SvdiclError(f"--overwrite will not clear {folder}: it is the current folder or holds it; give a subfolder")
    if not (folder / MANIFEST).is_file():
        raise SvdiclError(
            f"--overwrite clears only folders svdicl wrote, and {folder} has no {MANIFEST}; choose a new folder, "
            "or empty this one yourself"
        )


def prepare_output(path: str | Path, overwrite: bool = False) -> Path:
    """Take the folder for writing, once every input is valid: remove what svdicl wrote there before (with
    `overwrite`), create it, and start its manifest (what is there now is kept and never svdicl's)."""
    folder = check_output(path, overwrite)
    if (folder / MANIFEST).is_file():
        clear_output(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_manifest(folder, {"complete": False, "files": [], "kept": _files(folder)})
    return folder


def reopen_output(path: str | Path) -> Path:
    """A folder svdicl resumes writing (a linreg run): create it or mark its manifest unfinished again; what is
    there and not svdicl's (per the manifest) stays kept."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SvdiclError(f"output {folder} is a file; choose a folder path")
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(folder)
    if manifest is None:
        kept = _files(folder)
    elif manifest["complete"]:
        kept = sorted(set(_files(folder)) - set(manifest["files"]))
    else:
        return folder
    _write_manifest(folder, {"complete": False, "files": [], "kept": kept})
    return folder


def finish_output(folder: str | Path) -> None:
    """Record every file in the folder that was not kept as svdicl's: the list `--overwrite` may remove."""
    folder = Path(folder)
    manifest = read_manifest(folder) or {"kept": []}
    kept = set(manifest["kept"])
    _write_manifest(folder, {"complete": True, "files": [f for f in _files(folder) if f not in kept], "kept": sorted(kept)})


def clear_output(folder: str | Path) -> None:
    """Remove what svdicl wrote in `folder` (its manifest says what), then the manifest and emptied subfolders."""
    folder = Path(folder)
    check_clearable(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise SvdiclError(f"{folder / MANIFEST} is damaged; empty {folder} yourself or choose a new folder")
    ours = manifest["files"] if manifest["complete"] else [f for f in _files(folder) if f not in set(manifest["kept"])]
    for name in ours:
        path = folder / name
        if path.is_file() or path.is_symlink():
            path.unlink()
    for directory in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        if not any(directory.iterdir()):
            directory.rmdir()
    (folder / MANIFEST).unlink()


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None when there is none or it is not one (then nothing in the folder is svdicl's)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("complete"), bool):
        return None
    names = [*manifest.get("files", ()), *manifest.get("kept", ())]
    if not all(isinstance(n, str) and _inside(n) for n in names):
        return None  # a hand-edited manifest never makes svdicl delete outside the folder
    return {"complete": manifest["complete"], "files": list(manifest.get("files", [])), "kept": list(manifest.get("kept", []))}


def _inside(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def _files(folder: Path) -> list[str]:
    """Every file below `folder` (symlinks not followed), relative, without the manifest and the lock."""
    found = []
    for root, directories, names in os.walk(folder):
        directories[:] = [d for d in directories if not os.path.islink(os.path.join(root, d))]
        found += [Path(root, n).relative_to(folder).as_posix() for n in names]
    return sorted(f for f in found if f not in (MANIFEST, LOCK))


def _write_manifest(folder: Path, manifest: dict) -> None:
    write_atomic(folder / MANIFEST, json.dumps({"svdicl": "output manifest", **manifest}, indent=1) + "\n")


def remove_if_empty(folder: str | Path) -> None:
    """After a failed run that created `folder`: remove it if it holds nothing but empty folders, empty files
    and svdicl's manifest, so a failure leaves no empty output behind."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return
    entries = list(folder.rglob("*"))
    if any(p.is_symlink() or (p.is_file() and p.name not in (MANIFEST, LOCK) and p.stat().st_size > 0) for p in entries):
        return
    for path in sorted(entries, reverse=True):  # children before their folders
        path.rmdir() if path.is_dir() else path.unlink()
    folder.rmdir()
