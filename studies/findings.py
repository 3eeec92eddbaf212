"""From the study's stored results to its comparisons: the search records under studies/<model>/<design>/search/
and the per-example answers of the cells they name (docs/STUDY.md "Analysis (pre-registered)").

Every difference is `svdicl.stats.paired_by_id` on the stores' samples (each example's correctness averaged over the
seeds), read through experiments/arms.py's `Arm`, so the report never recomputes a statistic its own way.  Stores
are opened read-only: reading never repairs (or otherwise writes) a store that a running study appends to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from family import CONFIRMATORY_LABELS, MISSING, NOT_APPLICABLE, TESTED, ZERO, Comparison

from svdicl.calibration import METHODS, applicable
from svdicl.experiments.arms import Arm
from svdicl.experiments.search import CONTROL_NAMES
from svdicl.experiments.search_output import SEARCH_DIR, read_search
from svdicl.stats import paired_by_id
from svdicl.store import CELLS_FILE, Cell, CellKey, Store
from svdicl.tasks import get_task

MAIN = "algorithm1"
LAYER_DESIGNS = {"layer-fixed": "vs L−2", "layer-oracle": "vs oracle layer"}  # the layer-choice family
SWEEPS = "layer-sweep"  # parts whose cells are the layer-oracle store's validation sweep (finding 2)
SHOTS = "shots"  # the sweeps of finding 3 (amendment of 2026-12-05)
VARIANTS = ("authors-format", "authors-5-demos")  # comparability with the paper: descriptive
DEEP_RATE = 0.995  # finding 2: the deepest rate the paper says deep layers tolerate
BIAS = ("top_answer_share", "balanced_accuracy", "auc")
RANDOM, NOISE = (CONTROL_NAMES[c] for c in ("random-subspace", "matched-noise"))


@dataclass(frozen=True)
class Planned:
    """One search (or layer sweep) the design asks for: a part of studies/study.py covers it."""

    model: str
    design: str
    task: str
    module: str
    part: str


def planned(parts: Iterable[Any]) -> list[Planned]:
    """What study.py's parts cover, task by task, each search once: a part that reruns searches with more seeds
    (`<model>/<design>/<module>/seeds-...`) rewrites the same records.  A part's argv is read only for plain
    searches (the oracle search's argv reads its sweep's store; its task and module are in its name)."""
    found: dict[tuple[str, str, str, str], Planned] = {}
    for part in parts:
        model, design, rest = part.name.split("/")[:3]
        if design in (SWEEPS, "layer-oracle", SHOTS):
            task, module = rest.rsplit("-", 1)
            tasks = [task]
        else:
            argv = part.argv()
            tasks, module = argv[argv.index("--tasks") + 1].split(","), rest
        for source in tasks:
            task = Path(source).stem if source.endswith(".yaml") else source  # a task file's stem is its name
            found.setdefault((model, design, task, module), Planned(model, design, task, module, part.name))
    return list(found.values())


def cell_answers(store: Store, key: CellKey) -> list[tuple[str, float]] | None:
    """The (example id, 0/1 correctness) of the stored cell `key`, or None when it (or its samples file) is not
    there: the sweeps' cells, which no search record names (finding 2's layers, finding 3's grid)."""
    cell = store.get(key)
    if cell is None or not store.has(cell.key):
        return None
    return [(s["id"], float(s["correct"])) for s in store.samples(cell)]


@dataclass(frozen=True)
class Search:
    """One search record with the cells of its store (shared by the records of one folder)."""

    model: str
    design: str
    record: dict
    store: Store
    cells: dict[str, Cell]

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.model, self.design, self.record["task"], self.record["module"]

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(s["seed"] for s in self.record["seeds"])

    def arm(self, name: str) -> dict | None:
        """The record's entry of arm `name` (experiments/arms.py), or None when it was not scored."""
        return next((a for a in self.record.get("arms", []) if a["name"] == name), None)

    def runs(self, entry: dict, seeds: Sequence[int] | None = None) -> list[list[tuple[str, float]]]:
        """Per seed (all, or those of `seeds`), every test example's (id, correctness) under the arm `entry`."""
        arm = Arm(entry["name"], entry["rate"], tuple(self.cells[i] for i in entry["cells"]), entry["calibration"])
        keep = self.seeds if seeds is None else seeds
        runs = zip(self.seeds, arm.samples(self.store), strict=True)
        return [[(s["id"], float(s["correct"])) for s in run] for seed, run in runs if seed in keep]

    def edit(self, entry: dict) -> str:
        """The edit of an arm's cells (the same for every seed unless it is a null control)."""
        return self.cells[entry["cells"][0]].key.edit


def load_searches(studies: Path) -> list[Search]:
    """Every search record under studies/<model>/<design>/search/ whose cells its store holds with their samples (a
    record read while the store was copied may name cells the copy lacks, a checkout may lack samples files not yet
    packed: it counts as missing until they are back)."""
    found = []
    for folder in sorted(p.parent for p in studies.glob(f"*/*/{SEARCH_DIR}")):
        if not (folder / CELLS_FILE).is_file():
            continue
        store = Store(folder, readonly=True)
        cells = {c.id: c for c in store.cells()}
        for path in sorted((folder / SEARCH_DIR).glob("*.json")):
            record = read_search(path)
            ids = [i for arm in record.get("arms", []) for i in arm["cells"]]
            if ids and all(i in cells and store.has(cells[i].key) for i in ids):
                found.append(Search(folder.parent.name, folder.name, record, store, cells))
    return found


@dataclass(frozen=True)
class Row:
    """One search's test numbers: accuracy is each arm's correctness averaged over examples and seeds; the bias view
    (experiments/arms.py's means over seeds) as (unpruned, pruned)."""

    model: str
    design: str
    task: str
    module: str
    layer: int
    rate_star: float
    best_calibration: str | None
    n_validation: int
    n_test: int
    seeds: tuple[int, ...]
    unpruned: float
    pruned: float
    bias: dict[str, tuple[float | None, float | None]]


def best_calibration(record: dict) -> str | None:
    """The calibration with the highest validation metric on the unpruned model (rate 0); ties to svdicl's order."""
    curves = record["validation"].get("calibrated") or {}
    at = record["rates"].index(0)
    methods = [m for m in METHODS if m in curves]
    return max(methods, key=lambda m: curves[m]["values"][at]) if methods else None


def row(search: Search) -> Row:
    """The main table's row of one search."""
    record = search.record
    unpruned, pruned = search.arm("unpruned"), search.arm("pruned")
    return Row(
        model=search.model,
        design=search.design,
        task=record["task"],
        module=record["module"],
        layer=record["layer"],
        rate_star=record["rate_star"],
        best_calibration=best_calibration(record),
        n_validation=record["validation"]["n"],
        n_test=record["test"]["n"],
        seeds=search.seeds,
        unpruned=_accuracy(search, unpruned),
        pruned=_accuracy(search, pruned),
        bias={name: (unpruned.get(name), pruned.get(name)) for name in BIAS},
    )


def _accuracy(search: Search, entry: dict) -> float:
    return float(np.mean([[correct for _, correct in run] for run in search.runs(entry)]))


def confirmatory(
    plan: Planned, search: Search | None, labels: Sequence[str] = CONFIRMATORY_LABELS, family: str = "confirmatory"
) -> list[Comparison]:
    """C1-C5 of one model x task x module (docs/STUDY.md), `b` − `a` each:

    C1 pruned − unpruned; C2 pruned − (unpruned + c); C3 (pruned + c) − (unpruned + c), c the best calibration on
    validation; C4, C5 pruned − each null control at ξ*.  A task without calibration (COPA) has no C2, C3."""
    c = (best_calibration(search.record) if search else None) or "best calibration"
    arms = {
        "C1": ("unpruned", "pruned"),
        "C2": (f"unpruned + {c}", "pruned"),
        "C3": (f"unpruned + {c}", f"pruned + {c}"),
        "C4": (RANDOM, "pruned"),
        "C5": (NOISE, "pruned"),
    }
    found = []
    for label in labels:
        a, b = arms[label]
        base = Comparison(family, label, plan.model, plan.design, plan.task, plan.module, a, b, MISSING)
        if label in ("C2", "C3") and not has_calibration(plan, search):
            found.append(dataclasses.replace(base, status=NOT_APPLICABLE, note="no calibration for this task"))
        elif search is None:
            found.append(base)
        else:
            found.append(_paired(base, search, search.arm(a), search.arm(b)))
    return found


def has_calibration(plan: Planned, search: Search | None) -> bool:
    """Whether C2 and C3 are in the design: the record's calibrated curves, else the task's kind (multiple choice,
    COPA, has no calibration).  Only the main design's tasks are asked, all of them built in."""
    if search is not None:
        return bool(search.record["validation"].get("calibrated"))
    return bool(applicable(get_task(plan.task), METHODS))


def _paired(base: Comparison, search: Search, a: dict | None, b: dict | None) -> Comparison:
    """`base` tested on the arms' samples; ZERO when `b` reads the same cells as `a` or is a null control at ξ* = 0;
    a note when `b` is another arm's cells (ξ* = 0), so a C2 "holds" there reads as calibration losing, not pruning."""
    if b is not None and b.get("same_as") is not None and b["same_as"] == base.a:
        return dataclasses.replace(base, status=ZERO, note=f"{base.b} is {base.a}: its ξ* = 0")
    if base.a in (RANDOM, NOISE) and search.record["rate_star"] == 0:
        return dataclasses.replace(base, status=ZERO, note="ξ* = 0: pruned is the unpruned model, no control to run")
    if a is None or b is None:
        return dataclasses.replace(base, note="arm not scored")
    tested = dataclasses.replace(base, status=TESTED, paired=paired_by_id(search.runs(a), search.runs(b)))
    if b.get("same_as") is not None:  # C2 at ξ* = 0: the rule still judges it, the reader must see what it compares
        return dataclasses.replace(tested, note=f"{base.b} is {b['same_as']}, ξ* = 0: pruning did nothing here")
    return tested
