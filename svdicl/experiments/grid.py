"""What a sweep covers: the grid of tasks x shots x seeds x layers x modules x rates, and the
parsers of the list flags (`--rates 0,0.5`, `--layers first2,last2`, `--modules q+k`) it is read from.

A line is one (layers, modules) curve of the grid: `first2,last2` sweeps four layers alone,
`0+1` prunes two layers together as one line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from svdicl.errors import SvdiclError
from svdicl.experiments.runs import SAMPLINGS
from svdicl.specs import check_rate
from svdicl.targets import parse_layers

PAPER_RATES = (0.0, 0.1, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995)
SPLITS = ("validation", "test")
TOGETHER = "+"  # `0+1` in --layers, `q+k` in --modules: one line pruned together


def parse_list(value: str | int | float | Iterable[str | int | float] | None) -> list[str]:
    """`"a,b"`, `["a", "b"]` or a scalar as a list of stripped, non-empty strings."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int | float) else list(value)
    return [str(item).strip() for item in items if str(item).strip()]


def parse_rates(value: str | Iterable[float | str]) -> tuple[float, ...]:
    """Clipping rates from `0,0.5,0.9` (or a list), each in [0, 1); sorted, without repeats."""
    rates = [check_rate(text) for text in parse_list(value)]
    if not rates:
        raise SvdiclError("no clipping rates given; use e.g. --rates 0,0.1,0.5,0.75,0.9,0.95,0.99,0.995")
    return tuple(sorted(set(rates)))


def parse_ints(value: str | Iterable[int | str], name: str, minimum: int = 0) -> tuple[int, ...]:
    """Integers from `0,4,10` (or a list), each >= minimum, in the order given, without repeats."""
    numbers = []
    for text in parse_list(value):
        try:
            number = int(text)
        except ValueError:
            raise SvdiclError(f"{name} {text!r} is not an integer; write e.g. {name} 0,1,2") from None
        if number < minimum:
            raise SvdiclError(f"{name} must be at least {minimum}, got {number}")
        numbers.append(number)
    if not numbers:
        raise SvdiclError(f"no values given for {name}")
    return tuple(dict.fromkeys(numbers))


def layer_sets(specs: str | Iterable[str], num_layers: int) -> list[str]:
    """The layer sets a sweep draws one line each for, as non-negative indices.

    `first2,last2` on 30 layers is four lines (0, 1, 28, 29), each layer pruned alone; `+` joins
    specs into one set pruned together: `0+1` or `first2+last2` is one line.
    """
    sets: list[str] = []
    for item in parse_list(specs):
        if TOGETHER in item:
            layers = sorted({i for part in item.split(TOGETHER) if part.strip() for i in parse_layers(part.strip(), num_layers)})
            sets.append(",".join(map(str, layers)))
        else:
            sets += [str(i) for i in parse_layers(item, num_layers)]
    if not sets:
        raise SvdiclError("no layers given; use e.g. --layers first2,last2 (each swept alone) or 0+1 (pruned together)")
    return list(dict.fromkeys(sets))


def module_sets(specs: str | Iterable[str]) -> list[str]:
    """Module specs swept one at a time: `mlp,attn` is two lines, `q+k` one line with both matrices."""
    sets = [item.replace(TOGETHER, ",") for item in parse_list(specs)]
    if not sets:
        raise SvdiclError("no modules given; use e.g. --modules mlp,attn (each alone) or q+k (pruned together)")
    if any(spec.startswith("re:") and "," in spec for spec in sets):
        raise SvdiclError("a re:<regex> module spec cannot be joined with +; write one regex that matches everything")
    return list(dict.fromkeys(sets))


@dataclass(frozen=True)
class SweepGrid:
    """What a sweep evaluates.  `shots` counts demonstrations per class (None: the task's paper default), or
    in all with `shots_total` (lm-eval's --num_fewshot; each task draws them as balanced as they allow,
    `svdicl.prompts.shot_counts`)."""

    tasks: tuple[str, ...]
    layers: tuple[str, ...] = ("first2", "last2")
    modules: tuple[str, ...] = ("mlp", "attn")
    rates: tuple[float, ...] = PAPER_RATES
    shots: tuple[int | None, ...] = (None,)
    seeds: tuple[int, ...] = (0,)
    split: str = "test"
    limit: int | None = None
    shots_total: bool = False
    sampling: str = "random"  # how --limit draws its subset: seeded at random, or "balanced" per class

    def __post_init__(self) -> None:
        if not self.tasks:
            raise SvdiclError("no tasks given; use e.g. --tasks sst2,rte,copa")
        if self.split not in SPLITS:
            raise SvdiclError(f"unknown split {self.split!r}; use validation or test")
        if self.limit is not None and self.limit < 1:
            raise SvdiclError(f"--limit must be at least 1, got {self.limit}")
        if self.sampling not in SAMPLINGS:
            raise SvdiclError(f"unknown sampling {self.sampling!r}; use {' or '.join(SAMPLINGS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise SvdiclError("give at least one seed, each once")
        object.__setattr__(self, "rates", parse_rates(self.rates))
        if any(s is not None and s < 0 for s in self.shots):
            raise SvdiclError(f"shots must be >= 0 (demonstrations {'in all' if self.shots_total else 'per class'})")

    @property
    def run_limit(self) -> int | None:
        """The limit each run applies: None for "balanced", whose subset replaces the split (`sweep.grid_splits`)."""
        return None if self.sampling == "balanced" else self.limit
