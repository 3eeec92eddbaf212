"""The powered study of docs/STUDY.md: every number there comes from this script.

    python studies/study.py list                      # the parts in order: done, redo, started, todo or cut, CPU hours
    python studies/study.py run [--until 03:40] [--parts NAME,...] [--slots 2] [--workers 1]
    python studies/study.py report [--studies DIR] [--doc FILE]   # docs/STUDY.md's results section from what is stored
    python studies/study.py pack                      # gzip finished cells' samples (~5x smaller; `run` packs as it goes)

Each part is one `svdicl` command writing a resumable result store under studies/<model>/<design>/;
`run` runs the parts in order, two side by side with one single-threaded worker each (a part that
needs another's results waits for it), skips those logged as done and those cut (docs/STUDY.md "Cut";
--parts still runs them by name), and stops the running ones
cleanly at --until (SIGINT: finished cells stay, a rerun resumes).  CPU time per part (user + system of the
command, from wait4) goes to studies/cpu-time.tsv, one row per invocation.  The order is the
pre-registered priority (docs/STUDY.md "What CPU time buys"): cut seeds and the 1.5B model first.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CPU_LOG = HERE / "cpu-time.tsv"
TASKS = ("sst2", "agnews", "emoc", "mrpc", "rte", "cb", "copa")
LAYER_TASKS = ("sst2", "rte", "agnews")  # the layer-choice comparison (SmolLM2 only)
MODULES = ("mlp", "attn")
SEEDS = "0,1,2"  # 5 pre-registered; 3 while CPU time forces it (docs/STUDY.md)
ALL_SEEDS = "0,1,2,3,4"
POLL_S = 2.0  # how often the runner looks at its running parts
PACK_S = 600.0  # how often it packs the finished cells' samples of the running parts (and whenever a part ends)
VALIDATION, TEST = 200, 1000  # min(., split): RTE 277, CB 56, COPA 100 are whole test splits
SEARCH = (  # accuracy on every task, COPA too (the paper's COPA "F1" is accuracy in the authors' code)
    "--limit-validation", str(VALIDATION), "--validation-sampling", "balanced", "--limit-test", str(TEST),
    "--arms", "calibration,controls", "--metric", "accuracy",
)  # fmt: skip  # arms: the amendment of 2026-12-04 in docs/STUDY.md (no null controls at the calibrated arms' rates)


@dataclass(frozen=True)
class Part:
    """One svdicl command of the study; `argv` may be computed when the part starts (it reads earlier parts)."""

    name: str
    argv: Callable[[], list[str]]
    after: str = ""  # a part that must be done first (its results feed this one)
    out: Path | None = None  # its result store
    cut: bool = False  # docs/STUDY.md "Cut": `run` skips it unless --parts names it; its comparisons leave the family


def cut(part: Part) -> Part:
    """A part CPU time cannot buy (docs/STUDY.md "Cut", 2026-12-05), in the pre-registered order: seeds 3 and 4,
    then Qwen2.5-Coder-1.5B.  It stays in the design (`list` shows it, `--parts` still runs it)."""
    return dataclasses.replace(part, cut=True)


def folder(model: str, design: str) -> Path:
    return HERE / model / design


def search(model: str, design: str, tasks: Sequence[str], module: str, *extra: str, seeds: str = SEEDS) -> Part:
    out = folder(model, design)
    argv = ["search", "--model", model, "--tasks", ",".join(tasks), "--modules", module, "--seeds", seeds, *SEARCH, *extra]
    name = f"{model}/{design}/{module}"
    if seeds != SEEDS:  # more seeds rewrite the 3-seed records: after them
        return Part(f"{name}/seeds-{seeds}", lambda: [*argv, "--output", str(out), "--no-report"], after=name, out=out)
    return Part(name, lambda: [*argv, "--output", str(out), "--no-report"], out=out)


def oracle_sweep(model: str, task: str, module: str) -> Part:
    """Every layer at the paper's rates on the same balanced validation subset as the searches (seed 0)."""
    out = folder(model, "layer-oracle")
    argv = ["sweep", "--model", model, "--tasks", task, "--modules", module, "--layers", "all", "--split", "validation",
            "--limit", str(VALIDATION), "--sampling", "balanced", "--seeds", "0", "--calibration", "all",
            "--output", str(out), "--no-report"]  # fmt: skip
    return Part(f"{model}/layer-sweep/{task}-{module}", lambda: argv, out=out)


def shots_sweep(model: str, task: str, module: str) -> Part:
    """Finding 3 (docs/STUDY.md amendment "Finding 3"): the first two layers at the paper's rates with 0, 4 and 10
    demonstrations, on the sweeps' balanced validation subset, seeds 0-2."""
    out = folder(model, "shots")
    argv = ["sweep", "--model", model, "--tasks", task, "--modules", module, "--layers", "0,1", "--shots", "0,2,5",
            "--split", "validation", "--limit", str(VALIDATION), "--sampling", "balanced", "--seeds", SEEDS,
            "--output", str(out), "--no-report"]  # fmt: skip
    return Part(f"{model}/shots/{task}-{module}", lambda: argv, out=out)


def oracle_search(model: str, task: str, module: str) -> Part:
    """Algorithm 1's steps 3-4 at the oracle layer: the one whose best rate scored highest on validation."""

    def argv() -> list[str]:
        layer = oracle_layer(folder(model, "layer-oracle"), task, module)
        return search(model, "layer-oracle", [task], module, "--layer", str(layer), seeds="0").argv()

    sweep = oracle_sweep(model, task, module)
    return Part(f"{model}/layer-oracle/{task}-{module}", argv, after=sweep.name, out=sweep.out)


def checkout_on_path() -> None:
    """svdicl is imported only where needed (`list` needs no torch), from this checkout, installed or not."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def store(out: Path, readonly: bool = False):
    """svdicl's result store of `out`."""
    checkout_on_path()
    from svdicl.store import Store

    return Store(out, readonly=readonly)


def oracle_layer(out: Path, task: str, module: str) -> int:
    """The layer of the highest validation accuracy over rates > 0 (seed 0; ties to the shallower layer)."""
    best: dict[int, float] = {}
    for cell in store(out, readonly=True).cells():
        key = cell.key
        if key.task == task and key.split == "validation" and key.seed == 0 and key.edit != "none":
            layer, found_module, rate = key.edit.split(":")
            if found_module == module and float(rate) > 0:
                best[int(layer)] = max(best.get(int(layer), 0.0), cell.metrics["accuracy"]["value"])
    if not best:
        raise SystemExit(f"study: no layer sweep of {task} {module} in {out}; run its layer-sweep part first")
    return max(sorted(best), key=lambda layer: best[layer])


def parts() -> list[Part]:
    """The pre-registered order (docs/STUDY.md)."""
    smol = "smollm2-135m"
    found = [search(smol, "algorithm1", TASKS, m) for m in MODULES]
    found += [search(smol, "layer-fixed", LAYER_TASKS, m, "--layer", "-2") for m in MODULES]
    for model in ("gemma3-270m", "qwen2.5-coder-0.5b"):
        found += [search(model, "algorithm1", TASKS, m) for m in MODULES]
    for task in LAYER_TASKS:
        for m in MODULES:
            found += [oracle_sweep(smol, task, m), oracle_search(smol, task, m)]
    found += [search(smol, "authors-format", ["studies/tasks/sst2-authors.yaml", "studies/tasks/emoc-authors.yaml"], m)
              for m in MODULES]  # fmt: skip
    found += [search(smol, "authors-5-demos", ["rte", "cb", "copa"], m, "--num_fewshot", "5") for m in MODULES]
    found += [shots_sweep(smol, "sst2", m) for m in MODULES]  # amendment "Finding 3" (2026-12-05)
    found += [cut(search("qwen2.5-coder-1.5b", "algorithm1", ["sst2", "agnews", "rte"], m)) for m in MODULES]
    for model in (smol, "gemma3-270m", "qwen2.5-coder-0.5b"):  # the pre-registered 5 seeds, seeds 0-2's cells reused
        found += [cut(search(model, "algorithm1", TASKS, m, seeds=ALL_SEEDS)) for m in MODULES]
    found += [cut(search(smol, "layer-fixed", LAYER_TASKS, m, "--layer", "-2", seeds=ALL_SEEDS)) for m in MODULES]
    return found


def logged() -> dict[str, tuple[bool, float]]:
    """Per part in the CPU log: whether an invocation of it finished (exit 0), and the CPU seconds of all of them."""
    found: dict[str, tuple[bool, float]] = {}
    if CPU_LOG.exists():
        with CPU_LOG.open() as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                finished, cpu = found.get(row["part"], (False, 0.0))
                found[row["part"]] = (finished or row["exit"] == "0", cpu + float(row["user_s"]) + float(row["sys_s"]))
    return found


def lost(out: Path | None) -> bool:
    """Whether a cell the store's search records name (every cell, in a store without records: a layer sweep's) lacks
    its samples file: a checkout without the ignored, not yet packed files of an earlier machine.  Its parts run
    again (only such cells are scored again); cells no record names, e.g. controls an amendment dropped, do not count."""
    if out is None or not (out / "cells.jsonl").is_file():
        return False
    checkout_on_path()
    from svdicl.experiments.search_output import read_search

    found = store(out, readonly=True)
    cells = {cell.id: cell for cell in found.cells()}
    records = [read_search(path) for path in sorted((out / "search").glob("*.json"))]
    named = {i for record in records for arm in record.get("arms", []) for i in arm["cells"]} if records else set(cells)
    return any(i not in cells or not found.has(cells[i].key) for i in named)


def done(chosen: Sequence[Part]) -> set[str]:
    """The parts an invocation finished, less those whose store lost samples files since."""
    finished = {part for part, (ended, _) in logged().items() if ended}
    broken = {out for out in {p.out for p in chosen if p.name in finished} if lost(out)}  # once per store
    return finished - {p.name for p in chosen if p.out in broken}


def listing(chosen: Sequence[Part]) -> list[str]:
    """A line per part: done, redo (done, but its store lost samples files), started (an invocation stopped before
    the end: its finished cells are kept), todo or cut, with the CPU hours logged for it (an invocation is logged when
    it ends); then the totals."""
    log = logged()
    complete = done(chosen)
    lines = []
    for part in chosen:
        finished, cpu = log.get(part.name, (False, 0.0))
        state = "done" if part.name in complete else "redo" if finished else "started" if part.name in log else "todo"
        state = "cut" if part.cut and state != "done" else state
        hours = f"{cpu / 3600:6.2f} h" if part.name in log else " " * 8
        lines.append(f"{state:8} {hours}  {part.name}")
    names = {part.name for part in chosen}
    total = sum(cpu for name, (_, cpu) in log.items() if name in names)
    finished = len(complete & names)
    cuts = sum(p.cut and p.name not in complete for p in chosen)
    lines.append(f"{finished} of {len(chosen)} parts done, {cuts} cut; {total / 3600:.2f} CPU hours logged ({CPU_LOG.name})")
    return lines


def log(row: dict) -> None:
    new = not CPU_LOG.exists()
    with CPU_LOG.open("a") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row), delimiter="\t", lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _interruptible() -> None:
    """In the child before exec: take SIGINT as Python does by default, even where the runner was started in the
    background by a shell without job control (which sets it to ignored, and a child would inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Running:
    """A part's svdicl command in flight, with what its CPU-time row needs."""

    part: Part
    child: subprocess.Popen
    started: float
    load: float
    workers: int

    @classmethod
    def start(cls, part: Part, workers: int) -> Running:
        argv = [sys.executable, "-m", "svdicl", "-q", *part.argv(), "--workers", str(workers), "--threads-per-worker", "1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        logs = HERE / "logs"
        logs.mkdir(exist_ok=True)
        print(f"study: {part.name}", file=sys.stderr, flush=True)
        with (logs / (part.name.replace("/", "__") + ".log")).open("a") as err:
            err.write(f"# {dt.datetime.now().isoformat(timespec='seconds')} {' '.join(argv)}\n")
            err.flush()
            child = subprocess.Popen(
                ["nice", "-n", "10", *argv], cwd=ROOT, env=env, stdout=err, stderr=err, preexec_fn=_interruptible
            )
        return cls(part, child, time.time(), os.getloadavg()[0], workers)

    def poll(self) -> int | None:
        """The exit code once the command has ended (its CPU time then logged), else None."""
        pid, status, usage = os.wait4(self.child.pid, os.WNOHANG)
        if pid == 0:
            return None
        code = os.waitstatus_to_exitcode(status)
        log({
            "part": self.part.name, "exit": code, "user_s": f"{usage.ru_utime:.1f}", "sys_s": f"{usage.ru_stime:.1f}",
            "wall_s": f"{time.time() - self.started:.1f}", "max_rss_kib": usage.ru_maxrss, "workers": self.workers,
            "load_start": f"{self.load:.2f}", "started": dt.datetime.fromtimestamp(self.started).isoformat(timespec="seconds"),
        })  # fmt: skip
        return code


def not_installed(chosen: Sequence[Part], finished: set[str]) -> list[str]:
    """The pip command of each built-in model that a part still to run needs and this environment lacks, so that
    `run` stops before it starts anything, not at the first part of that model hours later."""
    checkout_on_path()
    from svdicl.aliases import ALIASES, install_command, installed

    models = dict.fromkeys(p.name.split("/")[0] for p in chosen if p.name not in finished)
    return [install_command(ALIASES[m]) for m in models if m in ALIASES and not installed(ALIASES[m])]


def pack(folders: Iterable[Path | None]) -> None:
    """Gzip the finished cells' samples of these stores as the study goes: git ignores the plain files, so a checkout
    carried to a new machine before a commit keeps only the packed ones (an interrupted session lost 4 CPU hours)."""
    for out in dict.fromkeys(folders):
        if out is not None and (out / "cells.jsonl").is_file():
            store(out).pack()


def run_parts(chosen: Sequence[Part], finished: set[str], slots: int, workers: int, deadline: float | None) -> int:
    """Run the parts not yet done, in order, `slots` at a time (a part waits for its `after`); at the deadline stop
    the running ones cleanly (SIGINT: svdicl keeps every finished cell) and start no other.  0, or the first failure's
    exit code (the parts already running then finish).  Packs samples as it goes (`pack`)."""
    todo = [p for p in chosen if p.name not in finished]
    running: list[Running] = []
    failed, stopping, packed = 0, False, time.time()
    while True:
        ended = []
        for job in list(running):
            code = job.poll()
            if code is not None:
                running.remove(job)
                ended.append(job.part.out)
                if code == 0:
                    finished.add(job.part.name)
                else:
                    print(f"study: {job.part.name} stopped (exit {code}); rerun to resume", file=sys.stderr)
                    failed = failed or code
        if ended or time.time() - packed > PACK_S:
            pack([*ended, *(job.part.out for job in running)])
            packed = time.time()
        if not stopping and deadline is not None and time.time() > deadline:
            for job in running:
                job.child.send_signal(signal.SIGINT)
            stopping = True
        while not (failed or stopping) and len(running) < slots:
            ready = next((p for p in todo if not p.after or p.after in finished), None)
            if ready is None:
                break
            todo.remove(ready)
            running.append(Running.start(ready, workers))
        if not running:
            return failed
        time.sleep(POLL_S)


def clock(text: str) -> dt.time:
    """--until's HH:MM, or argparse's one-line error naming the fix."""
    try:
        return dt.time.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time of day; give HH:MM, e.g. 18:30") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["list", "run", "report", "pack"])
    parser.add_argument("--parts", help="comma list of part names (default: all, in order)")
    parser.add_argument("--until", type=clock, help="HH:MM: stop the running parts cleanly then, and start no other")
    parser.add_argument("--slots", type=int, default=2, help="parts run side by side (default: 2)")
    parser.add_argument("--workers", type=int, default=1, help="single-threaded worker processes per part (default: 1)")
    parser.add_argument("--studies", type=Path, default=HERE, help="report: the folder of the stores (default: studies/; a copy)")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "STUDY.md", help="report: the page to rewrite")
    args = parser.parse_args(argv)
    if not os.environ.get("SVDICL_DATA"):
        raise SystemExit("study: set SVDICL_DATA to the folder of <task>/<split>.jsonl files (e.g. ../shared/data)")
    os.environ.setdefault("SVDICL_CACHE", str(ROOT / ".cache" / "svdicl"))
    chosen = parts()
    if args.parts:  # cut parts too, when named
        names = set(args.parts.split(","))
        chosen = [p for p in chosen if p.name in names]
    elif args.command == "run":
        chosen = [p for p in chosen if not p.cut]
    if args.command == "list":
        print("\n".join(listing(chosen)))
        return 0
    if args.command == "pack":
        for cells in sorted(HERE.glob("*/*/cells.jsonl")):
            print(f"{cells.parent.relative_to(HERE)}: {store(cells.parent).pack()} samples files packed")
        return 0
    if args.command == "report":
        sys.path.insert(0, str(HERE))
        from report import write_report

        write_report(args.studies, args.doc)
        return 0
    deadline = None
    if args.until:
        at = dt.datetime.combine(dt.date.today(), args.until)
        deadline = (at if at > dt.datetime.now() else at + dt.timedelta(days=1)).timestamp()
    finished = done(chosen)
    missing = not_installed(chosen, finished)
    if missing:
        raise SystemExit(f"study: {len(missing)} model(s) not installed: run `make models` or {'; '.join(missing)}")
    return run_parts(chosen, finished, args.slots, args.workers, deadline)


if __name__ == "__main__":
    sys.exit(main())
