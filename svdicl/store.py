"""Evaluated cells on disk: resumable, crash-safe, and keyed by the exact weights and edit.

One store per output folder:

    DIR/cells.jsonl                          one JSON line per finished cell (append-only)
    DIR/samples/<task>/<split>-...-<id>.jsonl  that cell's per-example predictions

A cell is one evaluation: (model fingerprint, task, split, shots, seed, edit, limit, scoring
options, data digest).  Writing a cell first puts its samples file in place (temp name, fsync, atomic
rename), then appends its line with a single write and fsyncs it, all under an exclusive lock
on cells.jsonl.  So a kill -9 at any moment loses at most the cell in flight: a torn last line
is cut off (with a warning) the next time the store is opened, and a line never points at a
samples file that is not there.  A bad line anywhere else is refused, never silently dropped.
The edit is part of the key, so a pruned model never reads the unpruned model's answers; the
data digest is, so a cell scored on other rows or under another task definition (same task
name) is never reused: such cells stay in the store, apart (`Store.other_data`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from svdicl.errors import SvdiclError, write_error
from svdicl.specs import PruneSpec

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per folder there
    fcntl = None

FORMAT = 1
CELLS_FILE = "cells.jsonl"
SAMPLES_DIR = "samples"
CLAIMS_DIR = "claims"  # <id>.lock: flock-ed while a process computes that cell
UNPRUNED = "none"

_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class CellKey:
    """What identifies an evaluated cell; `id` is a stable digest of it.

    `model` is the weights' fingerprint (`LoadedModel.fingerprint`), `edit` the canonical edit
    string (`EditRecord.key`: `26:mlp:0.95`, `none` for the unpruned model; write layers as
    non-negative indices so equal edits get equal keys), `limit` the number of evaluated
    examples (None = the whole split), `options` the scoring options (e.g. length
    normalisation) as a mapping of JSON scalars, `data` the digest of the task definition and
    the examples scored (`svdicl.tasks.data.content_digest`; empty in stores older than it).
    """

    model: str
    task: str
    split: str
    shots: int
    seed: int
    edit: str = UNPRUNED
    limit: int | None = None
    options: tuple[tuple[str, Any], ...] | Mapping[str, Any] = ()
    data: str = ""

    def __post_init__(self) -> None:
        options = dict(self.options)
        bad = [name for name, value in options.items() if not isinstance(value, _SCALARS)]
        if bad:
            raise SvdiclError(f"scoring option {bad[0]!r} must be a string, number, bool or null to be part of a cell key")
        object.__setattr__(self, "options", tuple(sorted(options.items())))
        for name in ("shots", "seed"):
            object.__setattr__(self, name, _integer(name, getattr(self, name)))
        if self.limit is not None:
            object.__setattr__(self, "limit", _integer("limit", self.limit))
        for name in ("model", "task", "split", "edit"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise SvdiclError(f"cell key field {name!r} must be a non-empty string, got {getattr(self, name)!r}")
        if not isinstance(self.data, str):
            raise SvdiclError(f"cell key field 'data' must be a digest string, got {self.data!r}")
        object.__setattr__(self, "edit", canonical_edit(self.edit))

    @property
    def id(self) -> str:
        """16 hex digits of SHA-256 over the canonical JSON of the key (an empty `data` left out, so cells
        of stores older than the data digest keep their ids)."""
        key = {name: value for name, value in self.to_dict().items() if name != "data" or value}
        text = json.dumps(key, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """The key's fields as a JSON object."""
        return {f.name: dict(self.options) if f.name == "options" else getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CellKey:
        """A key from its JSON object (unknown fields ignored)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SvdiclError(f"cell key field {name!r} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise SvdiclError(f"cell key field {name!r} must be an integer, got {value!r}") from None


def canonical_edit(edit: str) -> str:
    """The edit as `EditRecord.key` writes it: `26:mlp:0.950` -> `26:mlp:0.95`, rate-0 specs dropped, `none` if empty."""
    if edit == UNPRUNED:
        return edit
    specs = [PruneSpec.parse(text) for text in edit.split(";")]
    return ";".join(str(spec) for spec in specs if spec.rate > 0) or UNPRUNED


def _parse_edit(edit: str) -> tuple[str | None, str | None, float | None]:
    """(layers, modules, rate) of a one-spec edit; (None, None, 0.0) unpruned; all None for several specs."""
    if edit == UNPRUNED:
        return None, None, 0.0
    specs = [PruneSpec.parse(text) for text in edit.split(";")]
    if len(specs) > 1:
        return None, None, None
    return specs[0].layers, specs[0].modules, specs[0].rate


@dataclass(frozen=True)
class Result:
    """What a compute function returns for one cell; the store adds key, timing and paths.

    `metrics` maps a metric name to {"value", "ci_low", "ci_high"} (a bare number is read as
    the value); `samples` are the per-example records (JSON-serialisable dicts), or None.
    """

    metrics: Mapping[str, Any]
    n: int
    samples: Sequence[Mapping[str, Any]] | None = None
    ties: int = 0
    model_name: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    """A finished cell as stored: its key, metrics and where its samples are."""

    key: CellKey
    metrics: dict[str, dict[str, float | None]]
    n: int
    ties: int = 0
    samples: str | None = None  # relative to the store folder
    seconds: float = 0.0
    created: str = ""
    model_name: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The cell key's id."""
        return self.key.id

    @property
    def layers(self) -> str | None:
        """The edited layers as written in the key (None for the unedited model)."""
        return _parse_edit(self.key.edit)[0]

    @property
    def modules(self) -> str | None:
        """The edited modules as written in the key (None for the unedited model)."""
        return _parse_edit(self.key.edit)[1]

    @property
    def rate(self) -> float | None:
        """The clipping rate of the edit (None for the unedited model)."""
        return _parse_edit(self.key.edit)[2]

    def value(self, metric: str) -> float | None:
        """The point value of `metric`; raises naming the metrics there are if it is missing."""
        if metric not in self.metrics:
            raise SvdiclError(f"cell {self.id} has no metric {metric!r}; it has {', '.join(self.metrics) or 'none'}")
        return self.metrics[metric].get("value")

    def to_record(self) -> dict[str, Any]:
        """The JSON line: key fields flat, plus layers/modules/rate for plotting."""
        return {
            "format": FORMAT,
            "id": self.id,
            **self.key.to_dict(),
            "model_name": self.model_name,
            "layers": self.layers,
            "modules": self.modules,
            "rate": self.rate,
            "metrics": self.metrics,
            "n": self.n,
            "ties": self.ties,
            "samples": self.samples,
            "seconds": self.seconds,
            "created": self.created,
            "info": self.info,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Cell:
        """A cell from one cells.jsonl record; ValueError naming what is wrong with it."""
        if not isinstance(record, Mapping):
            raise ValueError("not a JSON object")
        if record.get("format", 0) > FORMAT:
            raise ValueError(f"format {record['format']} is newer than this svdicl reads ({FORMAT}); upgrade svdicl")
        missing = [name for name in ("model", "task", "split", "shots", "seed", "edit", "metrics", "n") if name not in record]
        if missing:
            raise ValueError(f"missing field {missing[0]!r}")
        return cls(
            key=CellKey.from_dict(record),
            metrics=_metrics(record["metrics"]),
            n=int(record["n"]),
            ties=int(record.get("ties", 0)),
            samples=record.get("samples"),
            seconds=float(record.get("seconds", 0.0)),
            created=str(record.get("created", "")),
            model_name=str(record.get("model_name", "")),
            info=dict(record.get("info") or {}),
        )


def _metrics(metrics: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """{"name": {"value", "ci_low", "ci_high", ...}}, bare numbers as values, NaN/inf as None."""
    if not isinstance(metrics, Mapping):
        raise SvdiclError(f"metrics must be a mapping of metric name to value, got {type(metrics).__name__}")
    out = {}
    for name, entry in metrics.items():
        entry = {"value": entry} if not isinstance(entry, Mapping) else entry
        if "value" not in entry:
            raise SvdiclError(f"metric {name!r} has no 'value'; give {{'value': ..., 'ci_low': ..., 'ci_high': ...}}")
        out[str(name)] = _plain(entry)
    return out


def _plain(value: Any) -> Any:
    """Plain JSON values: numpy/torch numbers as Python ones, NaN and infinity as null (JSON has neither)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, _SCALARS):
        return value
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    raise SvdiclError(f"cannot store a {type(value).__name__} as JSON; use numbers, strings, lists or dicts")


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
        self._claims: dict[str, int] = {}  # cell id -> descriptor of its flock-ed claim file
        self._offset = 0  # bytes of cells.jsonl already read
        self._line = 0  # lines of cells.jsonl already read
        with self._locked() as fd:
            self._refresh(fd)

    def __len__(self) -> int:
        return len(self._cells)

    def __contains__(self, key: CellKey) -> bool:
        return self.has(key)

    def has(self, key: CellKey) -> bool:
        """Whether the cell is finished: stored, with its samples file in place."""
        cell = self._cells.get(key.id)
        return cell is not None and self._intact(cell)

    def get(self, key: CellKey) -> Cell | None:
        """The stored cell of `key`, or None."""
        return self._cells.get(key.id)

    def missing(self, keys: Iterable[CellKey]) -> list[CellKey]:
        """The keys not finished yet, in order, without duplicates."""
        return [k for k in dict.fromkeys(keys) if not self.has(k)]

    def _intact(self, cell: Cell) -> bool:
        return cell.samples is None or (self.root / cell.samples).is_file()

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
        if key.id in self._claims:
            return True
        if fcntl is None:
            return not self.has(key)
        path = self.root / CLAIMS_DIR / f"{key.id}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.refresh()  # the last holder may have stored it before letting go
        if self.has(key):
            os.close(fd)
            return False
        self._claims[key.id] = fd
        return True

    def wait(self, key: CellKey) -> None:
        """Block while another process holds the cell's claim, then read what it stored."""
        path = self.root / CLAIMS_DIR / f"{key.id}.lock"
        if fcntl is not None and key.id not in self._claims and path.exists():
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(path, os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                finally:
                    os.close(fd)
        self.refresh()

    def release(self, keys: Iterable[CellKey] | None = None) -> None:
        """Give up claims without storing their cells (all of this store's claims when `keys` is None)."""
        ids = list(self._claims) if keys is None else [k.id for k in keys if k.id in self._claims]
        for cell_id in ids:
            os.close(self._claims.pop(cell_id))

    def other_data(self, keys: Iterable[CellKey]) -> list[Cell]:
        """Stored cells equal to one of `keys` but for the data digest: scored on other rows or under another
        definition of a task of the same name.  They are never returned for `keys`; this says they are there."""
        wanted = {replace(key, data="").id: key.data for key in keys}
        return [c for c in self._cells.values() if wanted.get(replace(c.key, data="").id, c.key.data) != c.key.data]

    def cells(self, **filters: Any) -> list[Cell]:
        """Cells in file order whose fields equal the filters (a list/tuple/set value means any of them).

        Filters are CellKey fields (model, task, split, shots, seed, edit, limit) or the
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
        path = self.root / cell.samples
        if not path.is_file():
            raise SvdiclError(f"samples file {path} of cell {cell.id} is missing; restore it or rerun in a new output folder")
        records = []
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
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
                self._finish_claim(key)
                return existing
            relative = None if result.samples is None else self._write_samples(key, result.samples)
            cell = Cell(
                key=key,
                metrics=_metrics(result.metrics),
                n=int(result.n),
                ties=int(result.ties),
                samples=relative,
                seconds=round(float(seconds), 3),
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                model_name=result.model_name,
                info=_plain(result.info),
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
            self._finish_claim(key)
            return cell

    def _finish_claim(self, key: CellKey) -> None:
        """The cell is stored: drop its claim file (a later claimer sees the cell first) and release it."""
        if key.id in self._claims:
            (self.root / CLAIMS_DIR / f"{key.id}.lock").unlink(missing_ok=True)
            os.close(self._claims.pop(key.id))

    def samples_path(self, key: CellKey) -> Path:
        """Where a cell's samples go: readable, and unique through the key's id."""
        edit = re.sub(r"[^A-Za-z0-9.,_-]+", "_", key.edit)[:60]
        name = f"{key.split}-{key.shots}shot-seed{key.seed}-{edit}-{key.id}.jsonl"
        return self.root / SAMPLES_DIR / re.sub(r"[^A-Za-z0-9._-]+", "_", key.task) / name

    def _write_samples(self, key: CellKey, samples: Sequence[Mapping[str, Any]]) -> str:
        path = self.samples_path(key)
        partial = path.with_name(path.name + ".partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "w", encoding="utf-8") as handle:
                for record in samples:
                    handle.write(json.dumps(_plain(record), ensure_ascii=False, allow_nan=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        except BaseException as exc:  # a full disk, a bad record, an interrupt: no half-written samples file is left
            partial.unlink(missing_ok=True)
            problem = write_error(exc, path) if isinstance(exc, OSError) else None
            if problem is not None:
                raise problem from None
            raise
        _fsync_dir(path.parent)
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


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_cells(
    store: Store,
    keys: Iterable[CellKey],
    compute: Callable[[CellKey], Result],
    *,
    desc: str = "cells",
    progress: bool = True,
) -> list[Cell]:
    """Compute and store every key not finished yet, in order; return all cells in key order.

    Finished cells are never recomputed, so rerunning after an interruption resumes where it
    stopped.  `compute` is called once per missing key, and only for keys this process claims:
    a key another process is computing is waited for and read back (or computed here, if that
    process dies first).
    """
    from tqdm.auto import tqdm

    keys = list(dict.fromkeys(keys))
    todo = store.missing(keys)
    with tqdm(total=len(keys), initial=len(keys) - len(todo), desc=desc, unit="cell", disable=not progress) as bar:
        try:
            while todo:
                deferred = []
                for key in todo:
                    if not store.claim(key):  # finished meanwhile, or another process computes it now
                        if store.has(key):
                            bar.update(1)
                        else:
                            deferred.append(key)
                        continue
                    bar.set_postfix_str(f"{key.task} {key.split} {key.shots}-shot seed {key.seed} {key.edit}")
                    start = time.perf_counter()
                    result = compute(key)
                    store.put(key, result, seconds=time.perf_counter() - start)
                    bar.update(1)
                for key in deferred:
                    store.wait(key)
                bar.update(len(deferred) - len(store.missing(deferred)))
                todo = store.missing(deferred)
        finally:
            store.release()
    return [store.get(key) for key in keys]
