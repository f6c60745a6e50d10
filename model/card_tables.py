"""The model card's tables (weights/README.md) written by the tools that measure them (``--record``), between markers.

A number in ``weights/README.md`` that a tool measured is written there by that tool, from the same
report it stores in the weights' metadata, so the card cannot drift from what was measured; the
tests compare each marked table with the recorded report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["CardSection", "OPEN_SET", "SUITE"]


@dataclass(frozen=True)
class CardSection:
    """One marked table of the model card: ``name`` keys its markers, ``writer`` is the command that writes it."""

    name: str
    writer: str

    @property
    def begin(self) -> str:
        return f"<!-- {self.name}:begin (written by {self.writer}) -->"

    @property
    def end(self) -> str:
        return f"<!-- {self.name}:end -->"

    def present(self, card: str) -> bool:
        """Both markers, in order (a tool checks before it spends its run's result on the card)."""
        return self._span(card) is not None

    def read(self, card: str) -> str:
        """The table between this section's markers in the card's text (ValueError without them)."""
        start, end = self._found(card)
        return card[start:end].strip()

    def write(self, path: Path, table: str) -> None:
        """Replace this section's table in the model card at ``path``."""
        card = path.read_text()
        start, end = self._found(card)
        path.write_text(card[:start] + "\n" + table.strip() + "\n" + card[end:])

    def _span(self, card: str) -> tuple[int, int] | None:
        """Where the table lies: from the end of the begin marker to the start of the end marker after it."""
        begin = card.find(self.begin)
        end = card.find(self.end, begin) if begin >= 0 else -1
        return (begin + len(self.begin), end) if end >= 0 else None

    def _found(self, card: str) -> tuple[int, int]:
        span = self._span(card)
        if span is None:
            raise ValueError(f"the model card has no {self.name} table between {self.begin!r} and {self.end!r}")
        return span


#: the benchmark suite (LFW, CFP-FP, CFP-FF; clean and occluded; against SFace)
SUITE = CardSection("suite", "oaml eval --suite public --record")
#: /identify's open set on LFW through the running service
OPEN_SET = CardSection("open_set", "oaml eval-identify --record")
