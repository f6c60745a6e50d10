"""The PyTorch RetinaFace (model/retinaface.py) against the onnxruntime graph it was read from.

The torch path serves on GPU hosts, batched across requests; it must find the same faces, at the
same places, as the onnxruntime path that made the training crops and serves on CPUs.
"""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model.align import DEFAULT_DETECTOR_PATH, DetectedFace, FaceDetector, FacePipeline, load_image
from model.errors import MultipleFacesError
from model.retinaface import RetinaFaceMNet, load_retinaface_onnx
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def torch_detector() -> FaceDetector:
    return FaceDetector(backend="torch", device="cuda" if torch.cuda.is_available() else "cpu")


def real_photos(astronaut: np.ndarray) -> dict[str, np.ndarray]:
    """Real photos: the astronaut in several framings, plus 20 LFW photos when ../shared is present."""
    canvas = np.full((512, 1024, 3), 200, dtype=np.uint8)
    canvas[:, :512] = astronaut
    canvas[128:384, 640:896] = cv2.resize(astronaut, (256, 256))
    photos = {
        "astronaut": astronaut,
        "astronaut_640x480": cv2.resize(astronaut, (640, 480)),
        "astronaut_1600": cv2.resize(astronaut, (1600, 1600)),
        "tight_crop": np.ascontiguousarray(astronaut[65:165, 180:270]),
        "two_faces": canvas,
    }
    lfw = SHARED_DATA / "eval" / "lfw"
    if lfw.is_dir():
        files = sorted(lfw.rglob("*.jpg"))
        for path in random.Random(0).sample(files, min(20, len(files))):
            photos[path.stem] = load_image(path)
    return photos


def iou(a: DetectedFace, b: DetectedFace) -> float:
    x1, y1 = max(a.box[0], b.box[0]), max(a.box[1], b.box[1])
    x2, y2 = min(a.box[2], b.box[2]), min(a.box[3], b.box[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / (a.area + b.area - inter)


def assert_same_faces(expected: list[DetectedFace], got: list[DetectedFace], what: str) -> None:
    assert len(got) == len(expected), f"{what}: {len(got)} faces, onnxruntime finds {len(expected)}"
    for e, g in zip(expected, got, strict=True):
        assert iou(e, g) >= 0.95, f"{what}: box IoU {iou(e, g):.3f}"
        assert np.abs(e.landmarks - g.landmarks).max() <= 1.0, f"{what}: landmarks {e.landmarks} vs {g.landmarks}"
        assert abs(e.score - g.score) < 0.01


class TestTorchRetinaFace:
    def test_raw_outputs_match_the_onnx_graph(
        self, detector: FaceDetector, torch_detector: FaceDetector, astronaut: np.ndarray
    ) -> None:
        inp = detector.prepare(astronaut)
        ours = torch_detector.forward([inp.blob])[0]
        theirs = detector.forward([inp.blob])[0]
        assert ours.canvas == theirs.canvas == (512, 512)
        np.testing.assert_allclose(ours.conf, theirs.conf, atol=1e-4)
        np.testing.assert_allclose(ours.loc, theirs.loc, atol=1e-3)
        np.testing.assert_allclose(ours.landmarks, theirs.landmarks, atol=1e-3)

    def test_same_faces_as_onnxruntime_on_real_photos(
        self, detector: FaceDetector, torch_detector: FaceDetector, astronaut: np.ndarray
    ) -> None:
        photos = real_photos(astronaut)
        found = 0
        for name, image in photos.items():
            expected = detector.detect(image)
            assert_same_faces(expected, torch_detector.detect(image), name)
            found += len(expected)
        assert found >= len(photos)  # every photo has a face (two_faces has two)

    def test_a_batch_of_different_sizes_finds_what_each_photo_finds_alone(
        self, torch_detector: FaceDetector, astronaut: np.ndarray
    ) -> None:
        photos = list(real_photos(astronaut).values())[:5]
        inputs = [torch_detector.prepare(image) for image in photos]
        outputs = torch_detector.forward([inp.blob for inp in inputs])
        assert len({out.canvas for out in outputs}) == 1  # padded to one canvas
        for image, inp, out in zip(photos, inputs, outputs, strict=True):
            alone = torch_detector.decode(inp, torch_detector.forward([inp.blob])[0])
            assert_same_faces(alone, torch_detector.decode(inp, out), f"{image.shape}")

    def test_a_graph_missing_weights_is_refused(self, tmp_path: Path) -> None:
        import onnx

        model = onnx.load(str(DEFAULT_DETECTOR_PATH))
        conv = next(n for n in model.graph.node if n.op_type == "Conv" and "landmark_head.2" in n.output[0])
        model.graph.node.remove(conv)
        path = tmp_path / "broken.onnx"
        onnx.save(model, str(path))
        with pytest.raises(ValueError, match=r"no weights for \['landmark_head.2.bias', 'landmark_head.2.weight'\]"):
            load_retinaface_onnx(path)

    def test_a_file_with_another_hash_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "det.onnx"
        path.write_bytes(DEFAULT_DETECTOR_PATH.read_bytes() + b"\0")
        with pytest.raises(ValueError, match="SHA-256"):
            load_retinaface_onnx(path, expected_sha256="0" * 64)

    def test_every_parameter_is_loaded(self) -> None:
        net = load_retinaface_onnx(DEFAULT_DETECTOR_PATH)
        fresh = RetinaFaceMNet()
        changed = [k for k, v in net.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
        assert len(changed) == len(fresh.state_dict()) == 2 * 56  # 56 convolutions, weight and bias


class TestPrepare:
    @pytest.mark.parametrize("shape,pad", [((480, 640), False), ((217, 301), False), ((150, 130), True)])
    def test_blob_is_bgr_minus_the_mean_then_zero_padding(
        self, detector: FaceDetector, shape: tuple[int, int], pad: bool
    ) -> None:
        image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
        inp = detector.prepare(image, pad=pad)
        vh, vw = inp.view
        assert inp.blob.shape[1] % 32 == 0 and inp.blob.shape[2] % 32 == 0
        if pad:
            side = 2 * max(shape)
            canvas = np.full((side, side, 3), 127, dtype=np.uint8)
            top, left = (side - shape[0]) // 2, (side - shape[1]) // 2
            canvas[top : top + shape[0], left : left + shape[1]] = image
            image = canvas
        view = (
            image
            if (vh, vw) == image.shape[:2]
            else cv2.resize(image, (vw, vh), interpolation=cv2.INTER_AREA if vw < image.shape[1] else cv2.INTER_LINEAR)
        )
        expected = (view[..., ::-1].astype(np.float32) - np.array([104.0, 117.0, 123.0], dtype=np.float32)).transpose(
            2, 0, 1
        )
        np.testing.assert_array_equal(inp.blob[:, :vh, :vw], expected)
        assert not inp.blob[:, vh:, :].any() and not inp.blob[:, :, vw:].any()


class TestCoarsePass:
    """Where the largest face is wanted, a photo is detected at 320 pixels and again around its face, not whole."""

    @staticmethod
    def portrait(astronaut: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(cv2.resize(astronaut, (1280, 1280))[150:850, 300:860])

    @staticmethod
    def passes(detector: FaceDetector, image: np.ndarray, coarse: bool) -> tuple[list[DetectedFace], list[tuple]]:
        shapes: list[tuple] = []
        forward = detector.forward

        def counting(blobs: list[np.ndarray]) -> list:
            shapes.extend(b.shape for b in blobs)
            return forward(blobs)

        detector.forward = counting  # type: ignore[method-assign]
        try:
            return detector.detect(image, coarse=coarse), shapes
        finally:
            del detector.forward

    @pytest.mark.parametrize("size", [(480, 640), (700, 560), (1600, 1600)])
    def test_two_small_passes_find_the_face_the_full_pass_finds(
        self, detector: FaceDetector, astronaut: np.ndarray, size: tuple[int, int]
    ) -> None:
        photo = cv2.resize(astronaut, size[::-1]) if size != (700, 560) else self.portrait(astronaut)
        faces, shapes = self.passes(detector, photo, coarse=True)
        full, full_shapes = self.passes(detector, photo, coarse=False)
        assert len(shapes) == 2 and shapes[0][1:] == detector.coarse_input(photo).blob.shape[1:]  # type: ignore[union-attr]
        assert sum(s[1] * s[2] for s in shapes) < 0.75 * full_shapes[0][1] * full_shapes[0][2]  # less work
        assert len(faces) == len(full) == 1 and iou(faces[0], full[0]) >= 0.85
        # the detector's landmarks move by a few pixels with its input (the whole photo or a square of it)
        assert np.abs(faces[0].landmarks - full[0].landmarks).max() <= 0.04 * full[0].width

    def test_a_small_face_goes_on_to_the_full_pass(self, detector: FaceDetector, astronaut: np.ndarray) -> None:
        canvas = np.full((960, 1280, 3), 90, dtype=np.uint8)
        canvas[400:656, 600:856] = cv2.resize(astronaut, (256, 256))  # the face ~45 px, ~22 px at 640: none at 320
        faces, shapes = self.passes(detector, canvas, coarse=True)
        assert shapes == [(3, 256, 320), (3, 480, 640)]  # the coarse pass, then the full one
        full, _ = self.passes(detector, canvas, coarse=False)
        assert len(full) == 1 and [f.box for f in faces] == [f.box for f in full]

    def test_no_coarse_pass_where_the_full_input_is_no_larger(
        self, detector: FaceDetector, astronaut: np.ndarray
    ) -> None:
        small = cv2.resize(astronaut, (250, 250))  # LFW's size: the full pass upscales it to 320 anyway
        faces, shapes = self.passes(detector, small, coarse=True)
        assert shapes == [(3, 320, 320)] and len(faces) == 1

    def test_the_refining_pass_keeps_its_own_face_only(self) -> None:
        def face(x: float, w: float) -> DetectedFace:
            return DetectedFace((x, 10.0, x + w, 10.0 + w), 0.99, np.zeros((5, 2)))

        lost = FaceDetector.refined(face(100, 80), [])  # as it was, not refined
        assert lost.box == face(100, 80).box and not lost.refined
        assert not FaceDetector.refined(face(100, 80), [face(160, 80)]).refined  # another face of the square
        again = FaceDetector.refined(face(100, 80), [face(160, 80), face(102, 78)])
        assert again.refined and again.box[0] == 102

    def test_every_aligned_face_is_refined_whichever_pass_found_it(
        self, pipeline: FacePipeline, astronaut: np.ndarray
    ) -> None:
        photo = cv2.resize(astronaut, (1600, 1600))  # a large face: ~300 px in the whole photo's 640 input
        single, largest = pipeline.align_one(photo, "single"), pipeline.align_one(photo, "largest")
        assert single.face.refined and largest.face.refined and pipeline.align_one(photo, 0).face.refined
        assert all(f.face.refined for f in pipeline.align_all(photo))
        # both refined from a 128-pixel view of the face, from slightly different boxes: nearly the same landmarks
        assert np.abs(single.face.landmarks - largest.face.landmarks).max() <= 0.02 * single.face.width

    def test_every_face_an_index_and_single_use_the_full_pass(
        self, pipeline: FacePipeline, astronaut: np.ndarray
    ) -> None:
        canvas = np.full((640, 800, 3), 200, dtype=np.uint8)
        canvas[:, :512] = cv2.resize(self.portrait(astronaut), (512, 640))  # a large face (~210 px) ...
        canvas[400:528, 560:688] = cv2.resize(astronaut, (128, 128))  # ... and a small one (~20 px), lost at 320
        assert len(pipeline.detector.detect(canvas, coarse=True)) == 1
        assert len(pipeline.align_all(canvas)) == 2
        assert pipeline.align_one(canvas, 1).face.area < pipeline.align_one(canvas, "largest").face.area
        with pytest.raises(MultipleFacesError):  # "single" sees every face the full pass sees
            pipeline.align_one(canvas, "single")

    def test_off_when_coarse_side_is_none(self, astronaut: np.ndarray) -> None:
        detector = FaceDetector(coarse_side=None)
        assert detector.coarse_input(cv2.resize(astronaut, (1280, 1280))) is None
