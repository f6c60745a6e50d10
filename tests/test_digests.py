"""Digests that name what a recorded number was measured on (model.digests), and the open-set report's line
that states them (oaml.openset_eval)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from model.cpu import cpu_description
from model.digests import file_sha256, tree_sha256
from oaml.openset_eval import markdown_open_set, ran_on


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, blob in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)
    return root


def test_file_digest_is_sha256_of_the_bytes(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 5000  # more than one read block
    (tmp_path / "f").write_bytes(blob)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(blob).hexdigest()


def test_tree_digest_follows_names_and_contents_not_place_or_time(tmp_path: Path) -> None:
    files = {"masks/a.png": b"mask", "sunglasses/41.png": b"glasses", "sunglasses/41.json": b"{}"}
    a, b = _tree(tmp_path / "a", files), _tree(tmp_path / "b", dict(reversed(files.items())))
    assert tree_sha256(a) == tree_sha256(b)
    (tmp_path / "link").symlink_to(a)  # ../oaml_data/occluders is a link to ../shared/data/occluders
    assert tree_sha256(tmp_path / "link") == tree_sha256(a)
    (b / "sunglasses" / "41.json").write_bytes(b"{ }")
    assert tree_sha256(a) != tree_sha256(b)
    renamed = _tree(
        tmp_path / "c", {"masks/b.png": b"mask", "sunglasses/41.png": b"glasses", "sunglasses/41.json": b"{}"}
    )
    assert tree_sha256(a) != tree_sha256(renamed)
    (a / "masks" / "empty").mkdir()  # folders alone do not count
    assert tree_sha256(a) == tree_sha256(_tree(tmp_path / "d", files))


def test_tree_digest_follows_linked_folders_and_skips_named_files(tmp_path: Path) -> None:
    """A folder made of links (as ../oaml_data is) has the digest of the files it links to; a skipped file (a
    manifest with absolute source paths) does not count."""
    real = _tree(tmp_path / "real", {"p/1.jpg": b"one", "q/2.jpg": b"two"})
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "p").symlink_to(real / "p")
    (linked / "q").symlink_to(real / "q")
    assert tree_sha256(linked) == tree_sha256(real)
    (real / "manifest.jsonl").write_text('{"source": "/somewhere/p/1.jpg"}\n')
    (linked / "manifest.jsonl").write_text('{"source": "/elsewhere/p/1.jpg"}\n')
    assert tree_sha256(linked) != tree_sha256(real)
    manifest = frozenset({"manifest.jsonl"})
    assert tree_sha256(linked, skip=manifest) == tree_sha256(real, skip=manifest)


def test_ran_on_names_the_cpu_the_served_path_and_the_inputs(tmp_path: Path) -> None:
    cache = _tree(tmp_path / "lfw", {"a/a_0001.jpg": b"crop", "manifest.jsonl": b'{"path": "a/a_0001.jpg"}\n'})
    occluders = _tree(tmp_path / "occ", {"masks/KN95.png": b"mask"})
    info = {"device": "cpu", "backbone_path": {"served": "torch float32"}, "gallery_search": {"map_storage": "int8"}}
    where = ran_on(info, cache, occluders)
    assert where["served"] == "torch float32" and where["map_storage"] == "int8" and where["device"] == "cpu"
    assert where["cpu"] == cpu_description() and len(where["date"]) == 10
    assert where["lfw_manifest_sha256"] == file_sha256(cache / "manifest.jsonl")
    assert where["lfw_crops_sha256"] == tree_sha256(_tree(tmp_path / "crops", {"a/a_0001.jpg": b"crop"}))
    assert where["occluders_sha256"] == tree_sha256(occluders)
    assert ran_on(info, cache, None)["occluders_sha256"] is None


def _report(**extra: object) -> dict[str, object]:
    row = {
        "presets": {"lenient": {"fpir": 0.01, "fpir_target": 0.01, "dir": 0.4}},
        "dir_at_fpir": {"0.1": 0.6, "0.01": 0.4},
        "rank1": 0.7,
    }
    size = {"gallery_people": 100, "mated_probes": 100, "strangers": 1000, "clean": row}
    return {"sizes": [size], **extra}


def test_the_open_set_table_says_where_it_was_measured() -> None:
    where = {
        "date": "2026-12-07",
        "cpu": "AMD EPYC (native bf16: no, AVX-512: no, class avx2)",
        "device": "cpu",
        "served": "onnxruntime int8",
        "map_storage": "int8",
        "lfw_manifest_sha256": "505d86a36668" + "0" * 52,
        "occluders_sha256": None,
    }
    table = markdown_open_set(_report(ran_on=where))
    last = table.splitlines()[-1]
    assert last.startswith("Measured 2026-12-07 on AMD EPYC (native bf16: no, AVX-512: no, class avx2)")
    assert "onnxruntime int8 on cpu, int8 maps" in last and "LFW manifest 505d86a36668," in last
    assert last.endswith("occluders none.")
    old = markdown_open_set(_report())  # recorded before reports said where
    assert old.splitlines()[-1].startswith("| 100 (clean) |") and "Measured" not in old


def test_the_open_set_table_keeps_its_column_order_after_the_metadata_sorted_the_keys() -> None:
    """Weights' metadata stores JSON with sorted keys: the presets and the measured FPIRs come back as balanced,
    lenient, strict and 0.01, 0.1; the table still follows its header (lenient first, FPIR 0.1 first)."""
    row = {
        "presets": {
            "lenient": {"fpir": 0.01, "fpir_target": 0.01, "dir": 0.41},
            "balanced": {"fpir": 0.0, "fpir_target": 0.001, "dir": 0.18},
            "strict": {"fpir": 0.0, "fpir_target": 0.0001, "dir": 0.06},
        },
        "dir_at_fpir": {"0.1": 0.62, "0.01": 0.41},
        "rank1": 0.74,
    }
    report = _report()
    report["sizes"][0]["clean"] = row  # type: ignore[index]
    report["peer"] = [{"gallery_people": 100, "clean": {"dir_at_fpir": {"0.1": 0.99, "0.01": 0.97}, "rank1": 1.0}}]
    stored = json.loads(json.dumps(report, sort_keys=True))
    assert list(stored["sizes"][0]["clean"]["presets"]) == ["balanced", "lenient", "strict"]
    line = markdown_open_set(stored).splitlines()[2]
    assert markdown_open_set(report) == markdown_open_set(stored)
    assert "| lenient: 1.0% (0.01), 41.0%; balanced: 0.0% (0.001), 18.0%; strict: 0.0% (0.0001), 6.0% |" in line
    assert "| 62.0% / 41.0% | 99.0% / 97.0% | 74.0% / 100.0% |" in line
    row["presets"]["custom"] = {"fpir": 0.2, "fpir_target": 0.2, "dir": 0.9}  # a preset this table does not know
    assert "strict: 0.0% (0.0001), 6.0%; custom: 20.0% (0.2), 90.0% |" in markdown_open_set(report)
