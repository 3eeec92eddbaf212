"""svdicl: SVD-based weight pruning for better in-context learning (Yao et al., NeurIPS 2024).

Pipeline: models (load) -> targets/prune (truncate) -> tasks/prompts (ICL prompts)
-> scoring (label log-likelihoods) -> experiments (sweeps, Algorithm 1) -> report.

The names below are the public API (docs/api.md): `evaluate` and `search` run what `svdicl eval`
and `svdicl search` run and return typed results; `wrap` takes a model and tokenizer already in
memory; `load_model`, `pruned`/`prune` and `save_pruned`/`load_pruned` are the pruning core.
"""

from svdicl.aliases import ALIASES
from svdicl.api import SearchResult, evaluate, search
from svdicl.errors import SvdiclError
from svdicl.experiments.eval_result import Evaluation, SeedEvaluation
from svdicl.export import load_any as load_model
from svdicl.export import load_pruned, save_pruned
from svdicl.lowrank import LowRankLinear
from svdicl.models import LoadedModel, wrap
from svdicl.prune import EditRecord, MatrixEdit, prune, pruned
from svdicl.specs import PruneSpec
from svdicl.svd import Factors, kept_rank, svd_factors
from svdicl.targets import Target, resolve

__all__ = [
    "ALIASES",
    "EditRecord",
    "Evaluation",
    "Factors",
    "LoadedModel",
    "LowRankLinear",
    "MatrixEdit",
    "PruneSpec",
    "SearchResult",
    "SeedEvaluation",
    "SvdiclError",
    "Target",
    "evaluate",
    "kept_rank",
    "load_model",
    "load_pruned",
    "prune",
    "pruned",
    "resolve",
    "save_pruned",
    "search",
    "svd_factors",
    "wrap",
]
__version__ = "0.1.0"
