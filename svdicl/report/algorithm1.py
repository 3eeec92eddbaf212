"""Algorithm 1 results in tables: a column per model x module (`search_columns`), the appendix C.5 table, its
rows per demonstration seed, and each search's arms (experiments/arms.py) on the same test examples."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from svdicl.errors import SvdiclError
from svdicl.report.labels import fmt, fmt_p, metric_label, module_label, module_order, task_label, task_order
from svdicl.report.tables import markdown_table
from svdicl.store import shots_label


def _interval_text(entry: Mapping[str, Any], seeds: int) -> str:
    value = fmt(entry.get("value"))
    if seeds > 1 and entry.get("std") is not None:
        value += f"±{fmt(entry['std'])}"
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        value += f" [{fmt(entry['ci_low'], 3)}, {fmt(entry['ci_high'], 3)}]"
    return value


def search_column(result: Mapping[str, Any]) -> tuple[str, str]:
    """(model name, module) of a search result: its column until `search_columns` tells equal ones apart."""
    model = result.get("model", {})
    return (model.get("name") or model.get("fingerprint", "")[:10] or "model", result["module"])


def _limits_label(limit: Any) -> str:
    if not isinstance(limit, Mapping):
        return "all examples" if limit is None else f"limit {limit}"
    return " ".join(f"{split[:4]} {'all' if n is None else n}" for split, n in limit.items())


def _options_label(options: Any) -> str:
    return "opts-" + hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:6]


# What tells two searches of one task, model name and module apart, in the order a column label adds them,
# each with its short label.  Searches differing in none of these are the same search.
SEARCH_SETUP: tuple[tuple[str, Callable[[Mapping[str, Any]], Any], Callable[[Any], str]], ...] = (
    ("dtype", lambda r: r.get("model", {}).get("dtype"), str),
    ("fingerprint", lambda r: r.get("model", {}).get("fingerprint"), lambda v: f"fp {str(v)[:8]}"),
    ("shots", lambda r: [r.get("shots"), r.get("extra_shots", 0)], lambda v: f"{shots_label(*v)}-shot"),
    ("limit", lambda r: r.get("limit"), _limits_label),
    ("seeds", lambda r: [s.get("seed") for s in r.get("seeds", [])], lambda v: "seeds " + ",".join(map(str, v))),
    ("metric", lambda r: r.get("metric"), lambda v: metric_label(str(v))),
    ("rates", lambda r: r.get("rates"), lambda v: f"{len(v or [])} rates"),
    ("layer", lambda r: r["layer"] if r.get("layer_from") == "given" else None, lambda v: f"layer {v} given"),
    ("scoring", lambda r: (r.get("scoring") or {}).get("options"), _options_label),
    ("data", lambda r: r.get("data"), lambda v: f"data {Path(str(v)).name}"),
    ("task_source", lambda r: r.get("task_source"), lambda v: f"task {Path(str(v)).name}"),
)


def search_columns(results: Sequence[Mapping[str, Any]], sources: Sequence[Any] | None = None) -> list[tuple[str, str]]:
    """The Algorithm 1 column (model label, module) of each result, so that no two results of one task share one.

    A column is the model's name and the module; where two results of one task share those (the same alias
    in float32 and bfloat16, other shots or limits), the label adds the first setup fields that tell them
    apart (SEARCH_SETUP order).  Two results of one task differing in none are the same search, refused in
    one line naming both (`sources`: where each result came from).
    """
    columns = [search_column(r) for r in results]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, column in enumerate(columns):
        groups.setdefault(column, []).append(i)
    for (name, module), members in groups.items():
        keys = {i: [results[i]["task"]] for i in members}
        labels = {i: [name] for i in members}
        for _, value, label in SEARCH_SETUP:
            if not _collisions(keys):
                break
            texts = {i: json.dumps(value(results[i]), sort_keys=True, default=str) for i in members}
            if any(len({texts[i] for i in group}) > 1 for group in _collisions(keys)):
                for i in members:
                    keys[i].append(texts[i])
                    labels[i].append(label(value(results[i])))
        for group in _collisions(keys):
            first, second = (str(sources[i]) if sources else f"result {i + 1}" for i in group[:2])
            raise SvdiclError(
                f"{first} and {second} are the same search ({results[group[0]]['task']}, {module} of {name}: same weights, "
                "dtype, shots, limits, seeds, scoring and data); report only one of them"
            )
        for i in members:
            columns[i] = (" ".join(labels[i]), module)
    return columns


def _collisions(keys: Mapping[int, list[str]]) -> list[list[int]]:
    """Groups of more than one index with equal keys."""
    found: dict[str, list[int]] = {}
    for i, key in keys.items():
        found.setdefault(json.dumps(key), []).append(i)
    return [group for group in found.values() if len(group) > 1]


ALGORITHM1_COLUMNS = (
    "model_name", "column", "model", "dtype", "task", "module", "layer", "top_k", "top_layers", "metric", "shots", "extra_shots",
    "rate_star",
    "baseline", "baseline_ci_low", "baseline_ci_high", "baseline_std", "pruned", "pruned_ci_low", "pruned_ci_high",
    "pruned_std", "mcnemar_p", "seeds", "n_test",
)  # fmt: skip


def algorithm1_rows(results: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Long-form rows of the Algorithm 1 table (tables/algorithm1.csv)."""
    rows = []
    for r, (label, _) in zip(results, search_columns(results), strict=True):
        test, base, pruned = r["test"], r["test"]["baseline"], r["test"]["pruned"]
        name, _ = search_column(r)
        model = r.get("model", {})
        seeds = [s.get("seed") for s in r.get("seeds", [])]
        rows.append([
            name, label, model.get("fingerprint", ""), model.get("dtype", ""), r["task"], r["module"], r["layer"], r.get("top_k"),
            " ".join(map(str, r.get("top_layers", []))), r.get("metric", ""), r.get("shots"), r.get("extra_shots", 0),
            r["rate_star"],
            base["value"], base.get("ci_low"), base.get("ci_high"), base.get("std"),
            pruned["value"], pruned.get("ci_low"), pruned.get("ci_high"), pruned.get("std"),
            test.get("p_value", test.get("mcnemar_p")), " ".join(map(str, seeds)), test.get("n"),
        ])  # fmt: skip
    return rows


def algorithm1_markdown(results: Sequence[Mapping[str, Any]]) -> str:
    """Appendix C.5 layout: rows = tasks, columns = model x layer x module, "baseline -> pruned (ξ*=...)" with CIs and p."""
    of = search_columns(results)
    columns = sorted(set(of), key=lambda c: (c[0], module_order(c[1])))
    tasks = sorted({r["task"] for r in results}, key=task_order)
    by_cell = {(r["task"], column): r for r, column in zip(results, of, strict=True)}
    headers = ["task"]
    for column in columns:
        layers = {r["layer"] for r, c in zip(results, of, strict=True) if c == column}
        where = f"L{next(iter(layers))} " if len(layers) == 1 else ""
        headers.append(f"{column[0]} {where}{module_label(column[1])}")
    rows = []
    for task in tasks:
        metrics = {by_cell[(task, c)].get("metric", "") for c in columns if (task, c) in by_cell}
        label = task_label(task) + (f" ({metric_label(next(iter(metrics)))})" if metrics - {"accuracy", ""} else "")
        row = [label]
        for column in columns:
            r = by_cell.get((task, column))
            if r is None:
                row.append("–")
                continue
            seeds = len(r.get("seeds", [])) or 1
            layers = {x["layer"] for x, c in zip(results, of, strict=True) if c == column}
            where = f"L{r['layer']}: " if len(layers) > 1 else ""
            text = f"{where}{_interval_text(r['test']['baseline'], seeds)} → {_interval_text(r['test']['pruned'], seeds)}"
            text += f" (ξ*={r['rate_star']:g}, p={fmt_p(r['test'].get('p_value', r['test'].get('mcnemar_p')))}"
            text += f", {seeds} seeds)" if seeds > 1 else ")"
            row.append(text)
        rows.append(row)
    note = (
        "\nCells: test metric of the unpruned → the ξ*-pruned model, [95% CI]; ξ* is the validation argmax "
        "(ties to the smaller rate, ξ=0 included); p: example-level paired sign-flip test (each example's correctness "
        "averaged over seeds; exact McNemar for one seed), unpruned vs pruned on the same test examples."
    )
    return markdown_table(headers, rows) + note + "\n"


ALGORITHM1_SEED_COLUMNS = (
    "model_name", "task", "module", "layer", "rate_star", "seed", "validation_unpruned", "validation_at_rate_star",
    "baseline", "pruned", "delta", "mcnemar_p", "only_baseline_correct", "only_pruned_correct", "n_test",
    "baseline_answer_share", "pruned_answer_share",
)  # fmt: skip


def algorithm1_seed_rows(
    results: Sequence[Mapping[str, Any]], shares: Mapping[str, float | None] | None = None
) -> list[list[Any]]:
    """One row per search x demonstration seed: that seed's validation and test at the shared ξ*.

    `shares` (cell id -> `answer_share`) adds how much of each test cell is its most common answer.
    """
    shares = shares or {}
    rows = []
    labelled = zip(search_columns(results), results, strict=True)
    for (label, _), r in sorted(labelled, key=lambda x: (x[0][0], task_order(x[1]["task"]), module_order(x[1]["module"]))):
        star = r["rates"].index(r["rate_star"])
        for seed in r.get("seeds", []):
            base, pruned = seed["baseline"]["value"], seed["pruned"]["value"]
            discordant, cells = seed.get("discordant", {}), seed.get("cells", {})
            rows.append([
                label, r["task"], r["module"], r["layer"], r["rate_star"], seed["seed"],
                seed["validation"][0], seed["validation"][star], base, pruned, pruned - base, seed.get("mcnemar_p"),
                discordant.get("only_baseline_correct"), discordant.get("only_pruned_correct"), r["test"].get("n"),
                shares.get(cells.get("baseline")), shares.get(cells.get("pruned")),
            ])  # fmt: skip
    return rows


def algorithm1_seed_markdown(seed_rows: Sequence[Sequence[Any]]) -> str:
    """Algorithm 1 per seed (rows of `algorithm1_seed_rows`): does a gain at the shared ξ* hold for every seed?"""
    rows = [
        [name, task_label(task), module_label(module), layer, f"{star:g}", seed, f"{fmt(v0, 3)} → {fmt(vs, 3)}",
         f"{fmt(b, 3)} → {fmt(p, 3)}", f"{d:+.3f}", fmt_p(mp), f"{fmt(sb, 2)} → {fmt(sp, 2)}"]
        for name, task, module, layer, star, seed, v0, vs, b, p, d, mp, _, _, _, sb, sp in seed_rows
    ]  # fmt: skip
    headers = ["model", "task", "module", "layer", "ξ*", "seed", "validation ξ=0 → ξ*", "test ξ=0 → ξ*", "Δ test", "p",
               "top answer ξ=0 → ξ*"]  # fmt: skip
    note = (
        "\nξ* is shared by the seeds (chosen on their mean); p: exact McNemar, that seed alone; top answer: the share of "
        "test examples given the most common answer (1.00 = one answer to all).\n"
    )
    return markdown_table(headers, rows) + note


ARMS_COLUMNS = (
    "model_name", "task", "module", "layer", "arm", "rate", "calibration", "control", "metric", "n", "seeds", "value",
    "std_over_seeds", "ci_low", "ci_high", "ci_method", "difference", "difference_ci_low", "difference_ci_high", "p",
    "p_holm", "mde", "top_answer_share", "balanced_accuracy", "auc", "difference_vs_calibrated",
    "difference_vs_calibrated_ci_low", "difference_vs_calibrated_ci_high", "p_vs_calibrated", "p_holm_vs_calibrated",
)  # fmt: skip


def arms_rows(results: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Long-form rows of every search's arms (tables/arms.csv)."""
    rows = []
    for r in results:
        for arm in r.get("arms", []):
            paired = arm.get("paired") or {}
            versus = arm.get("paired_calibrated") or {}
            rows.append([
                search_column(r)[0], r["task"], r["module"], r["layer"], arm["name"], arm["rate"], arm.get("calibration"),
                arm.get("control"), r.get("metric"), arm["n"], arm["seeds"], arm["value"], arm.get("std"), arm.get("ci_low"),
                arm.get("ci_high"), arm.get("ci_method"), paired.get("difference"), paired.get("ci_low"),
                paired.get("ci_high"), paired.get("p_value"), paired.get("p_holm"), paired.get("mde"),
                arm.get("top_answer_share"), arm.get("balanced_accuracy"), arm.get("auc"), versus.get("difference"),
                versus.get("ci_low"), versus.get("ci_high"), versus.get("p_value"), versus.get("p_holm"),
            ])  # fmt: skip
    return rows


def arms_markdown(result: Mapping[str, Any]) -> str:
    """One search's arms on the same test examples: metric, paired difference against the unpruned model, p, bias."""
    arms = result.get("arms", [])
    seeds = arms[0]["seeds"] if arms else 1
    metric = metric_label(result.get("metric", ""))
    rows = []
    for arm in arms:
        value = fmt(arm["value"], 3) + (f" ± {fmt(arm['std'], 3)}" if arm.get("std") is not None else "")
        value += f" [{fmt(arm.get('ci_low'), 3)}, {fmt(arm.get('ci_high'), 3)}]"
        paired = arm.get("paired")
        if arm.get("same_as"):
            delta, p, p_holm = f"= {arm['same_as']}", "", ""
        elif paired is None:
            delta, p, p_holm = "reference", "", ""
        else:
            delta = f"{paired['difference']:+.3f} [{paired['ci_low']:+.3f}, {paired['ci_high']:+.3f}]"
            p, p_holm = fmt_p(paired["p_value"]), fmt_p(paired.get("p_holm"))
        versus = arm.get("paired_calibrated")
        against_calibrated = "" if arm.get("same_as") or not versus else (
            f"{versus['difference']:+.3f} [{versus['ci_low']:+.3f}, {versus['ci_high']:+.3f}], p {fmt_p(versus['p_value'])} "
            f"(Holm {fmt_p(versus.get('p_holm'))})"
        )  # fmt: skip
        rows.append([arm["name"], f"{arm['rate']:g}", value, delta, p, p_holm, against_calibrated,
                     fmt(arm.get("top_answer_share"), 2), fmt(arm.get("balanced_accuracy"), 3),
                     fmt(arm.get("auc"), 3)])  # fmt: skip
    headers = ["arm", "ξ", f"test {metric}", "Δ correct vs unpruned", "p", "p (Holm)", "Δ vs unpruned + same calibration",
               "top answer", "balanced acc.", "AUC"]  # fmt: skip
    methods = sorted({a.get("ci_method") for a in arms if a.get("ci_method")})
    spread = f"± SD over the {seeds} demonstration seeds; " if seeds > 1 else ""
    note = (
        f"\n{task_label(result['task'])}, {module_label(result['module'])} of layer {result['layer']}, n = "
        f"{arms[0]['n'] if arms else '–'} test examples, {seeds} seed(s). {spread}[ ] 95% CI over test examples "
        f"({', '.join(methods)}). Δ: paired difference in per-example correctness against the unpruned model (each "
        "example's correctness averaged over seeds) with its 95% CI over examples; p: sign-flip permutation test on those "
        "differences, raw and Holm-adjusted across all comparisons of this table. Δ vs unpruned + same calibration: a "
        "calibrated pruned or control arm against the unpruned model under the same calibration (does pruning add to "
        "the calibration?). ξ of a calibrated pruned arm: the rate chosen "
        "on validation under that calibration; null controls at the rate of the pruned arm they mirror. top answer: share "
        "of examples given the most common answer; AUC: ranking AUC of the label margin (binary tasks); '= arm': the same "
        "predictions as that arm, left out of "
        "the Holm family.\n"
    )
    return markdown_table(headers, rows) + note
