"""`svdicl eval` folders in the report: a row per folder, each pruned eval paired with the unpruned eval of the
same weights and examples (Holm-adjusted over the report's comparisons), as CSV rows and a Markdown table."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from svdicl import stats
from svdicl.experiments.compare import EvalFolder, paired_accuracy, read_eval
from svdicl.experiments.evaluate import RESULTS_FILE
from svdicl.report.labels import fmt, fmt_p, model_labels, task_label, task_order
from svdicl.report.points import answer_share
from svdicl.report.tables import markdown_table
from svdicl.store import shots_label


@dataclass(frozen=True)
class EvalRow:
    """One eval folder in the report: its setting, each metric as the seed mean with its CI over examples and
    its spread over seeds, the share of the most common answer, and the paired comparison with the unpruned
    model's eval of the same examples (when the report has one; `adjusted_p`: Holm over the report's comparisons)."""

    folder: str
    model: str
    fingerprint: str
    dtype: str
    task: str
    split: str
    shots: int | None  # per class; `extra_shots` beyond it, one each from as many classes
    edit: str
    seeds: tuple[int, ...]
    n: int
    metric: str
    accuracy: stats.Estimate
    accuracy_std: float | None
    macro_f1: stats.Estimate
    macro_f1_std: float | None
    answer_share: float | None
    versus: stats.PairedComparison | None = None
    adjusted_p: float | None = None
    extra_shots: int = 0

    def value(self, metric: str) -> stats.Estimate:
        """The estimate of `metric` (accuracy or macro_f1)."""
        return self.accuracy if metric == "accuracy" else self.macro_f1


def find_evals(folder: Path) -> list[EvalFolder]:
    """The eval outputs in a folder: the folder itself, or one subfolder per task (a multi-task eval)."""
    if (folder / RESULTS_FILE).is_file():
        return [read_eval(folder)]
    return [read_eval(path.parent) for path in sorted(folder.glob(f"*/{RESULTS_FILE}"))]


def eval_rows(evals: Sequence[EvalFolder]) -> list[EvalRow]:
    """A row per eval folder, each pruned one paired with the unpruned eval of the same weights and examples."""
    labels = model_labels((e.fingerprint, e.model_name) for e in evals)
    rows = []
    for e in evals:
        versus = None
        base = next((b for b in evals if b.edit == "none" and e.edit != "none" and _same_setting(b, e)), None)
        if base is not None:
            versus = paired_accuracy(base, e)
        rows.append(_eval_row(e, labels[e.fingerprint], versus))
    tested = [i for i, row in enumerate(rows) if row.versus is not None]
    adjusted = stats.holm([rows[i].versus.p_value for i in tested]) if tested else []
    for i, p in zip(tested, adjusted, strict=True):
        rows[i] = dataclasses.replace(rows[i], adjusted_p=p)
    return sorted(rows, key=lambda r: (r.model, task_order(r.task), r.split, r.edit != "none", r.edit))


def _same_setting(a: EvalFolder, b: EvalFolder) -> bool:
    """Same weights, task, split, shots and examples: the pair `svdicl compare` would accept."""
    same = (a.fingerprint, a.task, a.split, a.config.get("shots_per_class"), a.config.get("extra_shots", 0)) == (
        b.fingerprint, b.task, b.split, b.config.get("shots_per_class"), b.config.get("extra_shots", 0))  # fmt: skip
    return same and set(a.ids) == set(b.ids)


def _eval_row(e: EvalFolder, model: str, versus: stats.PairedComparison | None) -> EvalRow:
    ids = e.ids
    gold_by_id, predicted_by_id = e.table("gold"), e.table("prediction")
    gold = [gold_by_id[i][0] for i in ids]
    predicted = np.array([predicted_by_id[i] for i in ids], dtype=np.int64).T  # seeds x examples
    classes = len(e.config["task"].get("labels") or []) or int(max(gold + predicted.ravel().tolist())) + 1
    per_seed = {
        name: [stats.accuracy(gold, p) if name == "accuracy" else stats.macro_f1(gold, p, classes) for p in predicted]
        for name in ("accuracy", "macro_f1")
    }
    shares = [answer_share([{"prediction": x} for x in p]) for p in predicted]
    return EvalRow(
        folder=str(e.folder), model=model, fingerprint=e.fingerprint, dtype=e.dtype, task=e.task, split=e.split,
        shots=e.config.get("shots_per_class"), edit=e.edit, seeds=e.seeds, n=len(ids), metric=e.metric,
        accuracy=stats.seed_mean_ci(gold, predicted, "accuracy", classes),
        accuracy_std=statistics.stdev(per_seed["accuracy"]) if len(predicted) > 1 else None,
        macro_f1=stats.seed_mean_ci(gold, predicted, "macro_f1", classes),
        macro_f1_std=statistics.stdev(per_seed["macro_f1"]) if len(predicted) > 1 else None,
        answer_share=statistics.fmean(shares), versus=versus, extra_shots=e.config.get("extra_shots", 0),
    )  # fmt: skip


EVAL_COLUMNS = (
    "model_name", "model", "dtype", "task", "split", "shots", "extra_shots", "edit", "seeds", "n", "metric",
    "accuracy", "accuracy_ci_low", "accuracy_ci_high", "accuracy_ci_method", "accuracy_std",
    "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "macro_f1_ci_method", "macro_f1_std", "answer_share",
    "delta_accuracy", "delta_ci_low", "delta_ci_high", "p_value", "p_holm", "p_method", "mde", "folder",
)  # fmt: skip


def eval_table_rows(rows: Sequence[EvalRow]) -> list[list[Any]]:
    """Long-form rows of tables/evals.csv."""
    out = []
    for r in rows:
        v = r.versus
        out.append([
            r.model, r.fingerprint, r.dtype, r.task, r.split, r.shots, r.extra_shots, r.edit, " ".join(map(str, r.seeds)), r.n,
            r.metric,
            r.accuracy.value, r.accuracy.low, r.accuracy.high, r.accuracy.method, r.accuracy_std,
            r.macro_f1.value, r.macro_f1.low, r.macro_f1.high, r.macro_f1.method, r.macro_f1_std, r.answer_share,
            *((v.difference, v.low, v.high, v.p_value, r.adjusted_p, v.method, v.mde) if v else (None,) * 7), r.folder,
        ])  # fmt: skip
    return out


def eval_markdown(rows: Sequence[EvalRow]) -> str:
    """A row per eval: seed mean ± sd over seeds [95% CI over examples], top-answer share, and B - unpruned."""
    table = []
    for r in rows:
        v = r.versus
        delta = "–" if v is None else f"{v.difference:+.4f} [{v.low:+.3f}, {v.high:+.3f}]"
        table.append([
            r.model, task_label(r.task), r.split, shots_label(r.shots, r.extra_shots) if r.shots is not None else "–", r.edit,
            len(r.seeds), r.n, _eval_estimate(r.accuracy, r.accuracy_std), _eval_estimate(r.macro_f1, r.macro_f1_std),
            fmt(r.answer_share, 2), delta, fmt_p(v.p_value if v else None), fmt_p(r.adjusted_p),
        ])  # fmt: skip
    headers = ["model", "task", "split", "shots/class", "edit", "seeds", "n", "accuracy", "macro-F1", "top answer",
               "Δ accuracy vs unpruned", "p", "p (Holm)"]  # fmt: skip
    note = (
        "\nValues: mean over seeds ±sd over seeds [95% CI over examples: Wilson for one seed's accuracy, else a BCa "
        "bootstrap]. n: examples. top answer: share of examples given the most common answer (1.00 = one answer to "
        "all). Δ: accuracy of the row minus the unpruned eval of the same weights and examples, each example averaged "
        "over its seeds first [95% t-interval over examples]; p: exact sign-flip test on those per-example "
        "differences (`svdicl compare`); p (Holm): adjusted over this table's comparisons.\n"
    )
    return markdown_table(headers, table) + note


def _eval_estimate(estimate: stats.Estimate, std: float | None) -> str:
    text = fmt(estimate.value) + ("" if std is None else f"±{fmt(std)}")
    return f"{text} [{fmt(estimate.low, 3)}, {fmt(estimate.high, 3)}]"
