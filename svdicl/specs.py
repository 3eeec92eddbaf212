"""An edit as the user writes it, `LAYERS:MODULES:RATE[@CONTROL[:seed=N]]`: parsed, checked and printed.

Plain text and numbers, no torch: the result store reads edits from its keys with these, and
listing a results folder must not load a tensor library (prune.py applies the edits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from svdicl.errors import SvdiclError

TRUNCATE = "truncate"
RANDOM_SUBSPACE = "random-subspace"
MATCHED_NOISE = "matched-noise"
CONTROLS = (RANDOM_SUBSPACE, MATCHED_NOISE)


def check_rate(rate: float) -> float:
    """Return `rate` as a float, or raise if it is not a clipping rate in [0, 1)."""
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise SvdiclError(f"clipping rate {rate!r} is not a number; use a value in [0, 1) such as 0.9") from None
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise SvdiclError(f"clipping rate {value} is outside [0, 1); use e.g. 0.9 to drop 90% of the singular values")
    return value


@dataclass(frozen=True)
class PruneSpec:
    """Layers, modules, one clipping rate and the edit, as the user wrote them.

    `26:mlp:0.95` truncates (the paper's edit); `26:mlp:0.95@random-subspace:seed=3` and
    `26:mlp:0.95@matched-noise` (seed 0) are its null controls at the same rate."""

    layers: str
    modules: str
    rate: float
    control: str = TRUNCATE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.control not in (TRUNCATE, *CONTROLS):
            raise SvdiclError(f"unknown edit {self.control!r}; use {TRUNCATE} or a null control: {', '.join(CONTROLS)}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise SvdiclError(f"control seed {self.seed!r} must be a non-negative integer, e.g. seed=0")
        if self.control == TRUNCATE and self.seed != 0:
            raise SvdiclError("a seed applies only to a null control; write e.g. 26:mlp:0.9@random-subspace:seed=3")

    @classmethod
    def parse(cls, text: str) -> PruneSpec:
        """Read `LAYERS:MODULES:RATE[@CONTROL[:seed=N]]`, e.g. `last2:attn:0.9` or `0-1:re:mlp\\..*:0.5@matched-noise`."""
        head, at, suffix = text.rpartition("@")
        control, seed = (TRUNCATE, 0) if not at else _control(suffix, text)
        spec = head if at else text
        layers, sep, rest = spec.partition(":")
        modules, sep2, rate = rest.rpartition(":")
        if not (sep and sep2 and layers and modules and rate):
            raise SvdiclError(f"cannot read prune spec {text!r}; write LAYERS:MODULES:RATE, e.g. 26:mlp:0.95")
        return cls(layers=layers, modules=modules, rate=check_rate(rate), control=control, seed=seed)

    def __str__(self) -> str:
        edit = f"{self.layers}:{self.modules}:{self.rate:g}"
        return edit if self.control == TRUNCATE else f"{edit}@{self.control}:seed={self.seed}"


def _control(suffix: str, text: str) -> tuple[str, int]:
    """`random-subspace` or `matched-noise:seed=3` -> (control, seed)."""
    control, colon, seed = suffix.partition(":")
    if control not in CONTROLS:
        choices = " or ".join(f"@{c}" for c in CONTROLS)
        raise SvdiclError(f"unknown null control {control!r} in {text!r}; use {choices}, e.g. 26:mlp:0.9@{CONTROLS[0]}")
    if not colon:
        return control, 0
    name, _, value = seed.partition("=")
    if name != "seed" or not value.isdigit():
        raise SvdiclError(f"cannot read the control seed in {text!r}; write @{control}:seed=N with N >= 0")
    return control, int(value)
