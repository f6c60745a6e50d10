"""The offsite copy of a training run: a run whose machine is lost with its disk resumes elsewhere from the copy,
bit-identical to one that never stopped; a folder ahead of its copy is kept; a corrupt copy falls back a
generation; a store that fails is reported and never stops the run."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import read_metadata
from model.training.offsite import OFFSITE_GENERATIONS, Offsite, OffsiteRefused
from model.training.preempt import (
    OFFSITE_FILE,
    CorruptCheckpoint,
    format_status,
    load_newest,
    read_offsite,
    run_status,
    save_generation,
)
from model.training.train import Trainer
from tests.test_train import assert_trained_alike, tiny_config, write_fake_cache


def _checkpoint(run: Path, step: int, value: float | None = None) -> None:
    """A small checkpoint generation of ``step`` in ``run`` (the trainer's layout: ``state`` JSON, tensors)."""
    run.mkdir(parents=True, exist_ok=True)
    fill = float(step) if value is None else value
    payload = {"state": json.dumps({"global_step": step}), "model": {"w": torch.full((4,), fill)}}
    save_generation(payload, run / "last.pt", keep=3)


def _step(folder: Path, keep: int = 3) -> int:
    found = load_newest(folder / "last.pt", keep)
    assert found is not None
    return int(json.loads(found[0]["state"])["global_step"])


def _copy_of(run: Path, folder: Path, identity: str = "run-a") -> Offsite:
    return Offsite(run, folder, keep_local=3, lock=threading.Lock(), identity=identity)


def _copied(offsite: Offsite, *steps: int) -> Offsite:
    """Checkpoints of ``steps`` written in ``offsite``'s run folder, each pushed and its copy waited for."""
    for step in steps:
        _checkpoint(offsite.run, step)
        offsite.push(step)
        assert offsite.close(None)
    return offsite


class TestOffsiteCopy:
    def test_each_checkpoint_and_its_companions_are_copied_whole(self, tmp_path: Path) -> None:
        run, away = tmp_path / "run", tmp_path / "away"
        offsite = _copy_of(run, away)
        for step in (1, 2, 3):
            _checkpoint(run, step)
            (run / "best.safetensors").write_bytes(b"best of %d" % step)
            offsite.push(step)
            assert offsite.close(None)
        assert _step(away, OFFSITE_GENERATIONS) == 3
        assert sorted(p.name for p in away.iterdir()) == ["best.safetensors", "last.pt", "last.pt.1", "run.json"]
        assert (away / "best.safetensors").read_bytes() == b"best of 3"
        info = read_offsite(run)
        assert info is not None and info["step"] == 3 and info["folder"] == str(away) and "error" not in info
        # a folder on the run's own filesystem does not outlive the machine: said wherever the copy is reported
        assert info["same_disk"] is True
        assert "(on this machine's own filesystem: it does not outlive this disk)" in format_status(run_status(run))

    def test_a_step_saved_again_with_more_in_it_is_copied_again(self, tmp_path: Path) -> None:
        """The epoch's last step is checkpointed, then again after its validation: the copy holds the second."""
        run, away = tmp_path / "run", tmp_path / "away"
        offsite = _copy_of(run, away)
        for value in (1.0, 2.0):
            _checkpoint(run, 6, value)
            offsite.push(6)
            assert offsite.close(None)
        found = load_newest(away / "last.pt", OFFSITE_GENERATIONS)
        assert found is not None and torch.equal(found[0]["model"]["w"], torch.full((4,), 2.0))

    def test_a_store_that_is_not_mounted_is_an_error_not_a_new_local_folder(self, tmp_path: Path) -> None:
        run, away = tmp_path / "run", tmp_path / "mnt" / "bucket"
        offsite = _copy_of(run, away)
        _checkpoint(run, 1)
        offsite.push(1)
        assert offsite.close(None)
        info = read_offsite(run)
        assert info is not None and "FileNotFoundError" in info["error"] and not (tmp_path / "mnt").exists()

    def test_a_store_that_fails_is_reported_and_the_next_checkpoint_retries(self, tmp_path: Path) -> None:
        run, away = tmp_path / "run", tmp_path / "away"
        away.write_text("not a folder: the bucket is not mounted")
        offsite = _copy_of(run, away)
        _checkpoint(run, 1)
        offsite.push(1)
        assert offsite.close(None)
        info = read_offsite(run)
        assert info is not None and "error" in info and "step" not in info
        assert "failing since" in format_status({**run_status(run), "offsite": info})
        away.unlink()  # mounted again
        _checkpoint(run, 2)
        offsite.push(2)
        assert offsite.close(None)
        info = read_offsite(run)
        assert info is not None and info["step"] == 2 and "error" not in info
        assert _step(away, OFFSITE_GENERATIONS) == 2

    def test_a_new_machine_takes_the_copy_and_a_folder_ahead_keeps_its_own(self, tmp_path: Path) -> None:
        run, away = tmp_path / "run", tmp_path / "away"
        offsite = _copy_of(run, away)
        _checkpoint(run, 5)
        (run / "steps.jsonl").write_text('{"step": 5}\n')
        offsite.push(5)
        assert offsite.close(None)
        # the machine is lost with its disk: a bare folder elsewhere
        elsewhere = tmp_path / "elsewhere"
        assert _copy_of(elsewhere, away).restore() == 5
        assert _step(elsewhere) == 5 and (elsewhere / "steps.jsonl").read_text() == '{"step": 5}\n'
        # the folder went on after the last copy: it is ahead, and kept
        _checkpoint(run, 6)
        assert _copy_of(run, away).restore() is None
        assert _step(run) == 6
        # no copy yet: nothing to take
        assert _copy_of(tmp_path / "fresh", tmp_path / "nowhere").restore() is None

    def test_a_folder_of_another_run_is_refused(self, tmp_path: Path) -> None:
        run, away = tmp_path / "run", tmp_path / "away"
        offsite = _copy_of(run, away, identity="run-a")
        _checkpoint(run, 4)
        offsite.push(4)
        assert offsite.close(None)
        other = tmp_path / "other"
        with pytest.raises(OffsiteRefused, match="holds the offsite copy of another run"):
            _copy_of(other, away, identity="run-b").restore()
        theirs = _copy_of(other, away, identity="run-b")
        _checkpoint(other, 9)
        theirs.push(9)
        assert theirs.close(None)
        info = read_offsite(other)
        assert info is not None and "another run" in info["error"] and _step(away, OFFSITE_GENERATIONS) == 4

    def test_a_run_that_started_over_never_replaces_a_later_copy(self, tmp_path: Path) -> None:
        """On a new machine started without its copy (or from a folder behind it): days of work are not
        rotated out by its first two checkpoints."""
        run, away = tmp_path / "run", tmp_path / "away"
        offsite = _copy_of(run, away)
        _checkpoint(run, 500)
        offsite.push(500)
        assert offsite.close(None)
        again = tmp_path / "again"
        late = _copy_of(again, away)
        _checkpoint(again, 2)
        late.push(2)
        assert late.close(None)
        info = read_offsite(again)
        assert info is not None and "holds step 500, later than this run's checkpoint (2)" in info["error"]
        assert _step(away, OFFSITE_GENERATIONS) == 500

    def test_a_copy_whose_checkpoints_none_load_stops_the_start(self, tmp_path: Path) -> None:
        run, away = tmp_path / "run", tmp_path / "away"
        _copied(_copy_of(run, away), 7, 8)
        for name in ("last.pt", "last.pt.1"):
            (away / name).write_bytes(b"a bucket that returned garbage")
        with pytest.raises(CorruptCheckpoint):
            _copy_of(tmp_path / "elsewhere", away).restore()
        # a run folder with a whole checkpoint of its own goes on, and its copies with it
        assert _copy_of(run, away).restore() is None and _step(run) == 8
        assert json.loads((away / "run.json").read_text())["step"] == -1  # what it claimed does not load
        again = _copy_of(run, away)
        _checkpoint(run, 9)
        again.push(9)
        assert again.close(None) and _step(away, OFFSITE_GENERATIONS) == 9

    def test_a_corrupt_newest_copy_falls_back_to_the_generation_before(self, tmp_path: Path) -> None:
        run, away = tmp_path / "run", tmp_path / "away"
        _copied(_copy_of(run, away), 7, 8)
        newest = away / "last.pt"
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut off half-way
        elsewhere = tmp_path / "elsewhere"
        assert _copy_of(elsewhere, away).restore() == 7
        assert _step(elsewhere) == 7
        assert json.loads((away / "run.json").read_text())["step"] == 7  # so the copies from 7 on go on


def test_a_run_that_loses_its_machine_resumes_from_the_offsite_copy_as_if_it_never_stopped(
    tmp_path: Path, astronaut: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    """Trained to step 2 with an offsite copy, its folder deleted (the machine and its disk gone), the same
    command resumes from the copy: the weights, validations and best model of a run that went straight through."""
    cache = write_fake_cache(tmp_path / "cache", astronaut)
    straight = Trainer(tiny_config(cache, tmp_path / "straight", validate_every=2))
    straight.fit()
    cfg = tiny_config(cache, tmp_path / "run", validate_every=2, offsite=str(tmp_path / "bucket"))
    Trainer(cfg).fit(stop_after=3)
    shutil.rmtree(tmp_path / "run")
    resumed = Trainer(cfg)
    assert resumed.state["global_step"] == 3
    resumed.fit()
    assert resumed.state["global_step"] == 4
    assert_trained_alike(resumed, straight, (tmp_path / "run", tmp_path / "straight"))
    # its weights say how many samples, on what, over how long: two processes here, every step accounted for
    resumed.export(tmp_path / "final.safetensors")
    compute = read_metadata(tmp_path / "final.safetensors")["training"]["compute"]
    assert compute["samples"] == 4 * cfg.samples_per_step and compute["unaccounted_steps"] == 0
    assert [(m["processes"], m["steps"]) for m in compute["machines"]] == [(2, 4)] and compute["seconds"] > 0
    # the copy holds the finished run, and train-status says so
    assert _step(tmp_path / "bucket", OFFSITE_GENERATIONS) == 4
    status = format_status(run_status(tmp_path / "run"))
    assert f"offsite copy ({tmp_path / 'bucket'}) (on this machine's own filesystem" in status
    assert "does not outlive this disk): step 4," in status
    assert "trained (as of the last checkpoint): " in status and "fp32; 2 processes)" in status
    assert json.loads((tmp_path / "run" / OFFSITE_FILE).read_text())["step"] == 4
    # resumed by a command without --offsite: said, not silently dropped
    with caplog.at_level(logging.WARNING):
        Trainer(tiny_config(cache, tmp_path / "run", validate_every=2))
    assert f"this run kept an offsite copy in {tmp_path / 'bucket'}; not copied there now" in caplog.text
