"""Evaluated cells on disk: resumable, crash-safe, and keyed by the exact weights and edit.

One store per output folder:

    DIR/cells.jsonl                          one JSON line per finished cell (append-only)
    DIR/samples/<task>/<split>-...-<id>.jsonl  that cell's per-example predictions

A cell is one evaluation: (model fingerprint, task, split, shots (+ extra), seed, edit, limit, scoring
options, data digest).  Writing a cell first puts its samples file in place (temp name, fsync, atomic
rename), then appends its line with a single write and fsyncs it, all under an exclusive lock
on cells.jsonl.  So a kill -9 at any moment loses at most the cell in flight: a torn last line
is cut off (with a warning) the next time the store is opened, and a line never points at a
samples file that is not there.  A bad line anywhere else is refused, never silently dropped.
The edit is part of the key, so a pruned model never reads the unpruned model's answers; the
data digest is, so a cell scored on other rows or under another task definition (same task
name) is never reused: such cells stay in the store, apart (`Store.other_data`).

    cells.py    CellKey, Result, Cell: what a cell is (no files)
    claims.py   per-cell flock claims: which process computes a cell now
    folder.py   Store: cells.jsonl and the samples files of one folder
"""

from svdicl.store.cells import FORMAT, UNPRUNED, Cell, CellKey, Result, canonical_edit, shots_label
from svdicl.store.claims import CLAIMS_DIR
from svdicl.store.folder import CELLS_FILE, SAMPLES_DIR, Store

__all__ = [
    "CELLS_FILE",
    "CLAIMS_DIR",
    "FORMAT",
    "SAMPLES_DIR",
    "UNPRUNED",
    "Cell",
    "CellKey",
    "Result",
    "Store",
    "canonical_edit",
    "shots_label",
]
