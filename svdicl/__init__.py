"""svdicl: SVD-based weight pruning for better in-context learning (Yao et al., NeurIPS 2024).

Pipeline: models (load) -> targets/prune (truncate) -> tasks/prompts (ICL prompts)
-> scoring (label log-likelihoods) -> experiments (sweeps, Algorithm 1) -> report.
"""

from svdicl.errors import SvdiclError
from svdicl.export import load_pruned, save_pruned
from svdicl.lowrank import LowRankLinear
from svdicl.models import ALIASES, LoadedModel, load_model
from svdicl.prune import EditRecord, MatrixEdit, PruneSpec, prune, pruned
from svdicl.svd import Factors, kept_rank, svd_factors
from svdicl.targets import Target, resolve

__all__ = [
    "ALIASES",
    "EditRecord",
    "Factors",
    "LoadedModel",
    "LowRankLinear",
    "MatrixEdit",
    "PruneSpec",
    "SvdiclError",
    "Target",
    "kept_rank",
    "load_model",
    "load_pruned",
    "prune",
    "pruned",
    "resolve",
    "save_pruned",
    "svd_factors",
]
__version__ = "0.1.0"
