"""The one embedding path: batching, flip test, precision rules and pair scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.embedder import Embedder, Features, score_pairs, select_device, select_precision
from model.net import OAMLNet


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
    return np.stack([base, np.ascontiguousarray(base[:, ::-1]), rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)])


class TestEmbedder:
    def test_batches_give_what_single_faces_give(self, ir18: OAMLNet, crops: np.ndarray) -> None:
        embed = Embedder(ir18, device="cpu", precision="fp32", batch_size=2)
        together = embed(crops)
        alone = Features.cat([embed(c) for c in crops])
        assert together.embedding.shape == (3, 512) and together.occlusion.shape == (3, 7, 7)
        assert together.norm.shape == (3,) and together.feature_map.shape == (3, ir18.feature_channels, 7, 7)
        torch.testing.assert_close(together.embedding, alone.embedding, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(together.feature_map, alone.feature_map, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(together.embedding.norm(dim=1), torch.ones(3))

    def test_flip_test_changes_only_the_embedding_and_makes_it_mirror_invariant(
        self, ir18: OAMLNet, crops: np.ndarray
    ) -> None:
        plain = Embedder(ir18, device="cpu", precision="fp32", flip=False)(crops)
        flipped = Embedder(ir18, device="cpu", precision="fp32", flip=True)(crops)
        torch.testing.assert_close(plain.feature_map, flipped.feature_map)
        torch.testing.assert_close(plain.norm, flipped.norm)
        assert not torch.allclose(plain.embedding, flipped.embedding, atol=1e-3)
        # crops 0 and 1 are mirror images: the fused embedding is the same for both
        assert float(flipped.embedding[0] @ flipped.embedding[1]) > 0.9999
        assert float(plain.embedding[0] @ plain.embedding[1]) < 0.9999

    def test_precision_and_device_rules(self) -> None:
        cpu, cuda = torch.device("cpu"), torch.device("cuda")
        assert select_precision("fp32", cuda) is None
        assert select_precision("auto", cuda) is torch.float16
        assert select_precision("bf16", cpu) is torch.bfloat16
        assert select_precision("auto", cpu) in (None, torch.bfloat16)  # bf16 only where the CPU has it
        with pytest.raises(ValueError):
            select_precision("int8", cpu)
        with pytest.raises(ValueError):
            select_device("tpu")
        assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")

    def test_no_crops_give_empty_features(self, ir18: OAMLNet) -> None:
        empty = Embedder(ir18, device="cpu", precision="fp32")(np.zeros((0, 112, 112, 3), dtype=np.uint8))
        assert len(empty) == 0 and empty.feature_map.shape[1:] == (ir18.feature_channels, 7, 7)


class TestScorePairs:
    def test_scores_match_the_literal_definitions(self, ir18: OAMLNet, crops: np.ndarray) -> None:
        f = Embedder(ir18, device="cpu", precision="fp32")(crops)
        ia, ib = np.array([0, 0, 2]), np.array([1, 2, 1])
        s = score_pairs(ir18.qaconv, f, f, ia, ib, chunk=2)
        assert len(s) == 3
        np.testing.assert_allclose(s.cos, (f.embedding[ia] * f.embedding[ib]).sum(1).numpy(), atol=1e-6)
        with torch.no_grad():
            literal = ir18.qaconv.eval()(
                f.feature_map, f.feature_map, probe_occ=f.occlusion[:, None], gal_occ=f.occlusion[:, None]
            )
        np.testing.assert_allclose(s.qa, literal[ia, ib].numpy(), atol=1e-4)
        np.testing.assert_allclose(s.visibility, torch.minimum(f.visibility[ia], f.visibility[ib]).numpy(), atol=1e-6)

    def test_index_lists_must_pair_up(self, ir18: OAMLNet, crops: np.ndarray) -> None:
        f = Embedder(ir18, device="cpu", precision="fp32")(crops)
        with pytest.raises(ValueError, match="differ in length"):
            score_pairs(ir18.qaconv, f, f, np.array([0, 1]), np.array([0]))

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CPU-held features scored on a CUDA matcher")
    def test_cpu_features_score_on_a_cuda_matcher(self, ir18: OAMLNet, crops: np.ndarray) -> None:
        import copy

        f = Embedder(ir18, device="cpu", precision="fp32")(crops)
        on_cpu = score_pairs(ir18.qaconv, f, f)
        on_gpu = score_pairs(copy.deepcopy(ir18.qaconv).cuda(), f, f)
        np.testing.assert_allclose(on_cpu.qa, on_gpu.qa, atol=1e-3)
