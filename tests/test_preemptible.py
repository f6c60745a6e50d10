"""Preemptible training: a run killed (SIGKILL), stopped (SIGTERM, once or twice) and resumed, again and again,
ends bit-identical to an uninterrupted one; SIGTERM leaves a checkpoint of the step it stopped at; a corrupt
newest checkpoint is skipped for the previous generation; the schedule is counted in steps, never by the clock."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model.training.preempt import (
    PID_FILE,
    CorruptCheckpoint,
    MemoryGuard,
    content_digest,
    control,
    format_status,
    generations,
    load_newest,
    restore_rng_states,
    rng_states,
    run_status,
    save_generation,
)
from model.training.train import TrainConfig, Trainer
from tests.test_train import tiny_config, write_fake_cache

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20  # the tiny cache holds 3 PK batches an epoch: epochs end inside the run too
#: the tiny run, as `oaml train` reads it: 4 faces a step, 20 steps (max_samples), validations every 6 steps and
#: at the end, checkpoints every 5 steps and every 2 s of wall time (so at steps that differ from run to run)
RUN = {
    "p": 2,
    "k": 2,
    "val_fraction": 0.34,
    "teacher": False,
    "threads": 1,  # the same in every run: the kernels' reductions, so the bits, depend on it
    "warmup_steps": 3,
    "lr": 0.05,
    "epochs": 1000,
    "max_samples": 4 * STEPS,
    "validate_every": 6,
    "checkpoint_every": 5,
    "checkpoint_every_s": 2.0,
    "log_every": 1,
    "qaconv_k_nearest": 2,
    "val_pairs": 20,
    "precision": "fp32",
    "deterministic": True,
    "preemptible": True,
}
#: history columns measured by the clock (the rest must be equal)
CLOCK_COLUMNS = {"seconds", "img_per_s"}


def _toml(values: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(v)

    return "".join(f"{k} = {value(v)}\n" for k, v in values.items())


def _last_step(out: Path) -> int:
    path = out / "steps.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            continue
    return steps[-1]


@dataclass
class Interruption:
    how: str  # "KILL", "TERM" or "TERM2" (SIGTERM and at once SIGINT: two stop signals)
    at: int  # the step it was aimed after
    returncode: int = 0
    stdout: str = ""
    logged_step: int = 0  # the last step steps.jsonl holds when the process ended
    checkpoint_step: int | None = None  # the step of the newest checkpoint it left
    checkpoint_fresh: bool = False  # written after the signal was sent
    offsite_step: int | None = None  # the step of the newest checkpoint in the offsite copy when it ended


@dataclass
class Runs:
    reference: Path
    resumed: Path
    offsite: Path  # the interrupted run's offsite copy (model/training/offsite.py)
    interruptions: list[Interruption] = field(default_factory=list)
    starts: int = 0


def _start(config: Path, out: Path, log: Path, offsite: Path | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "oaml", "train", "--config", str(config), "--out", str(out), "--preemptible"]
    command += ["--offsite", str(offsite)] if offsite is not None else []
    with log.open("ab") as err:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err)


def _wait_for(condition: Any, proc: subprocess.Popen[bytes], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """One uninterrupted run and one interrupted four times (two SIGKILLs, a SIGTERM, a double SIGTERM) at random
    steps and resumed by the same command each time; the two run side by side, a core each."""
    from skimage import data as skdata

    tmp = tmp_path_factory.mktemp("preemptible")
    cache = write_fake_cache(tmp / "cache", skdata.astronaut())
    config = tmp / "tiny.toml"
    config.write_text(_toml({"train": [str(cache)], "arch": "ir_18", **RUN}))
    runs = Runs(reference=tmp / "reference", resumed=tmp / "resumed", offsite=tmp / "offsite")
    reference = _start(config, runs.reference, tmp / "reference.log")

    rng = random.Random(32)
    plan = [("KILL", rng.randint(2, 5)), ("TERM", rng.randint(7, 9)), ("KILL", rng.randint(11, 13))]
    plan.append(("TERM2", rng.randint(15, 17)))
    log = tmp / "resumed.log"
    for how, at in plan:
        proc = _start(config, runs.resumed, log, runs.offsite)
        runs.starts += 1
        _wait_for(lambda at=at: _last_step(runs.resumed) >= at, proc, f"step {at}")
        event = Interruption(how, at)
        sent = time.time()
        if how == "KILL":
            proc.send_signal(signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGTERM)
            if how == "TERM2":  # a second stop signal (another kind: the two cannot merge into one) ends it at once
                proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
        event.returncode, event.stdout = proc.returncode, stdout.decode()
        event.logged_step = _last_step(runs.resumed)
        newest = runs.resumed / "last.pt"
        found = load_newest(newest, 3)
        if found is not None:
            event.checkpoint_step = json.loads(found[0]["state"])["global_step"]
            event.checkpoint_fresh = found[1] == newest and newest.stat().st_mtime >= sent
        copied = load_newest(runs.offsite / "last.pt", 2) if runs.offsite.exists() else None
        if copied is not None:
            event.offsite_step = json.loads(copied[0]["state"])["global_step"]
        runs.interruptions.append(event)
    final = _start(config, runs.resumed, log, runs.offsite)
    runs.starts += 1
    assert final.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert reference.wait(timeout=300) == 0, (tmp / "reference.log").read_text()[-3000:]
    return runs


def _final(out: Path) -> dict[str, Any]:
    found = load_newest(out / "last.pt", 3)
    assert found is not None
    return found[0]


def _tensors(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    found: dict[str, torch.Tensor] = {}
    for key, item in items:
        found.update(_tensors(item, f"{prefix}/{key}"))
    return found


class TestInterruptedRuns:
    def test_killed_and_stopped_runs_resume_bit_identical(self, runs: Runs) -> None:
        assert [e.how for e in runs.interruptions] == ["KILL", "TERM", "KILL", "TERM2"]
        a, b = _final(runs.reference), _final(runs.resumed)
        state_a, state_b = json.loads(a["state"]), json.loads(b["state"])
        assert state_a["global_step"] == state_b["global_step"] == STEPS
        # every tensor the run holds: model, margin head, class memory, optimiser (momentum and steps)
        for part in ("model", "head", "class_memory", "optimizer"):
            ta, tb = _tensors(a[part]), _tensors(b[part])
            assert ta.keys() == tb.keys() and ta, part
            for name in ta:
                assert torch.equal(ta[name], tb[name]), f"{part}{name}"
        assert a["scaler"] == b["scaler"] and a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
        # the same validations at the same steps with the same scores, and the same train-loss means between them
        history_a, history_b = state_a.pop("history"), state_b.pop("history")
        assert [r["global_step"] for r in history_a] == [6, 12, 18, 20]
        for row_a, row_b in zip(history_a, history_b, strict=True):
            assert {k: v for k, v in row_a.items() if k not in CLOCK_COLUMNS} == {
                k: v for k, v in row_b.items() if k not in CLOCK_COLUMNS
            }
        assert state_a == state_b
        # the logs are the uninterrupted run's: one row a step, one validation row each
        steps = [json.loads(line)["step"] for line in (runs.resumed / "steps.jsonl").read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1))
        csv_rows = (runs.resumed / "epochs.csv").read_text().splitlines()
        assert len(csv_rows) == 1 + len(history_b)

    def test_the_ledger_counts_each_step_once_in_the_process_that_kept_it(self, runs: Runs) -> None:
        """Where and how long the run trained (model/training/ledger.py): the interrupted run's processes hold
        consecutive stretches of steps, from 0 to the end (steps a killed process had not checkpointed are the
        next one's); the uninterrupted run is one process."""
        from model.cpu import cpu_description

        reference = json.loads(_final(runs.reference)["ledger"])
        assert [(s["from_step"], s["to_step"]) for s in reference] == [(0, STEPS)]
        segments = json.loads(_final(runs.resumed)["ledger"])
        assert 2 <= len(segments) <= runs.starts
        assert segments[0]["from_step"] == 0 and segments[-1]["to_step"] == STEPS
        assert all(a["to_step"] == b["from_step"] for a, b in zip(segments, segments[1:], strict=False))
        assert all(s["machine"] == cpu_description() and s["precision"] == "fp32" for s in segments)
        assert all(s["seconds"] > 0 for s in segments if s["to_step"] > s["from_step"])

    def test_sigterm_leaves_a_checkpoint_of_the_step_it_stopped_at(self, runs: Runs) -> None:
        term = next(e for e in runs.interruptions if e.how == "TERM")
        assert term.returncode == 0, term
        report = json.loads(term.stdout.strip().splitlines()[-1])
        assert report["stopped_by"] == "SIGTERM" and report["global_step"] == term.logged_step
        assert term.checkpoint_fresh and term.checkpoint_step == term.logged_step >= term.at
        # the preemption notice also waited for the offsite copy of that checkpoint
        assert term.offsite_step == term.checkpoint_step

    def test_a_second_sigterm_exits_at_once_and_sigkill_loses_at_most_the_steps_since_a_checkpoint(
        self, runs: Runs
    ) -> None:
        twice = next(e for e in runs.interruptions if e.how == "TERM2")
        assert twice.returncode in (-signal.SIGTERM, -signal.SIGINT), twice  # the default action: no clean stop
        for killed in (e for e in runs.interruptions if e.how == "KILL"):
            assert killed.returncode == -signal.SIGKILL
            assert killed.checkpoint_step is None or killed.checkpoint_step <= killed.logged_step
        assert runs.starts == 5


class TestCheckpointGenerations:
    @pytest.fixture()
    def cache(self, tmp_path: Path, astronaut: np.ndarray) -> Path:
        return write_fake_cache(tmp_path / "cache", astronaut)

    @pytest.mark.parametrize("damage", ["truncated", "corrupted"])
    def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_generation(
        self, tmp_path: Path, cache: Path, damage: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        cfg = tiny_config(cache, tmp_path / "run", max_steps=3, epochs=1000, checkpoint_every=1, preemptible=True)
        Trainer(cfg).fit(stop_after=2)
        newest = tmp_path / "run" / "last.pt"
        assert [p.exists() for p in generations(newest, 3)] == [True, True, False]
        previous = torch.load(newest.with_name("last.pt.1"), weights_only=True)
        if damage == "truncated":  # a write cut short (a disk that lied about fsync)
            newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
        else:  # a loadable file whose content changed: only the digest tells
            payload = torch.load(newest, weights_only=True)
            next(iter(payload["model"].values())).add_(1e-3)
            torch.save(payload, newest)
        with caplog.at_level(logging.WARNING, logger="model.training.preempt"):
            resumed = Trainer(cfg)
        assert "skipping checkpoint" in caplog.text and "last.pt" in caplog.text
        assert resumed.state["global_step"] == json.loads(previous["state"])["global_step"] == 1
        for name, value in previous["model"].items():
            assert torch.equal(resumed.model.state_dict()[name], value), name
        assert (tmp_path / "run" / "last.pt.corrupt").exists()  # set aside, no longer a generation
        resumed.fit()
        assert resumed.state["global_step"] == 3
        kept = [load_newest(p, 1) for p in generations(newest, 3) if p.exists()]
        # step 3 after its validation, step 3 before it, step 2: whole generations, the corrupt one gone
        assert [json.loads(k[0]["state"])["global_step"] for k in kept if k] == [3, 3, 2]

    def test_a_run_killed_before_its_first_checkpoint_starts_its_logs_over(self, tmp_path: Path, cache: Path) -> None:
        cfg = tiny_config(cache, tmp_path / "run", max_steps=3, epochs=1000, checkpoint_every=100, preemptible=True)
        run = tmp_path / "run"
        run.mkdir()
        # what a SIGKILL at step 2 leaves when no checkpoint was written yet (found so by CI on a slower machine)
        (run / "steps.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2)))
        (run / "epochs.csv").write_text("global_step,score\n2,0.5\n")
        trainer = Trainer(cfg)
        assert trainer.state["global_step"] == 0
        assert (run / "steps.jsonl").read_text() == "" and not (run / "epochs.csv").exists()
        trainer.fit()
        steps = [json.loads(line)["step"] for line in (run / "steps.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3]

    def test_generations_rotate_and_none_whole_refuses_to_start_again(self, tmp_path: Path) -> None:
        path = tmp_path / "last.pt"
        for i in range(5):
            save_generation({"i": torch.tensor([i]), "note": f"save {i}"}, path, keep=3)
        kept = [int(torch.load(p, weights_only=True)["i"]) for p in generations(path, 3)]
        assert kept == [4, 3, 2] and not (tmp_path / "last.pt.3").exists()
        assert not (tmp_path / "last.pt.tmp").exists()
        payload, source = load_newest(path, 3) or ({}, None)
        assert source == path and payload["note"] == "save 4" and "content_sha256" not in payload
        for p in generations(path, 3):
            p.write_bytes(b"not a checkpoint")
        with pytest.raises(CorruptCheckpoint, match="no checkpoint"):
            load_newest(path, 3)
        assert load_newest(tmp_path / "absent.pt", 3) is None

    def test_the_digest_covers_every_value(self) -> None:
        base = {"a": torch.arange(4.0), "b": [1, "x", None], "c": {"d": torch.zeros((), dtype=torch.int64)}}
        digest = content_digest(base)
        assert content_digest({**base, "a": torch.tensor([0.0, 1.0, 2.0, 3.5])}) != digest
        assert content_digest({**base, "b": [1, "y", None]}) != digest
        assert content_digest({**base, "c": {"d": torch.ones((), dtype=torch.int64)}}) != digest
        assert content_digest({**base, "a": torch.arange(4.0).double()}) != digest

    def test_global_random_states_round_trip(self, tmp_path: Path) -> None:
        torch.manual_seed(1)
        np.random.seed(2)
        random.seed(3)
        save_generation({"rng": rng_states()}, tmp_path / "last.pt")
        expected = (torch.rand(3), np.random.rand(3), random.random())
        torch.manual_seed(9)
        np.random.seed(9)
        random.seed(9)
        payload, _ = load_newest(tmp_path / "last.pt", 3) or ({}, None)
        restore_rng_states(payload["rng"])
        assert torch.equal(torch.rand(3), expected[0])
        assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


class TestPreemptibleConfig:
    def test_the_schedule_is_never_sized_by_the_clock(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="budget_minutes"):
            TrainConfig.from_dict({"train": ["x"], "preemptible": True, "budget_minutes": 10})
        with pytest.raises(ValueError, match="validate_every"):
            TrainConfig.from_dict({"train": ["x"], "preemptible": True, "validate_every_s": 60})
        with pytest.raises(ValueError, match="max_samples"):
            TrainConfig.from_dict({"train": ["x"], "max_steps": 10, "max_samples": 100})
        cfg = TrainConfig.from_dict({"train": ["x"], "preemptible": True, "p": 8, "k": 4, "max_samples": 1000})
        assert cfg.samples_per_step == 32 and cfg.clock_checkpoint_s == 180.0
        assert TrainConfig.from_dict({"train": ["x"]}).clock_checkpoint_s is None

    def test_the_cpu_recipe_is_preemptible_and_counted_in_samples(self) -> None:
        cfg = TrainConfig.from_toml(ROOT / "configs" / "oaml_ir18_v3_cpu.toml")
        assert cfg.preemptible and cfg.max_samples and cfg.validate_every and cfg.budget_minutes is None
        assert cfg.train == ["celeba", "afdb", "lag", "fgnet"]
        assert cfg.unlabeled == ["utkface", "mask_unlabeled", "aflw2000"]
        assert cfg.exclude_identities == ["configs/overlap/lag_eval.txt"] and cfg.device == "cpu" and cfg.memory_guard

    def test_status_reads_a_run_folder(self, runs: Runs) -> None:
        info = run_status(runs.resumed)
        assert info["process"] == "not running" and info["step"] == STEPS and info["samples"] == 4 * STEPS
        assert info["total_samples"] == 4 * STEPS and [v["step"] for v in info["validations"]] == [6, 12, 18, 20]
        text = format_status(info)
        assert "samples done: 80 of 80 (100.0%)" in text and "last checkpoint:" in text and "validation" in text

    def test_control_pauses_resumes_and_stops_the_run_by_its_process_group(self, tmp_path: Path) -> None:
        """What make train-pause, train-resume and train-stop do, on a stand-in whose command line says train."""
        assert control(tmp_path, "check") == (f"not running ({tmp_path / PID_FILE}: absent)", False)
        proc = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)", "train"], start_new_session=True
        )  # its own session: the pid is the process group, as `setsid` gives make train-background
        try:
            (tmp_path / PID_FILE).write_text(f"{proc.pid}\n")
            assert control(tmp_path, "check")[1] and run_status(tmp_path)["process"] == "running"
            control(tmp_path, "pause")
            assert run_status(tmp_path)["process"] == "paused"
            control(tmp_path, "resume")
            assert run_status(tmp_path)["process"] == "running"
            message, there = control(tmp_path, "stop", wait_s=20)
            assert not there and "exited" in message and proc.wait(timeout=5) == -signal.SIGTERM
            assert control(tmp_path, "check")[1] is False
        finally:
            proc.kill()
            proc.wait()

    def test_the_memory_guard_waits_for_memory_and_says_so(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        from model.training import preempt

        available = iter([1 * 2**30, 1 * 2**30, 2 * 2**30, 64 * 2**30])
        seen: list[bool] = []

        def meminfo(key: str) -> int:
            seen.append((tmp_path / "memory_wait.json").exists())
            return next(available)

        monkeypatch.setattr(preempt, "_meminfo_bytes", meminfo)
        guard = MemoryGuard(tmp_path, margin=3 * 2**30, poll_s=0.01)
        with caplog.at_level(logging.WARNING, logger="model.training.preempt"):
            guard.before_step()
        assert seen == [False, True, True, True] and guard.waited_s > 0  # waited until 64 GB were there
        assert "waiting for memory" in caplog.text and not (tmp_path / "memory_wait.json").exists()
        info = {"run": "r", "pid": 7, "process": "running", "samples": 0, "validations": []}
        info["memory_wait"] = {"since": time.time() - 90, "need_bytes": 5 * 2**30, "available_bytes": 2**30}
        assert "waiting for memory for 90 s: a step needs about 5.0 GB, 1.0 GB were available" in format_status(info)
