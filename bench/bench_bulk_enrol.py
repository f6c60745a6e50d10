"""Bulk enrolment (``oaml enrol``) against a local ``oaml serve``: photos per second at a few concurrencies, and
the server's peak memory during each run. Prints a Markdown section (others keep bench/RESULTS.md).

    .venv/bin/python bench/bench_bulk_enrol.py --photos 40 --concurrency 1,2,4

The photos are scikit-image's astronaut and camera, flipped, cropped, scaled (384 to 1024 pixels) and written as
JPEG, four to a subject; every run enrols all of them into a fresh collection, one request per photo, through
the real command (a child process, as a user runs it). A last run repeats the largest concurrency into the
same collection: every photo is then answered from its stored ``Idempotency-Key`` (a resumed run's speed).
The server's peak resident memory (``VmHWM``) is reset before each run (``/proc/<pid>/clear_refs``) and read
after it.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oaml.client import OAMLClient  # noqa: E402

SECTION = "## Bulk enrolment (bench/bench_bulk_enrol.py)"
KEY = "bench-bulk-admin-key-0123456789"


def cpu_model() -> str:
    """The CPU's name and the flags that choose the backbone's path (native bf16, AVX-512, VNNI, AMX)."""
    text = Path("/proc/cpuinfo").read_text()
    lines = text.splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown CPU")
    flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    feats = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
    said = ", ".join(f"{f}: {'yes' if f in flags else 'no'}" for f in feats)
    return f"{name} ({said})"


def write_photos(folder: Path, count: int) -> None:
    from skimage import data

    bases = [data.astronaut(), np.repeat(data.camera()[..., None], 3, axis=2)]
    scales = [0.75, 1.0, 1.5, 2.0]
    for i in range(count):
        image = bases[i % 2]
        if (i // 2) % 2:
            image = image[:, ::-1]
        top, left = 8 * (i % 5), 8 * (i % 7)
        picture = Image.fromarray(np.ascontiguousarray(image[top : 480 + top, left : 480 + left]))
        side = int(512 * scales[(i // 4) % len(scales)])
        picture = picture.resize((side, side), Image.Resampling.BILINEAR)
        subject = folder / f"s{i // 4:03d}"
        subject.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=85 + i % 10)
        (subject / f"{i:04d}.jpg").write_bytes(buf.getvalue())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def start_server(
    data_dir: Path, weights: Path | None, threads: int, rate_limits: str | None
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "OAML_DATA_DIR": str(data_dir),
        "OAML_PORT": str(port),
        "OAML_API_KEYS": f"{KEY}:admin",
        "OAML_TORCH_THREADS": str(threads),
        "OAML_LOG_LEVEL": "warning",
    }
    if weights is not None:
        env["OAML_WEIGHTS"] = str(weights)
    if rate_limits is not None:
        env["OAML_RATE_LIMITS"] = rate_limits
    with open(data_dir / "server.log", "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "oaml", "serve"], cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: see {data_dir / 'server.log'}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


def enrol_run(url: str, folder: Path, collection: str, concurrency: int, report: Path) -> tuple[float, str]:
    command = [
        sys.executable,
        "-m",
        "oaml",
        "enrol",
        url,
        str(folder),
        "--collection",
        collection,
        "--concurrency",
        str(concurrency),
        "--key",
        KEY,
        "--report",
        str(report),
        "--no-progress",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise RuntimeError(f"oaml enrol exited {done.returncode}: {done.stderr}")
    return seconds, done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--concurrency", default="1,2,4", help="comma-separated concurrencies")
    parser.add_argument("--weights", type=Path, default=None, help="default: the service's (the shipped weights)")
    parser.add_argument("--threads", type=int, default=2, help="OAML_TORCH_THREADS of the server")
    parser.add_argument(
        "--rate-limits",
        default=None,
        help="OAML_RATE_LIMITS of the server (default: the service's, admin keys 10 requests/s; admin=0: none)",
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="oaml-bench-bulk-") as tmp:
        folder, data_dir = Path(tmp) / "photos", Path(tmp) / "data"
        data_dir.mkdir()
        write_photos(folder, args.photos)
        proc, url = start_server(data_dir, args.weights, args.threads, args.rate_limits)
        try:
            with OAMLClient(url, KEY) as oaml:
                info = oaml.info()
                at_start = vm_hwm_mib(proc.pid)
                runs = [(c, f"bench-c{c}") for c in levels] + [(max(levels), f"bench-c{max(levels)}")]
                for i, (concurrency, collection) in enumerate(runs):
                    if i < len(levels):
                        oaml.create_collection(collection)
                    reset_peak(proc.pid)
                    load = os.getloadavg()[0]
                    seconds, summary = enrol_run(url, folder, collection, concurrency, Path(tmp) / "report.csv")
                    enrolled = re.search(r"enrolled (\d+), skipped (\d+) \(enrolled before\), failed (\d+)", summary)
                    assert enrolled, summary
                    new, skipped, failed = (int(x) for x in enrolled.groups())
                    what = "re-run (all stored)" if i >= len(levels) else "fresh collection"
                    rows.append(
                        f"| {concurrency} | {what} | {new} / {skipped} / {failed} | {seconds:.1f} | "
                        f"{args.photos / seconds:.2f} | {vm_hwm_mib(proc.pid):.0f} | {load:.1f} |"
                    )
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    body = [
        SECTION,
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs; server: `oaml serve`, model {info.model_version} "
        f"({info.engine} {info.precision}), OAML_TORCH_THREADS={args.threads}, "
        f"OAML_RATE_LIMITS={args.rate_limits or 'the default (admin=10/20)'}, on the same machine as the client.",
        "",
        f"Command: `.venv/bin/python bench/bench_bulk_enrol.py --photos {args.photos} "
        f"--concurrency {args.concurrency}"
        + (f" --rate-limits {args.rate_limits}" if args.rate_limits else "")
        + "`; each run is `oaml enrol URL FOLDER --collection C --concurrency N` "
        f"({args.photos} JPEG photos of 384 to 1024 pixels, four per subject, one request per photo), timed from "
        "start to exit (the command's own start-up and its check of the collection included).",
        "",
        f"Server peak memory after start-up (VmHWM): {at_start:.0f} MiB; in the table, the peak during each run "
        "(reset before it).",
        "",
        "| concurrency | run | enrolled / skipped / failed | seconds | photos/s | server VmHWM MiB | load (1 min) |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    sys.stdout.write("\n".join(body) + "\n")


if __name__ == "__main__":
    main()
