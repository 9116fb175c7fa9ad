"""Tasks as plugins: IOI's prompts, roles and counterfactuals; its stage graph (fast == naive on tiny Llama, Qwen2 and
Mistral, k, v and q receivers); a planted IOI mechanism found by path patching and circuit search; and a third toy
task, defined here, that runs eval and path patching through the CLI without touching etk's code (one `register`)."""

import json
import random
from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf

from etk.data.datasets import pair_loader, prompt_loader
from etk.data.roles import ROLE_ID, ROLE_VOCAB, Encoded
from etk.errors import ConfigError
from etk.interventions.components import HeadId, all_heads
from etk.methods.path_patching.fast import fast_scores
from etk.methods.path_patching.naive import naive_scores
from etk.methods.path_patching.stages import PPBatch, pp_loader, reachable_layers, receivers_from, task_stages
from etk.models.tiny import planted_llama, tiny_llama
from etk.tasks import TASKS, Group, Pair, Stage, Task, register, task_named, task_of
from tests.helpers import compose_run

IOI = task_named("ioi")
DATA = OmegaConf.create({"n_examples": 12, "seed": 0, "batch_size": 12, "padding_side": "right"})


def roles_of(enc: Encoded) -> list[str]:
    return [ROLE_VOCAB[i] for i in enc.token_roles]


def test_ioi_prompts_locate_every_role_in_both_orders(tok):
    task = IOI.with_config(None)
    exs = task.examples(DATA, tok)
    assert {e.order for e in exs} == {"ABBA", "BABA"}
    for e in exs:
        enc = task.encode(tok, e)
        ids, r = enc.input_ids, enc.roles
        word = lambda i: tok.decode([ids[i]]).strip()  # noqa: E731
        assert word(r["IO"]) == e.io and word(r["S1"]) == e.s and word(r["S2"]) == e.s and e.c == e.s
        assert r["S1+1"] == r["S1"] + 1 and r["last"] == len(ids) - 1 and r["S1"] < r["S2"] < r["last"]
        assert (r["IO"] < r["S1"]) == (e.order == "ABBA")
        names = roles_of(enc)
        assert [names[r[k]] for k in ("IO", "S1", "S1+1", "S2", "last")] == ["IO", "S1", "S1+1", "S2", "last"]
        assert names[0] == "bos" and "place" in names and "item" in names and "ioi_text" in names
        assert tok.decode([enc.answer_id]).strip() == e.io and tok.decode([enc.distractor_id]).strip() == e.s
    assert len({len(task.encode(tok, e).input_ids) for e in exs}) == 1  # one length: mean ablation per position


def test_ioi_counterfactuals_keep_positions_and_say_what_they_test(tok):
    task = IOI.with_config(None)
    exs = task.examples(DATA, tok)
    for p in task.path_patching_pairs(exs, random.Random(0)):  # the ABC distribution
        b, s = p.base, p.source
        assert p.target == b.io and s.answer is None and len({s.a, s.b, s.c}) == 3 and not {s.a, s.b, s.c} & {b.io, b.s}
        eb, es = task.encode(tok, b), task.encode(tok, s)
        assert eb.roles == es.roles and len(eb.input_ids) == len(es.input_ids)
    for p in task.desideratum_pairs("s_name", exs, 0):  # the subject's name moves, its position does not
        assert p.source.s == p.base.io and p.source.io_first == p.base.io_first and p.target == p.base.s
        assert task.encode(tok, p.source).roles["S2"] == task.encode(tok, p.base).roles["S2"]
    for p in task.desideratum_pairs("s_position", exs, 0):  # the position moves, the names are fresh
        assert p.source.io_first != p.base.io_first and p.target == p.base.s
        assert not {p.source.io, p.source.s} & {p.base.io, p.base.s}
    for p in task.desideratum_pairs("io_name", exs, 0):
        assert p.target == p.source.io and p.source.io not in (p.base.io, p.base.s)
    with pytest.raises(ConfigError, match="io_name, s_name, s_position"):
        task.desideratum_pairs("positional", exs, 0)
    abl = task.ablation_examples(OmegaConf.create({"ablation": {"n_prompts": 8, "seed": 0}}), tok)
    assert all(a.answer is None for a in abl)


def test_the_task_config_group_selects_and_configures_the_task(tmp_path):
    from tests.helpers import compose_cfg

    cfg = compose_cfg("patching", tmp_path, ["task=ioi", "task.templates=['When {A} and {B} went to the {place}, "
                                             "{C} gave a {object} to']"])
    task = task_of(cfg)
    assert task.name == "ioi" and len(task.templates) == 1
    assert task_of(compose_cfg("patching", tmp_path, [])).name == "entity_tracking"
    bad = compose_cfg("patching", tmp_path, ["task=ioi", "task.templates=['When {A} went, {C} gave it to']"])
    with pytest.raises(ConfigError, match=r"\{A\}, \{B\} and \{C\}"):
        task_of(bad)


IOI_STAGE_RECV = {"s_inhibition": [HeadId(3, 1), HeadId(3, 2)], "induction": [HeadId(3, 0), HeadId(2, 3)],
                  "previous_token": [HeadId(2, 1), HeadId(3, 3)]}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("group", ["name_mover", "s_inhibition", "induction", "previous_token"])
def test_fast_path_patching_equals_naive_on_the_ioi_stage_graph(tok, arch, group):
    model = tiny_llama(len(tok), n_layers=4, n_heads=4, n_kv_heads=2, seed=11, arch=arch)
    task = IOI.with_config(None)
    batch = next(iter(pp_loader(task, tok, task.examples(DATA, tok)[:6], seed=0, batch_size=6)))
    dims = task_stages(task)
    st = dims[group]
    d = tiny_dims(model)
    rec = None if st.receiver_site is None else receivers_from(IOI_STAGE_RECV[group], st.receiver_site, d)
    reach = [h for h in all_heads(d) if h.layer in reachable_layers(st, rec, d.n_layers)]
    naive = naive_scores(model, batch, st, rec, reach)[0]
    fast = fast_scores(model, batch, st, rec, reach)[0]
    assert naive.abs().max() > 0
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-4)


def tiny_dims(model):
    from etk.models.arch import LlamaFamily

    return LlamaFamily(model).dims


def test_the_ioi_stage_graph_patches_k_at_s1_plus_1():
    st = task_stages(IOI)
    assert [(g, s.sender_role, s.receiver_site) for g, s in st.items()] == [
        ("name_mover", "last", None), ("s_inhibition", "last", "q"), ("induction", "S2", "v"),
        ("previous_token", "S1+1", "k")]
    assert IOI.vital_roles == ("last", "S2", "S1+1")


# -- the planted IOI mechanism ----------------------------------------------------------------------------------------

def test_the_planted_ioi_model_answers_by_its_chain(tok):
    """It answers the test's IOI prompts (95% of 300 prompts of seed 1); mean-ablating the induction head at S2 or the previous-token head at S1+1 (their
    z replaced by the mean over ABC prompts) breaks it, and the name mover alone is not enough."""
    from etk.methods.mean_ablation.ablation import Ablation, ablation_patches, full_model, keep_rows
    from etk.interventions.hooks import hooked
    from etk.models.forward import last_logits
    from tests.helpers import means_of

    model = planted_llama(tok, "ioi")
    task = IOI.with_config(None)
    batch = next(iter(prompt_loader(task, tok, task.examples(DATA, tok), 12)))
    logits = last_logits(model, batch)
    assert bool((logits.argmax(-1) == batch.answer).all())
    abc = next(iter(prompt_loader(task, tok, task.ablation_examples(OmegaConf.create(
        {"ablation": {"n_prompts": 24, "seed": 0}}), tok), 24)))
    means = means_of(model, abc)
    dims = tiny_dims(model)

    def acc(ablation: Ablation) -> float:
        with hooked(model, patches=ablation_patches(means, keep_rows([ablation], batch))):
            return float((last_logits(model, batch).argmax(-1) == batch.answer).float().mean())

    full = full_model(dims)
    assert acc(full) == 1.0
    assert acc(full.without([("S2", 1, 0)])) < 0.5
    assert acc(full.without([("S1+1", 0, 0)])) < 0.5
    assert acc(full.without([("last", 2, 0)])) < 0.5


def test_path_patching_and_circuit_search_find_the_planted_ioi_mechanism(tmp_path):
    common = ["task=ioi", "model=tiny_planted_ioi", "logger=none", "trainer.enable_progress_bar=false",
              "data.n_examples=60"]
    compose_run(tmp_path / "pp", common + ["method=path_patching", "method.n_examples=16", "method.batch_size=16"])
    doc = json.loads((tmp_path / "pp" / "results.json").read_text())
    assert doc["circuit"]["name_mover"][0] == [2, 0]  # the planted name mover ranks first by direct effect
    compose_run(tmp_path / "cs", common + ["method=circuit_search", "method.n_search=20", "method.n_heldout=20",
                                           "method.batch_size=20", "method.attribution_batch_size=20",
                                           "ablation.n_prompts=40"])
    cs = json.loads((tmp_path / "cs" / "results.json").read_text())
    circuit = json.loads((tmp_path / "cs" / "circuit.json").read_text())
    assert cs["faithfulness"] >= 0.8
    assert [2, 0] in circuit["last"] and [1, 0] in circuit["S2"] and [0, 0] in circuit["S1+1"]


# -- a third task, defined here --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sequence_:
    """Letters; the answer is the letter after the first occurrence of the last one (induction)."""

    letters: tuple[str, ...]
    query: int  # index of the letter repeated at the end

    @property
    def answer(self) -> str:
        return self.letters[self.query + 1]

    def text(self) -> str:
        return " ".join(self.letters + (self.letters[self.query],))


class Induction(Task):
    name = "toy_induction"
    description = "toy: 'K F Q Z F' -> ' Q' (the letter after the earlier F)"
    roles = ("last", "first", "after_first", "letter")
    scalar_roles = ("last", "first", "after_first")
    groups = (Group("copier", "last", "CP", "Copier"), Group("matcher", "last", "MT", "Matcher"))
    stages = (Stage("copier", None), Stage("matcher", "q"))
    knockout_edges = ("last->after_first",)
    schedule = {"receivers_top_k": {"copier": 40}, "candidates_top_k": {"copier": 40, "matcher": 20}}

    def examples(self, data_cfg, tokenizer):
        rng = random.Random(int(data_cfg.seed))
        return [self._draw(rng) for _ in range(int(data_cfg.n_examples))]

    @staticmethod
    def _draw(rng):
        return Sequence_(tuple(rng.sample("ABCDEFGHJKLMNPQRSTUVWXYZ", 5)), rng.randrange(4))

    def text(self, example):
        return example.text()

    def encode(self, tokenizer, ex, answer=None):
        from etk.data.vocab import single_token_id

        ids = tokenizer(ex.text())["input_ids"]
        off = len(ids) - len(ex.letters) - 1  # BOS (if any) first; one token per letter
        roles = {"last": len(ids) - 1, "first": off + ex.query, "after_first": off + ex.query + 1}
        token_roles = [ROLE_ID["letter"]] * len(ids)
        for name, pos in roles.items():
            token_roles[pos] = ROLE_ID[name]
        return Encoded(ids, roles, single_token_id(tokenizer, answer or ex.answer), token_roles)

    def path_patching_pairs(self, examples, rng):
        return [Pair(ex, self._draw(rng), ex.answer) for ex in examples]

    def ablation_examples(self, cfg, tokenizer):
        rng = random.Random(int(cfg.ablation.seed))
        return [self._draw(rng) for _ in range(int(cfg.ablation.n_prompts))]


@pytest.fixture
def toy_task():
    task = register(Induction())
    yield task
    TASKS.pop(task.name)


def test_a_third_task_defined_in_a_test_runs_eval_and_path_patching(tmp_path, toy_task):
    common = ["task.name=toy_induction", "model=tiny", "logger=none", "trainer.enable_progress_bar=false",
              "data.n_examples=12", "data.batch_size=12"]
    compose_run(tmp_path / "eval", common + ["method=eval"])
    ev = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert ev["n"] == 12 and ev["config"]["task"]["name"] == "toy_induction" and "n_boxes" not in ev
    compose_run(tmp_path / "pp", common + ["method=path_patching", "method.n_examples=6", "method.batch_size=6"])
    pp = json.loads((tmp_path / "pp" / "results.json").read_text())
    assert list(pp["stages"]) == ["copier", "matcher"] and pp["stages"]["matcher"]["receivers"]["site"] == "q"
    assert set(pp["circuit"]) == {"copier", "matcher"}


def test_a_task_may_not_take_another_tasks_group_names():
    class Clash(Induction):
        name = "clash"
        groups = (Group("value_fetcher", "last", "VF", "clash"),)

    with pytest.raises(ConfigError, match="already groups of task 'entity_tracking'"):
        register(Clash())
    assert "clash" not in TASKS


def test_pair_loaders_carry_the_task_s_roles(tok):
    task = IOI.with_config(None)
    pairs = task.desideratum_pairs("s_position", task.examples(DATA, tok), 0)
    batch = next(iter(pair_loader(task, tok, pairs, 12)))
    assert set(batch.base.roles) == {"last", "IO", "S1", "S1+1", "S2"}
    assert bool((batch.base.distractor >= 0).all()) and bool((batch.source.roles["S1"] != batch.base.roles["S1"]).all())
    assert isinstance(next(iter(pp_loader(task, tok, task.examples(DATA, tok), 0, 4))), PPBatch)


def test_attention_reports_where_the_planted_name_mover_looks(tmp_path):
    """The planted name mover (2, 0) at END spreads its attention over the three name positions; an identity check
    of the attention method against the probabilities of HF's eager attention, computed independently."""
    (tmp_path / "c.json").write_text(json.dumps({"name_mover": [[2, 0]], "induction": [[1, 0]]}))
    compose_run(tmp_path / "att", ["task=ioi", "model=tiny_planted_ioi", "logger=none", "method=attention_patterns",
                                   f"circuit.path={tmp_path / 'c.json'}", "method.n_examples=12", "method.batch_size=6",
                                   "trainer.enable_progress_bar=false"])
    doc = json.loads((tmp_path / "att" / "results.json").read_text())
    nm = doc["groups"]["name_mover"]["group"]
    assert all(0.2 < nm[k]["mean"] < 0.5 for k in ("IO", "S1", "S2")) and nm["other"]["mean"] < 0.1
    ind = doc["groups"]["induction"]["group"]
    assert doc["groups"]["induction"]["role"] == "S2" and ind["S1+1"]["mean"] > 0.8  # S2 looks at the token after S1
    # independently: HF eager attention of head (2, 0), row END, at the IO position
    from etk.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    model = planted_llama(tok, "ioi")
    model.set_attn_implementation("eager")
    task = IOI.with_config(None)
    batch = next(iter(prompt_loader(task, tok, task.examples(OmegaConf.create({"n_examples": 12, "seed": 0}), tok), 12)))
    att = model(**batch.model_inputs(), output_attentions=True).attentions[2][:, 0]  # [B, T, T]
    b = torch.arange(12)
    expect = att[b, batch.roles["last"], batch.roles["IO"]].mean()
    torch.testing.assert_close(torch.tensor(nm["IO"]["mean"]), expect.double().float(), rtol=1e-5, atol=1e-6)


def test_the_python_api_takes_the_task(tmp_path):
    import etk

    model = etk.load_model("tiny_planted_ioi")
    pp = etk.path_patching(model, out_dir=tmp_path / "pp", task="ioi", n_examples=8, batch_size=8,
                           data={"n_examples": 20}, trainer={"enable_progress_bar": False})
    assert pp.config["task"]["name"] == "ioi" and list(pp.stages)[0] == "name_mover"
    assert pp.circuit["name_mover"][0] == [2, 0]


def test_no_method_imports_a_task_module():
    """Methods, the study, reports, interventions and models reach a task only through `etk.tasks.task_of` (the
    registry); only the tasks themselves and the fine-tuning corpora (entity-tracking text) import a task's module."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "etk"
    allowed = {root / "data" / "finetune_data.py"}
    offenders = []
    for path in root.rglob("*.py"):
        if root / "tasks" in path.parents or path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if n.startswith("etk.tasks.")]
    assert not offenders, offenders


def test_attention_shares_by_token_role_sum_to_one_and_land_on_the_planted_role(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"name_mover": [[2, 0]], "previous_token": [[0, 0]]}))
    compose_run(tmp_path / "att", ["task=ioi", "model=tiny_planted_ioi", "logger=none", "method=attention_patterns",
                                   f"circuit.path={tmp_path / 'c.json'}", "method.n_examples=12", "method.batch_size=12",
                                   "trainer.enable_progress_bar=false"])
    doc = json.loads((tmp_path / "att" / "results.json").read_text())
    for g in ("name_mover", "previous_token"):
        shares = doc["groups"][g]["by_token_role"]
        assert abs(sum(v["mean"] for v in shares.values()) - 1) < 1e-4
        assert (tmp_path / "att" / f"attention_{g}.png").exists()
    nm = doc["groups"]["name_mover"]["by_token_role"]
    assert nm["IO"]["mean"] + nm["S1"]["mean"] + nm["S2"]["mean"] > 0.9  # the planted name mover reads the names
    prev = doc["groups"]["previous_token"]["by_token_role"]  # from S1+1, the previous token: S1
    assert prev["S1"]["mean"] > 0.9
