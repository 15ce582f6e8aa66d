import math

import pytest
import torch
import torch.nn.functional as F

from aether.model.architectures import AetherModel
from aether.model.loss import AetherLoss, info_nce
from aether.model.metrics import mean_reciprocal_rank, recall_at_k


def manual_info_nce(a, b, scale):
    """Direct transcription of symmetric InfoNCE: -log softmax of the matching pair, both ways."""
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * float(a[i] @ b[j]) for j in range(n)]
        col = [scale * float(a[j] @ b[i]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        total += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    return total / (2 * n)


def test_info_nce_matches_manual():
    torch.manual_seed(0)
    a = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)
    got = float(info_nce(a, b, torch.tensor(1 / 0.07, dtype=torch.float64)))
    assert abs(got - manual_info_nce(a, b, 1 / 0.07)) < 1e-9


def test_perfect_alignment_gives_low_loss():
    x = torch.eye(8)
    assert float(info_nce(x, x, torch.tensor(100.0))) < 1e-6
    shuffled = x[torch.randperm(8, generator=torch.Generator().manual_seed(1))]
    assert float(info_nce(x, shuffled, torch.tensor(100.0))) > 10


def test_lambda_weights_the_two_terms():
    torch.manual_seed(1)
    base, aug, text = (F.normalize(torch.randn(5, 4), dim=1) for _ in range(3))
    log_scale = torch.tensor(math.log(1 / 0.07))
    for lam in (0.0, 0.2, 1.0):
        total, parts = AetherLoss(lam)(base, aug, text, log_scale, log_scale)
        assert abs(float(total) - (lam * parts["ae_ae"] + (1 - lam) * parts["ae_poi"])) < 1e-5
    _, parts = AetherLoss(0.5)(base, aug, text, log_scale, log_scale)
    assert abs(parts["ae_ae"] - float(info_nce(base, aug, log_scale.exp()))) < 1e-6
    assert abs(parts["ae_poi"] - float(info_nce(base, text, log_scale.exp()))) < 1e-6


def test_each_term_has_its_own_temperature():
    """The reference's tau_xt (AE-POI) and tau_img (AE-AE), checked against the manual sum."""
    torch.manual_seed(2)
    base, aug, text = (F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1) for _ in range(3))
    tau_poi, tau_ae = 0.07, 0.2
    total, parts = AetherLoss(0.3)(
        base,
        aug,
        text,
        torch.tensor(math.log(1 / tau_poi), dtype=torch.float64),
        torch.tensor(math.log(1 / tau_ae), dtype=torch.float64),
    )
    want = 0.3 * manual_info_nce(base, aug, 1 / tau_ae) + 0.7 * manual_info_nce(base, text, 1 / tau_poi)
    assert abs(float(total) - want) < 1e-9
    model = AetherModel(64, 384, temperature=tau_poi, ae_ae_temperature=tau_ae)
    assert abs(float(model.log_logit_scale.exp()) - 1 / tau_poi) < 1e-4
    assert abs(float(model.log_logit_scale_ae_ae.exp()) - 1 / tau_ae) < 1e-4
    assert abs(float(AetherModel(64, 384, temperature=0.05).log_logit_scale_ae_ae.exp()) - 20) < 1e-4  # null: same


def test_learnable_temperature_is_clamped():
    loss = AetherLoss(0.2, min_temperature=0.05)
    assert abs(float(loss.logit_scale(torch.tensor(10.0))) - 20.0) < 1e-4  # exp(10) clamped to 1/0.05
    model = AetherModel(64, 384, learn_temperature=True)
    assert model.log_logit_scale.requires_grad
    assert not AetherModel(64, 384).log_logit_scale.requires_grad


@pytest.mark.parametrize("arch", ["aether", "mlp"])
def test_projector_outputs_unit_vectors(arch):
    model = AetherModel(64, 384, latent_dim=16, hidden_dim=32, arch=arch)
    out = model.ae(torch.randn(10, 64))
    assert out.shape == (10, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(model.text(torch.randn(3, 384)).norm(dim=1), torch.ones(3))


def test_weights_of_each_architecture():
    """The paper's projectors have 123,777 (AE, with the gate) and 49,280 (text, 384 -> 128) weights;
    the MLP's AE side 49,536."""

    def count(module):
        return sum(p.numel() for p in module.parameters())

    aether, mlp = AetherModel(64, 384), AetherModel(64, 384, arch="mlp")
    assert count(aether.ae) == 123_777 and count(aether.text) == 384 * 128 + 128
    assert count(AetherModel(64, 384, gate=False).ae) == 123_776
    assert count(mlp.ae) == 49_536
    assert float(torch.sigmoid(aether.ae.gate.detach())) == pytest.approx(1 / (1 + math.exp(4)))


def test_recall_and_mrr_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    # query 0: its target scores 0, target 2 scores 1 -> rank 2
    # query 1: its target ties with target 0 at 1 -> rank 1 (ties count for the query)
    # query 2: its target scores 0.6, targets 0 and 1 score 0.8 -> rank 3
    r = recall_at_k(q, t, (1, 2, 3))
    assert r == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
    assert abs(mean_reciprocal_rank(q, t) - (1 / 2 + 1 + 1 / 3) / 3) < 1e-6
