"""The inverted-file shortlist (service/ann.py) and the index's use of it above ``ann_min_faces``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.net import build_model
from service.ann import InvertedFile, lists_for
from service.index import ANN_REGROWTH, GalleryIndex


def clustered(
    clusters: int, per_cluster: int, seed: int = 0, spread: float = 0.02, draw: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors around ``clusters`` random centres (cosine to the centre ~0.9), and the centres.
    ``draw`` changes the faces but not the centres (fresh faces of the same identities)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, 512, generator=g), dim=1)
    if draw:
        g.manual_seed(seed * 1000 + draw)
    x = centres.repeat_interleave(per_cluster, 0) + spread * torch.randn(clusters * per_cluster, 512, generator=g)
    return torch.nn.functional.normalize(x, dim=1), centres


@pytest.fixture(scope="module")
def qaconv() -> torch.nn.Module:
    return build_model("ir_18").qaconv.eval()


def fill(index: GalleryIndex, emb: torch.Tensor, start: int = 0, chunk: int = 100) -> list[str]:
    """Add faces with small random maps; returns their ids (``f<row>``)."""
    g = torch.Generator().manual_seed(start)
    ids = []
    for s in range(0, len(emb), chunk):
        part = emb[s : s + chunk]
        n = len(part)
        names = [f"f{start + s + i}" for i in range(n)]
        index.add(
            names,
            [f"s{start + s + i}" for i in range(n)],
            part,
            torch.randn(n, 512, 7, 7, generator=g),
            torch.rand(n, 1, 7, 7, generator=g),
        )
        ids += names
    return ids


def settle(index: GalleryIndex) -> None:
    """Let a training in flight finish and its file be adopted (the service adopts it at its next call)."""
    index.cosine.train_if_due(wait=True)


def search(index: GalleryIndex, probe: torch.Tensor, k: int) -> dict:
    return index.search(probe, torch.randn(512, 7, 7), torch.ones(7, 7), k)


def test_inverted_file_finds_removes_and_reads_every_list_when_asked() -> None:
    x, _ = clustered(20, 60)
    keys = np.arange(len(x), dtype=np.int64) * 10 + 7  # any int64 keys
    ivf = InvertedFile.build(x.numpy(), keys)
    assert len(ivf) == len(x) and ivf.lists == min(lists_for(len(x)), len(x) // 39)
    fresh, _ = clustered(20, 1, draw=1)
    row_of = {int(k): i for i, k in enumerate(keys)}
    for p in fresh:
        exact = (x @ p).topk(5)
        got = ivf.search(p.numpy(), 5, probe=ivf.lists)  # every list: exact up to 8-bit rounding
        assert got[0] == keys[int(exact.indices[0])]
        assert float((x[[row_of[int(k)] for k in got]] @ p).min()) >= float(exact.values[-1]) - 0.01
    assert ivf.search(x[0].numpy(), 1, probe=1)[0] == keys[0]  # a face is in its own nearest list
    ivf.remove(keys[:30])
    assert len(ivf) == len(x) - 30
    assert not set(ivf.search(x[0].numpy(), 50, probe=ivf.lists)) & set(keys[:30])


def test_lists_grow_with_the_square_root_of_the_gallery() -> None:
    assert lists_for(100) == 16 and lists_for(1_000_000) == 1000 and lists_for(250_000) == 500


def test_index_switches_to_the_inverted_file_at_the_threshold(qaconv: torch.nn.Module) -> None:
    x, _ = clustered(10, 60)  # fewer groups than lists, as faces are to a gallery's ~sqrt(N) lists
    index = GalleryIndex(qaconv, torch.device("cpu"), torch.bfloat16, ann_min_faces=400, ann_probe=4)
    fill(index, x[:300])
    assert index.describe() == {
        "method": "exact",
        "ann_min_faces": 400,
        "ann_lists": None,
        "ann_probe": 4,
        "map_storage": "int8",
    }
    fill(index, x[300:], start=300)
    settle(index)
    info = index.describe()
    assert info["method"] == "inverted_file" and info["ann_lists"] == 400 // 39  # trained on crossing 400
    # a face is its own nearest neighbour through the lists, with an exact cosine
    for row in (0, 299, 300, 599):
        found = search(index, x[row], 5)
        assert found["face_ids"][0] == f"f{row}" and found["cosine"][0] == pytest.approx(1.0, abs=1e-5)
        assert len(found["face_ids"]) == 5 and np.all(np.diff(found["cosine"]) <= 0)
    # a fresh face's exact nearest neighbour is, nearly always, in the shortlist the lists give
    exact = GalleryIndex(qaconv, torch.device("cpu"), torch.bfloat16)
    fill(exact, x)
    fresh, _ = clustered(10, 20, draw=1)
    inside = [search(exact, p, 1)["face_ids"][0] in search(index, p, 10)["face_ids"] for p in fresh]
    assert np.mean(inside) >= 0.9
    # reading every list is exact search up to the lists' 8-bit rounding; reported cosines are exact
    index.ann_probe = index.describe()["ann_lists"]
    for p in fresh[:20]:
        got, want = search(index, p, 10), search(exact, p, 10)
        assert got["face_ids"][0] == want["face_ids"][0] and got["cosine"][-1] >= want["cosine"][-1] - 0.01
        rows = [int(f[1:]) for f in got["face_ids"]]
        np.testing.assert_allclose(got["cosine"], (x[rows] @ p).numpy(), atol=1e-6)


def test_assignments_follow_deletions_and_later_enrolments(qaconv: torch.nn.Module) -> None:
    x, _ = clustered(40, 20)
    index = GalleryIndex(qaconv, torch.device("cpu"), torch.bfloat16, ann_min_faces=300, ann_probe=8)
    ids = fill(index, x[:500])
    settle(index)
    assert index.approximate
    gone = ids[::3]
    index.remove(gone)
    fill(index, x[500:], start=500)  # added to the trained lists as they arrive
    stage = index.cosine
    assert stage.ivf is not None and stage.ivf.trained_on == 300
    live = index.count
    # the inverted file holds exactly the live faces, under keys that followed every slot move
    assert stage.count == live and len(stage.ivf) == live and len(stage._slot_of_key) == live
    assert [stage._slot_of_key[int(k)] for k in stage._keys[:live]] == list(range(live))
    for row in (1, 2, 499, 500, 799):
        assert search(index, x[row], 3)["face_ids"][0] == f"f{row}"
    for row in (0, 3, 498):  # deleted: never returned
        assert f"f{row}" not in search(index, x[row], 20)["face_ids"]


def test_retrains_after_the_gallery_grows_and_drops_back_to_exact_below_the_threshold(
    qaconv: torch.nn.Module,
) -> None:
    x, _ = clustered(50, 20)
    index = GalleryIndex(qaconv, torch.device("cpu"), torch.bfloat16, ann_min_faces=200, ann_probe=8)
    fill(index, x[:200])
    settle(index)
    assert index.cosine.ivf is not None and index.cosine.ivf.trained_on == 200
    first = index.cosine.ivf
    fill(index, x[200 : 200 * ANN_REGROWTH], start=200)
    settle(index)
    assert index.cosine.ivf is not first and index.cosine.ivf.trained_on == 200 * ANN_REGROWTH
    assert index.cosine.ivf.lists == min(lists_for(200 * ANN_REGROWTH), 200 * ANN_REGROWTH // 39)
    index.remove([f"f{i}" for i in range(200 * ANN_REGROWTH - 1)])
    assert len(index) == 1 and index.describe()["method"] == "exact"
    assert search(index, x[0], 5)["face_ids"] == [f"f{200 * ANN_REGROWTH - 1}"]


def test_too_few_candidates_fall_back_to_exact(qaconv: torch.nn.Module) -> None:
    x, _ = clustered(30, 10)
    index = GalleryIndex(qaconv, torch.device("cpu"), torch.bfloat16, ann_min_faces=100, ann_probe=1)
    fill(index, x)
    settle(index)
    exact = GalleryIndex(qaconv, torch.device("cpu"), torch.bfloat16)
    fill(exact, x)
    k = 200
    ivf = index.cosine.ivf
    assert ivf is not None and len(ivf.search(x[0].numpy(), k, probe=1)) < k  # one list holds fewer than k
    got, want = search(index, x[0], k), search(exact, x[0], k)
    assert index.approximate and got["face_ids"] == want["face_ids"]
    np.testing.assert_allclose(got["cosine"], want["cosine"], atol=1e-6)


def test_a_gallery_loaded_at_start_up_is_trained_once_on_all_of_it(qaconv: torch.nn.Module) -> None:
    x, _ = clustered(20, 50)
    index = GalleryIndex(qaconv, torch.device("cpu"), torch.bfloat16, ann_min_faces=100, ann_probe=8)
    index.begin_loading()  # what service.gallery.Gallery.load does
    fill(index, x)  # crosses 100 and 4 x 100 without training
    assert index.cosine.ivf is None and index.describe()["method"] == "exact"
    index.finish_loading()
    assert index.cosine.ivf is not None and index.cosine.ivf.trained_on == len(x) and index.approximate
    assert search(index, x[123], 1)["face_ids"] == ["f123"]


def test_training_runs_beside_the_service_and_the_next_call_switches_to_it(qaconv: torch.nn.Module) -> None:
    x, _ = clustered(20, 50)
    index = GalleryIndex(qaconv, torch.device("cpu"), torch.bfloat16, ann_min_faces=500, ann_probe=8)
    fill(index, x[:500])
    stage = index.cosine
    training = stage._training
    assert training is not None and stage.ivf is None  # started in its own thread; nothing switched yet
    training.join()
    assert stage.ivf is None and not index.approximate  # still exact until the owner's next call
    fill(index, x[500:], start=500)  # that call adopts the file: every face, old and new, is in it
    assert stage.ivf is not None and len(stage.ivf) == len(x) and stage.ivf.trained_on == 500
    assert index.approximate and search(index, x[777], 1)["face_ids"] == ["f777"]


# -- chunked slot storage ------------------------------------------------------------------------


def test_slot_rows_grow_by_chunks_without_copying_what_they_hold() -> None:
    from service.index import SlotRows

    rows = SlotRows((3,), torch.float32, torch.device("cpu"), chunk_rows=128)
    values = torch.arange(1000 * 3, dtype=torch.float32).reshape(1000, 3)
    rows.ensure(10)
    rows.write(0, values[:10])
    first = rows.chunks[0].data_ptr()
    for start in range(10, 1000, 37):  # writes that straddle chunk boundaries
        rows.ensure(min(start + 37, 1000))
        rows.write(start, values[start : start + 37])
    assert rows.chunks[0].data_ptr() == first  # never reallocated
    assert [len(c) for c in rows.chunks][:4] == [64, 64, 128, 128] and max(len(c) for c in rows.chunks) == 128
    assert torch.equal(torch.cat(rows.views(1000)), values)
    slots = torch.tensor([999, 0, 64, 500, 63, 128, 0, 999])  # across chunks, out of order, repeated
    assert torch.equal(rows.gather(slots, 1000), values[slots])
    columns = rows.gather(slots, 1000, layout="columns")  # [3, k]: QAConv's layout, one copy
    assert torch.equal(columns, values[slots].T)
    rows.move(5, 999)
    assert torch.equal(rows.gather(torch.tensor([5]), 1000), values[999:1000])
    with pytest.raises(IndexError):
        rows.gather(torch.tensor([1000]), 1000)  # never a row nobody wrote
    with pytest.raises(IndexError):
        rows.write(rows.capacity - 1, values[:2])  # past the capacity: an error, not a loop
    rows.trim(200)
    assert rows.capacity == 384 and len(rows.chunks) == 4  # wholly unused chunks are freed, but one spare
    rows.trim(0)
    assert rows.capacity == 128 and len(rows.chunks) == 2


def test_the_index_searches_and_deletes_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.index.CHUNK_ROWS", 100)
    qa = build_model("ir_18").qaconv.eval()
    small = GalleryIndex(qa, torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr("service.index.CHUNK_ROWS", 1 << 20)
    whole = GalleryIndex(qa, torch.device("cpu"), torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    n = 530
    emb = torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=1)
    maps, occ = torch.randn(n, 512, 7, 7, generator=g), torch.rand(n, 1, 7, 7, generator=g)
    ids = [f"f{i}" for i in range(n)]
    for index in (small, whole):
        for s in range(0, n, 77):
            index.add(
                ids[s : s + 77],
                [f"s{i}" for i in range(s, min(s + 77, n))],
                emb[s : s + 77],
                maps[s : s + 77],
                occ[s : s + 77],
            )
        index.remove(["f3", "f250", "f529", "f100"])
    assert max(len(c) for c in small._maps.chunks) == 100 and max(len(c) for c in whole._maps.chunks) > 100
    for i in (7, 260, 400):
        a = small.search(emb[i], maps[i], occ[i, 0], 50)
        b = whole.search(emb[i], maps[i], occ[i, 0], 50)
        assert a["face_ids"] == b["face_ids"] and a["face_ids"][0] == f"f{i}"
        np.testing.assert_allclose(a["qaconv"], b["qaconv"], rtol=1e-5, atol=1e-5)


def test_an_empty_cosine_stage_answers_nothing() -> None:
    from service.index import CosineStage

    slots, cosines = CosineStage(torch.device("cpu")).top(torch.ones(512) / 512**0.5, 5)
    assert slots.numel() == 0 and cosines.numel() == 0
