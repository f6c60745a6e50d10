"""Margin heads: margins on the target logit only, AdaFace's adaptive margin and EMA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.training.head import AdaFace, ArcFace, CosFace, build_head


def inputs(batch: int = 6, dim: int = 16, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raw = torch.randn(batch, dim) * 10
    norms = raw.norm(dim=1, keepdim=True)
    return raw / norms, norms, torch.randint(0, classes, (batch,))


class TestMarginsOnTargetOnly:
    @pytest.mark.parametrize("head_type", ["adaface", "arcface", "cosface"])
    def test_non_target_logits_are_scaled_cosines(self, head_type: str) -> None:
        head = build_head(head_type, 16, 10, m=0.4, h=0.333, s=64.0, t_alpha=0.01)
        emb, norms, labels = inputs()
        logits = head(emb, norms, labels)
        cos = head.cosine(emb)
        mask = F.one_hot(labels, 10).bool()
        torch.testing.assert_close(logits[~mask], 64.0 * cos[~mask])
        assert not torch.allclose(logits[mask], 64.0 * cos[mask])

    def test_arcface_adds_angle_and_cosface_subtracts_cosine(self) -> None:
        emb, norms, labels = inputs()
        arc, cosf = ArcFace(16, 10, m=0.5), CosFace(16, 10, m=0.4)
        cosf.kernel.data.copy_(arc.kernel.data)
        cos = arc.cosine(emb).gather(1, labels[:, None])
        expected_arc = 64 * torch.cos((torch.acos(cos) + 0.5).clamp(1e-4, math.pi - 1e-4))
        torch.testing.assert_close(arc(emb, norms, labels).gather(1, labels[:, None]), expected_arc)
        torch.testing.assert_close(cosf(emb, norms, labels).gather(1, labels[:, None]), 64 * (cos - 0.4))


class TestAdaFace:
    def test_h_zero_is_a_fixed_additive_margin(self) -> None:
        emb, norms, labels = inputs()
        ada = AdaFace(16, 10, m=0.4, h=0.0).train()
        # angular margin -m*0 = 0, additive m + m*0 = m; same clamp domain for the comparison
        cos = ada.cosine(emb)
        target = ada(emb, norms, labels).gather(1, labels[:, None])
        expected = 64 * (torch.cos(torch.acos(cos).clamp(1e-3, math.pi - 1e-3)) - 0.4).gather(1, labels[:, None])
        torch.testing.assert_close(target, expected)

    def test_target_logit_follows_the_adaptive_formula(self) -> None:
        emb, norms, labels = inputs()
        head = AdaFace(16, 10, m=0.4, h=0.333, t_alpha=1.0).eval()
        head.batch_mean.fill_(float(norms.mean()))
        head.batch_std.fill_(float(norms.std()))
        z = ((norms.clip(0.001, 100) - head.batch_mean) / (head.batch_std + 1e-3) * 0.333).clip(-1, 1)
        cos = head.cosine(emb).gather(1, labels[:, None])
        theta = (torch.acos(cos) - 0.4 * z).clip(1e-3, math.pi - 1e-3)
        expected = 64 * (torch.cos(theta) - (0.4 + 0.4 * z))
        torch.testing.assert_close(head(emb, norms, labels).gather(1, labels[:, None]), expected)

    def test_scaler_is_clipped_to_unit_interval(self) -> None:
        head = AdaFace(16, 10, h=100.0).eval()
        z = head.margin_scaler(torch.tensor([[0.0], [1e6], [20.0]]))
        assert z.min() >= -1 and z.max() <= 1
        assert float(z[0]) == -1.0 and float(z[1]) == 1.0

    def test_ema_updates_in_training_and_not_in_eval(self) -> None:
        head = AdaFace(16, 10, t_alpha=0.25)
        assert float(head.batch_mean) == 20 and float(head.batch_std) == 100
        norms = torch.tensor([[10.0], [30.0], [200.0]])  # 200 is clipped to 100
        safe = norms.clip(0.001, 100)
        head.train().margin_scaler(norms)
        assert float(head.batch_mean) == pytest.approx(0.25 * float(safe.mean()) + 0.75 * 20)
        assert float(head.batch_std) == pytest.approx(0.25 * float(safe.std()) + 0.75 * 100)
        before = head.batch_mean.clone()
        head.eval().margin_scaler(norms)
        torch.testing.assert_close(head.batch_mean, before)

    def test_gradient_reaches_embeddings_but_not_norms(self) -> None:
        emb, norms, labels = inputs()
        emb.requires_grad_(True)
        norms.requires_grad_(True)
        loss = F.cross_entropy(AdaFace(16, 10).train()(emb, norms, labels), labels)
        loss.backward()
        assert emb.grad is not None and float(emb.grad.abs().sum()) > 0
        assert norms.grad is None


def test_build_head_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="adaface"):
        build_head("sphereface", 16, 10, m=0.4)
