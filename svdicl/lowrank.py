"""A rank-r linear layer stored as two thin matrices, the factorised form of a pruned weight.

A matrix truncated to rank r equals B @ A with B = U_r S_r (m x r) and A = Vh_r (r x n).
Storing B and A takes r (m + n) numbers instead of m n, a saving exactly when
r < m n / (m + n); the forward pass costs the same ratio in multiply-adds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowRankLinear(nn.Module):
    """y = x A^T B^T + bias: a drop-in for nn.Linear (and GPT-2's Conv1D) of rank `rank`.

    Weights use the logical (out, in) orientation whatever the replaced module stored, so a
    Conv1D (which keeps W as in x out) becomes the same module as a Linear.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight_a = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))  # A = Vh_r
        self.weight_b = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))  # B = U_r S_r
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, b: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None) -> LowRankLinear:
        """The module computing x @ (b @ a)^T + bias, holding copies of the given tensors."""
        module = cls(a.shape[1], b.shape[0], a.shape[0], bias is not None, dtype=a.dtype, device=a.device)
        with torch.no_grad():
            module.weight_a.copy_(a)
            module.weight_b.copy_(b)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_a), self.weight_b, self.bias)

    def dense(self) -> torch.Tensor:
        """The (out, in) matrix B @ A this module applies."""
        return self.weight_b @ self.weight_a

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


def saves_parameters(shape: tuple[int, int], rank: int) -> bool:
    """Whether two thin factors are smaller than the dense matrix: r (m + n) < m n."""
    m, n = shape
    return rank * (m + n) < m * n
