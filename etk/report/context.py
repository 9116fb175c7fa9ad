"""What a report section reads: the study's job graph — every job with its typed result — and the pair's members."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etk.results import Job, Result, member_circuit, select


@dataclass
class Section:
    title: str
    lines: list[str]
    findings: list[str] = field(default_factory=list)


@dataclass
class ReportContext:
    root: Path
    cfg: Any
    steps: list[str]
    graph: list[tuple[Job, Result]] = field(default_factory=list)

    @property
    def task(self):
        """The study's task (`etk.tasks.Task`): its groups, their abbreviations and the report's words."""
        from etk.tasks import task_of

        return task_of(self.cfg)

    @property
    def base(self) -> str:
        return self.cfg.pair.base.name

    @property
    def ft(self) -> str:
        return self.cfg.pair.finetuned.name

    def results(self, step: str, **match: Any) -> list[tuple[Job, Result]]:
        """The step's (job, result) pairs by job name; `match` filters on Job fields (member=..., circuit_of=...)."""
        return sorted(select(self.graph, step, **match), key=lambda jr: jr[0].name)

    def of(self, step: str, **match: Any) -> list[Any]:
        """The step's results (typed), by job name."""
        return [r for _, r in self.results(step, **match)]

    def result(self, step: str, **match: Any) -> Any:
        """The first result of a step whose job matches, or None."""
        found = self.of(step, **match)
        return found[0] if found else None

    def rel(self, path: Path) -> Path:
        return path.relative_to(self.root)

    def qualifier(self) -> str | None:
        """'fine-tuned circuit explains F [lo, hi]; every head at its positions C', for every circuit claim."""
        from etk.report.findings import explains

        text = explains(self.result("faithfulness", circuit_of="finetuned", member="finetuned"))
        return f"fine-tuned {text}" if text else None

    def circuit_path(self, member: str) -> Path | None:
        """The member's circuit as the study used it: minimality's, else path patching's candidates."""
        return member_circuit(self.graph, member)
