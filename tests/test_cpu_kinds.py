"""CPU kinds: a faster backbone path is served only on the instruction-set class a recorded check ran on, and only
after a start-up self-check against PyTorch fp32; elsewhere the next safe path, said in /info and the log.

These tests run on whatever CPU CI has; the classes they name are passed as flags, and the self-check runs for
real on this CPU (the shipped weights' int8 recipe passes it on an AMD EPYC Milan, AVX2 only, with a lowest
cosine of 0.9996 and a fused-score move of 0.13: bench/RESULTS.md, "Start-up self-check")."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from model import selfcheck
from model.card import WeightsCard
from model.checkpoint import load_checkpoint
from model.cpu import cpu_description, cpu_has_vnni, isa_class
from model.engines import openvino_available
from model.selfcheck import SelfCheck, selfcheck_crops, serve_backbone

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "oaml_ir18.safetensors"
MILAN = "flags : fpu sse sse2 avx avx2 fma bmi2"
GENOA = "flags : fpu avx2 avx512f avx512_vnni avx512_bf16"
SAPPHIRE = "flags : fpu avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8 amx_tile"

needs_openvino = pytest.mark.skipif(not openvino_available(), reason="OpenVINO has no wheel for this platform")


@pytest.mark.parametrize(
    ("flags", "cls", "vnni"),
    [
        (MILAN, "avx2", False),
        (GENOA, "avx512_bf16", True),
        (SAPPHIRE, "amx", True),
        ("flags : avx2 avx512f avx512_vnni", "avx512_vnni", True),
        ("flags : avx2 avx512f", "avx512", False),
        ("flags : avx2 avx_vnni", "avx2_vnni", True),
        ("flags : sse4_2", "baseline", False),
        ("", "baseline", False),
    ],
)
def test_cpu_classes(flags: str, cls: str, vnni: bool) -> None:
    assert isa_class(flags) == cls and cpu_has_vnni(flags) is vnni
    assert f"class {cls}" in cpu_description(flags)


@pytest.fixture(scope="module")
def shipped() -> tuple[Any, dict[str, Any]]:
    return load_checkpoint(SHIPPED)


def card_with(meta: dict[str, Any], *checks: dict[str, Any]) -> WeightsCard:
    """The shipped card with ``checks`` as its only engine checks (the shipped int8 recipe's fingerprint)."""
    recipe = WeightsCard.from_metadata(meta).int8
    assert recipe is not None
    full = [{"passes": True, "int8_recipe": recipe.fingerprint(), **c} for c in checks]
    return WeightsCard.from_metadata({**meta, "calibration": {**meta["calibration"], "engine_checks": full}})


def test_the_bundled_faces_are_real_faces_with_variants() -> None:
    crops = selfcheck_crops()
    assert crops.shape == (6, 112, 112, 3) and crops.dtype == np.uint8
    assert len({c.tobytes() for c in crops}) == 6  # six different views


@needs_openvino
def test_int8_checked_on_another_class_is_not_served_here(
    shipped: tuple[Any, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.setenv("OAML_ENGINE_CACHE", str(tmp_path))
    model, meta = shipped
    card = card_with(meta, {"engine": "openvino", "precision": "int8", "isa": "amx"})
    with caplog.at_level(logging.WARNING):
        embedder, path = serve_backbone(model, card, "cpu", "auto", "auto", threads=2, flags=MILAN)
    assert path.cpu_class == "avx2" and embedder.path == path.served == "openvino float32"
    assert path.fallbacks == ("openvino int8: no passed check on a CPU of class avx2 (checked on: amx)",)
    assert path.self_check is not None and path.self_check.passes and path.self_check.min_cosine > 0.9999
    assert "not serving openvino int8" in caplog.text


@needs_openvino
def test_int8_checked_on_this_class_is_served_after_its_self_check(
    shipped: tuple[Any, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OAML_ENGINE_CACHE", str(tmp_path))
    model, meta = shipped
    here = isa_class()
    card = card_with(meta, {"engine": "openvino", "precision": "int8", "isa": here})
    if WeightsCard.from_metadata(meta).calibration.fitted and "amx" == here:
        pytest.skip("on an AMX CPU auto serves bf16, not int8")
    embedder, path = serve_backbone(model, card, "cpu", "auto", "auto", threads=2)
    assert embedder.path == "openvino int8" and path.vouched_on == (here,) and path.fallbacks == ()
    check = path.self_check
    assert check is not None and check.passes and check.faces == 6 and check.pairs == 15
    # the real int8 path drifts, a little: not the fp32 function, well inside the bounds
    assert 0.99 < check.min_cosine < 0.99999 and 0 < check.max_score_drift < 0.5


@needs_openvino
def test_a_failed_self_check_falls_back_to_the_next_safe_path(
    shipped: tuple[Any, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OAML_ENGINE_CACHE", str(tmp_path))
    model, meta = shipped
    card = card_with(meta, {"engine": "openvino", "precision": "int8", "isa": "avx2"})
    real = selfcheck.self_check

    def int8_broken(candidate: Any, *args: Any) -> SelfCheck:
        got = real(candidate, *args)
        return SelfCheck(got.path, 0.5, 9.0, 6, 15, 0.1) if candidate.precision == "int8" else got

    monkeypatch.setattr(selfcheck, "self_check", int8_broken)
    embedder, path = serve_backbone(model, card, "cpu", "auto", "auto", threads=2, flags=MILAN)
    assert embedder.path == "openvino float32" and path.self_check is not None and path.self_check.passes
    assert path.fallbacks[0].startswith("openvino int8: start-up self-check failed (lowest cosine 0.5000")

    monkeypatch.setattr(selfcheck, "self_check", lambda c, *a: SelfCheck(c.path, 0.5, 9.0, 6, 15, 0.1))
    embedder, path = serve_backbone(model, card, "cpu", "auto", "auto", threads=2, flags=MILAN)
    assert embedder.path == "torch float32" and path.self_check is None  # PyTorch is the function itself
    assert [f.split(":")[0] for f in path.fallbacks] == ["openvino int8", "openvino float32"]


@needs_openvino
def test_a_forced_path_is_served_as_asked_and_its_failed_check_said(
    shipped: tuple[Any, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.setenv("OAML_ENGINE_CACHE", str(tmp_path))
    model, meta = shipped
    monkeypatch.setattr(selfcheck, "self_check", lambda c, *a: SelfCheck(c.path, 0.5, 9.0, 6, 15, 0.1))
    with caplog.at_level(logging.WARNING):
        embedder, path = serve_backbone(model, card_with(meta), "cpu", "int8", "auto", threads=2, flags=MILAN)
    assert embedder.path == "openvino int8" and path.forced and path.self_check is not None
    assert not path.self_check.passes and "self-check failed" in caplog.text


@needs_openvino
def test_info_says_which_path_runs_and_why(weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.app import create_app
    from tests.test_service import make_settings

    monkeypatch.setenv("OAML_ENGINE_CACHE", str(tmp_path / "cache"))
    with TestClient(create_app(make_settings(weights, tmp_path / "g", precision="fp32", engine="auto"))) as c:
        info = c.get("/info").json()
    path = info["backbone_path"]
    assert path["cpu_class"] == isa_class() and path["served"] == f"{info['engine']} {info['precision']}"
    assert path["self_check"]["passes"] and path["self_check"]["bounds"]["min_cosine"] == selfcheck.MIN_COSINE
    assert path["forced"] is False
