"""Entity tracking's tokenization: every role located by character offsets (no literal indices), and the token-role
partition of a prompt: the scalar roles take their token; the other boxes' words are `objects[k]` / `labels[k]`
(k = box index; the queried box's are `correct_object` / `prev_query_label`); every other token is named by the
template field it renders (`det`, `relation`, `container`, `segment_text`, `sep`, `end`, `prefix`,
`query_container`, `query_text`), `bos` for special tokens without characters, `other` for anything else."""

from __future__ import annotations

from etk.data.roles import ROLE_ID, Encoded, TokenizationError
from etk.data.vocab import single_token_id, tokenizer_name
from etk.tasks.entity_tracking.boxes import Example, Span

SCALAR_ROLES: tuple[str, ...] = ("last", "query_label", "prev_query_label", "correct_object")
VECTOR_ROLES: tuple[str, ...] = ("objects", "labels")
TEMPLATE_ROLES: tuple[str, ...] = ("bos", "prefix", "det", "relation", "container", "segment_text", "sep", "end",
                                   "query_container", "query_text", "other")
MAX_BOXES = 26
ROLES: tuple[str, ...] = (SCALAR_ROLES + TEMPLATE_ROLES + tuple(f"objects[{k}]" for k in range(MAX_BOXES))
                          + tuple(f"labels[{k}]" for k in range(MAX_BOXES)))


def _token_at(offsets: list[tuple[int, int]], span: Span, text: str, word: str, tokenizer) -> int:
    for i, (s, e) in enumerate(offsets):
        if e > s and s <= span.start < e:
            if text[s:e].strip() != word:
                raise TokenizationError(
                    f"tokenizer {tokenizer_name(tokenizer)!r} does not keep {word!r} as one token in the prompt "
                    f"(token {i} covers {text[s:e]!r}); choose single-token words for this tokenizer"
                )
            return i
    raise TokenizationError(f"no token covers {word!r} at characters {span.start}-{span.end} of {text!r}")


def encode_example(tokenizer, example: Example, answer: str | None = None) -> Encoded:
    """Tokenize a prompt and locate every role by character offsets (no literal indices).

    `answer` defaults to the example's own answer; pass another word for counterfactual targets."""
    rendered = example.render()
    enc = tokenizer(rendered.text, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    text = rendered.text
    ctx = example.context
    objs = [_token_at(offsets, sp, text, w, tokenizer) for sp, w in zip(rendered.objects, ctx.objects)]
    labs = [_token_at(offsets, sp, text, w, tokenizer) for sp, w in zip(rendered.labels, ctx.labels)]
    ql = _token_at(offsets, rendered.query_label, text, example.query_label, tokenizer)
    q = example.query
    roles: dict[str, int | list[int]] = {
        "last": len(ids) - 1,
        "query_label": ql,
        "prev_query_label": labs[q] if q is not None else -1,
        "correct_object": objs[q] if q is not None else -1,
        "objects": objs,
        "labels": labs,
    }
    if q is not None and ids[roles["prev_query_label"]] != ids[ql]:
        raise TokenizationError(f"query label token differs from its context occurrence in {text!r}")
    token_roles = _token_roles(rendered, offsets, roles, q)
    word = answer if answer is not None else example.answer
    answer_id = -1
    if word is not None:
        tid = single_token_id(tokenizer, word)
        if tid is None:
            raise TokenizationError(f"tokenizer {tokenizer_name(tokenizer)!r} splits the answer {word!r} into several tokens")
        answer_id = tid
    return Encoded(ids, roles, answer_id, token_roles)


def _token_roles(rendered, offsets: list[tuple[int, int]], roles: dict, q: int | None) -> list[int]:
    """The role id of every token: its first non-space character's template piece, then the word roles."""
    text = rendered.text
    out = []
    for s, e in offsets:
        c = next((i for i in range(s, e) if not text[i].isspace()), s if e > s else None)
        name = "bos" if c is None else next((r for a, b, r in rendered.pieces if a <= c < b), "other")
        out.append(ROLE_ID.get(name, ROLE_ID["other"]))
    for k, (o, lab) in enumerate(zip(roles["objects"], roles["labels"])):
        out[o], out[lab] = ROLE_ID[f"objects[{k}]"], ROLE_ID[f"labels[{k}]"]
    for name in ("correct_object", "prev_query_label", "query_label", "last"):
        if roles[name] >= 0:
            out[roles[name]] = ROLE_ID[name]
    return out
