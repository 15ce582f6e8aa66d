"""Retrieval scores and what chance scores, computed exactly (not sampled)."""

from __future__ import annotations

import numpy as np
import torch

from aether.model.metrics import KS, mean_reciprocal_rank, recall_at_k


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Mean over relevant items of the precision at their score.

    Tied scores are one cut-off: every item scoring at least as high counts as ranked
    above (as scikit-learn's average_precision_score), so ties never help.
    """
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if not relevant.any():
        raise ValueError("average precision needs at least one relevant item")
    order = np.argsort(-scores, kind="stable")
    s, rel = scores[order], relevant[order]
    hits = np.cumsum(rel)
    # the last position of each run of tied scores is where that run's cut-off lies
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    run_end = np.repeat(last, np.diff(np.r_[-1, last]))
    precision = hits[run_end] / (run_end + 1)
    return float(precision[rel].mean())


def chance_recall(n: int, k: int) -> float:
    """Recall@k of a random ranking of n targets: k / n (at most 1)."""
    return min(1.0, k / n)


def chance_mrr(n: int) -> float:
    """Mean reciprocal rank of a random ranking of n targets: H_n / n."""
    return float(np.sum(1.0 / np.arange(1, n + 1)) / n)


def chance_average_precision(n: int, n_relevant: int) -> float:
    """Expected average precision of a uniformly random ranking of n items, n_relevant of them relevant.

    E[AP] = H_n / n + (R - 1) / (n (n - 1)) * (n - H_n); it is 1 / n * H_n for R = 1 and 1 for R = n.
    """
    if not 1 <= n_relevant <= n:
        raise ValueError(f"need 1 <= relevant <= n, got {n_relevant} of {n}")
    harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
    if n == 1:
        return 1.0
    return harmonic / n + (n_relevant - 1) / (n * (n - 1)) * (n - harmonic)


def retrieval_metrics(text_z: np.ndarray, ae_z: np.ndarray) -> dict[str, float]:
    """Text-to-AE and AE-to-text Recall@k and MRR; row i of each is the same POI."""
    t, a = torch.from_numpy(text_z), torch.from_numpy(ae_z)
    out = {}
    for name, q, d in (("t2ae", t, a), ("ae2t", a, t)):
        out.update({f"{name}_r{k}": v for k, v in recall_at_k(q, d, KS).items()})
        out[f"{name}_mrr"] = mean_reciprocal_rank(q, d)
    return out


def chance_retrieval(n: int) -> dict[str, float]:
    out = {}
    for name in ("t2ae", "ae2t"):
        out.update({f"{name}_r{k}": chance_recall(n, k) for k in KS})
        out[f"{name}_mrr"] = chance_mrr(n)
    return out
