"""IR backbones: topology, AdaFace-compatible names and sizes, forward API, occlusion head, NaN guard."""

from __future__ import annotations

import pytest
import torch

from model.checkpoint import HEAD_PREFIXES
from model.net import (
    ARCHITECTURES,
    BasicBlockIRSE,
    BottleneckIR,
    BottleneckIRSE,
    OAMLNet,
    OcclusionHead,
    build_model,
)


def backbone_state(model: OAMLNet) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIXES)}


def backbone_params(model: OAMLNet) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(HEAD_PREFIXES))


class TestTopology:
    @pytest.mark.parametrize(
        ("name", "params_m", "keys"),
        [("ir_18", 24.02, 179), ("ir_34", 34.13, 323), ("ir_50", 43.59, 467), ("ir_101", 65.15, 917)],
    )
    def test_parameter_count_and_key_count_match_adaface(self, name: str, params_m: float, keys: int) -> None:
        model = build_model(name)
        assert backbone_params(model) / 1e6 == pytest.approx(params_m, abs=0.01)
        assert len(backbone_state(model)) == keys

    @pytest.mark.parametrize(("name", "keys"), [("ir_se_18", 195), ("ir_se_50", 515)])
    def test_se_variants_add_two_gate_convs_per_unit(self, name: str, keys: int) -> None:
        model = build_model(name)
        assert len(backbone_state(model)) == keys
        assert "body.0.res_layer.se_block.fc1.weight" in model.state_dict()
        assert model.state_dict()["body.0.res_layer.se_block.fc1.weight"].shape == (4, 64, 1, 1)

    def test_adaface_key_names_and_shortcut_placement(self) -> None:
        sd = build_model("ir_50").state_dict()
        for key in (
            "input_layer.0.weight",
            "input_layer.2.weight",
            "body.0.res_layer.4.weight",
            "output_layer.3.weight",
            "output_layer.4.running_mean",
        ):
            assert key in sd
        # projection shortcuts only where the width changes: first unit of stages 2, 3, 4
        projected = sorted({int(k.split(".")[1]) for k in sd if ".shortcut_layer.0.weight" in k})
        assert projected == [3, 7, 21]
        assert sd["output_layer.3.weight"].shape == (512, 512 * 7 * 7)
        assert "output_layer.4.weight" not in sd  # BatchNorm1d(affine=False)

    def test_stride_is_on_the_second_conv(self) -> None:
        unit = build_model("ir_18").body[0]
        assert unit.res_layer[1].stride == (1, 1)
        assert unit.res_layer[4].stride == (2, 2)
        assert isinstance(unit.shortcut_layer, torch.nn.MaxPool2d)

    def test_bottleneck_units_change_width_and_stride(self) -> None:
        x = torch.randn(2, 64, 28, 28)
        assert BottleneckIR(64, 256, 2)(x).shape == (2, 256, 14, 14)
        se = BottleneckIRSE(256, 256, 1)
        assert se(torch.randn(2, 256, 14, 14)).shape == (2, 256, 14, 14)
        assert hasattr(se.res_layer, "se_block")
        assert ARCHITECTURES["ir_152"].feature_channels == 2048
        assert ARCHITECTURES["ir_se_50"].block is BasicBlockIRSE

    def test_unknown_architecture_names_the_valid_ones(self) -> None:
        with pytest.raises(ValueError, match="ir_50"):
            build_model("ir_77")


class TestForward:
    def test_outputs_have_documented_shapes_and_ranges(self, ir18: OAMLNet) -> None:
        with torch.no_grad():
            emb, norm, occ = ir18(torch.randn(3, 3, 112, 112))
        assert emb.shape == (3, 512) and norm.shape == (3, 1) and occ.shape == (3, 1, 7, 7)
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
        assert bool(((occ >= 0) & (occ <= 1)).all())

    def test_forward_all_runs_the_body_once_and_matches_the_parts(self, ir18: OAMLNet) -> None:
        x = torch.randn(2, 3, 112, 112)
        calls = []
        handle = ir18.body[0].register_forward_hook(lambda *_: calls.append(1))
        try:
            with torch.no_grad():
                out = ir18.forward_all(x)
        finally:
            handle.remove()
        assert len(calls) == 1
        assert out.feature_map.shape == (2, 512, 7, 7)
        with torch.no_grad():
            torch.testing.assert_close(ir18.get_feature_maps(x), out.feature_map)
            emb, norm, occ = ir18(x)
        torch.testing.assert_close(emb, out.embedding)
        torch.testing.assert_close(norm, out.norm)
        torch.testing.assert_close(occ, out.occlusion)

    def test_embedding_times_norm_is_the_raw_output_layer_vector(self, ir18: OAMLNet) -> None:
        x = torch.randn(2, 3, 112, 112)
        with torch.no_grad():
            raw = ir18.output_layer(ir18.forward_features(x))
            emb, norm, _ = ir18(x)
        torch.testing.assert_close(emb * norm, raw, rtol=1e-5, atol=1e-5)

    def test_channels_last_gives_the_same_embedding(self, ir18: OAMLNet) -> None:
        x = torch.randn(2, 3, 112, 112)
        with torch.no_grad():
            ref = ir18(x)[0]
            cl = ir18.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))[0]
        ir18.to(memory_format=torch.contiguous_format)
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)

    def test_bf16_autocast_embedding_stays_close_to_fp32(self, ir18: OAMLNet) -> None:
        x = torch.randn(2, 3, 112, 112)
        with torch.no_grad():
            ref = ir18(x)[0]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = ir18(x)[0]
        assert low.dtype == torch.float32
        assert float((low * ref).sum(1).min()) > 0.98

    def test_gallery_mode_returns_qaconv_scores(self, ir18: OAMLNet) -> None:
        gallery_x = torch.randn(4, 3, 112, 112)
        probe_x = torch.randn(2, 3, 112, 112)
        with torch.no_grad():
            g = ir18.forward_all(gallery_x)
            p = ir18.forward_all(probe_x)
            ir18.set_gallery_features(g.feature_map, g.occlusion)
            try:
                outs = ir18(probe_x)
            finally:
                ir18.set_gallery_features(None)
            literal = ir18.qaconv(p.feature_map, g.feature_map, probe_occ=p.occlusion, gal_occ=g.occlusion)
        assert len(outs) == 4
        assert outs[3].shape == (2, 4)
        torch.testing.assert_close(outs[3], literal, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            assert len(ir18(probe_x)) == 3


class TestOcclusionHead:
    def test_init_follows_the_spec(self) -> None:
        head = OcclusionHead(512, 256)
        assert head.conv1.out_channels == 256
        assert bool((head.bn1.weight == 1).all()) and bool((head.bn1.bias == 0).all())
        assert bool((head.conv2.bias == 0).all())
        assert head(torch.randn(1, 512, 7, 7)).shape == (1, 1, 7, 7)

    def test_occlusion_loss_does_not_reach_the_backbone(self) -> None:
        model = build_model("ir_18").train()
        out = model.forward_all(torch.randn(2, 3, 112, 112))
        out.occlusion.mean().backward()
        assert model.occlusion_head.conv1.weight.grad is not None
        assert all(p.grad is None for p in model.body.parameters())


class TestNanGuard:
    def _poison(self, model: OAMLNet) -> torch.utils.hooks.RemovableHandle:
        def hook(_m: torch.nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[:, :, 0, 0] = float("nan")
            return out

        return model.body[-2].register_forward_hook(hook)

    def test_off_by_default_so_nans_propagate(self, ir18: OAMLNet) -> None:
        assert ir18.nan_guard is False
        handle = self._poison(ir18)
        try:
            with torch.no_grad():
                fmap = ir18.forward_features(torch.randn(1, 3, 112, 112))
        finally:
            handle.remove()
        assert bool(torch.isnan(fmap).any())

    def test_when_enabled_deep_units_are_sanitised(self, ir18: OAMLNet) -> None:
        ir18.nan_guard = True
        handle = self._poison(ir18)
        try:
            with torch.no_grad():
                emb, norm, _ = ir18(torch.randn(1, 3, 112, 112))
        finally:
            handle.remove()
            ir18.nan_guard = False
        assert bool(torch.isfinite(emb).all()) and bool(torch.isfinite(norm).all())
