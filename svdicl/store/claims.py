"""Per-cell claims: which process computes a cell right now.

A claim is an exclusive flock on DIR/claims/<cell id>.lock.  The kernel drops it when its process
ends, however it ends (kill -9 included), so a killed run's claims are never stale: the next run
that reaches the cell takes it.  Without fcntl (Windows) there are no claims and one writer per
folder is assumed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per folder there
    fcntl = None

CLAIMS_DIR = "claims"  # <id>.lock: flock-ed while a process computes that cell


class Claims:
    """The claims this process holds in one store folder, by cell id."""

    def __init__(self, root: Path) -> None:
        self.folder = root / CLAIMS_DIR
        self._held: dict[str, int] = {}  # cell id -> descriptor of its flock-ed claim file

    def holds(self, cell_id: str) -> bool:
        """Whether this process holds the cell's claim."""
        return cell_id in self._held

    def take(self, cell_id: str) -> bool:
        """Claim the cell without waiting: False when another live process holds it (always True without fcntl)."""
        if fcntl is None or cell_id in self._held:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(cell_id), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._held[cell_id] = fd
        return True

    def wait(self, cell_id: str) -> None:
        """Block while another process holds the cell's claim (returns at once when none does)."""
        path = self._path(cell_id)
        if fcntl is not None and cell_id not in self._held and path.exists():
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(path, os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                finally:
                    os.close(fd)

    def release(self, cell_ids: Iterable[str] | None = None) -> None:
        """Let go of claims (all of them when `cell_ids` is None), their cells not stored."""
        for cell_id in list(self._held) if cell_ids is None else [i for i in cell_ids if i in self._held]:
            os.close(self._held.pop(cell_id))

    def finish(self, cell_id: str) -> None:
        """The cell is stored: remove its claim file (a later claimer sees the cell first), then let go."""
        if cell_id in self._held:
            self._path(cell_id).unlink(missing_ok=True)
            os.close(self._held.pop(cell_id))

    def _path(self, cell_id: str) -> Path:
        return self.folder / f"{cell_id}.lock"
