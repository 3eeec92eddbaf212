"""The report's files: CSV, Markdown and figures written byte-identically on a rerun, one line naming the file when
a folder is not writable, and the manifest of what a report wrote, so the next one replaces exactly those files."""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from svdicl.errors import SvdiclError
from svdicl.style import STYLE

REPORT_FILES = "report-files.json"  # what the last report wrote into its folder: the files the next one may replace
FORMATS = ("png", "svg")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """A report that cannot be written (a read-only folder, a full disk) is one line naming the file and the fix."""
    try:
        yield
    except OSError as exc:
        raise SvdiclError(f"cannot write report file {path} ({exc.strerror or exc}); give --output a writable folder") from None


def write_text(path: Path, text: str) -> Path:
    """Write `text` to `path`, creating its folder."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path


def write_csv(path: Path, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write `rows` under `headers` to a CSV file (None as empty), creating its folder."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(headers)
            writer.writerows(["" if x is None else x for x in row] for row in rows)
    return path


def save_figure(fig: Figure, stem: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write `stem.png` (200 dpi) and `stem.svg` (text as text, no timestamp: reruns give identical files)."""
    stem = Path(stem)
    with writing(stem.parent):
        stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    with matplotlib.rc_context(STYLE):
        for fmt in formats:
            if fmt not in ("png", "svg", "pdf"):
                raise SvdiclError(f"figure format {fmt!r} is not supported; use png, svg or pdf")
            path = stem.with_name(f"{stem.name}.{fmt}")
            metadata = {"Date": None} if fmt == "svg" else {"CreationDate": None} if fmt == "pdf" else {}
            with writing(path):
                fig.savefig(path, dpi=200, bbox_inches="tight", metadata=metadata)
            written.append(path)
    return written


def report_files(target: Path) -> list[str]:
    """The files an earlier report wrote into `target` (relative paths from its manifest; none if there is none)."""
    try:
        data = json.loads((target / REPORT_FILES).read_text(encoding="utf-8"))
        return [str(name) for name in data["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def replace_report_files(target: Path, written: Sequence[Path], previous: Sequence[str]) -> None:
    """Delete what the earlier report wrote and this one did not (stale figures and tables), then record this one's
    files.  Only paths the manifest lists, inside `target`, are ever deleted: never a file report did not write."""
    names = [path.relative_to(target).as_posix() for path in written]
    root = target.resolve()
    for name in set(previous) - set(names):
        path = (target / name).resolve()
        if path.is_relative_to(root) and path != root / REPORT_FILES and path.is_file():
            with writing(path):
                path.unlink()
    write_text(target / REPORT_FILES, json.dumps({"format": "svdicl.report-files/1", "files": names}, indent=1) + "\n")
