"""What a report section reads: the study folder's results, by step and job, and the pair's members."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Doc = dict[str, Any]


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

    @property
    def base(self) -> str:
        return self.cfg.pair.base.name

    @property
    def ft(self) -> str:
        return self.cfg.pair.finetuned.name

    def docs(self, step: str) -> list[Doc]:
        """The step's results.json documents, each with `_dir` (its folder), in folder order."""
        out = []
        for p in sorted((self.root / step).glob("*/results.json")):
            d = json.loads(p.read_text())
            d["_dir"] = p.parent
            out.append(d)
        return out

    def job(self, step: str, name: str) -> Doc | None:
        return next((d for d in self.docs(step) if d["_dir"].name == name), None)

    def rel(self, path: Path) -> Path:
        return path.relative_to(self.root)

    def qualifier(self) -> str | None:
        """'fine-tuned circuit explains F [lo, hi]; three-position ceiling C', for every circuit claim."""
        from etk.report.findings import explains

        text = explains(self.job("faithfulness", "finetuned_circuit-on-finetuned"))
        return f"fine-tuned {text}" if text else None

    def circuit_path(self, member: str) -> Path | None:
        """The member's circuit as the study used it: minimality's, else path patching's candidates."""
        for step in ("minimality", "path_patching"):
            p = self.root / step / member / "circuit.json"
            if p.exists():
                return p
        return None
