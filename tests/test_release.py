"""A release candidate ships only when it beats the shipped weights on every clean row of the public suite and
meets the issue's floors; `oaml train-release` runs nothing before its run's rule is met, then calibrates,
runs the suite with the shipped weights beside it and writes the verdict (its steps faked here: the real ones
need the evaluation data and take hours on this CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from model.training.release import suite_verdict
from oaml.cli import main

ROOT = Path(__file__).resolve().parents[1]


PATH = {"device": "cpu", "precision": "float32", "flip": True, "engine": "torch"}


def report(**rows: tuple[float, float]) -> dict[str, Any]:
    """A suite report with these sets' fused (clean, occluded) accuracies."""
    return {
        "weights": {"file": "weights/oaml_ir18.safetensors", "model_version": "ir_18-33578dd8d7d0"},
        "embedding": PATH,
        "subset": {"folds": [1, 2], **{name: {} for name in rows}},
        "sets": {
            name: {"clean": {"fused": {"accuracy": clean}}, "occluded": {"fused": {"accuracy": occluded}}}
            for name, (clean, occluded) in rows.items()
        },
    }


#: the whole suite's report, as `oaml eval --suite public` writes it: every set, and the fixed subset's rows
SHIPPED = report(**{"LFW": (0.9168, 0.8855), "CFP-FP": (0.6882, 0.6746), "CFP-FF": (0.9008, 0.8658)})


class TestSuiteVerdict:
    def test_better_on_every_clean_row_and_above_the_floors_ships(self) -> None:
        better = report(**{"LFW": (0.93, 0.80), "CFP-FP": (0.76, 0.70), "CFP-FF": (0.91, 0.88)})
        verdict = suite_verdict(better, SHIPPED)
        assert verdict.ships and verdict.failed == ()
        # an occluded row that got worse is shown, not required
        assert "| LFW | occluded | 88.55% | 80.00% | -8.55 | shown |" in verdict.table
        assert "| CFP-FP | clean | 68.82% | 76.00% | +7.18 | better than shipped; at least 75.0% |" in verdict.table

    def test_one_clean_row_not_better_or_a_floor_missed_does_not_ship(self) -> None:
        tie = report(**{"LFW": (0.93, 0.9), "CFP-FP": (0.76, 0.7), "CFP-FF": (0.9008, 0.9)})
        verdict = suite_verdict(tie, SHIPPED)
        assert not verdict.ships and verdict.failed == ("CFP-FF clean: 90.08% is not above the shipped 90.08%",)
        low = report(**{"LFW": (0.92, 0.9), "CFP-FP": (0.74, 0.7), "CFP-FF": (0.95, 0.9)})
        failed = suite_verdict(low, SHIPPED).failed
        assert failed == (
            "LFW clean: 92.00% is below the 92.5% target",
            "CFP-FP clean: 74.00% is below the 75.0% target",
        )

    def test_reports_of_two_embedding_paths_do_not_compare(self) -> None:
        better = report(**{"LFW": (0.93, 0.80), "CFP-FP": (0.76, 0.70), "CFP-FF": (0.91, 0.88)})
        verdict = suite_verdict({**better, "embedding": {**PATH, "precision": "bfloat16"}}, SHIPPED)
        assert not verdict.ships and "different embedding paths" in verdict.failed[0]

    def test_a_set_missing_from_the_candidates_run_does_not_ship(self) -> None:
        partial = report(**{"LFW": (0.95, 0.9), "CFP-FF": (0.95, 0.9)})
        verdict = suite_verdict(partial, SHIPPED)
        assert verdict.failed == ("CFP-FP: not in the candidate's suite run",)


class TestTrainRelease:
    @pytest.fixture
    def run(self, tmp_path: Path) -> Path:
        folder = tmp_path / "run"
        folder.mkdir()
        shutil.copyfile(ROOT / "weights" / "oaml_ir18.safetensors", folder / "best.safetensors")
        return folder

    @staticmethod
    def status(run: Path, best: float) -> None:
        (run / "status.json").write_text(
            json.dumps(
                {
                    "validation_set": "v",
                    "baseline": {"score": 0.80, "validation_set": "v", "weights": "w"},
                    "release_margin": 0.01,
                    "best_score": best,
                    "best_step": 1200,
                }
            )
        )

    def fake_steps(self, monkeypatch: pytest.MonkeyPatch, candidate: dict[str, Any]) -> list[list[str]]:
        """`oaml calibrate` and `oaml eval` as train-release calls them: recorded, the eval writing both reports."""
        import oaml.cli

        calls: list[list[str]] = []
        real = oaml.cli.main

        def fake(argv: list[str]) -> int:
            if argv[0] not in ("calibrate", "eval"):
                return real(argv)
            calls.append(list(argv))
            if argv[0] == "eval":
                out = Path(argv[argv.index("--out") + 1])
                out.mkdir(parents=True)
                theirs = argv[1] == "weights/oaml_ir18.safetensors"
                (out / "suite.json").write_text(json.dumps(SHIPPED if theirs else candidate))
            return 0

        monkeypatch.setattr(oaml.cli, "main", fake)
        return calls

    def test_nothing_runs_before_the_runs_rule_is_met(self, run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.status(run, best=0.805)
        calls = self.fake_steps(monkeypatch, SHIPPED)
        assert main(["train-release", str(run)]) == 3
        assert calls == [] and not (run / "release").exists()

    def test_a_candidate_that_wins_is_calibrated_suited_and_ships(
        self, run: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.status(run, best=0.83)
        calls = self.fake_steps(
            monkeypatch, report(**{"LFW": (0.93, 0.9), "CFP-FP": (0.76, 0.7), "CFP-FF": (0.92, 0.9)})
        )
        assert main(["train-release", str(run), "--data-root", "D", "--shared", "S"]) == 0
        candidate = str(run / "release" / "candidate.safetensors")
        where = ["--data-root", "D", "--shared", "S"]
        # each its own suite run: a fine-tune's trunk is not the shipped one's, which `--also` refuses
        assert calls == [
            ["calibrate", candidate, "--data-root", "D", "--dtype", "float16", "--holdout", "D/celeba_extra"],
            [
                "eval",
                candidate,
                "--suite",
                "public",
                "--peer",
                "sface",
                "--out",
                str(run / "release" / "suite"),
                *where,
            ],
            ["eval", "weights/oaml_ir18.safetensors", "--suite", "public", "--peer", "sface"]
            + ["--out", str(run / "release" / "shipped"), *where],
        ]
        note = (run / "release" / "release.md").read_text()
        assert "best 0.8300 (step 1,200) against the initial weights' 0.8000" in note
        assert "**Ships.**" in note and "| LFW | clean | 91.68% | 93.00% | +1.32 |" in note
        assert "its lineage not recorded" in note  # the shipped file stands in: made before lineages were recorded
        assert "- Compute: not recorded (an export of older code)" in note

    def test_a_candidate_that_loses_a_clean_row_does_not_ship(self, run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.status(run, best=0.70)
        self.fake_steps(monkeypatch, report(**{"LFW": (0.93, 0.9), "CFP-FP": (0.76, 0.7), "CFP-FF": (0.89, 0.9)}))
        assert main(["train-release", str(run), "--force"]) == 2
        note = (run / "release" / "release.md").read_text()
        assert "**Does not ship:**" in note and "- CFP-FF clean: 89.00% is not above the shipped 90.08%" in note

    def test_a_kept_report_of_the_shipped_weights_spares_their_suite_run(
        self, run: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        self.status(run, best=0.83)
        kept = tmp_path / "kept"
        kept.mkdir()
        (kept / "suite.json").write_text(json.dumps(SHIPPED))
        calls = self.fake_steps(
            monkeypatch, report(**{"LFW": (0.93, 0.9), "CFP-FP": (0.74, 0.7), "CFP-FF": (0.92, 0.9)})
        )
        assert main(["train-release", str(run), "--shipped-report", str(kept)]) == 2
        assert [c[:2] for c in calls] == [
            ["calibrate", str(run / "release" / "candidate.safetensors")],
            ["eval", str(run / "release" / "candidate.safetensors")],
        ]
        assert "the shipped weights' from the kept report" in (run / "release" / "release.md").read_text()
        assert "CFP-FP clean: 74.00% is below the 75.0% target" in (run / "release" / "release.md").read_text()

    @pytest.mark.parametrize(
        "status", ["{not json", "[1, 2]", json.dumps({"best_score": 0.9, "validation_set": "v"})], ids=str
    )
    def test_a_run_without_a_readable_baseline_is_refused_with_a_reason(
        self, run: Path, status: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        (run / "status.json").write_text(status)
        calls = self.fake_steps(monkeypatch, SHIPPED)
        with pytest.raises(SystemExit, match="has no baseline on its current validation set"):
            main(["train-release", str(run)])
        assert calls == []

    def test_force_runs_a_run_without_a_baseline(self, run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        (run / "status.json").write_text("{}")
        better = report(**{"LFW": (0.93, 0.9), "CFP-FP": (0.76, 0.7), "CFP-FF": (0.92, 0.9)})
        self.fake_steps(monkeypatch, better)
        assert main(["train-release", str(run), "--force"]) == 0
        assert "no baseline to compare with" in (run / "release" / "release.md").read_text()

    def test_missing_shipped_weights_are_refused_before_anything_runs(
        self, run: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        self.status(run, best=0.83)
        calls = self.fake_steps(monkeypatch, SHIPPED)
        with pytest.raises(SystemExit, match="--shipped .*gone.safetensors not found"):
            main(["train-release", str(run), "--shipped", str(tmp_path / "gone.safetensors")])
        assert calls == []

    @pytest.mark.parametrize(
        ("kept", "refusal"),
        [
            ({**SHIPPED, "subset": {"folds": [1, 2]}}, "not a whole suite run"),  # what `--folds 1` leaves
            ({**SHIPPED, "weights": {"model_version": "ir_18-000000000000"}}, "a report of ir_18-000000000000, not of"),
        ],
        ids=["part of the suite", "another model version"],
    )
    def test_a_kept_report_that_does_not_stand_for_the_shipped_weights_is_refused_before_anything_runs(
        self, run: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kept: dict[str, Any], refusal: str
    ) -> None:
        self.status(run, best=0.83)
        report_file = tmp_path / "kept.json"
        report_file.write_text(json.dumps(kept))
        calls = self.fake_steps(monkeypatch, SHIPPED)
        with pytest.raises(SystemExit, match=refusal):
            main(["train-release", str(run), "--shipped-report", str(report_file)])
        assert calls == [] and not (run / "release").exists()


def test_the_release_note_says_how_many_samples_on_what_over_how_long() -> None:
    """Two processes on one kind of machine and one on another, after steps of code that kept no ledger."""
    from model.training.ledger import Ledger, describe_compute

    milan, xeon = "AMD EPYC (class avx2)", "Intel Xeon (class amx)"
    segment = {"device": "cpu", "started": "2026-12-07T07:00:00Z"}
    ledger = Ledger(
        [
            {**segment, "machine": milan, "precision": "fp32", "from_step": 100, "to_step": 400, "seconds": 3600.0},
            {**segment, "machine": milan, "precision": "fp32", "from_step": 400, "to_step": 700, "seconds": 3600.0},
            {**segment, "machine": xeon, "precision": "bf16", "from_step": 700, "to_step": 1600, "seconds": 3600.0},
            {**segment, "machine": xeon, "precision": "bf16", "from_step": 1600, "to_step": 1600, "seconds": 0.0},
        ]
    )
    summary = ledger.summary(samples_per_step=30, step=1600)
    assert summary["samples"] == 48_000 and summary["seconds"] == 10_800 and summary["unaccounted_steps"] == 100
    assert describe_compute(summary) == (
        "48,000 samples in 3.0 h of steps and validations: 18,000 samples in 2.0 h on AMD EPYC (class avx2) "
        "(cpu, fp32; 2 processes); 27,000 samples in 1.0 h on Intel Xeon (class amx) (cpu, bf16; 1 process); "
        "100 earlier steps not recorded (code before the ledger)"
    )


def test_a_pause_is_not_counted_as_training() -> None:
    """`make train-pause` stops the process mid-step (SIGSTOP); the SIGCONT that ends it marks that step, which
    counts as long as the one before it."""
    import os
    import signal

    import torch

    from model.training.ledger import Ledger

    ledger = Ledger()
    ledger.open(0, torch.device("cpu"), "fp32")
    with ledger.pauses_excluded():
        ledger.add(2.0, 1)
        ledger.add(30.0)  # a validation
        os.kill(os.getpid(), signal.SIGCONT)  # a pause ended during the next step, which took "an hour"
        ledger.add(3600.0, 2)
        ledger.add(3.0, 3)
    assert ledger.segments[0]["seconds"] == 2.0 + 30.0 + 2.0 + 3.0 and ledger.segments[0]["to_step"] == 3
    assert signal.getsignal(signal.SIGCONT) is signal.SIG_DFL  # the handler goes with the training
