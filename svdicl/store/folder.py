"""The cells of one output folder on disk: appended atomically, read back after any crash.

DIR/cells.jsonl                            one JSON line per finished cell (append-only)
DIR/samples/<task>/<split>-...-<id>.jsonl  that cell's per-example predictions (`.jsonl.gz` once `pack`ed)
DIR/samples/.../<...>.jsonl.unfinished     rows of a cell in flight, kept by its computer to resume from
DIR/claims/<id>.lock                       held while a process computes that cell (svdicl.store.claims)
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from svdicl.errors import SvdiclError, write_error
from svdicl.files import replaced
from svdicl.store.cells import Cell, CellKey, Result, normal_metrics, plain, shots_label
from svdicl.store.claims import Claims

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per folder there
    fcntl = None

CELLS_FILE = "cells.jsonl"
SAMPLES_DIR = "samples"
UNFINISHED = ".unfinished"  # suffix of a cell's samples path while its rows are appended
PACKED = ".gz"  # suffix of a finished cell's samples file after `Store.pack`


class Store:
    """The cells of one output folder, loaded once and appended to; safe to reopen after any crash.

    Several processes may write the same folder: every append happens under an exclusive
    lock after reading what the others appended, and a key already there is not written
    twice (the first result wins).  A process computes a cell only while it holds the cell's
    claim (`claim`: an flock on claims/<id>.lock, which the kernel drops when the process dies,
    so a killed run's claims are never stale); others skip the cell and `wait` for it.  A cell
    whose samples file was deleted counts as missing and is recomputed (its new line wins).
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.root = Path(path)
        self.readonly = readonly  # only read (a finished store in a read-only folder): no lock file, no repair, no put
        if self.root.exists() and not self.root.is_dir():
            raise SvdiclError(f"result store {self.root} is a file; give a folder (it will hold {CELLS_FILE})")
        if readonly and not (self.root / CELLS_FILE).is_file():
            raise SvdiclError(f"{self.root} holds no {CELLS_FILE}; give the --output folder of a sweep or search")
        if not readonly:
            self.root.mkdir(parents=True, exist_ok=True)
        self.file = self.root / CELLS_FILE
        self._cells: dict[str, Cell] = {}
        self._claims = Claims(self.root)
        self._offset = 0  # bytes of cells.jsonl already read
        self._line = 0  # lines of cells.jsonl already read
        with self._locked() as fd:
            self._refresh(fd)

    def __len__(self) -> int:
        return len(self._cells)

    def has(self, key: CellKey) -> bool:
        """Whether the cell is finished: stored, with its samples file in place."""
        cell = self._cells.get(key.id)
        return cell is not None and self._intact(cell)

    def get(self, key: CellKey) -> Cell | None:
        """The stored cell of `key`, or None."""
        return self._cells.get(key.id)

    def _intact(self, cell: Cell) -> bool:
        return cell.samples is None or self._samples_file(cell).is_file()

    def _samples_file(self, cell: Cell) -> Path:
        """The cell's samples file: as written, or its packed copy once `pack` replaced it."""
        path = self.root / cell.samples
        packed = path.with_name(path.name + PACKED)
        return packed if not path.is_file() and packed.is_file() else path

    def pack(self) -> int:
        """Gzip the samples file of every finished cell (about 5x smaller), for stores kept under version control;
        reads are the same afterwards.  Safe beside a running writer: only finished cells' files are touched, each
        packed copy is complete before its original goes.  Returns the number of files packed."""
        if self.readonly:
            raise SvdiclError(f"store {self.root} was opened read-only; open it without readonly to pack it")
        self.refresh()
        packed = 0
        for cell in list(self._cells.values()):
            path = None if cell.samples is None else self.root / cell.samples
            if path is None or not path.is_file():
                continue
            with replaced(path.with_name(path.name + PACKED), unique=True) as partial:
                partial.write_bytes(gzip.compress(path.read_bytes(), compresslevel=9, mtime=0))
            path.unlink()
            packed += 1
        return packed

    def refresh(self) -> None:
        """Read the cells other processes appended since this store was opened or last refreshed."""
        with self._locked() as fd:
            self._refresh(fd)

    def claim(self, key: CellKey) -> bool:
        """Take the cell for computing: True when it is missing and no other process is computing it.

        False when it is finished (perhaps just now, by another process) or another live process
        holds its claim; then `wait(key)` blocks until that process is done (or dead).  The claim
        is released by `put` of the cell, by `release`, or by the process ending, however it ends.
        """
        if self._claims.holds(key.id):
            return True
        if not self._claims.take(key.id):
            return False
        self.refresh()  # the last holder may have stored it before letting go
        if self.has(key):
            self._claims.release([key.id])
            return False
        return True

    def wait(self, key: CellKey) -> None:
        """Block while another process holds the cell's claim, then read what it stored."""
        self._claims.wait(key.id)
        self.refresh()

    def release(self, keys: Iterable[CellKey] | None = None) -> None:
        """Give up claims without storing their cells (all of this store's claims when `keys` is None)."""
        self._claims.release(None if keys is None else [k.id for k in keys])

    def other_data(self, keys: Iterable[CellKey]) -> list[Cell]:
        """Stored cells equal to one of `keys` but for the data digest: scored on other rows or under another
        definition of a task of the same name.  They are never returned for `keys`; this says they are there."""
        wanted = {replace(key, data="").id: key.data for key in keys}
        return [c for c in self._cells.values() if wanted.get(replace(c.key, data="").id, c.key.data) != c.key.data]

    def cells(self, **filters: Any) -> list[Cell]:
        """Cells in file order whose fields equal the filters (a list/tuple/set value means any of them).

        Filters are CellKey fields (model, task, split, shots, extra_shots, seed, edit, limit) or the
        derived layers, modules, rate and model_name: `store.cells(task="sst2", modules="mlp")`.
        """
        allowed = {f.name for f in fields(CellKey)} | {"layers", "modules", "rate", "model_name"}
        unknown = set(filters) - allowed
        if unknown:
            raise TypeError(f"unknown cell filter {sorted(unknown)[0]!r}; use {', '.join(sorted(allowed))}")

        def matches(cell: Cell) -> bool:
            for name, wanted in filters.items():
                value = getattr(cell.key, name) if hasattr(cell.key, name) else getattr(cell, name)
                if isinstance(wanted, list | tuple | set | frozenset):
                    if value not in wanted:
                        return False
                elif value != wanted:
                    return False
            return True

        return [cell for cell in self._cells.values() if matches(cell)]

    def samples(self, cell: Cell) -> list[dict[str, Any]]:
        """The per-example records of a cell."""
        if cell.samples is None:
            return []
        path = self._samples_file(cell)
        if not path.is_file():
            raise SvdiclError(f"samples file {path} of cell {cell.id} is missing; restore it or rerun in a new output folder")
        data = path.read_bytes()
        if path.name.endswith(PACKED):
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError):
                raise SvdiclError(
                    f"samples file {path} is damaged (not a whole gzip file); delete cell {cell.id}'s line in {self.file} "
                    "to recompute it, or rerun in a new output folder"
                ) from None
        records = []
        for number, line in enumerate(data.splitlines(), start=1):
            try:
                if line.strip():
                    records.append(json.loads(line))  # bad UTF-8 raises UnicodeDecodeError, a ValueError
            except ValueError:
                raise SvdiclError(
                    f"samples file {path} line {number} is damaged; delete cell {cell.id}'s line in {self.file} "
                    "to recompute it, or rerun in a new output folder"
                ) from None
        return records

    def put(self, key: CellKey, result: Result, seconds: float = 0.0) -> Cell:
        """Persist a finished cell (samples first, then its line); returns the stored cell.

        If another process stored the same key meanwhile, its cell is kept and returned.  A stored
        cell whose samples file is gone is replaced (its line is marked `recomputed`, so it wins).
        """
        if self.readonly:
            raise SvdiclError(f"store {self.root} was opened read-only; open it without readonly to add cells")
        with self._locked() as fd:
            self._refresh(fd)
            existing = self._cells.get(key.id)
            if existing is not None and self._intact(existing):
                self._claims.finish(key.id)
                return existing
            relative = None if result.samples is None else self._write_samples(key, result.samples)
            cell = Cell(
                key=key,
                metrics=normal_metrics(result.metrics),
                n=int(result.n),
                ties=int(result.ties),
                samples=relative,
                seconds=round(float(seconds), 3),
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                model_name=result.model_name,
                info=plain(result.info),
            )
            record = {**cell.to_record(), "recomputed": True} if existing is not None else cell.to_record()
            line = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode()
            try:
                _write_all(fd, line)
                os.fsync(fd)
            except OSError as exc:  # a full disk mid-line: cut what was written, drop the samples no line points at
                os.ftruncate(fd, self._offset)
                if relative is not None:
                    (self.root / relative).unlink(missing_ok=True)
                raise write_error(exc, self.file) or exc from None
            self._offset += len(line)
            self._line += 1
            self._cells[key.id] = cell
            self.unfinished(key).unlink(missing_ok=True)
            self._claims.finish(key.id)
            return cell

    def samples_path(self, key: CellKey) -> Path:
        """Where a cell's samples go: readable, and unique through the key's id."""
        edit = re.sub(r"[^A-Za-z0-9.,_-]+", "_", key.edit)[:60]
        name = f"{key.split}-{shots_label(key.shots, key.extra_shots)}shot-seed{key.seed}-{edit}-{key.id}.jsonl"
        return self.root / SAMPLES_DIR / re.sub(r"[^A-Za-z0-9._-]+", "_", key.task) / name

    def unfinished(self, key: CellKey) -> Path:
        """Where the process holding a cell's claim keeps the rows it scored so far (`keep_unfinished`), so that an
        interrupted computation resumes from them (`unfinished_rows`); `put` of the cell removes it."""
        path = self.samples_path(key)
        return path.with_name(path.name + UNFINISHED)

    def keep_unfinished(self, key: CellKey, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append rows of a cell this process has claimed, fsynced: work an interruption does not lose."""
        path = self.unfinished(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(plain(row), ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise write_error(exc, path) or exc from None

    def unfinished_rows(self, key: CellKey) -> list[dict[str, Any]]:
        """The rows kept for a claimed cell by an interrupted computation; a torn last line (a kill mid-write) is cut
        off, a damaged earlier one refused."""
        path = self.unfinished(key)
        lines = path.read_bytes().splitlines() if path.is_file() else []
        rows = []
        for number, line in enumerate(lines, start=1):
            try:
                rows.append(json.loads(line))
            except ValueError:
                if number < len(lines):
                    raise SvdiclError(
                        f"{path}, line {number} is damaged; delete the file to score its cell from the start"
                    ) from None
                with open(path, "r+b") as handle:
                    handle.truncate(sum(len(kept) + 1 for kept in lines[:-1]))
        return rows

    def _write_samples(self, key: CellKey, samples: Sequence[Mapping[str, Any]]) -> str:
        path = self.samples_path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with replaced(path) as partial, open(partial, "w", encoding="utf-8") as handle:
                for record in samples:  # a full disk, a bad record, an interrupt: no half-written samples file is left
                    handle.write(json.dumps(plain(record), ensure_ascii=False, allow_nan=False) + "\n")
        except OSError as exc:
            raise write_error(exc, path) or exc from None
        return path.relative_to(self.root).as_posix()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        flags = os.O_RDONLY if self.readonly else os.O_RDWR | os.O_CREAT | os.O_APPEND
        fd = os.open(self.file, flags, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_SH if self.readonly else fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # also releases the lock

    def _refresh(self, fd: int) -> None:
        """Read lines appended since the last read; cut a torn last line, refuse a bad earlier one."""
        size = os.fstat(fd).st_size
        if size < self._offset:
            raise SvdiclError(f"{self.file} shrank while open (another tool rewrote it); reopen the store")
        data = _read(fd, self._offset, size)
        lines = data.split(b"\n")
        complete, torn = lines[:-1], bool(lines[-1])
        if torn:  # no newline at the end: a write cut short
            complete.append(lines[-1])
        position = self._offset
        for index, raw in enumerate(complete):
            last = index == len(complete) - 1
            line_number = self._line + index + 1
            if last and torn:
                self._cut(fd, position, size, line_number)
                return
            if raw.strip():
                try:
                    record = json.loads(raw)
                except ValueError as exc:  # not JSON: torn if it is the last line (a crash mid-write), else damage
                    if last:
                        self._cut(fd, position, size, line_number)
                        return
                    raise self._damaged(line_number, f"not JSON: {exc}") from None
                try:
                    cell = Cell.from_record(record)
                except (ValueError, TypeError, KeyError, SvdiclError) as exc:
                    raise self._damaged(line_number, str(exc)) from None
                if record.get("recomputed") or cell.id not in self._cells:  # duplicates: the first wins, unless recomputed
                    self._cells[cell.id] = cell
            position += len(raw) + 1
        self._offset = size
        self._line += len(complete)

    def _damaged(self, line_number: int, reason: str) -> SvdiclError:
        return SvdiclError(
            f"{self.file} line {line_number} is not a valid cell record ({reason}); the store is damaged: "
            "delete that line to recompute its cell, or use a new output folder"
        )

    def _cut(self, fd: int, position: int, size: int, line_number: int) -> None:
        """Remove a torn last line (an interrupted write) so the next append starts clean; read-only: skip it."""
        if self.readonly:
            warnings.warn(f"{self.file}: line {line_number} was cut short by an interrupted write; skipped it", stacklevel=4)
            self._offset, self._line = position, line_number - 1
            return
        warnings.warn(
            f"{self.file}: line {line_number} was cut short by an interrupted write; removed it "
            f"({size - position} bytes), its cell will be recomputed",
            stacklevel=4,
        )
        os.ftruncate(fd, position)
        os.fsync(fd)
        self._offset = position
        self._line = line_number - 1


def _read(fd: int, start: int, stop: int) -> bytes:
    os.lseek(fd, start, os.SEEK_SET)
    chunks = []
    while start < stop:
        chunk = os.read(fd, stop - start)
        if not chunk:
            break
        chunks.append(chunk)
        start += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
