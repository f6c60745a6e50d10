"""Training pipeline: data listing and preparation, samplers, losses, trainer smoke run, exact resume, eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from model.align import ARCFACE_TEMPLATE, FacePipeline, align_face
from model.checkpoint import read_metadata
from model.embedder import FLIP_TEST
from model.net import build_model
from model.qaconv import QAConv
from model.training.face import AlignedCache, Face, identity_from_filename
from model.training.head import AdaFace
from model.training.losses import (
    feature_distillation_loss,
    occlusion_loss,
    pairwise_matching_loss,
    relation_distillation_loss,
    triplet_ranking_loss,
)
from model.training.prepare import prepare
from model.training.sampler import GraphSampler, PKSampler
from model.training.train import TrainConfig, Trainer, split_by_identity
from tests.conftest import SHARED_DATA

ASTRONAUT_LANDMARKS = np.array([[204.8, 100.8], [247.4, 103.4], [223.6, 129.2], [202.5, 138.1], [244.2, 140.6]])


class TestData:
    def test_face_lists_identity_folders_with_stable_labels(self, tmp_path: Path) -> None:
        for person, count in (("bob", 2), ("alice", 3)):
            (tmp_path / person).mkdir()
            for i in range(count):
                (tmp_path / person / f"{i}.jpg").write_bytes(b"x")
        (tmp_path / "notes.txt").write_text("ignored")
        face = Face(tmp_path)
        assert face.classes == ["alice", "bob"] and face.num_ids == 2 and len(face) == 5
        assert [label for _, label in face.samples] == [0, 0, 0, 1, 1]

    def test_filename_identity_rule(self, tmp_path: Path) -> None:
        assert identity_from_filename("S1-P1-F-39-1.jpg") == "S1-P1"
        for name in ("S1-P1-F-39-1.jpg", "S1-P1-F-40-2.jpg", "S2-P7-M-20-1.png"):
            (tmp_path / name).write_bytes(b"x")
        face = Face(tmp_path, filename_identity=True)
        assert face.classes == ["S1-P1", "S2-P7"] and len(face) == 3
        with pytest.raises(ValueError):
            identity_from_filename("portrait.jpg")

    def test_prepare_aligns_photos_and_lists_failures(
        self, tmp_path: Path, astronaut: np.ndarray, detector: object
    ) -> None:
        src, dst = tmp_path / "src", tmp_path / "dst"
        (src / "eileen").mkdir(parents=True)
        (src / "nobody").mkdir()
        Image.fromarray(astronaut).save(src / "eileen" / "a.jpg")
        Image.fromarray(astronaut[65:165, 180:270]).save(src / "eileen" / "tight.png")
        Image.fromarray(np.full((200, 200, 3), 90, np.uint8)).save(src / "nobody" / "blank.png")
        counts = prepare(src, dst, detector=detector)  # type: ignore[arg-type]
        assert counts == {"aligned": 2, "failed": 1, "skipped": 0}
        failures = [json.loads(line) for line in (dst / "failures.jsonl").read_text().splitlines()]
        assert failures[0]["code"] == "NO_FACE" and failures[0]["identity"] == "nobody"
        cache = AlignedCache(dst)
        assert len(cache) == 2 and cache.classes == ["eileen"]
        crops = cache.load_images()
        assert crops.shape == (2, 112, 112, 3)
        lm = np.array(cache.records[0].aligned_landmarks)
        assert np.abs(lm - ARCFACE_TEMPLATE).max() < 8
        assert prepare(src, dst, detector=detector) == {"aligned": 0, "failed": 0, "skipped": 3}  # type: ignore[arg-type]

    def test_identity_split_is_disjoint(self) -> None:
        labels = np.repeat(np.arange(20), 3)
        train, val = split_by_identity(labels, 0.2, seed=1)
        assert set(labels[train]).isdisjoint(labels[val])
        assert len(set(labels[val])) == 4 and len(train) + len(val) == 60


class TestSamplers:
    labels = np.repeat(np.arange(12), [2, 3, 5, 8, 2, 20, 4, 4, 6, 7, 3, 2])

    def test_pk_batches_hold_p_distinct_identities_with_k_images(self) -> None:
        sampler = PKSampler(self.labels, 4, 2, seed=3)
        batches = sampler.batches(0)
        assert batches and all(len(b) == 8 for b in batches)
        for b in batches:
            ids = self.labels[b]
            assert len(set(ids)) == 4 and all((ids == i).sum() == 2 for i in set(ids))
        assert all(np.array_equal(x, y) for x, y in zip(batches, sampler.batches(0), strict=True))
        assert not all(np.array_equal(x, y) for x, y in zip(batches, sampler.batches(1), strict=True))

    def test_graph_batches_are_a_class_and_its_neighbours(self) -> None:
        sampler = GraphSampler(self.labels, 3, 2, seed=0)
        neighbours = np.array([[(c + 1) % 12, (c + 2) % 12] for c in range(12)])
        sampler.set_neighbors(neighbours)
        for b in sampler.batches(0):
            ids = sorted(set(self.labels[b].tolist()))
            assert any(sorted({c, (c + 1) % 12, (c + 2) % 12}) == ids for c in range(12))


class TestLosses:
    def test_qaconv_and_margin_losses_decrease_on_a_tiny_task(self) -> None:
        torch.manual_seed(0)
        labels = torch.arange(4).repeat_interleave(4)
        prototypes = torch.randn(4, 3, 28, 28)
        images = prototypes[labels] + 0.8 * torch.randn(16, 3, 28, 28)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, 2, 1))
        qa = QAConv(32, 7, 7)
        head = AdaFace(32, 4, h=0.333, t_alpha=0.1)
        params = [*net.parameters(), *qa.parameters(), *head.parameters()]
        opt = torch.optim.Adam(params, lr=3e-3)
        history = []
        for _ in range(40):
            fmap = net(images)
            scores = qa(fmap, fmap)
            emb = fmap.mean((2, 3))
            norm = emb.norm(dim=1, keepdim=True)
            margin = torch.nn.functional.cross_entropy(head(emb / norm, norm, labels), labels)
            loss = pairwise_matching_loss(scores, labels) + triplet_ranking_loss(scores, labels) + 0.1 * margin
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
        assert np.mean(history[-5:]) < 0.6 * np.mean(history[:5])

    def test_losses_vanish_at_their_targets(self) -> None:
        target = torch.rand(4, 7, 7)
        assert float(occlusion_loss(target[:, None], target)) == 0.0
        t = torch.nn.functional.normalize(torch.randn(6, 128), dim=1)
        assert float(feature_distillation_loss(t * 3, t)) == pytest.approx(0.0, abs=1e-6)
        rot = torch.linalg.qr(torch.randn(128, 128))[0]
        assert float(relation_distillation_loss(t @ rot, t)) == pytest.approx(0.0, abs=1e-6)  # rotation-invariant
        labels = torch.tensor([0, 0, 1, 1])
        perfect = torch.where(labels[:, None] == labels[None, :], 20.0, -20.0)
        assert float(pairwise_matching_loss(perfect, labels)) < 1e-6
        assert float(triplet_ranking_loss(perfect, labels, 1.0)) == 0.0


def write_fake_cache(root: Path, astronaut: np.ndarray, identities: int = 6, per_identity: int = 4) -> Path:
    """An aligned cache of tinted, shifted astronaut crops: enough to exercise the trainer."""
    rng = np.random.default_rng(0)
    base = align_face(astronaut, ASTRONAUT_LANDMARKS)
    lines = []
    for i in range(identities):
        tint = rng.uniform(0.5, 1.5, 3)
        (root / f"id{i}").mkdir(parents=True)
        for j in range(per_identity):
            img = np.clip(base * tint + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
            img = np.roll(img, int(rng.integers(-3, 4)), axis=1)
            rel = f"id{i}/{j}.png"
            cv2.imwrite(str(root / rel), img[..., ::-1])
            lines.append(
                json.dumps(
                    {
                        "path": rel,
                        "source": f"/src/{rel}",
                        "identity": f"id{i}",
                        "landmarks": ASTRONAUT_LANDMARKS.tolist(),
                        "aligned_landmarks": ARCFACE_TEMPLATE.tolist(),
                        "score": 0.99,
                    }
                )
            )
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def assert_trained_alike(resumed: Trainer, whole: Trainer, runs: tuple[Path, Path]) -> None:
    """``resumed`` (a run stopped and resumed) ends as ``whole`` (one that went through): the same step, weights,
    validations (clock columns aside) and best model; ``runs``: their folders, in that order."""
    assert resumed.state["global_step"] == whole.state["global_step"]
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    clock = {"seconds", "img_per_s"}
    assert [{k: v for k, v in r.items() if k not in clock} for r in resumed.state["history"]] == [
        {k: v for k, v in r.items() if k not in clock} for r in whole.state["history"]
    ]
    versions = [read_metadata(run / "best.safetensors")["model_version"] for run in runs]
    assert versions[0] == versions[1]


def tiny_config(cache: Path, out: Path, **overrides: object) -> TrainConfig:
    raw = {
        "train": [str(cache)],
        "out": str(out),
        "arch": "ir_18",
        "p": 2,
        "k": 2,
        "val_fraction": 0.34,
        "teacher": False,
        "threads": 2,
        "warmup_steps": 2,
        "lr": 0.05,
        "epochs": 3,
        "max_steps": 4,
        "checkpoint_every": 1,
        "log_every": 1,
        "qaconv_k_nearest": 2,
        "val_pairs": 20,
        "precision": "fp32",
    }
    raw.update(overrides)
    return TrainConfig.from_dict(raw)


class TestTrainer:
    def test_config_rejects_unknown_options(self) -> None:
        with pytest.raises(ValueError, match="unknown"):
            TrainConfig.from_dict({"train": ["x"], "learning_rate": 1})

    def test_exact_resume_and_serving_export(
        self, tmp_path: Path, astronaut: np.ndarray, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        cache = write_fake_cache(tmp_path / "cache", astronaut)
        straight = Trainer(tiny_config(cache, tmp_path / "a"))
        straight.fit()
        interrupted = Trainer(tiny_config(cache, tmp_path / "b"))
        interrupted.fit(stop_after=2)
        assert interrupted.state["global_step"] == 2
        resumed = Trainer(tiny_config(cache, tmp_path / "b"))
        assert resumed.state["global_step"] == 2
        resumed.fit()
        assert resumed.state["global_step"] == straight.state["global_step"] == 4
        for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
        # epochs ended inside the run: validation happened, a CSV row each, a serving file with metadata
        rows = (tmp_path / "a" / "epochs.csv").read_text().splitlines()
        assert len(rows) == 1 + len(straight.state["history"]) and len(straight.state["history"]) >= 1
        from model.checkpoint import load_checkpoint

        model, meta = load_checkpoint(tmp_path / "a" / "best.safetensors")
        assert meta["training"]["identities"] == straight.num_classes
        assert "qaconv.class_embed" not in model.state_dict()
        # calibration on the held-out identities, written in half precision for shipping
        from oaml.cli import main

        out = tmp_path / "shipped.safetensors"
        args = [
            "calibrate",
            str(tmp_path / "a" / "best.safetensors"),
            "--data-root",
            str(tmp_path),
            "--dtype",
            "float16",
            "--out",
            str(out),
            "--export-check",
            "--precision",
            "fp32",
            "--plot",
            str(tmp_path / "reliability.png"),
            "--genuine-pairs",
            "200",
            "--impostor-pairs",
            "400",
        ]
        assert main(args) == 0
        _, shipped = load_checkpoint(out)
        cal = shipped["calibration"]
        assert (
            cal["fitted"]
            and cal["thresholds"]["strict"] >= cal["thresholds"]["balanced"] >= cal["thresholds"]["lenient"]
        )
        assert shipped["dtype"] == "float16" and shipped["training"] == meta["training"]
        # fitted on the path the service runs: its flip-test decision, the requested precision, the rounded weights
        assert cal["embedding"] == {
            "device": cal["embedding"]["device"],
            "precision": "float32",
            "flip": FLIP_TEST,
            "engine": "torch",
        }
        assert cal["prior"] == 0.5 and 0 <= cal["reliability"]["ece_in_sample"] <= 1
        assert (
            set(cal["presets"]) == {"lenient", "balanced", "strict"}
            and (tmp_path / "reliability.png").stat().st_size > 0
        )
        check = shipped["export_check"]
        assert check["served_as"]["weights"] == "float16" and check["pairs"] == cal["pairs"]
        assert 0 < check["max_abs_fused_diff"] < 0.5  # rounding moves scores a little, not much
        assert set(check) >= {"lenient", "balanced", "strict"}
        assert 0 <= check["balanced"]["far_served"] <= 1
        # the quality form, its pairs' scores kept; a refit reads them back instead of embedding again
        kept = tmp_path / "scores.npz"
        quality = [*args[:6], "--precision", "fp32", "--genuine-pairs", "200", "--impostor-pairs", "400"]
        quality += ["--fusion", "quality", "--scores", str(kept), "--out", str(tmp_path / "q.safetensors")]
        assert main(quality) == 0 and kept.is_file()
        first = load_checkpoint(tmp_path / "q.safetensors")[1]["calibration"]
        assert len(first["coef"]) == 7 and first["norm_mean"] > 0 and first["pairs"] == cal["pairs"]
        import model.training.evaluate as evaluate

        def no_embedding(*_: object, **__: object) -> None:
            raise AssertionError("the kept scores were not read back")

        monkeypatch.setattr(evaluate, "validation_scores", no_embedding)
        assert main(quality) == 0
        again = load_checkpoint(tmp_path / "q.safetensors")[1]["calibration"]
        assert again["coef"] == first["coef"] and again["thresholds"] == first["thresholds"]
        with pytest.raises(SystemExit, match="holds other scores"):  # other pairs: not these scores
            main([*quality[:-6], "--genuine-pairs", "100", *quality[-6:]])
        monkeypatch.undo()
        # /identify's stranger model, on the shipped file (more unseen identities: a gallery needs ten or more)
        extra = write_fake_cache(tmp_path / "extra", astronaut, identities=14, per_identity=2)
        args = ["calibrate-identify", str(out), "--data-root", str(tmp_path), "--holdout", str(extra)]
        assert main([*args, "--precision", "fp32", "--probes", "40"]) == 0
        _, identified = load_checkpoint(out)
        open_set = identified["calibration"]["open_set"]
        assert identified["model_version"] == shipped["model_version"] and identified["dtype"] == "float16"
        assert len(open_set["mu"]) == len(open_set["sigma"]) > 0 and open_set["residual"]["rate"] > 0
        assert open_set["validation"]["fpir"] and identified["calibration"]["thresholds"] == cal["thresholds"]
        # the occlusion attributes' mask threshold, fitted between two caches (here: fake faces, no real masks)
        args = ["calibrate-attributes", str(out), "--masked", str(extra), "--clean", str(cache), "--precision", "fp32"]
        assert main(args) == 0
        _, attributed = load_checkpoint(out)
        rules = attributed["attributes"]
        assert 0.0 <= rules["mask_threshold"] <= 1.0 and set(rules["mask_fit"]) >= {"tpr", "fpr", "balanced_accuracy"}
        assert attributed["calibration"]["open_set"] == open_set  # what the other tools wrote stays

    def test_init_from_a_collapsed_qaconv_tail_resets_it(self, tmp_path: Path, astronaut: np.ndarray) -> None:
        """Checkpoints made before the logit scale was fixed carry a scale near 0: training on from one
        would keep every QAConv score constant, so the tail starts again from its initial form."""
        from model.checkpoint import save_checkpoint

        cache = write_fake_cache(tmp_path / "cache", astronaut)
        old = build_model("ir_18")
        with torch.no_grad():
            old.qaconv.logit_bn.weight.fill_(5e-4)
            old.qaconv.fc.weight.fill_(0.3)
            old.output_layer[3].weight.mul_(2)  # a backbone change that must survive
        save_checkpoint(old, tmp_path / "old.safetensors")
        trainer = Trainer(tiny_config(cache, tmp_path / "run", init_from=str(tmp_path / "old.safetensors")))
        qa = trainer.model.qaconv
        # compared on the CPU: the trainer puts the model on CUDA when one is visible
        assert torch.equal(qa.logit_bn.weight.cpu(), torch.ones(1)) and not qa.logit_bn.weight.requires_grad
        assert torch.allclose(qa.fc.weight, torch.full_like(qa.fc.weight, 1.0 / (2 * qa.hw)))
        assert torch.equal(trainer.model.output_layer[3].weight.cpu(), old.output_layer[3].weight)
        # a checkpoint with the fixed scale keeps its trained tail
        with torch.no_grad():
            old.qaconv.logit_bn.weight.fill_(1.0)
        save_checkpoint(old, tmp_path / "new.safetensors")
        trainer = Trainer(tiny_config(cache, tmp_path / "run2", init_from=str(tmp_path / "new.safetensors")))
        assert torch.allclose(trainer.model.qaconv.fc.weight, torch.full_like(qa.fc.weight, 0.3))

    def test_finetune_heads_keeps_the_backbone_frozen(self, tmp_path: Path, astronaut: np.ndarray) -> None:
        cache = write_fake_cache(tmp_path / "cache", astronaut)
        trainer = Trainer(tiny_config(cache, tmp_path / "ft", mode="finetune-heads", max_steps=2))
        before = {k: v.clone() for k, v in trainer.model.body.state_dict().items()}
        head_before = trainer.model.occlusion_head.conv2.weight.clone()
        trainer.fit()
        for k, v in trainer.model.body.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert not torch.equal(trainer.model.occlusion_head.conv2.weight, head_before)


class TestTeacher:
    def test_sface_embeds_the_same_face_alike(self, pipeline: FacePipeline, astronaut: np.ndarray) -> None:
        from model.training.teacher import SFaceTeacher

        teacher = SFaceTeacher(threads=1)
        face = pipeline.align_one(astronaut).crop
        other = np.ascontiguousarray(np.roll(face, 40, axis=0))
        emb = teacher.embed(np.stack([face, face[:, ::-1], other]))
        assert emb.shape == (3, 128)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
        assert float(emb[0] @ emb[1]) > 0.85  # mirror image: same person (weights.md measured 0.97)
        assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])

    def test_the_pytorch_port_gives_what_opencv_gives(
        self, pipeline: FacePipeline, astronaut: np.ndarray, tmp_path: Path
    ) -> None:
        """Function matching runs the teacher on the training device: the port must be the same network."""
        from skimage import data

        from model.training.teacher import SFaceTeacher, SFaceTorch

        face = pipeline.align_one(astronaut).crop
        views = [face, face[:, ::-1], np.roll(face, 12, axis=1), np.clip(face * 0.6, 0, 255).astype(np.uint8)]
        for other in (data.chelsea(), data.coffee(), np.repeat(data.camera()[..., None], 3, axis=2)):
            views.append(cv2.resize(np.ascontiguousarray(other), (112, 112)))
        crops = np.ascontiguousarray(np.stack(views))
        reference = SFaceTeacher(threads=1).embed(crops)
        x = torch.from_numpy(crops.transpose(0, 3, 1, 2).astype(np.float32))
        port = SFaceTorch.from_onnx()
        with torch.no_grad():
            ours = port(x).numpy()
        cosine = (reference * ours).sum(1)
        assert cosine.min() >= 0.999, cosine
        assert not any(p.requires_grad for p in port.parameters()) and len(list(port.buffers())) > 40
        # the export a GPU host loads with torch alone gives the same embeddings
        port.save(tmp_path / "sface.safetensors")
        assert (tmp_path / "sface.safetensors").stat().st_size < 12 * 2**20  # int8 blocks, as the source
        with torch.no_grad():
            again = SFaceTorch.load(tmp_path / "sface.safetensors")(x).numpy()
        assert (reference * again).sum(1).min() >= 0.999


class TestEvaluation:
    def test_lfw_protocol_end_to_end_on_a_fake_cache(
        self, tmp_path: Path, astronaut: np.ndarray, ir18: torch.nn.Module
    ) -> None:
        from model.training.evaluate import evaluate_lfw, markdown_report, read_lfw_pairs

        cache = tmp_path / "lfw"
        lines = []
        base = align_face(astronaut, ASTRONAUT_LANDMARKS)
        for name in ("Ann_A", "Bob_B"):
            (cache / name).mkdir(parents=True)
            for i in (1, 2):
                cv2.imwrite(str(cache / name / f"{name}_{i:04d}.png"), np.roll(base, 5 * i, axis=0)[..., ::-1])
                lines.append(
                    json.dumps(
                        {
                            "path": f"{name}/{name}_{i:04d}.png",
                            "identity": name,
                            "aligned_landmarks": ARCFACE_TEMPLATE.tolist(),
                        }
                    )
                )
        (cache / "manifest.jsonl").write_text("\n".join(lines) + "\n")
        pairs = tmp_path / "pairs.txt"
        pairs.write_text("2\t1\nAnn_A\t1\t2\nAnn_A\t1\tBob_B\t1\nBob_B\t1\t2\nAnn_A\t2\tBob_B\t2\n")
        parsed = read_lfw_pairs(pairs)
        assert [p.same for p in parsed] == [True, False, True, False] and [p.fold for p in parsed] == [0, 0, 1, 1]
        from model.embedder import Embedder
        from model.training.calibrate import fit_calibration

        rng = np.random.default_rng(0)
        fitted = fit_calibration(rng.normal(0, 0.1, 400), rng.normal(0, 1, 400), np.ones(400), rng.random(400) < 0.5)
        report = evaluate_lfw(
            Embedder(ir18, device="cpu", precision="fp32", flip=True), cache, pairs, calibration=fitted
        )
        clean = report["protocols"]["clean"]
        assert set(clean) >= {"adaface", "qaconv", "fused", "mean_visibility", "presets", "probability_ece"}
        assert 0.0 <= clean["fused"]["accuracy"] <= 1.0 and report["missing_faces"] == 0
        assert clean["presets"]["balanced"]["impostor"] == 2 and report["embedding"]["flip"] is True
        text = markdown_report(report)
        assert "#### LFW, clean" in text and "TAR on LFW" in text and "flip test on" in text
        # the installed `oaml eval` command, run from outside the repository, with the SFace peer
        from model.checkpoint import save_checkpoint

        save_checkpoint(ir18, tmp_path / "w.safetensors")
        oaml = Path(sys.executable).parent / "oaml"
        run = subprocess.run(
            [
                str(oaml),
                "eval",
                str(tmp_path / "w.safetensors"),
                "--lfw-cache",
                str(cache),
                "--pairs",
                str(pairs),
                "--peer",
                "sface",
                "--out",
                str(tmp_path / "eval"),
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        cli_report = json.loads((tmp_path / "eval" / "report.json").read_text())
        peer = cli_report["protocols"]["clean"]["sface_peer"]
        assert 0.0 <= peer["accuracy"] <= 1.0 and (tmp_path / "eval" / "roc.png").is_file()


@pytest.mark.skipif(not (SHARED_DATA / "train" / "afdb").exists(), reason="../shared/data/train not present")
def test_shared_training_photos_align(detector: object, tmp_path: Path) -> None:
    src = SHARED_DATA / "train" / "afdb"
    counts = prepare(src, tmp_path / "afdb", detector=detector, limit=20)  # type: ignore[arg-type]
    assert counts["aligned"] + counts["failed"] == 20 and counts["aligned"] >= 18
