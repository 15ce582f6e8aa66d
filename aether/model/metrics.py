"""Cross-modal retrieval metrics."""

from __future__ import annotations

import torch

KS = (1, 5, 10)  # the k of Recall@k that training logs and evaluation reports


def recall_at_k(query: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries whose own row of `target` (row i for query i) ranks in the top k.

    Rank is 1 + the number of targets scoring strictly higher than the true one, so
    ties count in the query's favour.
    """
    sims = query @ target.T
    true = sims.diagonal().unsqueeze(1)
    rank = 1 + (sims > true).sum(dim=1)
    return {k: float((rank <= k).float().mean()) for k in ks}


def mean_reciprocal_rank(query: torch.Tensor, target: torch.Tensor) -> float:
    sims = query @ target.T
    rank = 1 + (sims > sims.diagonal().unsqueeze(1)).sum(dim=1)
    return float((1.0 / rank.float()).mean())
