"""Int8 QAConv maps in the in-memory index (``OAML_MAP_STORAGE=int8``): the quantisation's error bound, the index
matching what the pair path measures, scales that move and vanish with their maps, and the bytes it saves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.net import build_model
from model.qaconv import dequantise_maps, quantise_maps
from service.index import GalleryIndex


@pytest.fixture(scope="module")
def qaconv() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("ir_18", qaconv_channels=64).qaconv.eval()


def faces(n: int, channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings, maps whose channels span three orders of magnitude (as after a principal-direction
    projection), and visibility."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=1)
    spread = torch.logspace(0, -3, channels)[None, :, None, None]
    return emb, torch.randn(n, channels, 7, 7, generator=g) * spread, torch.rand(n, 1, 7, 7, generator=g)


def test_each_value_is_within_half_a_step_of_its_channel_scale() -> None:
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(5, 64, 49, generator=g) * torch.logspace(1, -4, 64)[None, :, None]
    rows[2, 7] = 0.0  # a channel with nothing in it: scale 0, values 0, never a NaN
    values, scales = quantise_maps(rows)
    assert values.dtype == torch.int8 and scales.shape == (5, 64) and int(values.abs().max()) == 127
    back = dequantise_maps(values, scales, torch.float32)
    assert torch.isfinite(back).all() and float(back[2, 7].abs().max()) == 0.0
    step = scales[..., None].expand_as(rows)
    assert bool(((back - rows).abs() <= step / 2 + 1e-7 * rows.abs()).all())
    # the smallest channel keeps its own resolution: a per-face scale would have rounded it to 0
    assert float((back[:, -1] - rows[:, -1]).abs().max()) < 0.01 * float(rows[:, -1].abs().max())
    columns = dequantise_maps(values.transpose(0, 1), scales.T, torch.float32)  # QAConv's layout [C, N, hw]
    assert torch.equal(columns, back.transpose(0, 1))
    with pytest.raises(ValueError, match="expected maps"):
        quantise_maps(rows[0])


def test_the_int8_index_scores_as_the_pair_path_measures_it(qaconv: torch.nn.Module) -> None:
    """What bench_heads_val --int8 measures (match_pairs with the gallery side in int8) is what the index serves."""
    emb, maps, occ = faces(40, 64, seed=2)
    index = GalleryIndex(qaconv, torch.device("cpu"), torch.float32, map_storage="int8")
    index.add([f"f{i}" for i in range(40)], [f"s{i}" for i in range(40)], emb, maps, occ)
    probe = 5
    served = index.score_faces([f"f{i}" for i in range(40)], emb[probe], maps[probe], occ[probe])["qaconv"]
    pairs = [maps[probe : probe + 1].expand(40, -1, -1, -1), maps, occ[probe : probe + 1].expand(40, -1, -1, -1), occ]
    with torch.no_grad():
        quantised = qaconv.match_pairs(*pairs, gallery_storage="int8").numpy()
        native = qaconv.match_pairs(*pairs).numpy()
    np.testing.assert_allclose(served, quantised, rtol=1e-4, atol=1e-4)
    assert not np.allclose(quantised, native, rtol=0, atol=1e-7)  # int8 is not a no-op...
    np.testing.assert_allclose(quantised, native, atol=0.02 * float(np.abs(native).max()))  # ...but close
    with pytest.raises(ValueError, match="gallery_storage"):
        qaconv.match_pairs(*pairs, gallery_storage="int4")
    # whatever the matching dtype, the stored values are quantised once, from fp32
    bf16 = GalleryIndex(qaconv, torch.device("cpu"), torch.bfloat16, map_storage="int8")
    bf16.add([f"f{i}" for i in range(40)], [f"s{i}" for i in range(40)], emb, maps, occ)
    prepared = qaconv.prepare_gallery(maps, occ).maps.reshape(64, 40, 49).permute(1, 0, 2)
    assert torch.equal(bf16._maps.gather(torch.arange(40), 40), quantise_maps(prepared)[0])


def test_scales_move_and_vanish_with_their_maps(monkeypatch: pytest.MonkeyPatch, qaconv: torch.nn.Module) -> None:
    monkeypatch.setattr("service.index.CHUNK_ROWS", 100)  # deletes move faces across chunks
    n = 230
    emb, maps, occ = faces(n, 64, seed=3)
    ids = [f"f{i}" for i in range(n)]
    int8 = GalleryIndex(qaconv, torch.device("cpu"), torch.bfloat16, map_storage="int8")
    native = GalleryIndex(qaconv, torch.device("cpu"), torch.bfloat16, map_storage="native")
    for index in (int8, native):
        for s in range(0, n, 64):
            index.add(ids[s : s + 64], [f"s{i}" for i in range(s, min(s + 64, n))], emb[s : s + 64], maps[s : s + 64],
                      occ[s : s + 64])  # fmt: skip
    probes = (7, 150, 229)
    before = {p: int8.search(emb[p], maps[p], occ[p, 0], n) for p in probes}
    for index in (int8, native):
        index.remove(["f3", "f120", "f228"])  # f229 and f227 move into the holes, in other chunks
    assert int8._scales is not None and native._scales is None
    for rows in (int8._maps, int8._scales):  # nothing of a deleted face stays in memory, its scales included
        assert float(torch.cat(rows.chunks)[int8.count :].float().abs().sum()) == 0.0
    for p in probes:
        got = int8.search(emb[p], maps[p], occ[p, 0], n)
        assert got["face_ids"][0] == f"f{p}" and len(got["face_ids"]) == n - 3
        was = dict(zip(before[p]["face_ids"], before[p]["qaconv"], strict=True))
        # a moved face scores as before its move (to float rounding): its scales travelled with its values
        moved = np.array([float(s) - float(was[f]) for f, s in zip(got["face_ids"], got["qaconv"], strict=True)])
        assert np.abs(moved).max() < 1e-6
        ref = native.search(emb[p], maps[p], occ[p, 0], n)
        assert set(got["face_ids"]) == set(ref["face_ids"])
        ref_qa = dict(zip(ref["face_ids"], ref["qaconv"], strict=True))
        diff = np.array([float(s) - float(ref_qa[f]) for f, s in zip(got["face_ids"], got["qaconv"], strict=True)])
        assert np.abs(diff).max() < 0.05 * float(np.abs(ref["qaconv"]).max())
    assert int8.describe()["map_storage"] == "int8" and native.describe()["map_storage"] == "native"
    # a gallery that shrinks gives back whole chunks of scales with those of the maps
    held = int8.memory_bytes()
    int8.remove([f for f in ids if int(f[1:]) >= 20])
    assert len(int8._scales.chunks) == len(int8._maps.chunks) < 4 and int8.memory_bytes() < held / 2
    assert int8.search(emb[7], maps[7], occ[7, 0], 5)["face_ids"][0] == "f7"


def test_int8_maps_take_about_half_the_bytes(qaconv: torch.nn.Module) -> None:
    emb, maps, occ = faces(64, 64, seed=4)
    sizes = {}
    for storage in ("native", "int8"):
        index = GalleryIndex(qaconv, torch.device("cpu"), torch.bfloat16, map_storage=storage)
        index.add([f"f{i}" for i in range(64)], ["s"] * 64, emb, maps, occ)
        sizes[storage] = index.memory_bytes() - index.cosine.emb.nbytes() - index._face.numel() * 4
    assert sizes["native"] == 64 * 64 * 49 * 2 and sizes["int8"] == 64 * (64 * 49 + 64 * 4)
    with pytest.raises(ValueError, match="map_storage"):
        GalleryIndex(qaconv, torch.device("cpu"), torch.bfloat16, map_storage="int4")
