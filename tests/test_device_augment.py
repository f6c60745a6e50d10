"""Augmentation batched on the training device: the same occluders, targets and rules as the NumPy path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.align import ARCFACE_TEMPLATE
from model.training.augment import AugmentConfig, FaceAugmenter
from model.training.device_augment import DeviceAugmenter, OccluderBank, jpeg_like, similarity_to
from model.training.occlusion import OcclusionAugmenter
from model.training.train import Trainer
from tests.test_train import tiny_config, write_fake_cache
from tests.test_trainer_v2 import matched_config

OFF = {"flip": 0.0, "crop": 0.0, "photometric": 0.0, "low_res": 0.0, "occlusion": 0.0}


@pytest.fixture(scope="module")
def faces(astronaut: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight aligned-looking 112x112 crops (the astronaut, shifted) and the template landmarks."""
    face = np.asarray(Image.fromarray(astronaut[40:260, 140:360]).resize((112, 112)))
    crops = np.stack([np.roll(face, shift, axis=1) for shift in range(0, 16, 2)])
    landmarks = np.repeat(ARCFACE_TEMPLATE[None].astype(np.float32), len(crops), 0)
    return torch.from_numpy(crops), torch.from_numpy(landmarks)


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def occlusion() -> OcclusionAugmenter:
    return OcclusionAugmenter.from_folder(None, probability=1.0)


class TestPieces:
    def test_similarity_recovers_a_known_transform(self) -> None:
        src = torch.from_numpy(ARCFACE_TEMPLATE.astype(np.float32))[None]
        angle, scale, shift = 0.3, 1.2, torch.tensor([4.0, -3.0])
        rot = scale * torch.tensor([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]).float()
        dst = src @ rot.T + shift
        a = similarity_to(src, dst)[0]
        assert torch.allclose(a[:, :2], rot, atol=1e-4) and torch.allclose(a[:, 2], shift, atol=1e-3)

    def test_jpeg_like_degrades_as_jpeg_does(self, faces: tuple[torch.Tensor, torch.Tensor]) -> None:
        crops = faces[0][:4].numpy()
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).float()
        for quality in (30, 75):
            pil = []
            for crop in crops:
                buf = io.BytesIO()
                Image.fromarray(crop).save(buf, format="JPEG", quality=quality, subsampling=0)
                pil.append(np.asarray(Image.open(buf)))
            real = torch.from_numpy(np.stack(pil)).permute(0, 3, 1, 2).float()
            ours = jpeg_like(x, torch.full((4,), float(quality)))
            # much closer to the real codec's output than the original is: the same blocks and quantisation
            assert (ours - real).abs().mean() < 0.5 * (x - real).abs().mean()
        near_lossless = jpeg_like(x, torch.full((4,), 100.0))
        assert (near_lossless - x).abs().mean() < 1.0

    def test_a_bank_layer_paints_what_the_occluder_paints(self, faces: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Rendered over black, a layer holds colour x alpha and alpha: over a face it gives the occluder's image."""
        occ = occlusion()
        bank = OccluderBank.render(occ, 1, seed=3)
        face = faces[0][0].numpy()
        painted, visible, _ = occ.occlude(face, ARCFACE_TEMPLATE, np.random.default_rng([3, 7919]))
        layer = bank.layers[0].float() / 255.0
        ours = face.astype(np.float32) * (1 - layer[3].numpy()[..., None]) + layer[:3].permute(1, 2, 0).numpy() * 255
        assert np.abs(ours - painted.astype(np.float32)).max() <= 2.0  # uint8 rounding of colour and alpha
        assert np.abs((1 - layer[3].numpy()) - visible).max() <= 1 / 255 + 1e-6
        assert (visible < 0.5).mean() > 0.01  # it did occlude something


class TestDeviceAugmenter:
    def test_occluders_follow_the_landmarks_and_set_the_visibility(
        self, faces: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        crops, landmarks = faces
        bank = OccluderBank.render(occlusion(), 16, seed=0)
        augment = DeviceAugmenter(AugmentConfig(**{**OFF, "occlusion": 1.0}), bank)
        at_template = augment(crops, landmarks, generator(0))
        moved = augment(crops, landmarks + torch.tensor([6.0, 4.0]), generator(0))  # same draws, face moved
        assert bool(at_template.occluded.all())
        hidden = 1 - at_template.visible
        assert float(hidden.mean()) > 0.02
        # the occluder moved with the face: the hidden region shifted by (6, 4) pixels
        shifted = torch.roll(hidden, shifts=(4, 6), dims=(1, 2))
        inner = (slice(None), slice(10, 100), slice(10, 100))
        assert torch.allclose(shifted[inner], (1 - moved.visible)[inner], atol=0.05)
        # where nothing covers the face, its pixels are untouched
        clear = at_template.visible == 1
        original = crops.permute(0, 3, 1, 2).float()
        assert torch.equal(at_template.student.permute(0, 2, 3, 1)[clear], original.permute(0, 2, 3, 1)[clear])

    def test_the_teacher_view_is_the_student_view_without_the_occluder(
        self, faces: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        crops, landmarks = faces
        config = AugmentConfig(flip=0.5, crop=1.0, photometric=1.0, low_res=1.0, occlusion=1.0, blur=0.5, jpeg=0.5)
        augment = DeviceAugmenter(config, OccluderBank.render(occlusion(), 8, seed=0))
        out = augment(crops, landmarks, generator(1), teacher_view=True)
        plain = DeviceAugmenter(AugmentConfig(**{**config.__dict__, "occlusion": 0.0}), None)
        clean = plain(crops, landmarks, generator(1), teacher_view=True)
        assert out.teacher is not None and clean.teacher is not None
        assert not torch.equal(out.student, out.teacher)  # the occluders differ
        # the occluder-free path draws the same flips, crops, colours, resolutions, blur and JPEG qualities
        # after one more uniform draw per face (whether to occlude), so compare only what the crop keeps
        assert out.student.shape == out.teacher.shape == (8, 3, 112, 112)
        assert float(out.visible.min()) >= 0 and float(out.visible.max()) <= 1

    def test_batches_are_a_function_of_the_seed(self, faces: tuple[torch.Tensor, torch.Tensor]) -> None:
        crops, landmarks = faces
        config = AugmentConfig(crop=0.5, photometric=0.5, low_res=0.5, occlusion=0.5, blur=0.3, jpeg=0.3, mix=0.25)
        augment = DeviceAugmenter(config, OccluderBank.render(occlusion(), 8, seed=0))
        a = augment(crops, landmarks, generator(5), teacher_view=True)
        b = augment(crops, landmarks, generator(5), teacher_view=True)
        c = augment(crops, landmarks, generator(6), teacher_view=True)
        assert torch.equal(a.student, b.student) and torch.equal(a.visible, b.visible)
        assert not torch.equal(a.student, c.student)

    def test_mixed_views_are_appended_and_made_of_two_faces(self, faces: tuple[torch.Tensor, torch.Tensor]) -> None:
        crops, landmarks = faces
        augment = DeviceAugmenter(AugmentConfig(**{**OFF, "mix": 0.5, "mix_cutmix": 1.0}), None)
        out = augment(crops, landmarks, generator(2), teacher_view=True)
        assert out.student.shape[0] == 8 + 4 and out.mixed_from.shape == (4, 2)
        assert out.teacher is not None and out.teacher.shape == out.student.shape
        assert bool((out.mixed_from[:, 0] != out.mixed_from[:, 1]).all())
        for view, (i, j) in zip(out.student[8:], out.mixed_from.tolist(), strict=True):
            # cutmix: every pixel comes from one of the two faces
            from_i = (view == out.student[i]).all(0)
            from_j = (view == out.student[j]).all(0)
            assert bool((from_i | from_j).all())
        mixup = DeviceAugmenter(AugmentConfig(**{**OFF, "mix": 0.5, "mix_cutmix": 0.0}), None)
        out = mixup(crops, landmarks, generator(2), teacher_view=True)
        for view, (i, j) in zip(out.student[8:], out.mixed_from.tolist(), strict=True):
            lam = ((view - out.student[j]) / (out.student[i] - out.student[j])).nan_to_num(nan=0.5)
            weights = lam[(out.student[i] - out.student[j]).abs() > 20]
            assert float(weights.std()) < 1e-3 and 0 <= float(weights.mean()) <= 1  # one weight for the whole view


class TestTrainerOnTheDevice:
    def test_numpy_path_refuses_what_only_the_device_makes(self, tmp_path: Path, astronaut: np.ndarray) -> None:
        with pytest.raises(ValueError, match="device"):
            FaceAugmenter(AugmentConfig(jpeg=0.5), None)
        cache = write_fake_cache(tmp_path / "cache", astronaut)
        with pytest.raises(ValueError, match="augment_on"):
            tiny_config(cache, tmp_path / "run", augment={"blur": 0.5})
        with pytest.raises(ValueError, match="matched"):
            tiny_config(cache, tmp_path / "run", augment_on="device", augment={"mix": 0.25})

    def test_a_run_with_device_batches_and_mixed_views_trains(self, tmp_path: Path, astronaut: np.ndarray) -> None:
        cache = write_fake_cache(tmp_path / "cache", astronaut)
        cfg = matched_config(
            cache,
            tmp_path / "run",
            augment_on="device",
            occluder_bank=8,
            augment={"blur": 0.3, "jpeg": 0.3, "mix": 0.25},
            max_steps=2,
        )
        trainer = Trainer(cfg)
        assert trainer.device_source is not None
        batch = trainer.sampler.batches(0)[0]
        prepared = trainer.device_source.prepare(0, batch)
        b = len(batch) + 2
        assert prepared.inputs.shape[0] == b + max(1, round(0.25 * b)) and prepared.labelled == len(batch)
        assert prepared.teacher_views is not None and prepared.visibility.shape == (prepared.inputs.shape[0], 7, 7)
        step = trainer.train_step(batch)
        assert {"distill_relation", "margin", "occlusion"} <= set(step)
        assert all(np.isfinite(v) for k, v in step.items() if k != "visibility_clean")
        assert trainer.fit()["global_step"] == 2
