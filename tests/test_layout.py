"""The two wings stay apart: serving code never imports training code, and the core never imports the app.

``model/`` (the serving core), ``model/training/`` and ``service/`` may only import downwards:

    oaml (the command line)  ->  service, model.training  ->  model (core)

Every ``import`` statement counts, including the lazy ones inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(folder: Path, exclude: str | None = None, root: Path = ROOT) -> dict[str, set[str]]:
    """``{file: {imported module, ...}}`` for every Python file under ``folder``."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        if exclude and exclude in path.relative_to(root).parts:
            continue
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(root))] = names
    return found


def offenders(found: dict[str, set[str]], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{file} imports {name}"
        for file, names in found.items()
        for name in sorted(names)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


@pytest.mark.parametrize(
    ("folder", "exclude", "forbidden"),
    [
        ("service", None, ("model.training", "oaml")),
        ("model", "training", ("model.training", "service", "oaml")),
        ("model/training", None, ("service", "oaml")),
    ],
    ids=[
        "service never imports training",
        "the core imports neither training nor the app",
        "training never imports the app",
    ],
)
def test_imports_only_go_down(folder: str, exclude: str | None, forbidden: tuple[str, ...]) -> None:
    found = imported_modules(ROOT / folder, exclude)
    assert found, f"no Python files under {folder}"
    assert offenders(found, forbidden) == []


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    """A forbidden import inside a function is still found (the rule is not only about start-up)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text("def f():\n    from model.training.train import Trainer\n    return Trainer\n")
    found = imported_modules(pkg, root=tmp_path)
    assert offenders(found, ("model.training",)) == ["pkg/mod.py imports model.training.train"]


def test_a_running_app_has_loaded_no_training_module() -> None:
    code = (
        "import sys\n"
        "from service.app import create_app\n"
        "create_app()\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('model.training', 'oaml')))\n"
        "print(','.join(bad))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == ""
