"""``oaml check-engine``, its section written into bench/RESULTS.md (model/training/engine_check.py).

    python bench/check_engine.py weights/oaml_ir18.safetensors --engine openvino --precision bf16 \\
        --data-root ../oaml_data --holdout ../shared/data/train/aligned/celeba_extra --out bench/RESULTS.md [--record]

Every option but ``--out`` is ``oaml check-engine``'s; with ``--record`` the verdict is kept in the weights.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_model import emit  # noqa: E402
from oaml.cli import main as oaml  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    out = None
    if "--out" in argv:
        i = argv.index("--out")
        out = Path(argv[i + 1])
        del argv[i : i + 2]
    sys.argv = ["oaml", "check-engine", *argv]  # the command the report (and the record) names
    section = io.StringIO()
    with contextlib.redirect_stdout(section):
        code = oaml(sys.argv[1:])
    emit(section.getvalue().rstrip("\n"), out)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
