"""Task data: JSONL files on disk (or the Hugging Face Hub when online), cut into the task's splits.

Local layout: `<data dir>/<task>/<source>.jsonl`, one JSON object per line, with the data dir
from `--data-dir` or the `SVDICL_DATA` variable.  Every line is checked (valid JSON, required
columns, known label) so a bad line is reported by file and line number; blank lines are
skipped.  The rows are always the file's current content: no cache keyed by path and mtime
stands between the file and the scores (a file rewritten with its mtime kept is read anew),
and `content_digest` puts what was read into every result's key.

The split protocol is fixed by the task's `split_seed`, never by the demonstration seed, so
validation and test hold the same examples in every run and runs can be compared pairwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from svdicl import hub
from svdicl.errors import SvdiclError
from svdicl.tasks import SPLITS, TaskConfig


@dataclass(frozen=True)
class Example:
    """One row of a task: a stable id (`<source>:<row>`), the template fields, the class index."""

    id: str
    fields: dict[str, str]
    label: int
    choices: tuple[str, ...] = ()  # multiple choice: the text of each choice


@dataclass(frozen=True)
class TaskSplits:
    """The task's demonstration pool, validation and test examples, disjoint by construction."""

    task: TaskConfig
    demonstrations: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]
    origin: str  # the folder or Hub id the rows came from

    def split(self, name: str) -> tuple[Example, ...]:
        """The examples of split `name` (demonstrations, validation or test)."""
        if name not in SPLITS:
            raise SvdiclError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, name)


def default_data_dir() -> Path | None:
    """SVDICL_DATA if set: the folder of <task>/<split>.jsonl files."""
    value = os.environ.get("SVDICL_DATA")
    return Path(value).expanduser() if value else None


def load_splits(task: TaskConfig, data_dir: str | Path | None = None) -> TaskSplits:
    """Read the task's source files and apply its split protocol.

    `data_dir` (else `SVDICL_DATA`) names a local folder; without either, the task's Hub
    dataset is used when the machine is online.
    """
    folder = Path(data_dir).expanduser() if data_dir else default_data_dir()
    sources = sorted({rule.source for rule in task.splits.values()})
    if folder is not None:
        rows = {s: _local_rows(task, folder / task.data_folder / f"{s}.jsonl") for s in sources}
        origin = str(folder / task.data_folder)
    else:
        rows = {s: _hub_rows(task, s) for s in sources}
        origin = f"hf://{task.hub.path}" + (f"@{task.hub.revision}" if task.hub.revision else "")
    examples = {s: [_example(task, s, i, row, folder is None) for i, row in enumerate(rows[s])] for s in sources}
    return TaskSplits(task=task, origin=origin, **_partition(task, examples))


def _local_rows(task: TaskConfig, path: Path) -> list[dict]:
    """The rows of a JSONL file, each checked; raises on the first bad line, naming file and line."""
    if not path.is_file():
        raise SvdiclError(
            f"task {task.name}: data file {path} does not exist; point --data-dir (or SVDICL_DATA) at a folder "
            f"of <task>/<split>.jsonl files"
        )
    columns, labels = task.columns(), set(task.data_labels())
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}, line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SvdiclError(
                    f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SvdiclError(f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise SvdiclError(f"{where}: each line must be a JSON object, not {type(row).__name__}")
            missing = [c for c in columns if c not in row]
            if missing:
                raise SvdiclError(f"{where}: missing field {missing[0]!r} (task {task.name} needs {', '.join(columns)})")
            for column in columns[:-1]:
                if not isinstance(row[column], str):
                    raise SvdiclError(f"{where}: field {column!r} must be a string")
            if type(row["label"]) is not int or row["label"] not in labels:
                raise SvdiclError(f"{where}: label {row['label']!r} is not one of {sorted(labels)}")
            rows.append(row)
    if not rows:
        raise SvdiclError(f"{path} is empty; it must hold one JSON object per line")
    return rows


def content_digest(task: TaskConfig, *groups: Sequence[Example]) -> str:
    """16 hex digits over the task's definition and the content of `groups` of examples (ids, rendered
    fields, labels, choices): what a result depends on besides the weights, never a path or an mtime."""
    digest = hashlib.sha256(task.digest.encode())
    for group in groups:
        digest.update(b"\x1e")
        rows = [[e.id, e.fields, e.label, e.choices] for e in group]
        digest.update(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def _hub_rows(task: TaskConfig, source: str) -> list[dict]:
    if task.hub is None or not hub.reachable():
        where = "it has no Hub dataset" if task.hub is None else "the Hugging Face Hub is unreachable"
        raise SvdiclError(
            f"task {task.name}: no local data folder given and {where}; set SVDICL_DATA or --data-dir to a folder of "
            f"<task>/<split>.jsonl files"
        )
    import datasets

    dataset = task.hub
    data = datasets.load_dataset(dataset.path, dataset.name, revision=dataset.revision, split=source)
    return data.to_list()


def _example(task: TaskConfig, source: str, index: int, row: dict, hub: bool) -> Example:
    values = {k: v.strip() if isinstance(v, str) else v for k, v in row.items()}
    fields = {name: fmt.format(**values).strip() for name, fmt in task.field_formats(hub).items()}
    choices = tuple(values[c] for c in task.choices)
    return Example(id=f"{source}:{index}", fields=fields, label=task.class_of(int(row["label"])), choices=choices)


def _partition(task: TaskConfig, examples: dict[str, list[Example]]) -> dict[str, tuple[Example, ...]]:
    """Apply the split rules source by source: sized draws first, then `rest`, each in file order."""
    chosen: dict[str, list[int]] = {}
    for source, rows in examples.items():
        names = [n for n in SPLITS if task.splits[n].source == source]
        order = list(range(len(rows)))
        random.Random(f"{task.split_seed}:{source}").shuffle(order)
        taken: set[int] = set()
        for name in names:
            rule = task.splits[name]
            if rule.size is not None:
                free = [i for i in order if i not in taken]
                if rule.size > len(free):
                    raise SvdiclError(
                        f"task {task.name}: split {name} wants {rule.size} rows of {source} but only {len(free)} are left"
                    )
                chosen[name] = free[: rule.size]
            elif rule.per_class is not None:
                chosen[name] = _per_class(task, name, source, rows, [i for i in order if i not in taken], rule.per_class)
            else:
                continue
            taken.update(chosen[name])
        for name in names:
            if name not in chosen:
                chosen[name] = [i for i in range(len(rows)) if i not in taken]
    return {name: tuple(examples[task.splits[name].source][i] for i in sorted(chosen[name])) for name in SPLITS}


def _per_class(task: TaskConfig, name: str, source: str, rows: list[Example], order: list[int], k: int) -> list[int]:
    picked = []
    for cls in range(task.num_classes):
        of_class = [i for i in order if rows[i].label == cls][:k]
        if len(of_class) < k:
            raise SvdiclError(
                f"task {task.name}: split {name} wants {k} rows of class {task.labels[cls]!r} from {source}, "
                f"which has only {len(of_class)}"
            )
        picked += of_class
    return picked
