"""Reader and writer for the paper's jsonl dataset format (SPEC §1.3)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Iterable

from etk.artifacts import write_text
from etk.data.boxes import Context, Example
from etk.errors import DataError

_SEGMENT = re.compile(r"^(?:The|the) (.+) is in Box (\S+)$")
_QUERY = re.compile(r"^Box (\S+) contains the (.+)\.$")


def parse_sentence(sentence: str) -> tuple[list[str], list[str], str, str]:
    """Split one `sentence` into (objects, labels, query label, answer)."""
    ctx, sep, query = sentence.rpartition(". ")
    m = _QUERY.match(query)
    if not sep or not m:
        raise DataError(f"not a boxes sentence: {sentence!r}")
    objs, labs = [], []
    for seg in ctx.split(", "):
        s = _SEGMENT.match(seg)
        if not s:
            raise DataError(f"bad segment {seg!r} in {sentence!r}")
        objs.append(s.group(1))
        labs.append(s.group(2))
    return objs, labs, m.group(1), m.group(2)


def read_jsonl(path: str | Path, on_invalid: str = "skip") -> list[Example]:
    """Read a paper-format file into examples, one per line, in file order.

    Contexts with repeated labels or objects (ambiguous queries; the 3-box file has 171) are skipped with one
    warning (`on_invalid="skip"`) or raise (`"error"`)."""
    examples: list[Example] = []
    bad: set[int] = set()
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        objs, labs, ql, ans = parse_sentence(rec["sentence"])
        sid = int(rec["sample_id"])
        try:
            ctx = Context(sid, tuple(objs), tuple(labs))
        except ValueError:
            if on_invalid == "error":
                raise
            bad.add(sid)
            continue
        ex = Example(ctx, ql)
        if ex.answer != ans:
            raise DataError(f"line for sample {sid}: answer {ans!r} disagrees with its context")
        examples.append(ex)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} contexts with repeated labels or objects", stacklevel=2)
    return examples


def write_jsonl(examples: Iterable[Example], path: str | Path) -> None:
    """Write examples in the paper's format (only `sentence` and `sample_id` carry information)."""
    lines = []
    for ex in examples:
        prompt = ex.render().text
        ans = ex.answer
        if ans is None:
            raise DataError("only answerable prompts can be written in the paper's format")
        lines.append(json.dumps({
            "sentence": f"{prompt} {ans}.",
            "sentence_masked": f"{prompt[: -len(' the')]} <extra_id_0> .",
            "masked_content": f"<extra_id_0> the {ans}",
            "sample_id": ex.context.sample_id,
            "numops": 0,
            "numops_by_op": {"move": 0, "remove": 0, "put": 0},
        }))
    write_text(path, "\n".join(lines) + "\n")
