"""The evaluation suite (``oaml eval --suite public``) and the wall between evaluation and training data."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.align import ARCFACE_TEMPLATE
from model.calibration import DEFAULT_CALIBRATION
from model.card_tables import OPEN_SET, SUITE
from model.checkpoint import load_checkpoint
from model.embedder import Embedder
from model.training.bundle import make_bundle
from model.training.face import EvaluationDataError
from model.training.suite import SuiteModel, cfp_set, rescore, run_suite, suite_table
from model.training.train import TrainConfig, load_training_data, read_exclusions
from tests.conftest import SHARED_DATA
from tests.test_occlusion import write_templates

ROOT = Path(__file__).resolve().parents[1]


def write_cache(
    root: Path, photos: dict[str, np.ndarray], source_prefix: str = "train/x", missing: tuple[str, ...] = ()
) -> Path:
    """An ``oaml prepare``-style cache: crops plus manifest.jsonl (photos in ``missing`` had no face: no record)."""
    lines = []
    for key, crop in photos.items():
        identity, stem = key.split("/")
        (root / identity).mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(root / identity / f"{stem}.jpg", quality=95)
        if key in missing:
            continue
        lm = ARCFACE_TEMPLATE.tolist()
        record = {
            "path": f"{identity}/{stem}.jpg",
            "source": f"{source_prefix}/{identity}/{stem}.jpg",
            "identity": identity,
            "landmarks": lm,
            "aligned_landmarks": lm,
            "score": 0.99,
        }
        lines.append(json.dumps(record))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def faces(n_ids: int, per_id: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Crops where one identity's photos share a pattern (noise around a per-identity image)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_ids):
        base = rng.integers(0, 255, size=(112, 112, 3)).astype(np.int16)
        for j in range(per_id):
            noisy = np.clip(base + rng.integers(-20, 20, size=base.shape), 0, 255).astype(np.uint8)
            out[f"{i + 1:03d}/{'f' if j < per_id - 1 else 'p'}{j + 1:02d}"] = noisy
    return out


# -- the suite -------------------------------------------------------------------------------------------


def test_the_suite_scores_every_set_counts_missing_faces_and_keeps_a_subset(
    weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = faces(6, 3)
    cache = write_cache(tmp_path / "cfp", photos, source_prefix="cfp", missing=("002/f01",))
    keys = sorted(photos)
    lines = ["# fold\tpath_a\tpath_b\tsame"]
    for fold in (1, 2, 3):  # each fold: genuine and impostor pairs
        for i in range(1, 7):
            lines.append(f"{fold}\t{i:03d}/f01.jpg\t{i:03d}/p03.jpg\t1")
            lines.append(f"{fold}\t{i:03d}/f02.jpg\t{(i % 6) + 1:03d}/p03.jpg\t0")
    (cache / "pairs_fp.txt").write_text("\n".join(lines) + "\n")
    pairs = cfp_set(cache, "fp")
    assert pairs.keys == keys and len(pairs.same) == 36
    assert pairs.subset([1]).keys == sorted(pairs.keys) and len(pairs.subset([1, 2]).same) == 24
    model, _ = load_checkpoint(weights)
    embedder = Embedder(model, device="cpu", precision="fp32", flip=False)
    report = run_suite([pairs], embedder, write_templates(tmp_path / "occluders"))[0]
    entry = report["sets"]["CFP-FP"]
    assert entry["photos_without_face"] == 1
    for condition in ("clean", "occluded"):
        rows = entry[condition]
        assert rows["pairs"] == 36 and rows["pairs_without_face"] == 3  # 002/f01's genuine pair in each fold
        for matcher in ("adaface", "qaconv", "fused"):
            assert 0.0 <= rows[matcher]["accuracy"] <= 1.0 and 0.0 <= rows[matcher]["auc"] <= 1.0
    assert report["subset"]["CFP-FP"]["clean"]["pairs"] == 24 and report["subset"]["folds"] == [1, 2]
    # the component scores it kept measure the same again, and another fusion without embedding a photo
    kept = report["_pairs"]
    assert kept["CFP-FP/clean/valid"].sum() == 33 and len(kept["CFP-FP/occluded/norm"]) == 36
    again = rescore(report, kept, DEFAULT_CALIBRATION)
    assert "_pairs" not in again
    for part in ("sets", "subset"):
        for condition in ("clean", "occluded"):
            want, got = report[part]["CFP-FP"][condition], again[part]["CFP-FP"][condition]
            for matcher in ("adaface", "qaconv", "fused"):
                for metric in ("accuracy", "auc", "tar_far_1e-2"):
                    assert got[matcher][metric] == pytest.approx(want[matcher][metric], abs=1e-9)
    qaconv_only = dataclasses.replace(DEFAULT_CALIBRATION, coef=[0.0, 1.0, 0.0, 0.0], intercept=0.0)
    other = rescore(report, kept, qaconv_only)["sets"]["CFP-FP"]["clean"]
    assert other["fused"]["auc"] == pytest.approx(entry["clean"]["qaconv"]["auc"], abs=1e-9)
    assert other["adaface"] == entry["clean"]["adaface"]
    with pytest.raises(ValueError, match="no component scores"):
        rescore(report, {k: v for k, v in kept.items() if not k.startswith("CFP-FP/occluded")}, qaconv_only)
    # the occluded condition occludes every photo that has a face (and only those), the same way every time
    from model.training.evaluate import evaluation_occluders
    from model.training.suite import _embed_cache

    occluders = evaluation_occluders(tmp_path / "occluders")
    emb = _embed_cache(cache, keys, embedder, occluders, None)
    moved = (emb.clean[0].embedding - emb.occluded[0].embedding).abs().amax(1).numpy() > 1e-4
    assert (moved == emb.found).all()
    again = _embed_cache(cache, keys, embedder, occluders, None)
    assert (again.occluded[0].embedding == emb.occluded[0].embedding).all()
    part = _embed_cache(cache, keys[3:9], embedder, occluders, None)  # a subset occludes each photo alike
    torch.testing.assert_close(part.occluded[0].embedding, emb.occluded[0].embedding[3:9], atol=1e-5, rtol=1e-5)
    table = suite_table(report)
    assert re.search(r"\| CFP-FP \| clean \| 36 \| 3 \| [\d.]+% / [\d.]+ \|", table), table
    assert "| CFP-FP | occluded | 36 | 3 |" in table
    # `oaml eval --rescore` reads the kept run alone: neither the model nor the SFace peer is built
    from oaml.cli import main

    kept_dir = tmp_path / "kept"
    kept_dir.mkdir()
    version = load_checkpoint(weights)[1]["model_version"]
    public = {k: v for k, v in report.items() if k != "_pairs"}
    (kept_dir / "suite.json").write_text(json.dumps({**public, "weights": {"model_version": version}}))
    np.savez_compressed(kept_dir / "pairs.npz", **kept)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a rescore ran a model")

    monkeypatch.setattr("model.embedder.Embedder", refuse)
    monkeypatch.setattr("model.training.teacher.SFaceTeacher", refuse)
    command = ["eval", str(weights), "--suite", "public", "--peer", "sface", "--rescore", str(kept_dir)]
    assert main([*command, "--out", str(tmp_path / "rescored")]) == 0
    rescored = json.loads((tmp_path / "rescored" / "suite.json").read_text())["sets"]["CFP-FP"]["clean"]
    assert rescored["fused"]["auc"] == pytest.approx(entry["clean"]["fused"]["auc"], abs=1e-9)
    (kept_dir / "suite.json").write_text(json.dumps({**public, "weights": {"model_version": "ir_18-another"}}))
    with pytest.raises(SystemExit, match="the calibration of one model version rescores only its own run"):
        main([*command, "--out", str(tmp_path / "refused")])


def test_a_pair_whose_face_is_missing_is_a_non_match(weights: Path, tmp_path: Path) -> None:
    """Identical photos make a perfect genuine pair; once one of them has no face the pair must fail."""
    photos = faces(4, 2, seed=3)
    photos["001/p02"] = photos["001/f01"].copy()
    lines = []
    for fold in (1, 2):
        for i in range(1, 5):
            lines.append(f"{fold}\t{i:03d}/f01.jpg\t{i:03d}/p02.jpg\t1")
            lines.append(f"{fold}\t{i:03d}/f01.jpg\t{(i % 4) + 1:03d}/p02.jpg\t0")
    model, _ = load_checkpoint(weights)
    embedder = Embedder(model, device="cpu", precision="fp32", flip=False)
    occluders = write_templates(tmp_path / "occluders")
    scores = {}
    for missing in ((), ("001/p02",)):
        cache = write_cache(tmp_path / f"c{len(missing)}", photos, "cfp", missing)
        (cache / "pairs_ff.txt").write_text("\n".join(lines) + "\n")
        report = run_suite([cfp_set(cache, "ff")], embedder, occluders)[0]
        scores[len(missing)] = report["sets"]["CFP-FF"]["clean"]
    assert scores[0]["pairs_without_face"] == 0 and scores[1]["pairs_without_face"] == 4
    assert scores[1]["adaface"]["auc"] < scores[0]["adaface"]["auc"]


def test_a_heads_only_variant_scored_from_the_same_pass_is_what_its_own_run_gives(
    weights: Path, tmp_path: Path
) -> None:
    """``--also``: a release that differs in its heads alone (16 projected channels, another occlusion head) is
    scored from the trunk maps of the weights' pass, and every number is what its own run gives."""
    from model.net import build_model
    from model.training.heads import export_heads
    from tests.test_heads import _trained_heads

    photos = faces(6, 3, seed=4)
    cache = write_cache(tmp_path / "cfp", photos, source_prefix="cfp")
    lines = ["# fold\tpath_a\tpath_b\tsame"]
    for fold in (1, 2, 3):
        for i in range(1, 7):
            lines.append(f"{fold}\t{i:03d}/f01.jpg\t{i:03d}/p03.jpg\t1")
            lines.append(f"{fold}\t{i:03d}/f02.jpg\t{(i % 6) + 1:03d}/p03.jpg\t0")
    (cache / "pairs_fp.txt").write_text("\n".join(lines) + "\n")
    pairs, occluders = cfp_set(cache, "fp"), write_templates(tmp_path / "occluders")
    export_heads(weights, _trained_heads(weights, 16), tmp_path / "projected.safetensors", {})
    base, _ = load_checkpoint(weights)
    variant, _ = load_checkpoint(tmp_path / "projected.safetensors")
    both = run_suite(
        [pairs], Embedder(base, device="cpu", precision="fp32", flip=False), occluders, also=[SuiteModel("c", variant)]
    )
    alone = run_suite([pairs], Embedder(variant, device="cpu", precision="fp32", flip=False), occluders)[0]
    assert len(both) == 2
    for condition in ("clean", "occluded"):
        got, want = both[1]["sets"]["CFP-FP"][condition], alone["sets"]["CFP-FP"][condition]
        for matcher in ("adaface", "qaconv", "fused"):
            for metric in ("accuracy", "auc", "tar_far_1e-2"):
                assert got[matcher][metric] == pytest.approx(want[matcher][metric], abs=1e-9), (matcher, metric)
        # the base's own report is its own: another QAConv on other maps
        assert both[0]["sets"]["CFP-FP"][condition]["adaface"] == got["adaface"]
        assert both[0]["sets"]["CFP-FP"][condition]["qaconv"] != got["qaconv"]
    crops = np.stack(list(photos.values())[:4])
    derived = Embedder(base, device="cpu", precision="fp32", flip=False)(crops).through(variant)
    own = Embedder(variant, device="cpu", precision="fp32", flip=False)(crops)
    torch.testing.assert_close(derived.feature_map, own.feature_map, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(derived.occlusion, own.occlusion, rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    other = build_model("ir_18").eval()  # another trunk: its faces cannot be made from the base's pass
    with pytest.raises(ValueError, match="does not share the trunk"):
        run_suite([pairs], Embedder(base, device="cpu", flip=False), occluders, also=[SuiteModel("x", other)])


def test_the_table_keeps_the_suites_order_whatever_the_reports() -> None:
    rows = {"pairs": 1, "pairs_without_face": 0, "fused": {"accuracy": 0.5, "tar_far_1e-3": 0.1}}
    report = {"sets": {name: {"clean": rows, "occluded": rows} for name in ("CFP-FF", "CFP-FP", "LFW")}}
    names = [line.split("|")[1].strip() for line in suite_table(report).splitlines()[2:8]]
    assert names == ["LFW", "LFW", "CFP-FP", "CFP-FP", "CFP-FF", "CFP-FF"]  # stored metadata sorts its keys


def test_the_card_table_is_replaced_between_its_markers(tmp_path: Path) -> None:
    """Each recorded section replaces its own table only: the suite's record leaves the open set's alone."""
    card = tmp_path / "README.md"
    card.write_text(
        f"# Card\n\nbefore\n{SUITE.begin}\nold table\n{SUITE.end}\nmiddle\n"
        f"{OPEN_SET.begin}\nopen\n{OPEN_SET.end}\nafter\n"
    )
    SUITE.write(card, "| new | table |")
    text = card.read_text()
    assert SUITE.read(text) == "| new | table |" and OPEN_SET.read(text) == "open"
    assert text.startswith("# Card\n\nbefore\n") and text.endswith("after\n") and "\nmiddle\n" in text
    with pytest.raises(ValueError, match="open_set"):
        OPEN_SET.read("no markers here")
    assert not OPEN_SET.present(f"{OPEN_SET.begin}\nan end marker lost\n")  # checked before a run is spent on it
    assert not OPEN_SET.present(f"{OPEN_SET.end}\n{OPEN_SET.begin}\n")


def test_a_recorded_table_goes_to_the_card_beside_the_weights_or_the_one_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from oaml.cli import _record_card

    weights = tmp_path / "w" / "model.safetensors"
    weights.parent.mkdir()
    beside, named = weights.parent / "README.md", tmp_path / "card.md"
    for card in (beside, named):
        card.write_text(f"# Card\n{OPEN_SET.begin}\nold\n{OPEN_SET.end}\n")
    _record_card(weights, None, OPEN_SET, "| beside |")
    _record_card(weights, named, OPEN_SET, "| named |")
    assert OPEN_SET.read(beside.read_text()) == "| beside |" and OPEN_SET.read(named.read_text()) == "| named |"
    broken = f"# Card\n{OPEN_SET.begin}\nold\n"
    named.write_text(broken)
    with caplog.at_level("WARNING"):
        _record_card(weights, named, OPEN_SET, "| lost |")  # a warning, not a traceback after a 22-minute run
    assert named.read_text() == broken and "no model card with both markers of the open_set table" in caplog.text


# -- evaluation data never trains -----------------------------------------------------------------------


def test_evaluation_data_is_refused_as_training_data(tmp_path: Path) -> None:
    photos = faces(2, 2)
    inside = write_cache(tmp_path / "data" / "eval" / "cfp", photos)
    with pytest.raises(EvaluationDataError):
        load_training_data([inside])
    link = tmp_path / "innocent"
    link.symlink_to(inside)  # a link with a training-like name still leads into eval/
    with pytest.raises(EvaluationDataError):
        load_training_data([link])
    made_from = write_cache(tmp_path / "prepared_lfw", photos, source_prefix="/x/shared/data/eval/lfw")
    with pytest.raises(EvaluationDataError):  # a cache prepared from eval/ photos, wherever it lies
        load_training_data([made_from])
    with pytest.raises(EvaluationDataError):
        make_bundle(tmp_path / "bundle", [made_from], None)
    fine = write_cache(tmp_path / "train_cache", photos)
    assert len(load_training_data([fine]).labels) == 4


def test_identity_overlap_lists_leave_identities_out(tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "lag", faces(3, 2))
    listed = tmp_path / "overlap.txt"
    listed.write_text("# comment\nlag/002  # an evaluation person\nother/001\n")
    excluded = read_exclusions([listed])
    assert excluded == {"lag/002", "other/001"}
    data = load_training_data([cache], excluded)
    assert data.identities == ["lag/001", "lag/003"] and len(data.labels) == 4 and set(data.labels) == {0, 1}
    for line in (ROOT / "configs/overlap/lag_eval.txt").read_text().splitlines():  # the shipped list parses
        assert not line.strip() or line.startswith("#") or re.fullmatch(r"lag/\S+\s+#.*", line), line


def _config_caches() -> list[tuple[str, str]]:
    out = []
    for path in sorted((ROOT / "configs").rglob("*.toml")):
        raw = tomllib.loads(path.read_text())
        out += [(path.name, name) for name in raw.get("train", []) + raw.get("unlabeled", [])]
    return out


@pytest.mark.parametrize(("config", "cache"), _config_caches())
def test_no_config_trains_on_evaluation_data(config: str, cache: str) -> None:
    assert cache not in {"lfw", "cfp", "mask_real", "eval"}, f"{config} trains on {cache}"
    linked = ROOT.parent / "oaml_data" / cache  # what `make prepare-data` made, when it has been run here
    if linked.exists():
        from model.training.face import AlignedCache, refuse_evaluation_data

        refuse_evaluation_data(linked, AlignedCache(linked).records)


def test_the_diverse_config_names_every_training_set_make_prepare_data_links() -> None:
    cfg = TrainConfig.from_toml(ROOT / "configs/oaml_ir18_diverse.toml")
    makefile = (ROOT / "Makefile").read_text()
    linked = set(re.search(r"for cache in ([^;]+); do", makefile).group(1).split())  # type: ignore[union-attr]
    assert set(cfg.train) == {"celeba", "afdb", "lag", "fgnet"}
    assert set(cfg.unlabeled) == {"utkface", "mask_unlabeled", "aflw2000"} <= linked
    assert {"lag", "fgnet"} <= linked and cfg.exclude_identities == ["configs/overlap/lag_eval.txt"]


@pytest.mark.skipif(not (SHARED_DATA / "train/aligned/lag").exists(), reason="../shared/data not present")
def test_the_new_training_caches_load_with_their_exclusions() -> None:
    aligned = SHARED_DATA / "train/aligned"
    excluded = read_exclusions([ROOT / "configs/overlap/lag_eval.txt"])
    for name in ("lag", "fgnet", "mask_unlabeled", "aflw2000"):
        from model.training.face import AlignedCache, refuse_evaluation_data

        cache = AlignedCache(aligned / name)
        refuse_evaluation_data(aligned / name, cache.records)
        if name == "lag":
            kept = cache.without({e.split("/", 1)[1] for e in excluded})
            assert len(kept.classes) == len(cache.classes) - len(excluded & {f"lag/{c}" for c in cache.classes})
