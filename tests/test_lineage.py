"""A run from trained weights validates on people neither it nor its initial weights trained on, measures its
initial weights on them (the baseline a release must beat), and passes its lineage on to the weights it exports;
a run whose validation changed under it measures its best model again; the release rule reads all of it."""

from __future__ import annotations

import csv
import json
import math
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import read_metadata
from model.training.lineage import LineageUnknown, own_training_identities, trained_identities
from model.training.preempt import format_status, load_newest, run_status, save_generation
from model.training.release import release_gate
from model.training.train import TrainConfig, Trainer, _write_csv
from model.training.validation import ValidationSet
from tests.test_train import assert_trained_alike, tiny_config, write_fake_cache


@dataclass(frozen=True)
class Lineage:
    a: Path  # cache a (stage 1's data)
    b: Path  # cache b (stage 2 adds it)
    stage1: Path  # stage 1's exported weights
    stage1_trained: set[str]  # the people stage 1 trained on


@pytest.fixture(scope="module")
def lineage(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> Lineage:
    """Stage 1 trained on cache ``a`` from scratch; stage 2 from stage 1's weights on ``a`` and ``b`` with
    another seed, so its validation split holds some of stage 1's training people."""
    root = tmp_path_factory.mktemp("lineage")
    a = write_fake_cache(root / "data" / "a", astronaut, identities=9, per_identity=3)
    b = write_fake_cache(root / "data" / "b", astronaut, identities=6, per_identity=3)
    first = Trainer(tiny_config(a, root / "stage1", max_steps=1, val_fraction=0.34, seed=3))
    first.fit()
    stage1 = root / "stage1.safetensors"
    first.export(stage1)
    stage1_trained = {first.data.identities[int(c)] for c in np.unique(first.data.labels[first.train_idx])}
    return Lineage(a, b, stage1, stage1_trained)


def stage2_config(lineage: Lineage, out: Path, **overrides: object) -> TrainConfig:
    raw: dict[str, object] = {
        "max_steps": 2,
        "val_fraction": 0.5,
        "seed": 0,
        "init_from": str(lineage.stage1),
        "validate_every": 1,
        "epochs": 1000,
        "train": [str(lineage.a), str(lineage.b)],
    }
    raw.update(overrides)
    return tiny_config(lineage.a, out, **raw)


class TestLineage:
    def test_weights_without_a_recorded_list_are_rebuilt_from_their_config(self, lineage: Lineage) -> None:
        meta = read_metadata(lineage.stage1)
        recorded = set(meta["training"]["trained_identities"])
        assert recorded == lineage.stage1_trained and recorded
        assert all(name.startswith("a/") for name in recorded)
        config = meta["training"]["config"]
        assert own_training_identities(config, lineage.a.parent) == recorded
        del meta["training"]["trained_identities"]
        assert trained_identities(meta, lineage.a.parent) == recorded
        # as the shipped weights name their caches (data/celeba): by name, under the data root given
        meta["training"]["config"] = {**config, "train": ["data/a"]}
        assert trained_identities(meta, lineage.a.parent) == recorded

    def test_a_rebuilt_lineage_follows_the_initial_weights_and_says_when_it_cannot(
        self, lineage: Lineage, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        trainer = Trainer(stage2_config(lineage, tmp_path / "run"))
        trainer.fit()
        meta = read_metadata(tmp_path / "run" / "best.safetensors")
        recorded = set(meta["training"].pop("trained_identities"))
        assert trained_identities(meta, None) == recorded  # its own split, then stage 1's through init_from
        assert lineage.stage1_trained < recorded
        meta["training"]["config"]["init_from"] = str(tmp_path / "gone.safetensors")
        with pytest.raises(LineageUnknown, match="gone.safetensors are not here"):
            trained_identities(meta, None, strict=True)
        with caplog.at_level("WARNING", logger="model.training.lineage"):
            assert trained_identities(meta, None) == own_training_identities(meta["training"]["config"], None)
        assert "counted as nobody" in caplog.text

    def test_a_run_from_trained_weights_validates_on_people_they_never_saw(
        self, lineage: Lineage, tmp_path: Path
    ) -> None:
        trainer = Trainer(stage2_config(lineage, tmp_path / "run"))
        names = trainer.data.identities
        split_people = {names[int(c)] for c in trainer.data.labels[trainer.val_idx]}
        validated = {names[int(c)] for c in trainer.data.labels[trainer.val_rows]}
        assert trainer.inherited == lineage.stage1_trained
        assert split_people & trainer.inherited, "the test needs a split holding some of stage 1's training people"
        assert validated and validated == split_people - trainer.inherited
        assert set(trainer._val_set().identities) == validated
        # the baseline is the initial weights on those people: before any step the model is those weights
        trainer._settle_validation()
        base = trainer.state["baseline"]
        assert base["weights"] == str(lineage.stage1)
        assert base["validation_set"] == trainer._val_set().digest == trainer.state["validation_set"]
        assert base["score"] == trainer.validate()["score"]
        assert base["faces"] == len(trainer.val_rows)
        status = json.loads((tmp_path / "run" / "status.json").read_text())
        assert status["baseline"]["score"] == base["score"] and status["release_margin"] == 0.01

    def test_exported_weights_carry_their_lineage(self, lineage: Lineage, tmp_path: Path) -> None:
        trainer = Trainer(stage2_config(lineage, tmp_path / "run"))
        trainer.fit()
        meta = read_metadata(tmp_path / "run" / "best.safetensors")
        own = {trainer.data.identities[int(c)] for c in np.unique(trainer.data.labels[trainer.train_idx])}
        assert set(meta["training"]["trained_identities"]) == own | lineage.stage1_trained
        assert meta["training"]["validation_identities"] == len(np.unique(trainer.data.labels[trainer.val_rows]))
        # what a calibration of these weights may use: their split's people less everyone in the lineage
        assert not set(meta["training"]["trained_identities"]) & {
            trainer.data.identities[int(c)] for c in trainer.data.labels[trainer.val_rows]
        }

    def test_a_run_whose_validation_changed_measures_its_best_model_again(
        self, lineage: Lineage, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        run = tmp_path / "run"
        cfg = stage2_config(lineage, run)
        Trainer(cfg).fit(stop_after=2)
        best_meta = read_metadata(run / "best.safetensors")["training"]
        # the checkpoint as code before validation sets had digests left it: a best score on another set
        found = load_newest(run / "last.pt", 3)
        assert found is not None
        payload, _ = found
        state = json.loads(payload["state"])
        for key in ("validation_set", "baseline", "best_step"):
            state.pop(key)
        state["best_score"] = 0.123
        payload["state"] = json.dumps(state)
        save_generation(payload, run / "last.pt", 3)
        resumed = Trainer(cfg)
        assert resumed.state["best_score"] == 0.123
        with caplog.at_level("WARNING", logger="model.training.train"):
            resumed._settle_validation()
        assert "validation changed" in caplog.text
        # measured again on the current set: what best.safetensors scored when it was exported on that set
        assert resumed.state["best_score"] == pytest.approx(best_meta["validation"]["score"], abs=1e-12)
        assert resumed.state["best_step"] == best_meta["global_step"]
        assert resumed.state["baseline"]["validation_set"] == resumed.state["validation_set"]

    def test_a_checkpoint_of_older_code_whose_people_did_not_change_is_not_measured_again(
        self, lineage: Lineage, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        run = tmp_path / "run"
        cfg = tiny_config(lineage.a, run, max_steps=2, validate_every=1, epochs=1000)
        Trainer(cfg).fit()
        found = load_newest(run / "last.pt", 3)
        assert found is not None
        payload, _ = found
        state = json.loads(payload["state"])
        state.pop("validation_set")
        payload["state"] = json.dumps(state)
        save_generation(payload, run / "last.pt", 3)
        resumed = Trainer(cfg)
        with caplog.at_level("WARNING", logger="model.training.train"):
            resumed._settle_validation()
        assert "validation changed" not in caplog.text
        assert resumed.state["best_score"] == state["best_score"] and resumed.state["validation_set"]

    def test_a_run_from_scratch_has_no_baseline(self, lineage: Lineage, tmp_path: Path) -> None:
        trainer = Trainer(tiny_config(lineage.a, tmp_path / "run", max_steps=1))
        trainer.fit()
        assert trainer.inherited == set() and "baseline" not in trainer.state
        assert len(trainer.val_rows) == len(trainer.val_idx)
        assert release_gate(json.loads((tmp_path / "run" / "status.json").read_text())) is None


class TestReleaseRule:
    STATUS = {
        "validation_set": "abc",
        "baseline": {"score": 0.90, "validation_set": "abc", "weights": "w.safetensors"},
        "release_margin": 0.01,
        "best_step": 1200,
    }

    def test_the_best_must_beat_the_initial_weights_by_the_margin(self) -> None:
        below = release_gate({**self.STATUS, "best_score": 0.9099})
        assert below is not None and not below.met and "not yet" in below.reason and "+0.0099" in below.reason
        above = release_gate({**self.STATUS, "best_score": 0.9101})
        assert above is not None and above.met and "step 1,200" in above.reason and "train-release" in above.reason

    def test_a_baseline_of_another_validation_set_does_not_count(self) -> None:
        assert release_gate({**self.STATUS, "best_score": 0.99, "validation_set": "other"}) is None
        gate = release_gate({**self.STATUS, "best_score": -math.inf})
        assert gate is not None and not gate.met and "no validation" in gate.reason

    def test_train_status_shows_the_baseline_and_the_rule(self, tmp_path: Path) -> None:
        (tmp_path / "status.json").write_text(
            json.dumps({**self.STATUS, "best_score": 0.905, "samples_per_step": 30, "global_step": 1200})
        )
        rows = [
            {"global_step": 600, "val_score": 0.95, "val_acc_cos_clean": 0.96},  # before validation sets
            {"global_step": 1200, "val_score": 0.905, "val_acc_cos_clean": 0.93, "val_faces": 470.0},
        ]
        _write_csv(tmp_path / "epochs.csv", rows)
        with (tmp_path / "epochs.csv").open(newline="") as f:
            read = list(csv.DictReader(f))
        assert read[0]["val_faces"] == "" and read[1]["val_faces"] == "470.0"
        text = format_status(run_status(tmp_path))
        assert "the initial weights (w.safetensors)" in text
        start = next(line for line in text.splitlines() if line.strip().startswith("start"))
        assert "0.9000" in start and "the initial weights (w.safetensors)" in start
        assert "rows without faces were measured before" in text
        assert "release rule: best 0.9050 (step 1,200) against the initial weights' 0.9000: +0.0050" in text


def test_a_run_from_trained_weights_resumed_twice_ends_as_one_that_never_stopped(
    lineage: Lineage, tmp_path: Path
) -> None:
    """The baseline at the start and the validations on the lineage-free set change nothing of what the run
    learns or which model it keeps: stopped at steps 1 and 3 and resumed, it ends with the weights, history,
    baseline and best model of a run that went through."""
    whole = Trainer(stage2_config(lineage, tmp_path / "whole", max_steps=5, validate_every=2))
    whole.fit()
    cut = stage2_config(lineage, tmp_path / "cut", max_steps=5, validate_every=2)
    for stop in (1, 3, None):
        Trainer(cut).fit(stop_after=stop)
    resumed = Trainer(cut)
    assert resumed.state["global_step"] == 5
    assert_trained_alike(resumed, whole, (tmp_path / "cut", tmp_path / "whole"))
    assert resumed.state["baseline"] == whole.state["baseline"]
    assert resumed.state["best_step"] == whole.state["best_step"]


def test_settling_keeps_the_random_states(lineage: Lineage, tmp_path: Path) -> None:
    """Measuring the initial weights draws nothing from the global generators the run's steps use."""
    trainer = Trainer(stage2_config(lineage, tmp_path / "run"))
    torch_before, numpy_before, python_before = torch.get_rng_state().clone(), np.random.get_state(), random.getstate()
    trainer._settle_validation()
    assert "baseline" in trainer.state  # it did measure the initial weights
    assert torch.equal(torch.get_rng_state(), torch_before)
    assert pickle.dumps(np.random.get_state()) == pickle.dumps(numpy_before)
    assert random.getstate() == python_before


def test_one_person_left_to_validate_makes_pairs_without_hanging(astronaut: np.ndarray) -> None:
    """Three faces of one person hold no pair of two people: the impostor draw stops at what there is."""
    images = np.zeros((3, 112, 112, 3), np.uint8)
    landmarks = np.tile(np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]]), (3, 1, 1))
    val = ValidationSet.build(images, landmarks, np.zeros(3, np.int64), ["a/x"], None, seed=0, max_pairs=20)
    assert val.same.tolist() == [True, True, True] and len(val.pairs) == 3
