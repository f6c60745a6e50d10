"""Where a run trained and for how long: the model card's "how many samples, on what, over how long".

A preemptible run is many processes, often on several machines (stopped for a benchmark, killed, resumed on a
new host from its offsite copy), each of a different kind: an AMD EPYC Milan trains the v3 recipe in fp32 at
about 2 samples/s, an Intel Xeon with AMX in bf16 at about 7, a GPU at hundreds. Each process adds a *segment*
to the run's ledger: the machine (the CPU's model and class, or the GPU's name), device and precision, the
steps it trained and the seconds its steps and validations took (not its loading, checkpoints or starting
baseline). A step that a pause fell into (``make train-pause``: SIGSTOP, then SIGCONT) counts as long as the
step before it, so that hours stopped for a benchmark are not hours of training. The ledger travels in the
checkpoint beside the model (not in the run's ``state``, whose equality with an uninterrupted run's the resume
tests assert), so a segment holds what its newest checkpoint holds: steps a killed process had not
checkpointed are trained again, and counted, by the next one. The steps of all segments add up to the run's
step. Exported weights carry the summary (``training.compute``).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch

from model.cpu import cpu_description

__all__ = ["Ledger", "describe_compute", "machine_name"]


def machine_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's description (model, native bf16, AVX-512, class)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_description()


class Ledger:
    """The segments of a run, oldest first; :meth:`open` starts this process's."""

    def __init__(self, segments: list[dict[str, Any]] | None = None) -> None:
        self.segments: list[dict[str, Any]] = list(segments or [])
        self._current: dict[str, Any] | None = None
        self._continued = False  # a SIGCONT came since the last add(): a pause fell into what it timed
        self._last: dict[bool, float] = {}  # the last seconds counted, of a step (True) and of a validation

    @classmethod
    def from_json(cls, text: str | None) -> Ledger:
        """A checkpoint's ledger (an older checkpoint has none: its earlier steps are unaccounted for)."""
        return cls(json.loads(text) if text else None)

    def to_json(self) -> str:
        return json.dumps(self.segments)

    def open(self, step: int, device: torch.device, precision: str) -> None:
        """This process starts training at ``step``."""
        self._current = {
            "machine": machine_name(device),
            "device": device.type,
            "precision": precision,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "from_step": step,
            "to_step": step,
            "seconds": 0.0,
        }
        self.segments.append(self._current)

    @contextmanager
    def pauses_excluded(self) -> Iterator[None]:
        """While training: a SIGCONT (the end of a pause) marks the step or validation it fell into, which then
        counts as long as the last one of its kind. Signal handlers belong to the main thread: elsewhere
        (a test's worker thread) pauses are counted."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def continued(signum: int, frame: FrameType | None) -> None:
            self._continued = True

        previous = signal.signal(signal.SIGCONT, continued)
        try:
            yield
        finally:
            signal.signal(signal.SIGCONT, previous)

    def add(self, seconds: float, step: int | None = None) -> None:
        """A step (``step``: the run's step after it) or a validation took ``seconds``."""
        if self._current is None:
            return
        kind = step is not None
        if self._continued:
            self._continued = False
            seconds = self._last.get(kind, 0.0)
        self._last[kind] = seconds
        self._current["seconds"] = round(self._current["seconds"] + seconds, 3)
        if step is not None:
            self._current["to_step"] = step

    def summary(self, samples_per_step: int, step: int) -> dict[str, Any]:
        """What exported weights carry: the samples and seconds of the run up to ``step``, and for each kind of
        machine (the same machine, device and precision) its processes, steps, samples and seconds."""
        kinds: dict[tuple[str, str, str], dict[str, Any]] = {}
        for seg in self.segments:
            steps = seg["to_step"] - seg["from_step"]
            if steps <= 0:
                continue
            key = (seg["machine"], seg["device"], seg["precision"])
            kind = kinds.setdefault(
                key,
                {"machine": key[0], "device": key[1], "precision": key[2], "processes": 0, "steps": 0, "seconds": 0.0},
            )
            kind["processes"] += 1
            kind["steps"] += steps
            kind["seconds"] = round(kind["seconds"] + seg["seconds"], 1)
        machines = [{**k, "samples": k["steps"] * samples_per_step} for k in kinds.values()]
        accounted = sum(k["steps"] for k in machines)
        return {
            "samples": step * samples_per_step,
            "seconds": round(sum(k["seconds"] for k in machines), 1),
            # steps trained before the run kept a ledger (a checkpoint of older code)
            "unaccounted_steps": max(0, step - accounted),
            "machines": machines,
        }


def describe_compute(compute: dict[str, Any] | None) -> str:
    """How many samples, on what, over how long (``training.compute``, model/training/ledger.py)."""
    if not compute:
        return "not recorded (an export of older code)"
    parts = [
        f"{m['samples']:,} samples in {m['seconds'] / 3600:.1f} h on {m['machine']} ({m['device']}, {m['precision']}; "
        f"{m['processes']} process{'es' if m['processes'] != 1 else ''})"
        for m in compute["machines"]
    ]
    line = (
        f"{compute['samples']:,} samples in {compute['seconds'] / 3600:.1f} h of steps and validations: "
        + "; ".join(parts)
    )
    if compute.get("unaccounted_steps"):
        line += f"; {compute['unaccounted_steps']:,} earlier steps not recorded (code before the ledger)"
    return line
