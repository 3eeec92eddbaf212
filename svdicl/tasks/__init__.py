"""ICL tasks as declarative configs: one YAML file per task, read into a frozen `TaskConfig`.

A task says which columns of its data files feed the template, the template itself (the
paper's, docs/paper.md section 3), the label words, the answer delimiter, the split protocol and
the paper's default number of shots per class.  Adding a task is writing one such YAML file
and passing its path wherever a task name is accepted (`get_task("my_task.yaml")`).
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from svdicl.errors import SvdiclError, read_text

KINDS = ("classification", "multiple_choice")
SPLITS = ("demonstrations", "validation", "test")
METRICS = ("accuracy", "macro_f1")
_HERE = Path(__file__).resolve().parent
TASKS = tuple(sorted(p.stem for p in _HERE.glob("*.yaml")))
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")  # names that become file and folder names
_NOT_SCORED = ("name", "description", "metric", "shots", "data_folder", "hub")  # change no answer (or are keyed apart)


@dataclass(frozen=True)
class SplitRule:
    """Which rows of a source file (`train.jsonl`, ...) make up one of the task's splits.

    Exactly one of: `size` (a uniform random sample of that many rows), `per_class` (that many
    rows of every class), `rest` (every row no other split of the same source took), or none
    of them (the whole file).
    """

    source: str
    size: int | None = None
    per_class: int | None = None
    rest: bool = False


@dataclass(frozen=True)
class HubSource:
    """Where the data lives on the Hugging Face Hub, for online users without a local folder."""

    path: str
    name: str | None = None
    revision: str | None = None
    fields: dict[str, str] = field(default_factory=dict)  # overrides TaskConfig.fields where Hub columns differ


@dataclass(frozen=True)
class TaskConfig:
    """One task as its YAML declares it: template, label words, shots, split protocol, metric."""

    name: str
    kind: str
    template: str  # the query: rendered from `fields`, ends right before the answer
    labels: tuple[str, ...]  # classification: label word per class; multiple choice: class names
    shots: int  # the paper's demonstrations per class
    splits: dict[str, SplitRule]
    fields: dict[str, str] = field(default_factory=dict)  # template field -> format string over data columns
    choices: tuple[str, ...] = ()  # multiple choice: the columns holding each choice's text
    answer_delimiter: str = " "  # between the query and the answer (label word or choice)
    label_map: dict[int, int] = field(default_factory=dict)  # data label -> class index; empty: identity
    metric: str = "accuracy"  # the paper's headline metric
    data_folder: str = ""  # <data dir>/<data_folder>/<source>.jsonl; default: the task name
    hub: HubSource | None = None
    split_seed: int = 0  # fixes the split protocol's random draws, independent of the demonstration seed
    description: str = ""

    @property
    def num_classes(self) -> int:
        """Number of classes (label words or choices)."""
        return len(self.labels)

    def field_formats(self, hub: bool = False) -> dict[str, str]:
        """Template field -> format over data columns (identity for fields the YAML does not map)."""
        formats = {name: f"{{{name}}}" for name in _placeholders(self.template)}
        formats.update(self.fields)
        if hub and self.hub is not None:
            formats.update(self.hub.fields)
        return formats

    def columns(self, hub: bool = False) -> tuple[str, ...]:
        """Data columns every row must have: those the fields read, the choices, and `label`."""
        names = {c for fmt in self.field_formats(hub).values() for c in _placeholders(fmt)}
        return (*sorted(names | set(self.choices)), "label")

    def class_of(self, label: int) -> int:
        """The class index of a data label, through `label_map` when there is one."""
        return self.label_map.get(label, label) if self.label_map else label

    def data_labels(self) -> tuple[int, ...]:
        """The label values a data file may hold."""
        return tuple(sorted(self.label_map)) if self.label_map else tuple(range(self.num_classes))

    def to_dict(self) -> dict:
        """Plain JSON-able form, for results files."""
        return asdict(self)

    @property
    def digest(self) -> str:
        """16 hex digits over everything that changes what is scored: template, fields, label words, delimiter,
        label map, choices, split rules and split seed (a renamed copy of a task has the same digest)."""
        definition = {k: v for k, v in self.to_dict().items() if k not in _NOT_SCORED}
        text = json.dumps(definition, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_name(name: str, what: str) -> str:
    """`name` if it is safe as one file or folder name (letters, digits, `_ . + -`), else a one-line error naming it."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise SvdiclError(
            f"{what} {name!r} cannot name a file: use 1-64 letters, digits, '_', '.', '+' or '-', starting with a letter or digit"
        )
    return name


def get_task(name_or_path: str | Path) -> TaskConfig:
    """A built-in task by name (`sst2`), or a task YAML file by path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise SvdiclError(f"task file {text} does not exist; give a task name ({', '.join(TASKS)}) or a YAML file")
        return parse_task(read_text(path), origin=str(path), default_name=path.stem)
    if text not in TASKS:
        raise SvdiclError(f"unknown task {text!r}; choose one of {', '.join(TASKS)} or give a task YAML file")
    path = _HERE / f"{text}.yaml"
    return parse_task(path.read_text(), origin=str(path), default_name=text)


def parse_task(text: str, origin: str = "<task>", default_name: str = "task") -> TaskConfig:
    """Read and check a task YAML; every problem is one line naming the file and the key."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SvdiclError(f"task file {origin} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SvdiclError(f"task file {origin} must be a mapping of keys such as name, template, labels, splits")

    def fail(message: str) -> SvdiclError:
        return SvdiclError(f"task file {origin}: {message}")

    known = set(TaskConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise fail(f"unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    for key in ("kind", "template", "labels", "shots", "splits"):
        if key not in raw:
            raise fail(f"missing key {key!r}")
    values = dict(raw)
    values.setdefault("name", default_name)
    for key in ("name", "kind", "template", "answer_delimiter", "metric", "description"):
        if key in values:
            values[key] = str(values[key])
    if not isinstance(raw["labels"], list):
        raise fail("labels must be a list, e.g. [negative, positive]")
    values["labels"] = tuple(str(w) for w in raw["labels"])
    values["choices"] = tuple(str(c) for c in raw.get("choices") or ())
    values["fields"] = {str(k): str(v) for k, v in (raw.get("fields") or {}).items()}
    values["label_map"] = {int(k): int(v) for k, v in (raw.get("label_map") or {}).items()}
    values["splits"] = _split_rules(raw["splits"], fail)
    values["hub"] = _hub(raw.get("hub"), fail)
    values["data_folder"] = str(raw.get("data_folder") or values["name"])
    check_name(values["name"], f"task file {origin}: name")
    check_name(values["data_folder"], f"task file {origin}: data_folder")
    task = TaskConfig(**values)
    _check(task, fail)
    return task


def _split_rules(raw, fail) -> dict[str, SplitRule]:
    if not isinstance(raw, dict) or set(raw) != set(SPLITS):
        raise fail(f"splits must define exactly {', '.join(SPLITS)}")
    rules = {}
    for name in SPLITS:
        spec = raw[name]
        if not isinstance(spec, dict) or "source" not in spec or set(spec) - {"source", "size", "per_class", "rest"}:
            raise fail(f"splits.{name} needs `source` and at most one of size, per_class, rest")
        for key in ("size", "per_class"):
            if spec.get(key) is not None and (type(spec[key]) is not int or spec[key] < 1):
                raise fail(f"splits.{name}.{key} must be a whole number >= 1")
        try:
            source = check_name(str(spec["source"]), f"splits.{name}.source")
        except SvdiclError as exc:
            raise fail(str(exc)) from None
        rule = SplitRule(
            source=source,
            size=spec.get("size"),
            per_class=spec.get("per_class"),
            rest=bool(spec.get("rest", False)),
        )
        if sum([rule.size is not None, rule.per_class is not None, rule.rest]) > 1:
            raise fail(f"splits.{name} gives more than one of size, per_class, rest")
        rules[name] = rule
    by_source: dict[str, list[str]] = {}
    for name, rule in rules.items():
        by_source.setdefault(rule.source, []).append(name)
    for source, names in by_source.items():
        whole = [n for n in names if rules[n].size is None and rules[n].per_class is None and not rules[n].rest]
        if whole and len(names) > 1:
            raise fail(f"splits {', '.join(names)} share source {source!r}, so {whole[0]} must say size, per_class or rest")
        if sum(rules[n].rest for n in names) > 1:
            raise fail(f"only one split may take the rest of source {source!r}")
    return rules


def _hub(raw, fail) -> HubSource | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or "path" not in raw or set(raw) - {"path", "name", "revision", "fields"}:
        raise fail("hub needs `path` and optionally name, revision, fields")
    return HubSource(
        path=str(raw["path"]),
        name=raw.get("name"),
        revision=raw.get("revision"),
        fields={str(k): str(v) for k, v in (raw.get("fields") or {}).items()},
    )


def _check(task: TaskConfig, fail) -> None:
    if task.kind not in KINDS:
        raise fail(f"kind {task.kind!r} is not one of {', '.join(KINDS)}")
    if task.metric not in METRICS:
        raise fail(f"metric {task.metric!r} is not one of {', '.join(METRICS)}")
    if len(task.labels) < 2 or len(set(task.labels)) != len(task.labels):
        raise fail("labels must name at least two distinct classes")
    if task.kind == "multiple_choice" and len(task.choices) != len(task.labels):
        raise fail("a multiple_choice task lists one choice column per class in `choices`")
    if task.kind == "classification" and task.choices:
        raise fail("`choices` is only for multiple_choice tasks")
    if task.label_map and set(task.label_map.values()) != set(range(task.num_classes)):
        raise fail(f"label_map must map data labels onto every class index 0..{task.num_classes - 1}")
    if not isinstance(task.shots, int) or task.shots < 0:
        raise fail("shots (demonstrations per class) must be a whole number >= 0")
    for name in _placeholders(task.template):
        if name not in task.field_formats():
            raise fail(f"template field {{{name}}} has no format in `fields`")
    extra = set(task.fields) - set(_placeholders(task.template))
    if extra:
        raise fail(f"fields {', '.join(sorted(extra))} are not used by the template")


def _placeholders(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]
