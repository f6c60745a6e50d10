"""Image decoding, RetinaFace detection, face selection and 5-point alignment on real photos."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from model.align import (
    ARCFACE_TEMPLATE,
    DEFAULT_DETECTOR_PATH,
    FaceDetector,
    FacePipeline,
    align_face,
    decode_image,
    similarity_transform,
    to_input_tensor,
)
from model.errors import (
    FaceIndexError,
    ImageTooLargeError,
    InvalidImageError,
    MultipleFacesError,
    NoFaceError,
    UnsupportedImageFormatError,
)
from tests.conftest import encode

# Landmarks of the astronaut's face (RetinaFace, this detector), in the 512x512 image.
ASTRONAUT_LANDMARKS = np.array([[204.8, 100.8], [247.4, 103.4], [223.6, 129.2], [202.5, 138.1], [244.2, 140.6]])


class TestDecode:
    def test_png_round_trips_to_rgb(self, astronaut: np.ndarray) -> None:
        out = decode_image(encode(astronaut))
        assert out.dtype == np.uint8 and out.shape == (512, 512, 3)
        assert np.array_equal(out, astronaut)

    @pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16"])
    def test_every_common_mode_becomes_rgb(self, astronaut: np.ndarray, mode: str) -> None:
        img = Image.fromarray(astronaut)
        if mode == "I;16":
            img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
        else:
            img = img.convert(mode)
        fmt = {"CMYK": "JPEG"}.get(mode, "PNG")
        out = decode_image(encode(img, fmt))
        assert out.shape == (512, 512, 3) and out.dtype == np.uint8
        assert 40 < out.mean() < 220  # not blown out or black after conversion

    @pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
    def test_the_accepted_formats_decode(self, astronaut: np.ndarray, fmt: str) -> None:
        assert decode_image(encode(astronaut, fmt)).shape == (512, 512, 3)

    @pytest.mark.parametrize("fmt", ["GIF", "TIFF", "EPS", "ICO", "PPM", "JPEG2000"])
    def test_other_formats_are_refused_before_their_parser_runs(
        self, astronaut: np.ndarray, fmt: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        data = encode(Image.fromarray(astronaut[:64, :64]), fmt)
        Image.init()
        opened: list[str] = []
        factory, accept = Image.OPEN[fmt]
        monkeypatch.setitem(Image.OPEN, fmt, (lambda *a, **k: opened.append(fmt) or factory(*a, **k), accept))
        with pytest.raises(UnsupportedImageFormatError, match=f"{fmt} images are not accepted") as refused:
            decode_image(data)
        assert refused.value.code == "UNSUPPORTED_MEDIA" and opened == []

    @pytest.mark.parametrize("junk", [b"Z", b"\xff", b"Z\xc2\x90", b"\x00\x01", b"plain text"])
    def test_short_or_unknown_bytes_are_an_invalid_image(self, junk: bytes) -> None:
        with pytest.raises(InvalidImageError, match="not a recognised image"):
            decode_image(junk)

    def test_transparent_pixels_are_composited_on_white(self) -> None:
        rgba = np.zeros((8, 8, 4), dtype=np.uint8)
        out = decode_image(encode(Image.fromarray(rgba, "RGBA")))
        assert bool((out == 255).all())

    def test_exif_orientation_is_applied(self, astronaut: np.ndarray) -> None:
        wide = astronaut[:200]  # 200 x 512
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise on display
        out = decode_image(encode(Image.fromarray(wide), "JPEG", exif=exif.tobytes()))
        assert out.shape == (512, 200, 3)

    @pytest.mark.parametrize("payload", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
    def test_garbage_is_an_invalid_image(self, payload: bytes) -> None:
        with pytest.raises(InvalidImageError):
            decode_image(payload)

    def test_truncated_jpeg_is_an_invalid_image(self, astronaut: np.ndarray) -> None:
        data = encode(astronaut, "JPEG")
        with pytest.raises(InvalidImageError):
            decode_image(data[: len(data) // 3])

    def test_pixel_limit_is_checked_before_decoding(self, astronaut: np.ndarray) -> None:
        with pytest.raises(ImageTooLargeError) as info:
            decode_image(encode(astronaut), max_pixels=512 * 511)
        assert info.value.code == "IMAGE_TOO_LARGE"


class TestDetector:
    def test_finds_the_astronaut_with_accurate_landmarks(self, detector: FaceDetector, astronaut: np.ndarray) -> None:
        faces = detector.detect(astronaut)
        assert len(faces) == 1
        assert faces[0].score > 0.99
        assert np.abs(faces[0].landmarks - ASTRONAUT_LANDMARKS).max() < 3.0

    def test_large_photos_map_landmarks_back_to_full_resolution(
        self, detector: FaceDetector, astronaut: np.ndarray
    ) -> None:
        big = cv2.resize(astronaut, (2048, 2048), interpolation=cv2.INTER_CUBIC)
        faces = detector.detect(big)
        assert len(faces) == 1
        assert np.abs(faces[0].landmarks - ASTRONAUT_LANDMARKS * 4).max() < 12.0

    def test_tight_face_crops_are_detected(self, detector: FaceDetector, astronaut: np.ndarray) -> None:
        crop = astronaut[65:165, 180:270]  # about 90x100 px, the face fills the frame
        faces = detector.detect(crop)
        assert len(faces) == 1
        expected = ASTRONAUT_LANDMARKS - [180, 65]
        assert np.abs(faces[0].landmarks - expected).max() < 6.0

    def test_several_faces_are_found_largest_first(self, detector: FaceDetector, astronaut: np.ndarray) -> None:
        small = cv2.resize(astronaut, (256, 256))
        canvas = np.full((512, 1024, 3), 200, dtype=np.uint8)
        canvas[:512, :512] = astronaut
        canvas[128:384, 640:896] = small
        faces = detector.detect(canvas)
        assert len(faces) == 2
        assert faces[0].area > faces[1].area
        assert faces[1].box[0] > 512

    def test_no_face_in_a_landscape(self, detector: FaceDetector) -> None:
        from skimage import data

        assert detector.detect(np.ascontiguousarray(data.coffee())) == []

    def test_weights_hash_is_verified(self, tmp_path: Path) -> None:
        bad = tmp_path / "det.onnx"
        bad.write_bytes(DEFAULT_DETECTOR_PATH.read_bytes()[:-1] + b"\x00")
        with pytest.raises(ValueError, match="SHA-256"):
            FaceDetector(bad)


class TestAlignment:
    def test_similarity_transform_recovers_a_known_warp(self) -> None:
        angle, scale, shift = 0.3, 2.5, np.array([40.0, -7.0])
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        src = ARCFACE_TEMPLATE
        dst = scale * src @ rot.T + shift
        m = similarity_transform(src, dst)
        np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
        np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)

    def test_aligned_landmarks_land_on_the_template(self, astronaut: np.ndarray) -> None:
        from skimage.transform import SimilarityTransform

        m = similarity_transform(ASTRONAUT_LANDMARKS, ARCFACE_TEMPLATE)
        reference = SimilarityTransform.from_estimate(ASTRONAUT_LANDMARKS, ARCFACE_TEMPLATE).params[:2]
        np.testing.assert_allclose(m, reference, atol=1e-6)  # the same least-squares (Umeyama) fit
        mapped = ASTRONAUT_LANDMARKS @ m[:, :2].T + m[:, 2]
        assert np.linalg.norm(mapped - ARCFACE_TEMPLATE, axis=1).mean() < 5.0
        crop = align_face(astronaut, ASTRONAUT_LANDMARKS)
        assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8

    def test_aligned_crop_is_detected_as_a_centred_face(
        self, pipeline: FacePipeline, detector: FaceDetector, astronaut: np.ndarray
    ) -> None:
        crop = pipeline.align_one(astronaut).crop
        faces = detector.detect(crop)
        assert len(faces) == 1
        assert (
            np.abs(faces[0].landmarks - ARCFACE_TEMPLATE).max() < 8.0
        )  # a context-free re-detection is biased a few px

    def test_input_tensor_is_bgr_in_minus_one_one(self) -> None:
        red = np.zeros((112, 112, 3), dtype=np.uint8)
        red[..., 0] = 255
        x = to_input_tensor([red, red])
        assert x.shape == (2, 3, 112, 112) and x.dtype == torch.float32
        assert float(x[:, 2].min()) == 1.0 and float(x[:, 0].max()) == -1.0


class TestSelection:
    @pytest.fixture(scope="class")
    @classmethod
    def two_faces(cls, astronaut: np.ndarray) -> np.ndarray:
        canvas = np.full((512, 1024, 3), 200, dtype=np.uint8)
        canvas[:, :512] = astronaut
        canvas[128:384, 640:896] = cv2.resize(astronaut, (256, 256))
        return canvas

    def test_largest_is_the_default(self, pipeline: FacePipeline, two_faces: np.ndarray) -> None:
        assert pipeline.align_one(two_faces).face.box[0] < 512

    def test_index_picks_by_size_order(self, pipeline: FacePipeline, two_faces: np.ndarray) -> None:
        assert pipeline.align_one(two_faces, 1).face.box[0] > 512
        with pytest.raises(FaceIndexError):
            pipeline.align_one(two_faces, 2)

    def test_single_refuses_several_faces(self, pipeline: FacePipeline, two_faces: np.ndarray) -> None:
        with pytest.raises(MultipleFacesError) as info:
            pipeline.align_one(two_faces, "single")
        assert info.value.details["faces"] == 2

    def test_no_face_raises(self, pipeline: FacePipeline) -> None:
        with pytest.raises(NoFaceError):
            pipeline.align_one(np.full((300, 300, 3), 90, dtype=np.uint8))

    def test_align_all_returns_every_face(self, pipeline: FacePipeline, two_faces: np.ndarray) -> None:
        faces = pipeline.align_all(two_faces)
        assert [f.crop.shape for f in faces] == [(112, 112, 3)] * 2


def test_decoded_rgb_and_bytes_io_agree(astronaut: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(astronaut).save(buf, format="BMP")
    assert np.array_equal(decode_image(buf.getvalue()), astronaut)
