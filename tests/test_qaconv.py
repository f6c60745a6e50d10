"""QAConv: fast gallery path vs the literal definition, occlusion weighting rules, class neighbours."""

from __future__ import annotations

import pytest
import torch

from model.qaconv import QAConv
from model.training.class_memory import ClassMemory


def trained_like(method: str = "scaling") -> QAConv:
    """A QAConv with non-trivial BN statistics and FC weights, in eval mode."""
    qa = QAConv(32, 7, 7, occlusion_method=method)
    with torch.no_grad():
        qa.bn.running_mean.fill_(0.3)
        qa.bn.running_var.fill_(0.05)
        qa.bn.weight.fill_(1.7)
        qa.bn.bias.fill_(-0.2)
        qa.fc.weight.copy_(torch.rand_like(qa.fc.weight))
        qa.fc.bias.fill_(0.4)
        qa.logit_bn.running_mean.fill_(2.0)
        qa.logit_bn.running_var.fill_(9.0)
        qa.logit_bn.weight.fill_(0.8)
        qa.logit_bn.bias.fill_(0.1)
    return qa.eval()


def maps(n: int, c: int = 32) -> torch.Tensor:
    return torch.randn(n, c, 7, 7)


def vis(n: int) -> torch.Tensor:
    return torch.rand(n, 1, 7, 7)


class TestFastPathEqualsDefinition:
    @pytest.mark.parametrize("method", ["scaling", "outer"])
    @pytest.mark.parametrize("chunk", [1, 7, 256])
    def test_match_equals_literal_einsum(self, method: str, chunk: int) -> None:
        qa = trained_like(method)
        probe, gallery, p_occ, g_occ = maps(3), maps(20), vis(3), vis(20)
        with torch.no_grad():
            literal = qa(probe, gallery, probe_occ=p_occ, gal_occ=g_occ)
            fast = qa.match(probe, qa.prepare_gallery(gallery, g_occ), probe_occ=p_occ, chunk_size=chunk)
        assert fast.shape == (3, 20)
        assert float((fast - literal).abs().max()) < 1e-4

    def test_shortlist_indices_select_gallery_columns(self) -> None:
        qa = trained_like()
        probe, gallery = maps(2), maps(30)
        prepared = qa.prepare_gallery(gallery)
        idx = torch.tensor([29, 3, 17, 3])
        full = qa.match(probe, prepared)
        torch.testing.assert_close(qa.match(probe, prepared, indices=idx, chunk_size=3), full[:, idx])

    def test_match_pairs_is_the_diagonal_of_all_pairs(self) -> None:
        qa = trained_like()
        a, b, oa, ob = maps(9), maps(9), vis(9), vis(9)
        with torch.no_grad():
            full = qa(a, b, probe_occ=oa, gal_occ=ob)
            pairs = qa.match_pairs(a, b, oa, ob, chunk_size=4)
        torch.testing.assert_close(pairs, full.diagonal(), rtol=1e-5, atol=1e-5)

    def test_bf16_gallery_stays_close_to_fp32(self) -> None:
        qa = trained_like()
        probe, gallery = maps(1), maps(50)
        ref = qa.match(probe, qa.prepare_gallery(gallery))
        low = qa.match(probe, qa.prepare_gallery(gallery, dtype=torch.bfloat16))
        assert low.dtype == torch.float32
        assert float((low - ref).abs().max()) < 0.02 * float(ref.abs().max())

    def test_folded_tail_equals_the_bn_fc_bn_layers(self) -> None:
        qa = trained_like()
        pooled = torch.rand(5, 98)
        weight, bias = qa.folded_tail()
        with torch.no_grad():
            torch.testing.assert_close(pooled @ weight + bias, qa._tail(pooled), rtol=1e-5, atol=1e-5)


class TestOcclusionWeighting:
    def test_each_location_is_weighted_by_its_own_image(self) -> None:
        qa = trained_like()
        probe, gallery = maps(1), maps(1)
        p_occ = torch.ones(1, 1, 7, 7)
        p_occ[0, 0, 2, 3] = 0.0  # probe location 17 hidden; gallery fully visible
        loc = 2 * 7 + 3

        def score(p: torch.Tensor, g: torch.Tensor) -> float:
            return float(qa.match(p, qa.prepare_gallery(g), probe_occ=p_occ))

        base = score(probe, gallery)
        probe2 = probe.clone()
        probe2[0, :, 2, 3] = torch.randn(32) * 5
        assert score(probe2, gallery) == pytest.approx(base, abs=1e-6)  # hidden probe location is ignored
        gallery2 = gallery.clone()
        gallery2[0, :, 2, 3] = probe[0, :, 1, 1]  # gallery location 17 is visible, so it counts
        assert score(probe, gallery2) != pytest.approx(base, abs=1e-4)
        assert loc == 17

    def test_negative_correlations_cannot_win_by_being_down_weighted(self) -> None:
        qa = trained_like()
        common = torch.randn(32, 1, 1) * 4
        gallery = maps(1) * 0.5 + common
        probe = maps(1)
        # probe location 0 is anti-correlated with every gallery location
        probe[0, :, 0, 0] = -common.reshape(-1)
        g_loc = torch.nn.functional.normalize(gallery[0].flatten(1), dim=0)
        assert bool((probe[0, :, 0, 0] @ g_loc < 0).all())
        visible, hidden = torch.ones(1, 1, 7, 7), torch.ones(1, 1, 7, 7)
        hidden[0, 0, 0, 0] = 0.01
        g = qa.prepare_gallery(gallery)
        full = float(qa.match(probe, g, probe_occ=visible))
        down = float(qa.match(probe, g, probe_occ=hidden))
        assert full == pytest.approx(down, abs=1e-5)

    def test_outer_weights_have_unit_mean(self) -> None:
        qa = trained_like("outer")
        w = qa.visibility_weights(vis(4), 4, torch.device("cpu"))
        torch.testing.assert_close(w.mean(1), torch.ones(4))

    def test_scaling_lowers_scores_of_occluded_faces(self) -> None:
        qa = QAConv(32, 7, 7).eval()  # init tail: mean of maxima, monotonic
        x = maps(1)
        clean = float(qa.match(x, qa.prepare_gallery(x)))
        half = torch.ones(1, 1, 7, 7)
        half[..., 4:, :] = 0.0
        occluded = float(qa.match(x, qa.prepare_gallery(x, half)))
        assert occluded < clean

    def test_unknown_method_is_rejected(self) -> None:
        with pytest.raises(ValueError, match="scaling"):
            QAConv(occlusion_method="swap")


class TestClassMemory:
    """The training-only class maps, scored through the core matcher's grouped path."""

    def memory(self, qa: QAConv) -> ClassMemory:
        return ClassMemory(12, qa.num_features, qa.height, qa.width, k_nearest=3)

    def test_neighbours_are_top_k_by_cosine_excluding_self(self) -> None:
        qa = trained_like()
        mem = self.memory(qa)
        nb = mem.compute_neighbors(chunk_size=5)
        assert nb.shape == (12, 3)
        emb = torch.nn.functional.normalize(qa._locations(mem.embed.detach()).reshape(12, -1), dim=1)
        sim = emb @ emb.T
        sim.fill_diagonal_(float("-inf"))
        expected = sim.topk(3, dim=1).indices
        assert torch.equal(nb.sort(1).values, expected.sort(1).values)
        assert not any(i in nb[i].tolist() for i in range(12))

    def test_each_sample_is_scored_against_its_class_and_its_neighbours(self) -> None:
        qa = trained_like().train()
        mem = self.memory(qa)
        mem.compute_neighbors()
        labels = torch.tensor([0, 5, 11])
        probe = maps(3).requires_grad_(True)
        scores = mem.scores(qa, probe, labels)
        assert scores.shape == (3, 4)
        assert torch.equal(mem.candidates(labels)[:, 0], labels)
        scores.sum().backward()
        assert mem.embed.grad is not None and probe.grad is not None

    def test_grouped_matching_is_the_literal_definition_per_group(self) -> None:
        qa = trained_like()
        probe, groups = maps(2), maps(6).reshape(2, 3, 32, 7, 7)
        grouped = qa.match_grouped(probe, groups)
        for b in range(2):
            torch.testing.assert_close(grouped[b], qa(probe[b : b + 1], groups[b])[0], atol=1e-5, rtol=1e-5)

    def test_serving_files_never_hold_class_maps(self) -> None:
        assert not any("class" in k for k in QAConv(32).state_dict())


class TestExplanation:
    @pytest.mark.parametrize("method", ["scaling", "outer"])
    def test_the_shares_add_up_to_the_score_it_serves(self, method: str) -> None:
        qa = trained_like(method)
        probe, gallery = maps(1)[0], maps(1)[0]
        occ_p, occ_g = torch.rand(7, 7), torch.rand(7, 7)
        why = qa.explain_pair(probe, gallery, occ_p, occ_g)
        with torch.no_grad():
            served = qa.match_pairs(probe[None], gallery[None], occ_p[None, None], occ_g[None, None])[0]
        assert why.score == pytest.approx(float(served), abs=1e-4)
        assert why.probe_shares.shape == (49,) and why.gallery_match.shape == (49,)
        # each location's match is the best weighted correlation on the other face
        p = qa._locations(probe[None])[0] * qa.visibility_weights(occ_p[None], 1, probe.device)[0][:, None]
        g = qa._locations(gallery[None])[0] * qa.visibility_weights(occ_g[None], 1, gallery.device)[0][:, None]
        corr = (p @ g.T).clamp_min(0)
        assert torch.equal(why.probe_match, corr.argmax(dim=1)) and torch.allclose(
            why.probe_similarity, corr.amax(dim=1)
        )
        torch.testing.assert_close(why.probe_weight, qa.visibility_weights(occ_p[None], 1, probe.device)[0])
