"""Fine-tuning recipe on the tiny model: loss goes down, only the adapter is trained and checkpointed, the
exported adapter round-trips through the model loader and changes the logits."""

import json

import torch

from etk.data.finetune_data import TRAIN_TEMPLATES, arithmetic_items, boxes_items
from etk.data.vocab import load_objects
from etk.methods.finetune.module import IGNORE, collate_lm, encode_items
from etk.methods.finetune.run import run_finetune
from etk.models.loading import load_model
from tests.helpers import compose_cfg


def test_boxes_training_text_is_disjoint_from_evaluation(tok):
    items = boxes_items(200, tok, seed=0)
    eval_objects = set(load_objects("objects.csv"))
    assert all(it.answer.strip() not in eval_objects for it in items)
    assert not any(o in it.prompt.split() for it in items for o in eval_objects if o not in ("the",))
    frames = {name for name, t in TRAIN_TEMPLATES.items() for it in items if f" {t.container} " in it.prompt}
    assert frames == set(TRAIN_TEMPLATES)
    counts = {it.prompt.count(",") + 1 for it in items}
    assert counts == set(range(2, 8))


def test_arithmetic_items_are_correct():
    for it in arithmetic_items(300, seed=1):
        a, op, b, eq = it.prompt.split()
        assert eq == "="
        want = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert int(it.answer) == want


def test_loss_only_on_answer_tokens(tok):
    enc = encode_items(tok, boxes_items(4, tok, seed=0))
    batch = collate_lm(enc, pad_id=3)
    for b, e in enumerate(enc):
        n_answer = sum(1 for x in e["labels"] if x != IGNORE)
        assert n_answer == 1  # single-token object
        assert (batch["labels"][b] != IGNORE).sum() == 1
        assert e["labels"][-1] == e["input_ids"][-1]


def compose_finetune(tmp_path, overrides):
    return compose_cfg("finetune", tmp_path, overrides)


def test_finetune_tiny_end_to_end(tmp_path, tiny, monkeypatch):
    import etk.methods.finetune.run as ft_run
    from etk.methods.finetune.module import FineTuneModule

    used = []

    class Recording(FineTuneModule):  # the module the run itself trains: frozen weights before/after, LoRA moved
        def on_fit_start(self):
            self.at_start = {n: p.detach().clone() for n, p in self.net.named_parameters()}
            used.append(self)

        def on_fit_end(self):
            self.at_end = {n: p.detach().clone() for n, p in self.net.named_parameters()}

    monkeypatch.setattr(ft_run, "FineTuneModule", Recording)
    cfg = compose_finetune(tmp_path / "run", [
        "model=tiny", "logger=csv", "train.steps=30", "train.batch_size=8", "train.checkpoint_every=10",
        "optim.lr=5e-2", "lora.target_modules=[q_proj,v_proj,o_proj,lm_head]", "eval.n_examples=14", "eval.box_counts=[2]", "trainer.enable_progress_bar=false",
        f"export={tmp_path / 'exported'}",
    ])
    card = run_finetune(cfg)
    m = used[0]
    lora = [n for n in m.at_start if "lora_" in n]
    assert lora and all(torch.equal(m.at_start[n], m.at_end[n]) for n in m.at_start if n not in lora)
    assert any(not torch.equal(m.at_start[n], m.at_end[n]) for n in lora)
    # loss goes down
    import csv

    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    assert losses[-1] < losses[0] - 0.5  # a real decrease (from ~log(vocab)), not noise
    # checkpoints hold only the adapter weights
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["state_dict"] and all("lora_" in k for k in ck["state_dict"])
    # exported adapter + card; loading merges it and changes the logits
    exported = tmp_path / "exported"
    assert (exported / "adapter_model.safetensors").exists()
    doc = json.loads((exported / "card.json").read_text())
    assert doc["steps"] == 30 and doc["command"].startswith("python finetune.py") and doc["eval"][0]["n"] == 14
    base, _ = load_model(cfg.model)
    cfg.model.adapters = [str(exported)]
    tuned, _ = load_model(cfg.model)
    ids = torch.tensor([[1, 10, 20, 30, 40, 50]])
    assert not torch.allclose(tuned(ids).logits, base(ids).logits, atol=1e-4)
    assert card.eval[0]["n_boxes"] == 2


def test_relation_frames_never_emit_the_box_template_and_are_seeded(tok):
    import re

    from etk.data.finetune_data import BOX_TEMPLATE_WORDS, RELATION_FRAMES, relation_items

    items = relation_items(300, tok, seed=3, arithmetic_fraction=0.2)
    box = re.compile(r"\bis in \w+ [A-Z]\b|\bBox\b|\bcontains the\b")
    for it in items:
        assert not box.search(it.prompt), it.prompt
        assert not any(w in it.prompt.split() for w in BOX_TEMPLATE_WORDS)
    eval_objects = set(load_objects("objects.csv"))
    assert all(it.answer.strip() not in eval_objects for it in items)
    text = [it for it in items if "=" not in it.prompt]
    assert 0.7 < len(text) / len(items) < 0.9  # the arithmetic share
    used = {name for name, t in RELATION_FRAMES.items() for it in text if t.relation in it.prompt}
    assert used == set(RELATION_FRAMES)
    for it in text:  # the answer is the object bound to the queried name
        clauses, query = it.prompt.rsplit(". ", 1)
        key = next(w for w in query.split() if w[0].isupper() and w not in ("The",))
        assert any(key in c and it.answer.strip() in c for c in re.split(r", |; ", clauses)), it.prompt
    again = relation_items(300, tok, seed=3, arithmetic_fraction=0.2)
    assert [(a.prompt, a.answer) for a in again] == [(a.prompt, a.answer) for a in items]
    assert [a.prompt for a in relation_items(300, tok, seed=4)] != [a.prompt for a in items]
