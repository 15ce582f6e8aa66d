"""The AETHER loss: L = lambda * L_AE-AE + (1 - lambda) * L_AE-POI, both symmetric InfoNCE."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned unit vectors: row i of `a` matches row i of `b`."""
    logits = logit_scale * a @ b.T
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class AetherLoss(nn.Module):
    """Weights the AE-AE (base vs augmented view) and AE-POI (base view vs text) terms.

    Each term has its own temperature (the reference's tau_img and tau_xt), held by the model
    as a log logit scale; here both are clamped so a learnable temperature cannot fall below
    `min_temperature`.
    """

    def __init__(self, lam: float = 0.2, min_temperature: float = 0.01):
        super().__init__()
        self.lam = lam
        self.max_log_logit_scale = math.log(1.0 / min_temperature)

    def logit_scale(self, log_logit_scale: torch.Tensor) -> torch.Tensor:
        return log_logit_scale.clamp(max=self.max_log_logit_scale).exp()

    def forward(
        self,
        base: torch.Tensor,
        aug: torch.Tensor,
        text: torch.Tensor,
        log_scale_ae_poi: torch.Tensor,
        log_scale_ae_ae: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        ae_ae = info_nce(base, aug, self.logit_scale(log_scale_ae_ae))
        ae_poi = info_nce(base, text, self.logit_scale(log_scale_ae_poi))
        total = self.lam * ae_ae + (1.0 - self.lam) * ae_poi
        return total, {"loss": total.item(), "ae_ae": ae_ae.item(), "ae_poi": ae_poi.item()}
