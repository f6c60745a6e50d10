"""The occlusion-aware heads on a frozen backbone (model/training/heads.py): trained on a cache of trunk maps,
exported as weights whose served path is exactly what was trained, and a service that keeps the smaller maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from model.checkpoint import load_checkpoint
from model.embedder import Embedder
from model.training.heads import (
    HeadCache,
    HeadConfig,
    Heads,
    evaluate_heads,
    export_heads,
    load_heads,
    pca_projection,
    run_recipes,
    set_projection,
    train_heads,
)


def _synthetic_cache(folder: Path, identities: int = 160, views: int = 4, seed: int = 0) -> HeadCache:
    """A cache in build_cache's format: each identity a random trunk-map prototype in 32 of the 512 channels (a
    random projection to 16 mostly keeps noise; a learned one finds them), its views that prototype plus noise;
    occluded views (all but the first) have their lower rows zeroed (nothing to match there), and their
    visibility target says so. The teacher's embedding is the identity's own vector plus noise (a clean view)."""
    rng = np.random.default_rng(seed)
    protos = np.zeros((identities, 512, 7, 7), np.float32)  # identity lives in 32 of the 512 channels
    protos[:, :32] = 2 * rng.normal(size=(identities, 32, 7, 7))
    teach = rng.normal(size=(identities, 128)).astype(np.float32)
    fields: dict[str, list[np.ndarray]] = {k: [] for k in ("maps", "emb", "norm", "vis", "teacher")}
    label, image, view = [], [], []
    for i in range(identities):
        for v in range(views):
            fmap = protos[i] + rng.normal(size=(512, 7, 7)).astype(np.float32)
            vis = np.ones((7, 7), np.float32)
            if v > 0:
                fmap[:, 4:] = 0.0
                vis[4:] = 0
            fields["maps"].append(fmap)
            fields["emb"].append(fmap.mean(axis=(1, 2))[:64])
            fields["norm"].append(np.float32(20.0))
            fields["vis"].append(vis.reshape(-1))
            fields["teacher"].append(teach[i] + 0.1 * rng.normal(size=128).astype(np.float32))
            label.append(i)
            image.append(i * views + v)
            view.append(v)
    for u in range(24):  # unlabelled views: the teacher's loss only
        fields["maps"].append(rng.normal(size=(512, 7, 7)).astype(np.float32))
        fields["emb"].append(rng.normal(size=64).astype(np.float32))
        fields["norm"].append(np.float32(20.0))
        fields["vis"].append(np.ones(49, np.float32))
        fields["teacher"].append(rng.normal(size=128).astype(np.float32))
        label.append(-1)
        image.append(-1 - u)
        view.append(0)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(
        folder / "part-0000.npz",
        maps=np.stack(fields["maps"]).astype(np.float16),
        emb=np.stack(fields["emb"]).astype(np.float16),
        norm=np.array(fields["norm"]),
        vis=np.stack(fields["vis"]).astype(np.float16),
        teacher=np.stack(fields["teacher"]).astype(np.float16),
        label=np.array(label, np.int32),
        image=np.array(image, np.int32),
        view=np.array(view, np.int8),
    )
    (folder / "cache.json").write_text(json.dumps({"weights": "synthetic", "views": views, "parts": ["part-0000.npz"]}))
    return HeadCache(folder)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> HeadCache:
    return _synthetic_cache(tmp_path_factory.mktemp("heads-cache"))


def test_the_cache_splits_by_identity(cache: HeadCache) -> None:
    train, val = cache.split(fraction=0.25)
    labels = cache.data["label"]
    assert len(val) and set(labels[train].tolist()).isdisjoint(labels[val].tolist())
    assert len(train) + len(val) == len(cache.labelled) and len(cache.unlabelled) == 24


def test_the_heads_learn_on_cached_maps_and_hold_out_identities(weights: Path, cache: HeadCache) -> None:
    base, _ = load_checkpoint(weights)
    train, val = cache.split(fraction=0.25)
    cfg = HeadConfig(
        channels=16, steps=150, p=8, k=4, unlabelled_per_batch=8, lr=3e-2, log_every=50, train_occlusion=False
    )
    untrained = Heads(base, cfg).eval()
    heads, curve = train_heads(cache, base, cfg, train)
    assert [row["step"] for row in curve] == [50, 100, 150]
    assert {"pair", "triplet", "distill", "total"} <= set(curve[0])
    assert curve[-1]["total"] < curve[0]["total"]
    before = evaluate_heads(cache, untrained, val)
    after = evaluate_heads(cache, heads, val)
    assert after["genuine"] > 0 and after["pairs"] > after["genuine"]
    # on identities it never saw, the trained projection separates one-face-occluded pairs better
    # (measured: AUC 0.46 untrained, 0.95 trained)
    assert after["qaconv"]["auc"] > before["qaconv"]["auc"] + 0.2, (before, after)
    assert after["qaconv"]["auc"] > 0.85, after
    assert set(after["fused"]) >= {"accuracy", "tar_far_1e-3"}


def test_recipes_write_a_report_and_heads_that_load_again(weights: Path, cache: HeadCache, tmp_path: Path) -> None:
    recipes = {
        "no projection": HeadConfig(channels=None, steps=10, p=8, k=4, w_distill=0.0, unlabelled_per_batch=0),
        "projection": HeadConfig(channels=16, steps=10, p=8, k=4),
    }
    report = run_recipes(cache, weights, tmp_path, recipes, occlusion_steps=40)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert list(saved["recipes"]) == list(recipes) and "shipped" in saved
    # the occlusion head, tuned once on the drawn occluders' targets, learns them (synthetic: the lower rows)
    tuned, shipped = saved["occlusion"]["validation"], saved["shipped_occlusion"]
    assert tuned["occluded_mae"] < shipped["occluded_mae"], (tuned, shipped)  # measured: 0.27 against 0.41
    assert tuned["occluded_cell_accuracy"] > shipped["occluded_cell_accuracy"], (tuned, shipped)
    assert "occlusion" in saved["recipes"]["projection"]["curve"][0]  # trained with the QAConv there
    assert (
        saved["recipes"]["projection"]["validation"]["qaconv"]
        == report["recipes"]["projection"]["validation"]["qaconv"]
    )
    base, _ = load_checkpoint(weights)
    heads = load_heads(tmp_path / "1.pt", base)
    assert heads.proj is not None and heads.qaconv.num_features == 16


def test_principal_directions_keep_qaconv_when_the_locations_span_few_of_them(weights: Path) -> None:
    """Maps whose location vectors lie in 16 of 512 dimensions: the 16 principal directions are orthonormal, span
    that subspace, and QAConv on the projected maps scores pairs as it does on the full maps (cosines kept)."""
    gen = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(512, 16, generator=gen)).Q  # [512, 16], orthonormal columns
    maps = torch.einsum("ck,nkhw->nchw", basis, torch.randn(40, 16, 7, 7, generator=gen))
    directions = pca_projection(maps, 16, chunk=7)
    assert directions.shape == (16, 512)
    torch.testing.assert_close(directions @ directions.T, torch.eye(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(directions.T @ (directions @ basis), basis, atol=1e-4, rtol=0)  # the same subspace
    base, _ = load_checkpoint(weights)
    heads = Heads(base, HeadConfig(channels=16)).eval()
    assert heads.proj is not None
    set_projection(heads.proj, directions)
    heads.qaconv.load_state_dict(base.qaconv.state_dict())
    full = Heads(base, HeadConfig(channels=None)).eval()
    with torch.no_grad():
        projected = heads.qaconv.match_pairs(heads.local(maps[:20]), heads.local(maps[20:]))
        reference = full.qaconv.match_pairs(maps[:20], maps[20:])
    torch.testing.assert_close(projected, reference, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="channels"):
        pca_projection(maps, 513)


def test_the_principal_directions_recipe_learns_nothing_from_labels(weights: Path, cache: HeadCache) -> None:
    """steps=0 with init='pca': the projection is the training views' principal directions and the tail is the
    shipped QAConv's, whatever the identity labels say (relabelled views give the same heads)."""
    cfg = HeadConfig(channels=16, init="pca", steps=0, train_occlusion=False, pca_views=200)
    base, _ = load_checkpoint(weights)
    train, _ = cache.split()
    heads, curve = train_heads(cache, base, cfg, train)
    assert curve == [] and heads.proj is not None
    for name, value in base.qaconv.state_dict().items():
        assert torch.equal(heads.qaconv.state_dict()[name], value), name
    saved = cache.data["label"].copy()
    try:
        cache.data["label"][cache.labelled] = np.random.default_rng(0).permutation(saved[cache.labelled])
        again, _ = train_heads(cache, base, cfg, train)
    finally:
        cache.data["label"] = saved
    assert torch.equal(heads.proj[0].weight, again.proj[0].weight)  # type: ignore[index]
    with pytest.raises(ValueError, match="projection"):
        train_heads(cache, base, HeadConfig(channels=None, init="pca", steps=0), train)


def _trained_heads(weights: Path, channels: int) -> Heads:
    """Heads with every trained part moved off its initial values (projection, its BatchNorm statistics, QAConv's
    tail, the occlusion head), so that an export that dropped or misplaced any of them would show."""
    base, _ = load_checkpoint(weights)
    heads = Heads(base, HeadConfig(channels=channels))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        assert heads.proj is not None
        bn = heads.proj[1]
        assert isinstance(bn, torch.nn.BatchNorm2d) and bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.copy_(torch.randn(channels, generator=gen))
        bn.running_var.copy_(torch.rand(channels, generator=gen) + 0.5)
    return heads.eval()


def test_exported_weights_serve_what_the_heads_were_trained_as(weights: Path, tmp_path: Path) -> None:
    heads = _trained_heads(weights, 16)
    out = tmp_path / "projected.safetensors"
    written = export_heads(weights, heads, out, {"recipe": "test"})
    base, base_meta = load_checkpoint(weights)
    model, meta = load_checkpoint(out)
    assert meta["model_version"] == written["model_version"] != base_meta["model_version"]
    assert meta["base_model_version"] == base_meta["model_version"] and meta["heads_training"] == {"recipe": "test"}
    assert meta["heads"]["qaconv"]["num_features"] == 16 and meta["heads"]["qaconv"]["projected_from"] == 512
    x = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trunk = base.forward_features(x)
        served = model.forward_all(x)
        plain = base.forward_all(x)
        local = heads.local(trunk)
        occ = heads.occlusion(trunk)
        # the backbone is the base's, untouched: the cosine branch is unchanged
        torch.testing.assert_close(served.embedding, plain.embedding)
        assert served.feature_map.shape == (3, 16, 7, 7)
        torch.testing.assert_close(served.feature_map, local, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(served.occlusion, occ, rtol=1e-4, atol=1e-4)
        trained = heads.qaconv(local, local, occ, occ)
        exported = model.qaconv(served.feature_map, served.feature_map, served.occlusion, served.occlusion)
        torch.testing.assert_close(exported, trained, rtol=1e-4, atol=1e-4)
    feats = Embedder(model, device="cpu", flip=False)(np.zeros((2, 112, 112, 3), np.uint8))
    assert feats.feature_map.shape == (2, 16, 7, 7)
    assert Embedder(model, device="cpu")(np.zeros((0, 112, 112, 3), np.uint8)).feature_map.shape == (0, 16, 7, 7)


def test_a_service_on_projected_weights_keeps_the_smaller_maps(weights: Path, tmp_path: Path, photo: bytes) -> None:
    from service.app import create_app
    from service.config import Settings

    out = tmp_path / "weights" / "projected.safetensors"
    out.parent.mkdir()
    export_heads(weights, _trained_heads(weights, 16), out, {})
    settings = Settings(weights=out, data_dir=tmp_path / "data", torch_threads=1)
    with TestClient(create_app(settings)) as c:
        r = c.post("/gallery", data={"subject": "eileen"}, files={"images": ("a.png", photo, "image/png")})
        assert r.status_code == 201, r.text
        found = c.post("/identify", data={"threshold": "-1000"}, files={"image": ("q.png", photo, "image/png")})
        assert found.status_code == 200 and found.json()["candidates"][0]["subject"] == "eileen"
        same = c.post(
            "/verify", files={"image_a": ("a.png", photo, "image/png"), "image_b": ("b.png", photo, "image/png")}
        )
        assert same.status_code == 200 and same.json()["scores"]["qaconv"] is not None
        face_id = r.json()["faces"][0]["face_id"]
        version = c.get("/info").json()["model_version"]
    from service.store import SQLiteGalleryStore

    store = SQLiteGalleryStore(tmp_path / "data" / "gallery.sqlite3", version)
    try:
        record = store.faces_by_id([face_id], {"default": version})
    finally:
        store.close()
    assert record[0].feature_map.shape == (16, 7, 7)


def test_the_export_command_records_the_recipe_in_the_weights(weights: Path, tmp_path: Path) -> None:
    from dataclasses import asdict

    from model.checkpoint import read_metadata
    from oaml.cli import main

    cfg = HeadConfig(channels=16, init="pca", steps=0)
    torch.save({"config": asdict(cfg), "state": _trained_heads(weights, 16).state_dict()}, tmp_path / "5.pt")
    out = tmp_path / "q16.safetensors"
    assert main(["heads", "export", str(weights), "--heads", str(tmp_path / "5.pt"), "--out", str(out)]) == 0
    meta = read_metadata(out)
    assert meta["heads_training"]["recipe"] == asdict(cfg) and meta["heads"]["qaconv"]["num_features"] == 16
    assert meta["base_model_version"] == read_metadata(weights)["model_version"]
    assert meta.get("int8") == read_metadata(weights).get("int8")  # the trunk's int8 recipe holds for its trunk
