"""The preemptible CPU recipe (configs/oaml_ir18_v3_cpu.toml) on this machine: which augmentation path is faster,
how many samples a second it trains in the foreground and in the background (nice 19, ionice idle), and how much
a foreground job slows down beside it.

    python bench/bench_background.py augment --data-root ../oaml_data            # device vs per-face batches
    python bench/bench_background.py throughput --data-root ../oaml_data --seconds 300
    python bench/bench_background.py contention --data-root ../oaml_data --repeat 2

``augment`` builds the recipe's trainer once and times, on the same PK batches, the device augmenter (batched
torch on the CPU: the recipe's blur, JPEG-like blocking and mixed views included) and the per-face NumPy path
(``augment_on = "workers"`` in the training process, which has none of those three): the batch alone, and a
whole training step. ``throughput`` runs ``oaml train --preemptible`` on the recipe (a fresh run folder under a
temporary directory, starting from the shipped weights) for ``--seconds`` after its first logged step, at nice 0
and then at nice 19 with ``ionice -c3``, and reads samples/s from steps.jsonl. ``contention`` times a foreground
job (``pytest -q tests/test_qaconv.py`` by default) alone (the background run paused) and beside it, alternately.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "oaml_ir18_v3_cpu.toml"
WEIGHTS = ROOT / "weights" / "oaml_ir18.safetensors"


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def cpu_line() -> str:
    text = Path("/proc/cpuinfo").read_text()
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    feats = ", ".join(f"{f}: {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    return f"{name}, {os.cpu_count()} cores ({feats})"


def augment(data_root: Path, batches: int, steps: int) -> None:
    import dataclasses

    import torch

    from model.training.batches import DeviceBatchSource
    from model.training.device_augment import DeviceAugmenter
    from model.training.train import TrainConfig, Trainer

    cfg = TrainConfig.from_toml(CONFIG).with_data_root(data_root)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "out": tempfile.mkdtemp(prefix="bench_aug_")})
    cfg.init_from = str(WEIGHTS)
    trainer = Trainer(cfg)
    assert trainer.device_source is not None
    plan = trainer.sampler.batches(0)
    say(f"machine: {cpu_line()}; torch {torch.__version__}, {cfg.threads} threads, precision {trainer.precision}")
    source = trainer.device_source
    # the device path without mixed views: the same 80 faces a step as the per-face path (blur and blocking kept)
    unmixed = DeviceBatchSource(
        trainer.batch_source,
        DeviceAugmenter(dataclasses.replace(source.augmenter.config, mix=0.0), source.augmenter.bank),
        trainer.device,
    )
    paths = {
        "device": lambda step, b: source.prepare(step, b),
        "device, no mixed views": lambda step, b: unmixed.prepare(step, b),
        "per-face (workers)": lambda step, b: trainer.batch_source.prepare(step, b).to_device(trainer.device),
    }
    batch_s: dict[str, list[float]] = {k: [] for k in paths}
    step_s: dict[str, list[float]] = {k: [] for k in paths}
    rows = {k: int(fn(0, plan[0]).inputs.shape[0]) for k, fn in paths.items()}
    for i in range(batches):  # interleaved, so that other load on the machine falls on every path alike
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn(1000 + i, plan[i])
            batch_s[name].append(time.perf_counter() - t0)
    for i in range(steps):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            trainer._step(fn(2000 + i, plan[i]))
            step_s[name].append(time.perf_counter() - t0)
    report = {
        name: {
            "faces_a_step": rows[name],
            "batch_s": round(statistics.median(batch_s[name]), 3),
            "step_s": [round(x, 1) for x in step_s[name]],
            "drawn_samples_per_s": round(cfg.samples_per_step / statistics.median(step_s[name]), 3),
            "faces_per_s": round(rows[name] / statistics.median(step_s[name]), 3),
        }
        for name in paths
    }
    report["load_average"] = os.getloadavg()  # type: ignore[assignment]
    shutil.rmtree(cfg.out, ignore_errors=True)
    say(json.dumps(report, indent=1))


def _nice_session() -> None:
    """In the child, after its setsid: nice the new session's scheduler autogroup too (as ``make
    train-background`` does); else, where autogroups are on, the run gets a session's equal share whatever its
    nice."""
    try:
        Path("/proc/self/autogroup").write_text("19")
    except OSError:
        pass


def _start_run(out: Path, data_root: Path, background: bool, log: Path) -> subprocess.Popen[bytes]:
    command = [str(ROOT / ".venv" / "bin" / "oaml"), "train", "--config", str(CONFIG), "--data-root", str(data_root)]
    command += ["--out", str(out), "--init-from", str(WEIGHTS), "--preemptible"]
    if background:
        command = ["nice", "-n", "19", *(["ionice", "-c3"] if shutil.which("ionice") else []), *command]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    with log.open("wb") as f:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_nice_session if background else None,  # noqa: PLW1509  # writes one /proc file
        )


def _rows(out: Path) -> list[dict[str, float]]:
    path = out / "steps.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rate(rows: list[dict[str, float]]) -> float:
    return (rows[-1]["samples"] - rows[0]["samples"]) / (rows[-1]["time"] - rows[0]["time"])


def throughput(data_root: Path, seconds: float, modes: list[str]) -> None:
    say(f"machine: {cpu_line()}; load average before: {os.getloadavg()}")
    for mode in modes:
        tmp = Path(tempfile.mkdtemp(prefix=f"bench_{mode}_"))
        proc = _start_run(tmp / "run", data_root, mode == "background", tmp / "log")
        try:
            while not _rows(tmp / "run"):
                if proc.poll() is not None:
                    raise SystemExit((tmp / "log").read_text()[-2000:])
                time.sleep(2)
            started = time.time()
            time.sleep(seconds)
            rows = _rows(tmp / "run")
            steps = [r for r in rows if r["time"] >= rows[0]["time"]]
            say(
                f"{mode}: {_rate(steps):.2f} samples/s over {steps[-1]['time'] - steps[0]['time']:.0f} s "
                f"({len(steps)} logged steps, step {steps[-1]['step']}); faces/s within steps: "
                f"{statistics.median(r['img_per_s'] for r in steps):.2f}; measured {time.time() - started:.0f} s"
            )
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            shutil.rmtree(tmp, ignore_errors=True)


def contention(data_root: Path, repeat: int, job: list[str], warm_s: float) -> None:
    """The job alone and beside the background run, alternately: the run is paused (SIGSTOP, as ``make
    train-pause``) for each alone timing and continued for the next one beside it, so that other load on the
    machine falls on both alike."""
    say(f"machine: {cpu_line()}; load average before: {os.getloadavg()}; job: {' '.join(job)}")

    def run_job() -> float:
        t0 = time.perf_counter()
        subprocess.run(job, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0

    tmp = Path(tempfile.mkdtemp(prefix="bench_contention_"))
    proc = _start_run(tmp / "run", data_root, True, tmp / "log")
    alone, beside = [], []
    try:
        while not _rows(tmp / "run"):
            if proc.poll() is not None:
                raise SystemExit((tmp / "log").read_text()[-2000:])
            time.sleep(2)
        time.sleep(warm_s)
        for _ in range(repeat):
            os.killpg(proc.pid, signal.SIGSTOP)
            time.sleep(1)
            alone.append(run_job())
            os.killpg(proc.pid, signal.SIGCONT)
            time.sleep(3)
            beside.append(run_job())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    a, b = statistics.median(alone), statistics.median(beside)
    report = {
        "alone_s": [round(x, 2) for x in alone],
        "beside_s": [round(x, 2) for x in beside],
        "median_alone_s": round(a, 2),
        "median_beside_s": round(b, 2),
        "slowdown": round(b / a, 3),
        "load_average_after": os.getloadavg(),
    }
    say(json.dumps(report, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["augment", "throughput", "contention"])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "oaml_data")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--modes", default="foreground,background")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--warm-s", type=float, default=60)
    parser.add_argument("--job", default=f"{ROOT / '.venv' / 'bin' / 'python'} -m pytest -q tests/test_qaconv.py")
    args = parser.parse_args()
    if args.what == "augment":
        augment(args.data_root, args.batches, args.steps)
    elif args.what == "throughput":
        throughput(args.data_root, args.seconds, args.modes.split(","))
    else:
        contention(args.data_root, args.repeat, args.job.split(), args.warm_s)


if __name__ == "__main__":
    main()
