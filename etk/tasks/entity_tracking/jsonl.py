"""Reader and writer for the paper's jsonl dataset format (SPEC §1.3)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Iterable

from etk.artifacts import write_text
from etk.errors import DataError
from etk.tasks.entity_tracking.boxes import Context, Example

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


def read_jsonl_lines(path: str | Path, on_invalid: str = "skip") -> list[tuple[int, Example]]:
    """(line number, example) for every line of a paper-format file, in file order. A line that is not JSON, has no
    `sentence`, or is not a boxes sentence raises DataError naming its line. Contexts with repeated labels or
    objects (ambiguous queries; the 3-box file has 171) are skipped with one warning naming their lines
    (`on_invalid="skip"`) or raise (`"error"`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; pass a paper-format dataset.jsonl (one JSON object a "
                        f"line with a 'sentence' field), e.g. data.path=/data/box_datasets/3/dataset.jsonl")
    out: list[tuple[int, Example]] = []
    ambiguous: list[int] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            objs, labs, ql, ans = parse_sentence(rec["sentence"])
            sid = int(rec.get("sample_id", lineno))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, DataError) as e:
            why = "no 'sentence' field" if isinstance(e, KeyError) else str(e)
            raise DataError(f"{path}:{lineno}: {why}. Each line must be a JSON object whose 'sentence' reads "
                            f"'The <obj> is in Box <L>, ... . Box <L> contains the <obj>.'") from None
        try:
            ctx = Context(sid, tuple(objs), tuple(labs))
        except ValueError as e:
            if on_invalid == "error":
                raise DataError(f"{path}:{lineno}: {e}") from None
            ambiguous.append(lineno)
            continue
        ex = Example(ctx, ql)
        if ex.answer != ans:
            raise DataError(f"{path}:{lineno}: answer {ans!r} disagrees with its context (Box {ql} holds {ex.answer!r})")
        out.append((lineno, ex))
    if ambiguous:
        warnings.warn(f"{path}: skipped {len(ambiguous)} lines with repeated labels or objects in their context (lines "
                      f"{ambiguous[:20]}{' ...' if len(ambiguous) > 20 else ''})", stacklevel=2)
    return out


def read_jsonl(path: str | Path, on_invalid: str = "skip") -> list[Example]:
    """The examples of a paper-format file, in file order (see `read_jsonl_lines`)."""
    return [ex for _, ex in read_jsonl_lines(path, on_invalid)]


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
