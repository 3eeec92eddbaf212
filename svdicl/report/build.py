"""`build_report`: every figure and table of one output folder (or several) and the page that shows them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from svdicl.errors import SvdiclError
from svdicl.experiments.condition import CSV_FILE as CONDITIONS_CSV
from svdicl.experiments.condition import JSON_FILE as CONDITIONS_JSON
from svdicl.experiments.condition import read_conditions
from svdicl.experiments.evaluate import RESULTS_FILE
from svdicl.experiments.search_output import SEARCH_DIR, read_search
from svdicl.report.algorithm1 import (
    ALGORITHM1_COLUMNS,
    ALGORITHM1_SEED_COLUMNS,
    ARMS_COLUMNS,
    algorithm1_markdown,
    algorithm1_rows,
    algorithm1_seed_markdown,
    algorithm1_seed_rows,
    arms_markdown,
    arms_rows,
    search_column,
    search_columns,
)
from svdicl.report.evals import EVAL_COLUMNS, eval_markdown, eval_rows, eval_table_rows, find_evals
from svdicl.report.figures import plot_arms, plot_conditions, plot_evals, plot_rates, plot_search, plot_shots
from svdicl.report.files import FORMATS, replace_report_files, report_files, save_figure, write_csv, write_text
from svdicl.report.labels import model_labels, slug
from svdicl.report.points import TASK_METRIC, answer_share, setting_tags, setting_title, sweep_points
from svdicl.report.tables import SWEEP_COLUMNS, cell_rows, conditions_markdown, sweep_markdown, sweep_rows
from svdicl.store import CELLS_FILE, Cell, Store


@dataclass(frozen=True)
class Report:
    """What build_report wrote: every file, and the page that shows them."""

    files: tuple[Path, ...]
    page: Path


def build_report(
    directories: str | Path | Sequence[str | Path],
    *,
    output: str | Path | None = None,
    metric: str = TASK_METRIC,
    formats: Sequence[str] = FORMATS,
    bands: bool = True,
) -> Report:
    """Figures, tables and report.md for everything found in one folder (written there) or several (into `output`)."""
    folders = [Path(directories)] if isinstance(directories, (str, Path)) else [Path(d) for d in directories]
    folders = _unique_folders(folders)
    for folder in folders:
        if not folder.is_dir():
            raise SvdiclError(
                f"report folder {folder} does not exist; give the --output folder of a sweep, condition or search run"
            )
    if output is None and len(folders) != 1:
        raise SvdiclError(f"{len(folders)} report folders need --output, the folder to write the combined report to")
    target = Path(output) if output is not None else folders[0]
    figures, tables = target / "figures", target / "tables"
    previous = report_files(target)
    written: list[Path] = []
    page = ["# svdicl report", "", "Folders: " + ", ".join(f"`{f}`" for f in folders) + ".", ""]
    found_any = False

    stored = [(store, store.cells()) for store in (Store(f, readonly=True) for f in folders if (f / CELLS_FILE).is_file())]
    shares = {cell.id: answer_share(store.samples(cell)) for store, cells in stored for cell in cells}
    if stored:
        found_any = True
        # one cell per key: two folders holding the same cell (a sweep's and a search's unpruned cells) must not
        # count it twice in a seed mean or spread
        unique: dict[str, Cell] = {}
        for _, found in stored:
            for cell in found:
                unique.setdefault(cell.id, cell)
        cells = list(unique.values())
        headers, rows = cell_rows(cells, shares)
        written.append(write_csv(tables / "cells.csv", headers, rows))
        points = sweep_points(cells, metric, shares)
        if cells and not points:
            have = sorted({m for c in cells for m in c.metrics})
            raise SvdiclError(f"no stored cell has metric {metric!r}; use --metric with one of {', '.join(have)} or task")
        page += _sweep_section(points, figures, tables, formats, bands, written)
        page.append(_baseline_note({p.model_name for p in points}))

    with_conditions = _condition_folders([folder for folder in folders if (folder / CONDITIONS_CSV).is_file()])
    for folder, name in with_conditions:
        found_any = True
        conditions = read_conditions(folder / CONDITIONS_CSV)
        tag = "" if len(with_conditions) == 1 else f"-{slug(name)}"
        figure = plot_conditions(conditions, title=f"{name} · condition numbers per layer")
        written += save_figure(figure, figures / f"fig3-conditions{tag}", formats)
        text = conditions_markdown(conditions)
        written.append(write_text(tables / f"conditions{tag}.md", text))
        title = "## Condition numbers (fig 3)" + ("" if len(with_conditions) == 1 else f": {name}")
        page += [title, "", f"![fig 3](figures/fig3-conditions{tag}.png)", "", text]

    searches = [path for folder in folders for path in sorted((folder / SEARCH_DIR).glob("*.json"))]
    if searches:
        found_any = True
        results = [read_search(path) for path in searches]
        search_columns(results, searches)  # refuses the same search twice, naming both files
        written.append(write_csv(tables / "algorithm1.csv", ALGORITHM1_COLUMNS, algorithm1_rows(results)))
        text = algorithm1_markdown(results)
        written.append(write_text(tables / "algorithm1.md", text))
        seed_rows = algorithm1_seed_rows(results, shares)
        written.append(write_csv(tables / "algorithm1-seeds.csv", ALGORITHM1_SEED_COLUMNS, seed_rows))
        per_seed = algorithm1_seed_markdown(seed_rows)
        written.append(write_text(tables / "algorithm1-seeds.md", per_seed))
        written += save_figure(plot_search(results), figures / "algorithm1-validation", formats)
        page += [
            "## Algorithm 1 (appendix C.5 layout)",
            "",
            text,
            "![Algorithm 1 validation](figures/algorithm1-validation.png)",
            "",
            "### Per demonstration seed",
            "",
            per_seed,
        ]
        page += _arms_section(results, figures, tables, formats, written)

    evals = [found for folder in folders for found in find_evals(folder)]
    if evals:
        found_any = True
        rows = eval_rows(evals)
        written.append(write_csv(tables / "evals.csv", EVAL_COLUMNS, eval_table_rows(rows)))
        text = eval_markdown(rows)
        written.append(write_text(tables / "evals.md", text))
        written += save_figure(plot_evals(rows), figures / "evals", formats)
        page += ["## Evaluations (svdicl eval)", "", "![evaluations](figures/evals.png)", "", text]

    if not found_any:
        where = ", ".join(str(f) for f in folders)
        raise SvdiclError(
            f"nothing to report in {where}: no {CELLS_FILE}, {CONDITIONS_CSV}, {SEARCH_DIR}/*.json or {RESULTS_FILE}; "
            "run svdicl sweep, condition, search or eval with --output there first"
        )
    page_path = write_text(target / "report.md", "\n".join(page) + "\n")
    replace_report_files(target, [*written, page_path], previous)
    return Report(files=tuple(written), page=page_path)


def _unique_folders(folders: Sequence[Path]) -> list[Path]:
    """The folders in order, a folder given twice (under any spelling) once."""
    unique: dict[Path, Path] = {}
    for folder in folders:
        unique.setdefault(folder.resolve(), folder)
    return list(unique.values())


def _conditions_model(folder: Path) -> tuple[str, str]:
    """(name, fingerprint) of the model in the folder's conditions.json (`svdicl condition` writes it); the folder's
    name and no fingerprint where it says nothing."""
    try:
        model = json.loads((folder / CONDITIONS_JSON).read_text(encoding="utf-8"))["model"]
        return str(model["name"] or folder.name), str(model.get("fingerprint") or "")
    except (OSError, ValueError, KeyError, TypeError):
        return folder.name, ""


def _condition_folders(folders: Sequence[Path]) -> list[tuple[Path, str]]:
    """(folder, model label) per folder with condition numbers: one per weights (the same fingerprint twice is one
    model's numbers twice), labels unique (fingerprint digits where names are shared, else the folder's name)."""
    found: dict[str, tuple[Path, str]] = {}
    for folder in folders:
        name, fp = _conditions_model(folder)
        found.setdefault(fp or f"folder:{folder}", (folder, name))
    labels = model_labels((key, name) for key, (_, name) in found.items())
    chosen = [(folder, labels[key] if not key.startswith("folder:") else name) for key, (folder, name) in found.items()]
    names = [label for _, label in chosen]
    return [(folder, label if names.count(label) == 1 else f"{label} ({folder})") for folder, label in chosen]


def _sweep_section(points, figures: Path, tables: Path, formats, bands: bool, written: list[Path]) -> list[str]:
    page = []
    tags = setting_tags(points)
    labels = model_labels((p.model, p.model_name) for p in points)
    for setting, tag in tags.items():
        chosen = [p for p in points if p.setting == setting]
        written.append(write_csv(tables / f"sweep-{tag}.csv", SWEEP_COLUMNS, sweep_rows(chosen)))
        text = sweep_markdown(chosen)
        written.append(write_text(tables / f"sweep-{tag}.md", text))
        first = chosen[0]
        limit = "all examples" if first.limit is None else f"first {first.limit} examples"
        page += [f"## Sweep: {labels[first.model]}, {first.split} split, {limit}", ""]
        title = setting_title(chosen, labels[first.model])
        if any(p.layers is not None for p in chosen):
            written += save_figure(plot_rates(chosen, bands=bands, title=title), figures / f"fig1-rates-{tag}", formats)
            page += [f"![fig 1](figures/fig1-rates-{tag}.png)", ""]
            if len({p.shot_count for p in chosen}) > 1:
                figure = plot_shots(chosen, bands=bands, title=title)
                written += save_figure(figure, figures / f"fig2-shots-{tag}", formats)
                page += [f"![fig 2](figures/fig2-shots-{tag}.png)", ""]
        page += [text, ""]
    if points:
        page.append(
            "Bands: 95% bootstrap interval of the metric for a single seed; mean ± one sample standard deviation "
            "over demonstration seeds for several. Dashed line: the unpruned model."
        )
    return page


def _baseline_note(model_names: set[str]) -> str:
    from svdicl.aliases import ALIASES

    quantised = sorted(n for n in model_names if n in ALIASES or n.endswith(".gguf"))
    if not quantised:
        return ""
    return (
        f"\nNote: {', '.join(quantised)} is a GGUF model dequantised from 4-8-bit weights; its baseline and its spectra "
        "include quantisation noise, so pruning results are relative to that quantised baseline.\n"
    )


def _arms_section(results, figures: Path, tables: Path, formats, written: list[Path]) -> list[str]:
    """The arms of every search that has them: tables/arms.csv, a table and a figure per search."""
    with_arms = [r for r in results if r.get("arms")]
    if not with_arms:
        return []
    written.append(write_csv(tables / "arms.csv", ARMS_COLUMNS, arms_rows(with_arms)))
    page = ["## Algorithm 1 side by side: calibration and null controls on the same test examples", ""]
    for r in with_arms:
        stem = f"arms-{slug(search_column(r)[0])}-{slug(r['task'])}-{slug(r['module'])}"
        text = arms_markdown(r)
        written.append(write_text(tables / f"{stem}.md", text))
        written.extend(save_figure(plot_arms(r), figures / stem, formats))
        page += [text, f"![arms](figures/{stem}.png)", ""]
    return page
