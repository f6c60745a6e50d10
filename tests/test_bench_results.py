"""bench/RESULTS.md keeps each CPU kind's results: a re-run replaces its own kind's section, not another's."""

from __future__ import annotations

from pathlib import Path

from bench.bench_model import write_section


def _section(title: str, machine: str, value: str) -> str:
    return f"## {title}\n\n- Date: today; machine: {machine}, 2 cores; torch x.\n\n| a |\n|---|\n| {value} |"


def test_a_rerun_replaces_its_own_kind_and_keeps_the_others(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    write_section(out, _section("Engines", "AMD EPYC (native bf16: yes)", "1"))
    write_section(out, _section("Other", "AMD EPYC (native bf16: yes)", "9"))
    write_section(out, _section("Engines", "Intel Xeon (native bf16: yes)", "2"))
    write_section(out, _section("Engines", "Intel Xeon (native bf16: yes), AVX2 kernels only", "3"))
    write_section(out, _section("Engines", "AMD EPYC (native bf16: yes)", "4"))  # the same kind again
    text = out.read_text()
    assert text.count("## Engines") == 3 and text.count("## Other") == 1
    assert "| 1 |" not in text and all(f"| {v} |" in text for v in "2349")
    # each kind's section stays where it was, the new kinds after the first, before the next title
    assert text.index("| 4 |") < text.index("| 2 |") < text.index("| 3 |") < text.index("## Other")
    assert "\n\n## Other" in text and text.endswith("| 9 |\n")
