"""int8 for CPUs without native bf16: the equalisation changes nothing in fp32, the recipe round-trips and names
what it vouches for, OpenVINO runs the quantised graph, and one rule decides when ``auto`` serves it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model import engines
from model.card import WeightsCard
from model.checkpoint import load_checkpoint
from model.cpu import cpu_has_vnni, isa_class
from model.embedder import Embedder
from model.engines import serve_int8
from model.net import OAMLNet, build_model
from model.quantize import FP32_LAYERS, Int8Recipe, equalised_copy, fit_int8, quantised_copy

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "oaml_ir18.safetensors"


def _faces(n: int, seed: int) -> np.ndarray:
    """Smooth face-like crops (random noise would make every activation range its own outlier)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:112, 0:112] / 112.0
    base = np.stack([np.sin(6 * xx + i) * np.cos(5 * yy - i) for i in range(3)], -1)
    out = [(127 + 90 * np.roll(base, rng.integers(-8, 8), axis=1) + rng.normal(0, 12, base.shape)) for _ in range(n)]
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def net() -> OAMLNet:
    """A random IR-18 whose BatchNorms are not the identity: channels of very different ranges, as trained."""
    torch.manual_seed(3)
    model = build_model("ir_18").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand_like(m.weight) * 2 + 0.1)
                m.bias.copy_(torch.randn_like(m.bias) * 0.3)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return model


@pytest.fixture(scope="module")
def recipe(net: OAMLNet) -> Int8Recipe:
    return fit_int8(net, _faces(48, 0), batch=16, data=["synthetic"])


def test_equalisation_changes_nothing_in_fp32(net: OAMLNet, recipe: Int8Recipe) -> None:
    x = torch.from_numpy(_faces(4, 1)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        want = net.forward_all(x)
        got = equalised_copy(net, recipe.scales).forward_all(x)
    torch.testing.assert_close(got.embedding, want.embedding, atol=1e-4, rtol=1e-4)
    drift = (got.feature_map - want.feature_map).norm() / want.feature_map.norm()
    assert drift < 1e-5  # rounding only: rescaled weights and BatchNorms round differently
    assert any(max(s) / min(s) > 2 for s in recipe.scales.values())  # it did rescale channels


def test_the_recipe_covers_the_backbone_and_round_trips(net: OAMLNet, recipe: Int8Recipe) -> None:
    convs = {n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    backbone = {n for n in convs if n.startswith(("input_layer.", "body.", "output_layer."))}
    assert set(recipe.ranges) == backbone - set(FP32_LAYERS)
    assert "output_layer.3" in recipe.scales and "body.0.res_layer.1" in recipe.scales
    assert not any(n.endswith("shortcut_layer.0") for n in recipe.scales)  # its input feeds the unit's BN too
    assert all(lo <= 0 <= hi or lo < hi for lo, hi in recipe.ranges.values())
    again = Int8Recipe.from_dict(recipe.to_dict())
    assert again.fingerprint() == recipe.fingerprint() and again.ranges == recipe.ranges
    moved = dict(recipe.ranges, **{"output_layer.3": (0.0, 1.0)})
    assert Int8Recipe(recipe.scales, moved, recipe.alpha, recipe.crops).fingerprint() != recipe.fingerprint()
    with pytest.raises(ValueError, match="scheme"):
        Int8Recipe.from_dict({**recipe.to_dict(), "scheme": "something else"})
    with pytest.raises(ValueError, match="malformed"):
        Int8Recipe.from_dict({**recipe.to_dict(), "ranges": {"body.0.res_layer.1": [1.0]}})


def test_the_fake_quantised_network_stays_close_to_fp32(net: OAMLNet, recipe: Int8Recipe) -> None:
    x = torch.from_numpy(_faces(6, 2)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        want = net.forward_all(x).embedding
        got = quantised_copy(net, recipe).forward_all(x).embedding
    cosine = (got * want).sum(1)
    assert cosine.min() > 0.98 and not torch.equal(got, want)  # quantised, and close


def test_openvino_runs_the_quantised_graph(
    net: OAMLNet, recipe: Int8Recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openvino")
    monkeypatch.setenv("OAML_ENGINE_CACHE", str(tmp_path))
    crops = _faces(3, 4)
    embedder = Embedder(net, device="cpu", precision="int8", engine="auto", version="v-test", int8=recipe)
    assert (embedder.engine, embedder.precision) == ("openvino", "int8")
    got = embedder(crops)
    assert [p.name.split(".")[-2] for p in tmp_path.glob("*.onnx")] == [f"int8-{recipe.fingerprint()}"]
    fake = Embedder(quantised_copy(net, recipe), device="cpu", precision="fp32", engine="torch")(crops)
    fp32 = Embedder(net, device="cpu", precision="fp32", engine="torch")(crops)
    agreement = (got.embedding * fake.embedding).sum(1)
    # OpenVINO's int8 kernels compute what the fake-quantised network says, not the fp32 network. With VNNI or AMX
    # (Intel Xeon with AMX, AMD EPYC Genoa) they accumulate in 32 bits: above 0.999. Without (AVX2 only: AMD EPYC
    # Milan) products are summed in pairs into saturating 16-bit lanes: 0.9985 measured on a Milan with this
    # network (weights limited to 7 bits gave 0.9998 there: the saturation is the whole difference).
    assert agreement.min() > (0.999 if cpu_has_vnni() else 0.997), isa_class()
    assert agreement.mean() > (got.embedding * fp32.embedding).sum(1).mean()


def test_when_int8_is_served(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    vouched = {("openvino", "int8")}
    monkeypatch.setattr(engines, "openvino_available", lambda: True)
    assert serve_int8("auto", "auto", cpu, None, vouched, has_recipe=True)  # fp32 CPU, checked recipe
    assert not serve_int8("auto", "auto", cpu, None, (), has_recipe=True)  # unchecked: fp32 stays
    assert not serve_int8("auto", "auto", cpu, None, vouched, has_recipe=False)
    amx, genoa = "flags: avx512f avx512_bf16 amx_bf16 amx_int8", "flags: avx512f avx512_vnni avx512_bf16"
    assert not serve_int8("auto", "auto", cpu, torch.bfloat16, vouched, True, amx)  # AMX: bf16 is as fast
    assert serve_int8("auto", "auto", cpu, torch.bfloat16, vouched, True, genoa)  # AVX-512 bf16, no AMX: int8
    assert not serve_int8("auto", "auto", cpu, torch.bfloat16, (), True, genoa)  # unchecked: bf16 stays
    assert not serve_int8("auto", "auto", cuda, None, vouched, has_recipe=True)
    assert not serve_int8("auto", "torch", cpu, None, vouched, has_recipe=True)  # an engine forced
    assert not serve_int8("fp32", "auto", cpu, None, vouched, has_recipe=True)  # a precision forced
    assert serve_int8("int8", "openvino", cpu, None, (), has_recipe=True)  # forced, unchecked: allowed
    with pytest.raises(ValueError, match="oaml quantize"):
        serve_int8("int8", "auto", cpu, None, vouched, has_recipe=False)
    with pytest.raises(ValueError, match="openvino"):
        serve_int8("int8", "onnxruntime", cpu, None, vouched, has_recipe=True)
    with pytest.raises(ValueError, match="CPU"):
        serve_int8("int8", "auto", cuda, None, vouched, has_recipe=True)
    monkeypatch.setattr(engines, "openvino_available", lambda: False)
    assert not serve_int8("auto", "auto", cpu, None, vouched, has_recipe=True)


def test_an_int8_check_vouches_only_for_the_recipe_and_the_cpu_class_it_checked(recipe: Int8Recipe) -> None:
    _, meta = load_checkpoint(SHIPPED)
    check = {"engine": "openvino", "precision": "int8", "passes": True, "int8_recipe": recipe.fingerprint()}
    check["isa"] = "avx2"
    calibration = {**meta["calibration"], "engine_checks": [check]}
    card = WeightsCard.from_metadata({**meta, "calibration": calibration, "int8": recipe.to_dict()})
    assert card.vouched_for("avx2") == {("openvino", "int8")} and card.int8 == recipe
    assert card.vouched_for("amx") == frozenset() and card.vouched_for("avx512_vnni") == frozenset()
    other = Int8Recipe(recipe.scales, dict(recipe.ranges, **{"output_layer.3": (-1.0, 1.0)}), 0.5, 1)
    card = WeightsCard.from_metadata({**meta, "calibration": calibration, "int8": other.to_dict()})
    assert card.vouched_for("avx2") == frozenset()
    card = WeightsCard.from_metadata({**meta, "calibration": calibration, "int8": None})
    assert card.vouched_for("avx2") == frozenset() and card.int8 is None
    unnamed = {**meta["calibration"], "engine_checks": [{k: v for k, v in check.items() if k != "isa"}]}
    card = WeightsCard.from_metadata({**meta, "calibration": unnamed, "int8": recipe.to_dict()})
    assert not any(card.vouched_for(c) for c in ("avx2", "amx", "baseline"))  # a check that names no class


def test_the_service_serves_int8_when_asked_and_says_so(
    net: OAMLNet, recipe: Int8Recipe, tmp_path: Path, astronaut: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openvino")
    from fastapi.testclient import TestClient

    from model.checkpoint import save_checkpoint
    from service.app import create_app
    from tests.test_service import make_settings, png

    monkeypatch.setenv("OAML_ENGINE_CACHE", str(tmp_path / "cache"))
    plain, quantised = tmp_path / "plain.safetensors", tmp_path / "int8.safetensors"
    save_checkpoint(net, plain)
    save_checkpoint(net, quantised, {"int8": recipe.to_dict()})
    files = {"image_a": ("a.png", png(astronaut), "image/png"), "image_b": ("b.png", png(astronaut), "image/png")}
    with TestClient(create_app(make_settings(quantised, tmp_path / "a", precision="int8"))) as c:
        info = c.get("/info").json()
        assert (info["engine"], info["precision"]) == ("openvino", "int8")
        r = c.post("/verify", files=files)
        assert r.status_code == 200, r.text
        assert r.json()["scores"]["adaface"] > 0.999  # the same photo twice
    # auto never serves an unchecked recipe: fp32 or bf16 by the CPU, as without one
    with TestClient(create_app(make_settings(quantised, tmp_path / "b"))) as c:
        assert c.get("/info").json()["precision"] != "int8"
    with pytest.raises(ValueError, match="oaml quantize"):  # asked for int8, weights without a recipe
        with TestClient(create_app(make_settings(plain, tmp_path / "c", precision="int8"))):
            pass
