"""Figures and tables from an output folder: the paper's fig 1-3 and its Algorithm 1 table (appendix C.5).

`build_report(DIR)` reads what the experiment commands left in DIR and writes

    DIR/figures/fig1-rates-<split>.{png,svg}    metric vs clipping rate, a line per layer, a panel per task x module
    DIR/figures/fig2-shots-<split>.{png,svg}    the same per shot count (when there are several)
    DIR/figures/fig3-conditions.{png,svg}       condition number vs layer, a line per matrix (log scale)
    DIR/figures/algorithm1-validation.{png,svg} Algorithm 1's validation curves with the chosen rate
    DIR/figures/evals.{png,svg}                 each `svdicl eval` folder's metric with its CI over examples
    DIR/tables/*.{md,csv}                       the numbers behind every figure, the appendix C.5 table,
                                                Algorithm 1 per demonstration seed, the evals paired with
                                                their unpruned eval
    DIR/report.md                               all of it on one page
    DIR/report-files.json                       what this report wrote: the next one replaces exactly these

`build_report([DIR, ...], output=OUT)` does the same for several folders at once (one per model, say)
into OUT: one Algorithm 1 table with a column per model x module, the sweeps of every model, and a
fig 3 per model.

Inputs: DIR/cells.jsonl (the result store of `svdicl sweep`, opened read-only), DIR/conditions.csv
(`svdicl condition`), DIR/search/*.json (`svdicl search`, schema in docs/experiments.md) and
DIR/results.json + samples.jsonl (`svdicl eval`, or one such folder per task); each is optional.
No two inputs share a table column, a figure panel or a file name: searches and models that share
a display name are told apart by what differs (`search_columns`, `model_labels`).  Several seeds
of a cell are drawn as their mean with a band of +-1 sample standard deviation; a single seed with
its 95% interval.  The plotting functions return matplotlib Figures (no pyplot state) so tests can
inspect what was drawn.

Modules, in the order the data flows:

    labels.py      task, module and metric names, orders and number formats every table and figure shares
    points.py      stored sweep cells -> rate-curve points (seeds averaged)
    tables.py      sweep, cell and condition-number tables (CSV rows, Markdown)
    algorithm1.py  search results -> a column per model x module, the appendix C.5 table, per-seed and arms tables
    evals.py       eval folders -> rows, each pruned eval paired with its unpruned eval
    figures.py     every figure, in svdicl's plot style (svdicl/style.py)
    files.py       writing CSV, Markdown and figures; the manifest of what a report wrote
    build.py       build_report: all of the above for one folder or several, and the page
"""

from svdicl.report.algorithm1 import (
    algorithm1_markdown,
    algorithm1_rows,
    algorithm1_seed_markdown,
    algorithm1_seed_rows,
    arms_markdown,
    arms_rows,
    search_columns,
)
from svdicl.report.build import Report, build_report
from svdicl.report.evals import EvalRow, eval_rows, find_evals
from svdicl.report.figures import plot_arms, plot_conditions, plot_evals, plot_rates, plot_search, plot_shots
from svdicl.report.files import FORMATS, save_figure, write_csv
from svdicl.report.labels import model_labels
from svdicl.report.points import TASK_METRIC, Point, answer_share, headline_metric, setting_title, sweep_points
from svdicl.report.tables import cell_rows, conditions_markdown, markdown_table, sweep_markdown, sweep_rows

__all__ = [
    "FORMATS",
    "TASK_METRIC",
    "EvalRow",
    "Point",
    "Report",
    "algorithm1_markdown",
    "algorithm1_rows",
    "algorithm1_seed_markdown",
    "algorithm1_seed_rows",
    "answer_share",
    "arms_markdown",
    "arms_rows",
    "build_report",
    "cell_rows",
    "conditions_markdown",
    "eval_rows",
    "find_evals",
    "headline_metric",
    "markdown_table",
    "model_labels",
    "plot_arms",
    "plot_conditions",
    "plot_evals",
    "plot_rates",
    "plot_search",
    "plot_shots",
    "save_figure",
    "search_columns",
    "setting_title",
    "sweep_markdown",
    "sweep_points",
    "sweep_rows",
    "write_csv",
]
