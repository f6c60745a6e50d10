"""Trainer v2: teacher views, unlabelled faces, batches prepared in worker processes, time budgets, fp16 starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import export_backbone, load_checkpoint
from model.net import build_model
from model.training.augment import AugmentConfig, FaceAugmenter
from model.training.batches import BatchSource, Prefetcher, PreparedBatch
from model.training.occlusion import OcclusionAugmenter
from model.training.train import TrainConfig, Trainer, _RunClock
from tests.test_train import tiny_config, write_fake_cache


@pytest.fixture()
def cache(tmp_path: Path, astronaut: np.ndarray) -> Path:
    return write_fake_cache(tmp_path / "cache", astronaut)


def augmenter(occlusion: float = 1.0, crop: float = 1.0) -> FaceAugmenter:
    config = AugmentConfig(flip=0.5, crop=crop, photometric=1.0, low_res=1.0, occlusion=occlusion)
    return FaceAugmenter(config, OcclusionAugmenter.from_folder(None, probability=1.0))


class TestTeacherView:
    def test_the_teacher_sees_the_student_view_without_the_occluder(self, astronaut: np.ndarray) -> None:
        from model.align import align_face
        from tests.test_train import ASTRONAUT_LANDMARKS

        face = align_face(astronaut, ASTRONAUT_LANDMARKS)
        lm = np.asarray(ASTRONAUT_LANDMARKS)
        occluded = 0
        for seed in range(12):
            alone = augmenter()(face, lm, np.random.default_rng(seed))
            both = augmenter()(face, lm, np.random.default_rng(seed), teacher_view=True)
            assert np.array_equal(alone.image, both.image)  # asking for the teacher view changes nothing
            assert both.teacher_image is not None and both.teacher_image.shape == face.shape
            # without the crop, what is hidden is the occluder. Outside it the views differ only by the contrast
            # pivot (the image's own mean grey, which the occluder shifts) and resampling near its edges
            uncropped = augmenter(crop=0.0)(face, lm, np.random.default_rng(seed), teacher_view=True)
            assert uncropped.teacher_image is not None
            hidden = uncropped.visible < 0.99
            diff = np.abs(uncropped.image.astype(int) - uncropped.teacher_image.astype(int)).mean(axis=2)
            assert np.median(diff[~hidden]) <= 12
            if hidden.any():  # the occluder is what tells the two views apart
                occluded += 1
                assert diff[hidden].mean() > 2 * np.median(diff[~hidden]) + 5
            unoccluded = augmenter(occlusion=0.0)(face, lm, np.random.default_rng(seed), teacher_view=True)
            assert np.array_equal(unoccluded.image, unoccluded.teacher_image)
        assert occluded >= 3


class TestBatches:
    def source(self, cache: Path, matched: bool) -> BatchSource:
        from model.training.train import load_training_data

        data = load_training_data([str(cache)])
        return BatchSource(
            augmenter=augmenter(0.5),
            images=data.images,
            landmarks=data.landmarks,
            rows=np.arange(len(data.images)),
            labels=data.labels,
            seed=7,
            teacher_view="matched" if matched else "clean",
            teacher_table=None
            if matched
            else np.random.default_rng(0).normal(size=(len(data.images), 2, 128)).astype(np.float32),
            unlabeled_images=data.images[:5],
            unlabeled_landmarks=data.landmarks[:5],
            unlabeled_per_batch=3,
            unlabeled_teacher_table=None if matched else np.zeros((5, 2, 128), np.float32),
        )

    @pytest.mark.parametrize("matched", [True, False])
    def test_pieces_and_worker_processes_give_the_same_batch(self, cache: Path, matched: bool) -> None:
        source = self.source(cache, matched)
        batch = np.array([0, 1, 4, 5, 8, 9])
        whole = source.prepare(3, batch)
        assert len(whole.images) == 9 and whole.labelled == 6 and np.array_equal(whole.labels, source.labels[batch])
        assert (whole.teacher_images is not None) == matched and (whole.teacher_targets is not None) != matched
        pieces = PreparedBatch.merge([source.prepare(3, batch, 0, 4), source.prepare(3, batch, 4, 9)])
        prefetcher = Prefetcher(source, workers=2)
        try:
            prefetcher.request(3, batch)
            fetched = prefetcher.take(3, batch)
        finally:
            prefetcher.close()
        for other in (pieces, fetched):
            assert np.array_equal(other.images, whole.images) and np.array_equal(other.visibility, whole.visibility)
            assert np.array_equal(other.labels, whole.labels) and np.array_equal(other.occluded, whole.occluded)
        assert not np.array_equal(source.prepare(4, batch).images, whole.images)  # another step, other draws


def matched_config(cache: Path, out: Path, **overrides: object) -> TrainConfig:
    """A tiny run with the matched teacher and two unlabelled faces a step (the same cache, unlabelled)."""
    return tiny_config(
        cache, out, teacher=True, teacher_view="matched", unlabeled=[str(cache)], unlabeled_per_batch=2, **overrides
    )


class TestTrainerV2:
    def test_matched_teacher_and_unlabelled_faces_train(self, tmp_path: Path, cache: Path) -> None:
        cfg = matched_config(cache, tmp_path / "run", max_steps=2)
        trainer = Trainer(cfg)
        assert trainer.teacher_net is not None and trainer.teacher_emb is None
        step = trainer.train_step(trainer.sampler.batches(0)[0])
        assert {"distill_relation", "distill_feature", "margin", "qaconv_pair", "occlusion"} <= set(step)
        assert all(np.isfinite(v) for k, v in step.items() if k != "visibility_clean")  # NaN when all are occluded

    def test_config_rules(self, cache: Path, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="teacher_view"):
            tiny_config(cache, tmp_path, teacher_view="noisy")
        with pytest.raises(ValueError, match="unlabeled"):
            tiny_config(cache, tmp_path, unlabeled=[str(cache)])
        with pytest.raises(ValueError, match="teacher"):
            tiny_config(cache, tmp_path, unlabeled=[str(cache)], unlabeled_per_batch=2, teacher=False)

    def test_a_half_precision_serving_file_starts_a_run_with_a_fresh_optimizer(
        self, tmp_path: Path, cache: Path
    ) -> None:
        """A GPU run returns weights, not optimiser state: training goes on from the fp16 file."""
        torch.manual_seed(3)
        export_backbone(build_model("ir_18").eval(), tmp_path / "gpu.safetensors", dtype=torch.float16)
        served, _ = load_checkpoint(tmp_path / "gpu.safetensors")
        trainer = Trainer(
            tiny_config(cache, tmp_path / "cpu", init_from=str(tmp_path / "gpu.safetensors"), max_steps=2)
        )
        for name, value in served.state_dict().items():
            assert torch.equal(trainer.model.state_dict()[name].cpu(), value), name
        assert not trainer.optimizer.state  # nothing carried over
        trainer.fit()
        assert trainer.state["global_step"] == 2


class TestRunEnd:
    def test_a_step_limit_inside_an_epoch_validates_and_exports_the_final_model(
        self, tmp_path: Path, cache: Path
    ) -> None:
        trainer = Trainer(tiny_config(cache, tmp_path / "run", max_steps=2, epochs=1000))
        assert trainer.steps_per_epoch > 2  # the limit falls inside the first epoch
        trainer.fit()
        rows = (tmp_path / "run" / "epochs.csv").read_text().splitlines()
        assert len(rows) == 2 and rows[1].split(",")[1] == "2"  # one row, at the last (decayed) step
        assert (tmp_path / "run" / "best.safetensors").exists()

    def test_an_interrupted_run_does_not_validate(self, tmp_path: Path, cache: Path) -> None:
        Trainer(tiny_config(cache, tmp_path / "run", max_steps=2, epochs=1000)).fit(stop_after=1)
        assert not (tmp_path / "run" / "epochs.csv").exists()


class TestTimeBudget:
    def test_the_schedule_is_sized_to_end_inside_the_budget(self, monkeypatch: pytest.MonkeyPatch) -> None:
        now = [1000.0]
        monkeypatch.setattr("model.training.train.time.perf_counter", lambda: now[0])
        clock = _RunClock(budget_minutes=10, first_step=0, validate_every_s=60)
        sizes = []
        for step in range(1, 260):
            now[0] += 0.5  # two steps a second
            if step == 100:
                clock.spent_validating(10.0)
                now[0] += 10.0
            size = clock.resize(step)
            if size is not None:
                sizes.append((step, size))
        assert [s for s, _ in sizes] == [20, 200]
        # 600 s budget, 3% margin, 0.5 s a step, validations of 10 s every 60 s: about 890 steps in all
        first, second = sizes[0][1], sizes[1][1]
        assert 1000 < first <= 1170  # before any validation was timed
        assert 800 < second < 1000 and second < first  # the validations' share is now known
        assert _RunClock(None, 0).resize(20) is None

    def test_a_budgeted_run_ends_and_resumes_with_its_sized_schedule(self, tmp_path: Path, cache: Path) -> None:
        cfg = tiny_config(
            cache, tmp_path / "run", max_steps=None, epochs=1000, budget_minutes=0.25, validate_every_s=5.0
        )
        trainer = Trainer(cfg)
        state = trainer.fit()
        assert state["total_steps"] is not None and state["global_step"] == state["total_steps"]
        assert len(state["history"]) >= 1 and (tmp_path / "run" / "best.safetensors").exists()
        assert Trainer(cfg).total_steps == state["total_steps"]

    def test_a_budget_far_below_the_schedule_validates_exports_and_ends_inside_it(
        self, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Steps of about 2 s (a CPU emulating bf16 is this slow) against a 12 s budget and a schedule of
        thousands of steps: the run stops on time, with its validation and export done."""
        import time as clock

        slow = Trainer.train_step

        def slow_step(self: Trainer, batch: object) -> dict[str, float]:
            clock.sleep(2.0)
            return slow(self, batch)  # type: ignore[arg-type]

        monkeypatch.setattr(Trainer, "train_step", slow_step)
        cfg = tiny_config(cache, tmp_path / "run", max_steps=None, epochs=1000, budget_minutes=0.2)
        started = clock.perf_counter()
        trainer = Trainer(cfg)
        planned = trainer.total_steps
        state = trainer.fit()
        elapsed = clock.perf_counter() - started
        assert elapsed <= 12.0 + 1.5, f"a 12 s budget took {elapsed:.1f} s"  # 1.5 s: a loaded test machine
        assert 1 <= state["global_step"] == state["total_steps"] < planned
        assert len(state["history"]) >= 1 and (tmp_path / "run" / "best.safetensors").exists()
        assert (tmp_path / "run" / "last.pt").exists()


class TestPrecision:
    @pytest.mark.parametrize(
        "flags",
        [
            "fpu sse avx2 avx512f avx512_bf16",  # e.g. AMD EPYC Genoa
            "fpu sse avx2 avx512f amx_bf16 amx_tile",  # e.g. Intel Sapphire Rapids
            "fpu sse avx2 fma",  # AMD EPYC Milan: no native bf16
            "",  # /proc/cpuinfo unreadable
        ],
    )
    def test_the_trainer_and_the_embedder_choose_alike_on_every_cpu(
        self, flags: str, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from model.cpu import cpu_has_bf16
        from model.embedder import Embedder

        monkeypatch.setattr("model.cpu.cpu_flags", lambda: flags)
        trainer = Trainer.__new__(Trainer)
        trainer.cfg = tiny_config(cache, tmp_path / "run", precision="auto")
        trainer._setup_runtime()
        embedder = Embedder(build_model("ir_18"), device="cpu")
        assert trainer.autocast_dtype == embedder.autocast
        native = cpu_has_bf16(flags) and torch.backends.mkldnn.is_available()
        assert trainer.autocast_dtype == (torch.bfloat16 if native else None)
        assert trainer.precision == ("bf16" if native else "fp32")


class TestBundle:
    def test_a_bundle_is_a_data_root_the_trainer_reads(self, tmp_path: Path, cache: Path) -> None:
        from model.training.bundle import make_bundle
        from model.training.face import AlignedCache

        summary = make_bundle(tmp_path / "bundle", [cache], None, quality=80, teacher=True)
        packed = AlignedCache(tmp_path / "bundle" / cache.name)
        original = AlignedCache(cache)
        assert summary["caches"] == {cache.name: len(original)} and len(packed) == len(original)
        assert np.array_equal(packed.labels, original.labels)
        # JPEG at q80 of these noisy test crops: close, not equal
        assert np.abs(packed.load_images().astype(int) - original.load_images().astype(int)).mean() < 12
        teacher = tmp_path / "bundle" / summary["teacher"]
        cfg = tiny_config(
            tmp_path / "bundle" / cache.name,
            tmp_path / "run",
            max_steps=1,
            teacher=True,
            teacher_view="matched",
            teacher_weights=str(teacher),
        )
        trainer = Trainer(cfg)
        assert trainer.teacher_net is not None and trainer.fit()["global_step"] == 1
        with pytest.raises(ValueError, match="over the"):
            make_bundle(tmp_path / "small", [cache], None, limit_mb=0.001)
        with pytest.raises(FileExistsError):
            make_bundle(tmp_path / "bundle", [cache], None)
