"""What a stored cell is: its key (weights, task, split, shots, seed, edit, limit, options, data digest), what a
compute function returns for it (`Result`) and the record cells.jsonl holds (`Cell`).  No file is touched here."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from svdicl.errors import SvdiclError
from svdicl.specs import PruneSpec

FORMAT = 1
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
    `shots` counts demonstrations per class; `extra_shots` the ones beyond, one each from as many
    classes (a total the classes do not divide, e.g. `--num_fewshot 5` on RTE: 2 per class + 1).
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
    extra_shots: int = 0

    def __post_init__(self) -> None:
        options = dict(self.options)
        bad = [name for name, value in options.items() if not isinstance(value, _SCALARS)]
        if bad:
            raise SvdiclError(f"scoring option {bad[0]!r} must be a string, number, bool or null to be part of a cell key")
        object.__setattr__(self, "options", tuple(sorted(options.items())))
        for name in ("shots", "seed", "extra_shots"):
            object.__setattr__(self, name, _integer(name, getattr(self, name)))
        if self.extra_shots < 0:
            raise SvdiclError(f"cell key field 'extra_shots' must be >= 0, got {self.extra_shots}")
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
        """16 hex digits of SHA-256 over the canonical JSON of the key (an empty `data` and no `extra_shots` left
        out, so cells of stores older than either keep their ids)."""
        key = {name: value for name, value in self.to_dict().items() if name not in ("data", "extra_shots") or value}
        text = json.dumps(key, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """The key's fields as a JSON object."""
        return {f.name: dict(self.options) if f.name == "options" else getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CellKey:
        """A key from its JSON object (unknown fields ignored)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def shots_label(shots: int, extra_shots: int = 0) -> str:
    """A shot count as reports and progress bars name it: `5` per class, `2+1` for 2 per class plus 1 extra."""
    return f"{shots}+{extra_shots}" if extra_shots else str(shots)


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
            metrics=normal_metrics(record["metrics"]),
            n=int(record["n"]),
            ties=int(record.get("ties", 0)),
            samples=record.get("samples"),
            seconds=float(record.get("seconds", 0.0)),
            created=str(record.get("created", "")),
            model_name=str(record.get("model_name", "")),
            info=dict(record.get("info") or {}),
        )


def normal_metrics(metrics: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """{"name": {"value", "ci_low", "ci_high", ...}}, bare numbers as values, NaN/inf as None."""
    if not isinstance(metrics, Mapping):
        raise SvdiclError(f"metrics must be a mapping of metric name to value, got {type(metrics).__name__}")
    out = {}
    for name, entry in metrics.items():
        entry = {"value": entry} if not isinstance(entry, Mapping) else entry
        if "value" not in entry:
            raise SvdiclError(f"metric {name!r} has no 'value'; give {{'value': ..., 'ci_low': ..., 'ci_high': ...}}")
        out[str(name)] = plain(entry)
    return out


def plain(value: Any) -> Any:
    """Plain JSON values: numpy/torch numbers as Python ones, NaN and infinity as null (JSON has neither)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, _SCALARS):
        return value
    if hasattr(value, "tolist"):
        return plain(value.tolist())
    raise SvdiclError(f"cannot store a {type(value).__name__} as JSON; use numbers, strings, lists or dicts")
