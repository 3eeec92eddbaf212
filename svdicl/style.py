"""The plot style every svdicl figure shares (the report's and the theory checks'): colours, markers, rcParams.

A leaf module (matplotlib only), so that report/ and theory/ both draw in one style without importing each other.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import matplotlib
from matplotlib.figure import Figure

# Okabe-Ito (without yellow and black, which are kept for highlights), then two of Tol's: colour-blind safe, paired with markers.
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#882255", "#44AA99")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
BASELINE_COLOR = "0.25"
STYLE = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "legend.fontsize": 7.5,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.3,
    "lines.markersize": 3.5,
    "svg.fonttype": "none",  # text stays text in SVG, editable for a paper
    "svg.hashsalt": "svdicl",  # stable element ids: rerunning gives the same SVG
}


def styled(plot: Callable[..., Figure]) -> Callable[..., Figure]:
    """Draw under svdicl's style (rcParams are read when artists are created)."""

    @functools.wraps(plot)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with matplotlib.rc_context(STYLE):
            return plot(*args, **kwargs)

    return wrapper
