"""The AETHER model: two projectors into one L2-normalised latent space.

Two architectures (config model.arch):
- `aether`, the paper's (Liu et al.; the reference code's AEProj and TextProj): the AE side is a
  ReLU MLP 64 -> 256 -> d plus a gated linear shortcut, normalised, then a GELU post-MLP
  d -> hidden -> d, normalised; the text side is one linear map. State keys are the reference's,
  so its checkpoints load as they are.
- `mlp`: one GELU MLP in -> hidden -> d on each side (this project's first architecture).

Every projector has `forward` (unit vectors), `head` (the same before the last normalisation:
what bf16/fp16 inference computes under autocast) and, for the AE side, `forward_into`: a fused
fp32 inference path writing into buffers from `workspace`, reused batch after batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aether.config.schema import ARCHS

AE_INNER_DIM = 256  # the paper's AE main branch is 64 -> 256 -> d, whatever model.hidden_dim is
GATE_INIT = -4.0  # the shortcut starts at sigmoid(-4) = 0.018 of its weight


def _normalize_(x: torch.Tensor) -> torch.Tensor:
    return x.div_(torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12))


def gelu_mlp(in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Linear, GELU, Dropout, Linear: the mlp projectors, and the paper's AE post-MLP (keys .0 and .3)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim))


def _gelu_mlp_into(mlp: nn.Sequential, x: torch.Tensor, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`mlp` (a `gelu_mlp`) in inference on x into `out`, through the `hidden` buffer: bias and GELU in place."""
    first, gelu, _, second = mlp
    torch.addmm(first.bias, x, first.weight.T, out=hidden)
    torch.ops.aten.gelu_(hidden, approximate=gelu.approximate)
    return torch.addmm(second.bias, hidden, second.weight.T, out=out)


class MLPProjector(nn.Module):
    """Linear, GELU, dropout, linear; output unit length (model.arch: mlp, both sides)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = gelu_mlp(in_dim, hidden_dim, out_dim, dropout)
        self.in_dim, self.out_dim = in_dim, out_dim

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(x), dim=-1)

    def workspace(self, n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The buffers `forward_into` needs for batches of up to `n` vectors."""
        return (torch.empty((n, self.net[0].out_features), device=device),)

    @torch.no_grad()
    def forward_into(self, x: torch.Tensor, workspace: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        """`forward` for inference (dropout off, no autograd) into `out` (N, out_dim), using the
        first N rows of `workspace`: bias and GELU in place, no temporaries."""
        return _normalize_(_gelu_mlp_into(self.net, x, workspace[0][: len(x)], out))


class AEProjector(nn.Module):
    """The paper's AE projector (model.arch: aether), with the reference's state keys.

    z = normalise(proj(x) + sigmoid(gate) * shortcut(x)), proj = Linear(in, 256), ReLU,
    Linear(256, d); without a gate (`gate=False`, as in reference checkpoints that have none) the
    shortcut is added unscaled, and when in == d the shortcut is the identity, as there. The
    output is normalise(post_mlp(z)), post_mlp = Linear(d, hidden), GELU, Dropout, Linear(hidden, d).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0, gate: bool = True):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(in_dim, AE_INNER_DIM), nn.ReLU(), nn.Linear(AE_INNER_DIM, out_dim))
        self.shortcut = nn.Linear(in_dim, out_dim) if in_dim != out_dim else nn.Identity()
        if gate:
            self.gate = nn.Parameter(torch.tensor([GATE_INIT]))
        else:
            self.register_parameter("gate", None)
        self.post_mlp = gelu_mlp(out_dim, hidden_dim, out_dim, dropout)
        self.in_dim, self.out_dim = in_dim, out_dim

    def _shortcut_weight(self) -> torch.Tensor:
        return torch.sigmoid(self.gate) if self.gate is not None else torch.ones((), device=self.proj[0].weight.device)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        z = self.proj(x) + self._shortcut_weight() * self.shortcut(x)
        return self.post_mlp(F.normalize(z, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(x), dim=-1)

    def workspace(self, n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The buffers `forward_into` needs for batches of up to `n` vectors."""
        return (
            torch.empty((n, AE_INNER_DIM), device=device),
            torch.empty((n, self.out_dim), device=device),
            torch.empty((n, self.post_mlp[0].out_features), device=device),
        )

    @torch.no_grad()
    def forward_into(self, x: torch.Tensor, workspace: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        """`forward` for inference (dropout off, no autograd) into `out` (N, out_dim), using the
        first N rows of `workspace`: the shortcut is accumulated into the main branch's product,
        biases, ReLU, GELU and both normalisations in place (an identity shortcut, when in == d,
        takes one temporary)."""
        first, _, second = self.proj
        n = len(x)
        inner, z, hidden = (w[:n] for w in workspace)
        s = self._shortcut_weight()
        torch.addmm(first.bias, x, first.weight.T, out=inner)
        inner.relu_()
        torch.addmm(second.bias, inner, second.weight.T, out=z)
        if isinstance(self.shortcut, nn.Identity):
            z.add_(x * s)
        else:
            z.addmm_(x, self.shortcut.weight.T * s).add_(self.shortcut.bias * s)
        return _normalize_(_gelu_mlp_into(self.post_mlp, _normalize_(z), hidden, out))


class TextProjector(nn.Module):
    """The paper's text projector (model.arch: aether): one linear map, output unit length."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.in_dim, self.out_dim = in_dim, out_dim

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(x), dim=-1)


class AetherModel(nn.Module):
    """AE projector (AlphaEarth -> latent), text projector (frozen text embedding -> latent)
    and the two contrastive temperatures, kept as log logit scales: `log_logit_scale` for the
    AE-POI term, `log_logit_scale_ae_ae` for the AE-AE term (the reference's tau_xt and tau_img)."""

    def __init__(
        self,
        n_bands: int,
        text_dim: int,
        latent_dim: int = 128,
        hidden_dim: int = 256,
        dropout: float = 0.0,
        temperature: float = 0.07,
        learn_temperature: bool = False,
        arch: str = "aether",
        gate: bool = True,
        ae_ae_temperature: float | None = None,
    ):
        super().__init__()
        if arch == "aether":
            self.ae = AEProjector(n_bands, hidden_dim, latent_dim, dropout, gate)
            self.text = TextProjector(text_dim, latent_dim)
        elif arch == "mlp":
            self.ae = MLPProjector(n_bands, hidden_dim, latent_dim, dropout)
            self.text = MLPProjector(text_dim, hidden_dim, latent_dim, dropout)
        else:
            raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHS)}")
        self.arch = arch
        tau_ae = temperature if ae_ae_temperature is None else ae_ae_temperature
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature)
        self.log_logit_scale_ae_ae = nn.Parameter(torch.tensor(math.log(1.0 / tau_ae)), requires_grad=learn_temperature)

    @classmethod
    def from_config(cls, cfg, n_bands: int, text_dim: int) -> AetherModel:
        """The model a Config (aether.config.schema) describes, for `n_bands` inputs and `text_dim` texts."""
        m, lo = cfg.model, cfg.loss
        return cls(
            n_bands,
            text_dim,
            m.latent_dim,
            m.hidden_dim,
            m.dropout,
            lo.temperature,
            lo.learn_temperature,
            m.arch,
            m.gate,
            lo.ae_ae_temperature,
        )

    def forward(self, base: torch.Tensor, aug: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Latent vectors of a batch's base views, augmented views and texts (one call, as DDP wants)."""
        return self.ae(base), self.ae(aug), self.text(text)


def untrained_model(n_bands: int, text_dim: int, cfg, seed: int) -> AetherModel:
    """A projector pair of the checkpoint's shape, initialised as `train` initialises it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AetherModel.from_config(cfg, n_bands, text_dim)
    return model.eval()
