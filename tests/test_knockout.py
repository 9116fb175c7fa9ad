"""Attention knockout: identity when nothing is blocked, agreement with a hand-built eager reference (causal-only
and padded masks, every start layer), a planted head's answer edge, batched = one-at-a-time, restoration of the
attention implementation, left padding, and the runner end to end."""

import json

import pytest
import torch

from etk.data.roles import PromptBatch
from etk.interventions.knockout import (
    KNOCKOUT_ATTN,
    STATE_ATTR,
    config_rows,
    edge_positions,
    knockout,
    parse_edge,
    random_context_positions,
)
from etk.methods.knockout.module import KnockoutModule
from etk.models.arch import LlamaFamily
from etk.models.forward import last_logits
from etk.models.loading import LoadedModel
from etk.models.tiny import tiny_llama
from tests.helpers import batch_of, compose_run, mixed_length_examples, planted_model

EDGES = ["last->correct_object", "last->query_label", "last->random", "query_label->prev_query_label",
         "query_label->random"]


@pytest.fixture(scope="module")
def pair(tok):
    """The same 3-layer GQA model twice: sdpa (knockout runs on it) and eager (the reference)."""
    sdpa = tiny_llama(len(tok), n_layers=3, n_heads=4, n_kv_heads=2, seed=3)
    eager = tiny_llama(len(tok), n_layers=3, n_heads=4, n_kv_heads=2, seed=3)
    eager.set_attn_implementation("eager")
    assert sdpa.config._attn_implementation == "sdpa"
    return sdpa, eager


def reference_logits(eager, batch: PromptBatch, q: list[int], k: list[int], start: list[int]) -> torch.Tensor:
    """Eager attention with a hand-built additive mask per layer (causal, padding, and row r's (q, k) pair blocked
    in layers >= start[r]), swapped in by a pre-hook on each self_attn. Loops are fine here: test-only."""
    arch = LlamaFamily(eager)
    B, T = batch.input_ids.shape
    neg = torch.finfo(torch.float32).min
    allowed = torch.ones(T, T).tril().bool()[None] & batch.attention_mask.bool()[:, None, :]  # [B, T, T]
    handles = []
    for layer in range(arch.dims.n_layers):
        a = allowed.clone()
        for r in range(B):
            if start[r] <= layer and q[r] >= 0 and k[r] >= 0:
                a[r, q[r], k[r]] = False
        mask = torch.zeros(B, 1, T, T).masked_fill(~a[:, None], neg)

        def pre(module, args, kwargs, mask=mask):
            return args, {**kwargs, "attention_mask": mask}
        handles.append(arch.attn(layer).register_forward_pre_hook(pre, with_kwargs=True))
    try:
        return last_logits(eager, batch)
    finally:
        for h in handles:
            h.remove()


def knocked(model, batch, edge: str, start: int, rand=None) -> torch.Tensor:
    qp, kp = edge_positions(batch, edge, rand)
    with knockout(model, qp, kp, torch.full_like(qp, start)):
        return last_logits(model, batch)


def accuracy(logits, batch) -> float:
    return (logits.argmax(-1) == batch.answer).float().mean().item()


# (a) identity -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_empty_knockout_is_bit_exact(tok, pair, padding_side):
    model = pair[0]
    # same-length prompts: transformers passes no mask (is_causal); mixed lengths: a 4-D bool padding mask
    examples = None if padding_side == "right" else mixed_length_examples(tok, 6)
    batch, _ = batch_of(tok, n=6, padding_side=padding_side, examples=examples)
    plain = last_logits(model, batch)
    L, B = LlamaFamily(model).dims.n_layers, len(batch)
    seen = []
    h = LlamaFamily(model).attn(0).register_forward_pre_hook(lambda m, a: seen.append(model.config._attn_implementation))
    try:
        qp, kp = edge_positions(batch, "last->correct_object")
        with knockout(model, qp, kp, torch.full((B,), L)):  # start beyond the last layer
            beyond = last_logits(model, batch)
        none = torch.full((B,), -1)
        with knockout(model, none, none, torch.zeros(B, dtype=torch.long)):  # no edges
            no_edges = last_logits(model, batch)
    finally:
        h.remove()
    assert seen == [KNOCKOUT_ATTN, KNOCKOUT_ATTN]  # the registered function really ran
    assert torch.equal(beyond, plain) and torch.equal(no_edges, plain)


# (b), (c) agreement with a hand-written eager computation; a real edge changes the logits -------------------------

@pytest.mark.parametrize("start", [0, 1, 2])
def test_knockout_matches_eager_reference(tok, pair, start):
    model, eager = pair
    batch, _ = batch_of(tok, n=5)  # same length: the incoming mask is None and the causal mask is materialised
    qp, kp = edge_positions(batch, "last->correct_object")
    with knockout(model, qp, kp, torch.full_like(qp, start)):
        got = last_logits(model, batch)
    ref = reference_logits(eager, batch, qp.tolist(), kp.tolist(), [start] * len(batch))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    plain = last_logits(model, batch)
    assert (got - plain).abs().max() > 1e-3  # (c) blocking a real edge changes the logits


def test_reference_itself_is_the_plain_model_without_blocks(tok, pair):
    model, eager = pair
    batch, _ = batch_of(tok, n=4)
    B = len(batch)
    torch.testing.assert_close(reference_logits(eager, batch, [-1] * B, [-1] * B, [0] * B), last_logits(model, batch),
                               atol=1e-5, rtol=1e-5)


# (d) planted head ---------------------------------------------------------------------------------------------------

def test_planted_head_needs_the_last_to_object_edge(tok):
    model = planted_model(tok, head=2)
    batch, _ = batch_of(tok, n=12, n_boxes=1, seed=3)
    L = LlamaFamily(model).dims.n_layers
    assert accuracy(last_logits(model, batch), batch) == 1.0
    assert accuracy(knocked(model, batch, "last->correct_object", 0), batch) <= 0.2
    assert accuracy(knocked(model, batch, "last->correct_object", 1), batch) <= 0.2  # the head lives in layer 1
    assert accuracy(knocked(model, batch, "last->query_label", 0), batch) >= 0.9
    assert accuracy(knocked(model, batch, "query_label->prev_query_label", 0), batch) == 1.0
    assert torch.equal(knocked(model, batch, "last->correct_object", L), last_logits(model, batch))


# (e) batched configurations ---------------------------------------------------------------------------------------

def test_many_configs_in_one_forward_equal_one_at_a_time(tok, pair):
    from etk.methods.mean_ablation.ablation import repeat_batch

    model = pair[0]
    batch, _ = batch_of(tok, n=4, padding_side="left", examples=mixed_length_examples(tok, 4))
    rand = random_context_positions(batch, torch.Generator().manual_seed(0))
    cfgs = [(e, s) for e in EDGES for s in (0, 2)] + [("last->correct_object", 3)]
    pos = [edge_positions(batch, e, rand) for e, _ in cfgs]
    q = torch.stack([p[0] for p in pos])  # [K, N]
    k = torch.stack([p[1] for p in pos])
    s = torch.tensor([s for _, s in cfgs])
    with knockout(model, *config_rows(q, k, s)):
        together = last_logits(model, repeat_batch(batch, len(cfgs))).view(len(cfgs), len(batch), -1)
    for i, (e, st) in enumerate(cfgs):
        torch.testing.assert_close(together[i], knocked(model, batch, e, st, rand), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-4)  # start 0 and start 2 differ


def test_module_sweep_chunks_agree_and_baseline_is_the_plain_model(tok, pair):
    model = pair[0]
    batch, _ = batch_of(tok, n=4)
    plain = (last_logits(model, batch).argmax(-1) == batch.answer).float()

    def sweep(rows_per_forward, reference=False):
        mod = KnockoutModule({}, EDGES, None, rows_per_forward=rows_per_forward, random_seed=5,
                             model=LoadedModel(model, tok, {}), reference=reference)
        mod.on_predict_epoch_start()
        mod.predict_step(batch, 0)
        return mod, mod.acc.per_example()

    one, c_one = sweep(rows_per_forward=4)  # one configuration per forward
    many, c_many = sweep(rows_per_forward=64)  # 16 configurations per forward
    K = 1 + len(EDGES) * 3
    ref, c_ref = sweep(rows_per_forward=64, reference=True)
    # one clean forward (baseline + residuals), then per start layer its configurations' rows: one forward per query
    # role (`last`, `query_label`: each runs from its own earliest blocked query), all positions in the reference
    assert c_one.shape == (K, 4) and one.forwards == K and many.forwards == 1 + 3 * 2 and ref.forwards == 1 + 3
    assert torch.equal(c_one, c_many) and torch.equal(c_many, c_ref)
    assert torch.equal(c_many[0], plain) and one.configs()[0] == ("baseline", 3)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_prefix_reuse_equals_full_knockout_forwards(tok, pair, padding_side):
    """Rows start at their start layer from the clean residual: same logits as knocking out in a full forward, and
    the module's sweep agrees configuration by configuration."""
    from etk.methods.mean_ablation.ablation import repeat_batch
    from etk.models.partial import LayerInputs, forward_from_layer

    model = pair[0]
    arch = LlamaFamily(model)
    batch, _ = batch_of(tok, n=4, padding_side=padding_side, examples=mixed_length_examples(tok, 4))
    rand = random_context_positions(batch, torch.Generator().manual_seed(5))
    with LayerInputs(arch, None) as h:
        last_logits(model, batch)
    b = torch.arange(8)
    for start in range(3):
        pos = [edge_positions(batch, e, rand) for e in EDGES[:2]]
        q, k = torch.stack([p[0] for p in pos]), torch.stack([p[1] for p in pos])
        rows = repeat_batch(batch, 2)
        with knockout(model, *config_rows(q, k, torch.full((2,), start))):
            hid = forward_from_layer(model, h[start].repeat(2, 1, 1), start, rows.attention_mask, rows.position_ids, None)
        got = arch.lm_head(hid[b, rows.roles["last"]]).view(2, 4, -1)
        for i, e in enumerate(EDGES[:2]):
            torch.testing.assert_close(got[i], knocked(model, batch, e, start, rand), atol=1e-5, rtol=1e-5)
    mod = KnockoutModule({}, EDGES, None, rows_per_forward=8, random_seed=5, model=LoadedModel(model, tok, {}))
    mod.on_predict_epoch_start()
    mod.predict_step(batch, 0)
    per = mod.acc.per_example()
    for i, (e, st) in enumerate(mod.configs()):
        want = last_logits(model, batch) if e == "baseline" else knocked(model, batch, e, st, rand)
        assert torch.equal(per[i], (want.argmax(-1) == batch.answer).float()), (e, st)


# (f) restoration -----------------------------------------------------------------------------------------------------

def test_implementation_and_state_restored_also_on_exceptions(tok, pair):
    model = pair[0]
    batch, _ = batch_of(tok, n=3)
    qp, kp = edge_positions(batch, "last->query_label")
    start = torch.zeros_like(qp)
    attns = [LlamaFamily(model).attn(j) for j in range(3)]
    plain = last_logits(model, batch)
    with knockout(model, qp, kp, start) as state:
        assert model.config._attn_implementation == KNOCKOUT_ATTN
        assert all(getattr(a, STATE_ATTR) is state for a in attns)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(a, STATE_ATTR) for a in attns)
    with pytest.raises(RuntimeError, match="boom"):
        with knockout(model, qp, kp, start):
            last_logits(model, batch)
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(a, STATE_ATTR) for a in attns)
    assert torch.equal(last_logits(model, batch), plain)  # the model is back to its plain behaviour
    with pytest.raises(ValueError):
        with knockout(model, qp, kp, start[:1]):  # wrong shape: rejected before anything is touched
            pass
    assert model.config._attn_implementation == "sdpa"


# (g) left padding -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edge", ["last->correct_object", "query_label->prev_query_label", "last->random"])
def test_left_padding_matches_reference_and_right_padding(tok, pair, edge):
    model, eager = pair
    ex = mixed_length_examples(tok, 6)
    left, _ = batch_of(tok, examples=ex, padding_side="left")
    right, _ = batch_of(tok, examples=ex, padding_side="right")
    assert (left.attention_mask == 0).any()
    r_left = random_context_positions(left, torch.Generator().manual_seed(1))
    r_right = random_context_positions(right, torch.Generator().manual_seed(1))
    shift = left.roles["last"] - right.roles["last"]
    assert torch.equal(r_left - shift, r_right)  # the same token is drawn under either padding
    got = knocked(model, left, edge, 1, r_left)
    qp, kp = edge_positions(left, edge, r_left)
    ref = reference_logits(eager, left, qp.tolist(), kp.tolist(), [1] * len(left))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, knocked(model, right, edge, 1, r_right), atol=1e-5, rtol=1e-5)


def test_random_positions_are_real_context_tokens_and_seeded(tok):
    batch, _ = batch_of(tok, examples=mixed_length_examples(tok, 9), padding_side="left")
    draw = lambda seed: random_context_positions(batch, torch.Generator().manual_seed(seed))  # noqa: E731
    r = draw(0)
    assert torch.equal(r, draw(0)) and not torch.equal(r, draw(1))
    assert (r <= batch.roles["last"] - 3).all()
    assert batch.attention_mask.gather(1, r[:, None]).bool().all()
    assert parse_edge("last->random") == ("last", "random")
    with pytest.raises(ValueError):
        parse_edge("random->last")


# (h) end to end ------------------------------------------------------------------------------------------------------

def test_run_knockout_end_to_end(tmp_path, capsys):
    """The runner on the planted model, whose answer rests on what head (1, 2) at `last` reads from the objects (a
    random tiny model answers next to nothing, and every accuracy compared would be 0): each accuracy it writes for
    a fixed edge and start layer is the accuracy of the hand-built eager reference on the same prompts, and the
    baseline that of the plain model. (The random-key edges draw per dataset index:
    test_random_keys_are_drawn_per_dataset_index.)"""
    import copy

    from omegaconf import OmegaConf

    from etk.models.loading import load_model

    compose_run(tmp_path, ["method=knockout", "model=tiny_planted_direct", "logger=none", "data.n_boxes=3",
                           "method.n_examples=6", "method.batch_size=3", "trainer.enable_progress_bar=false"])
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["schema"] == "etk.knockout/v1" and doc["model"] == "tiny_planted_direct" and doc["n"] == 6
    assert set(doc["edges"]) == set(EDGES) and doc["config"]["method"]["name"] == "knockout"
    png = tmp_path / "knockout.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert all(f"[etk] knockout {e} on tiny_planted_direct" in out for e in EDGES)
    # the same model and prompts, rebuilt here; the reference masks attention by hand in eager attention
    model, mtok = load_model(OmegaConf.create(doc["config"]["model"]))
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    data = doc["config"]["data"]
    batch, _ = batch_of(mtok, n=6, n_boxes=data["n_boxes"], seed=data["seed"], padding_side=data["padding_side"])
    B = len(batch)

    def acc(logits):  # k / n, as a count over the prompts
        return int((logits.argmax(-1) == batch.answer).sum()) / B

    b = doc["baseline"]
    assert b["n"] == 6 and b["accuracy"] == acc(reference_logits(eager, batch, [-1] * B, [-1] * B, [0] * B))
    for edge in ("last->correct_object", "last->query_label", "query_label->prev_query_label"):
        curve = doc["edges"][edge]
        assert curve["start_layer"] == [0, 1]
        qp, kp = edge_positions(batch, edge)
        for s, a in zip(curve["start_layer"], curve["accuracy"]):
            assert a == acc(reference_logits(eager, batch, qp.tolist(), kp.tolist(), [s] * B)), (edge, s)
    # blocking the answer head's view of the correct object never helps it (an edge mix-up would show here)
    assert doc["edges"]["last->correct_object"]["accuracy"][0] <= b["accuracy"]


def test_random_keys_are_drawn_per_dataset_index():
    """The random key of a prompt depends on its dataset index only (so DDP shards draw what one process draws): the
    module's uniforms are draw i of one seeded stream, whatever the batch order or batch size."""
    mod = KnockoutModule({}, EDGES, None, random_seed=5)  # no table drawn yet, as at the start of a loop

    class B:  # only the index is read
        def __init__(self, idx):
            self.index = torch.tensor(idx)

    stream = torch.cat([torch.rand(4, generator=g) for g in [torch.Generator().manual_seed(5)] for _ in range(30)])
    assert torch.equal(mod.uniforms(B([7, 0, 3])), stream[[7, 0, 3]])
    assert torch.equal(mod.uniforms(B([119, 64])), stream[[119, 64]])  # the table grows, the prefix stays
    assert torch.equal(mod.uniforms(B([7])), stream[[7]])
    assert mod.uniforms(B([-1, 2])) is None
