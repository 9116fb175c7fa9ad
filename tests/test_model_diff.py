"""Model diffing: exactly zero for a model against itself; a change planted in one head's W_O shows in that head's
weight delta only and in the activations downstream of it only; the LoRA delta read from the adapter equals the
merged-weights delta; DLA and the logit lens against hand computations; the CLI run and its artefacts."""

import copy
import json
import math

import pytest
import torch

from etk.circuits import load_circuit
from etk.methods.model_diff.module import ModelDiffModule, direct_logit_attribution, lens_kl, member_run
from etk.methods.model_diff.weights import weight_deltas
from etk.models.arch import LlamaFamily
from etk.models.pair import PairModels
from etk.models.tiny import tiny_llama
from etk.tasks import collapsed_roles
from tests.helpers import batch_of, compose_run

COMMON = ["method=model_diff", "logger=none", "trainer.enable_progress_bar=false", "data.n_boxes=3",
          "data.n_examples=12", "method.n_examples=6", "method.batch_size=3"]


def diff_of(base, ft, tok, toggled=False, n=6):
    mod = ModelDiffModule({}, {}, pair=PairModels(base, ft, tok, tok, ("a", "b"), toggled=toggled))
    mod.on_predict_epoch_start()
    for seed in range(n // 3):
        mod.predict_step(batch_of(tok, n=3, n_boxes=3, seed=seed)[0], seed)
    return mod.gathered()


def test_a_model_against_itself_is_exactly_zero(tmp_path):
    compose_run(tmp_path, ["pair=tiny_self", *COMMON])
    d = json.loads((tmp_path / "results.json").read_text())
    assert d["schema"] == "etk.model_diff/v1" and d["n"] == 6

    def flat(x):
        return [v for row in x for v in (flat(row) if isinstance(row, list) else [row])]

    for k in ("head", "q", "k", "v", "o", "mlp"):
        assert set(flat(d["weight_delta"][k]["values"])) == {0.0}, k
    assert set(flat(d["activation_delta"]["rel_norm"]["values"])) == {0.0}
    assert set(flat(d["dla"]["diff"]["values"])) == {0.0}
    assert set(d["token_kl"]["kl_finetuned_base"]) == {0.0}
    assert d["logit_lens"]["kl_to_final"]["base"] == d["logit_lens"]["kl_to_final"]["finetuned"]
    assert d["activation_delta"]["rel_norm"]["axes"] == ["role", "layer", "head"]
    assert all((tmp_path / h).exists() for h in d["heatmaps"]) and len(d["heatmaps"]) >= 3
    assert [r["group"] for r in d["by_group"]]  # the tiny circuit's groups are ranked


def test_a_planted_change_in_one_heads_w_o_shows_only_there_and_downstream(tok):
    base = tiny_llama(len(tok), n_layers=4, n_heads=4, n_kv_heads=2, seed=3)
    ft = copy.deepcopy(base)
    arch = LlamaFamily(ft)
    D = arch.dims.head_dim
    with torch.no_grad():
        arch.proj(1, "o_proj").weight[:, 2 * D:3 * D] *= 3.0
    w = weight_deltas(base, ft)
    nonzero = (w["head"] > 0).nonzero().tolist()
    assert nonzero == [[1, 2]] and (w["o"] > 0).nonzero().tolist() == [[1, 2]]
    assert float(w["o"][1, 2]) == pytest.approx(2.0, rel=1e-5)  # ||3W - W|| / ||W||
    for k in ("q", "k", "v", "mlp"):
        assert float(w[k].abs().max()) == 0.0, k
    t = diff_of(base, ft, tok)
    rel = torch.nan_to_num(t["rel"], nan=0.0)  # [R, L, H]
    assert float(rel[:, :2].abs().max()) == 0.0  # z of layers 0 and 1 is computed before the changed W_O
    assert float(rel[:, 2:].min()) >= 0 and float(rel[collapsed_roles().index("last"), 2:].min()) > 0
    dla_diff = t["dla_finetuned"] - t["dla_base"]
    assert float(dla_diff[1, 2].abs()) > 0


def test_the_lora_delta_read_from_the_adapter_equals_the_merged_weights_delta(tok):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(len(tok), n_layers=2, n_heads=4, n_kv_heads=2, seed=5)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                        "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), cfg).eval()
    merged = copy.deepcopy(peft_model).merge_and_unload()
    from_adapter = weight_deltas(peft_model, peft_model, toggled=True)
    from_weights = weight_deltas(base, merged)
    for k in from_adapter:
        assert float(from_adapter[k].min()) > 0, k
        torch.testing.assert_close(from_adapter[k], from_weights[k], rtol=1e-4, atol=1e-7)


def test_dla_and_lens_against_hand_computations(tok, tiny):
    batch = batch_of(tok, n=4, n_boxes=3)[0]
    run = member_run(tiny, batch)
    dla = direct_logit_attribution(tiny, run, batch)  # [B, L, H]
    arch = LlamaFamily(tiny)
    d = arch.dims
    b = torch.arange(4)
    x = run["resid"][-1]
    rms = (x.pow(2).mean(-1) + arch.final_norm.variance_epsilon).sqrt()
    layer, head = 1, 3
    z = run["z"][layer][b, batch.roles["last"]].clone()  # [B, H, D]
    keep = torch.zeros(d.n_heads, dtype=torch.bool)
    keep[head] = True
    z[:, ~keep] = 0
    c = arch.proj(layer, "o_proj")(z.flatten(1))  # [B, d] the head's own write, through the module
    ref = ((c * arch.final_norm.weight / rms[:, None]) * arch.lm_head.weight[batch.answer]).sum(-1)
    torch.testing.assert_close(dla[:, layer, head], ref, rtol=1e-5, atol=1e-6)
    kl = lens_kl(tiny, run, batch)  # [B, L]
    assert kl.shape == (4, d.n_layers) and float(kl[:, -1].abs().max()) < 1e-5 and float(kl[:, 0].min()) > 0


def test_model_diff_on_a_different_pair_ranks_the_groups_beside_cmap(tmp_path):
    cmap = tmp_path / "cmap"
    compose_run(cmap, ["pair=tiny", "method=cmap", "logger=none", "trainer.enable_progress_bar=false", "data.n_boxes=3",
                       "data.n_examples=12", "method.n_examples=6", "method.batch_size=3"])
    run = tmp_path / "diff"
    compose_run(run, ["pair=tiny", *COMMON, f"method.cmap_run={cmap / 'results.json'}"])
    d = json.loads((run / "results.json").read_text())
    assert d["token_kl"]["last"] > 0 and min(min(r) for r in d["weight_delta"]["head"]["values"]) > 0
    groups = {r["group"]: r for r in d["by_group"]}
    # recomputed from what the same results.json reports per head: the groups of the fine-tuned member's circuit,
    # each read at its own position, its mean z change, and its mean percentile among all heads at that position
    circuit = load_circuit(d["circuit"])
    assert set(groups) == {g for g, hs in circuit.groups.items() if hs}
    cmap_doc = json.loads((cmap / "results.json").read_text())
    roles, rel = d["activation_delta"]["roles"], d["activation_delta"]["rel_norm"]["values"]  # [role][layer][head]
    at = {"value_fetcher": "last", "pos_transmitter": "last", "pos_detector": "query_label",
          "struct_reader": "prev_query_label"}  # SPEC: the position each group acts at
    percentile = {}
    for g, r in groups.items():
        heads = [tuple(h) for h in circuit.groups[g]]
        assert r["role"] == at[g] and r["n_heads"] == len(heads)
        grid = rel[roles.index(r["role"])]
        pool = [x for row in grid for x in row if x is not None and math.isfinite(x)]
        vals = [grid[layer][head] for layer, head in heads]
        assert all(v is not None for v in vals)
        assert r["activation_delta"] == pytest.approx(sum(vals) / len(vals), rel=1e-5)
        # a head's percentile: the share of all heads strictly below it, plus half the ties
        percentile[g] = sum(100 * (sum(p < v for p in pool) + 0.5 * sum(p == v for p in pool)) / len(pool)
                            for v in vals) / len(vals)
        assert r["activation_percentile"] == pytest.approx(percentile[g], abs=1e-9), g
        assert r["cmap_share_of_gap"] == cmap_doc["results"][g]["share_of_gap"]
    top = max(percentile.values())
    assert d["verdict"]["most_changed_group"] in {g for g, p in percentile.items() if p == pytest.approx(top, abs=1e-9)}
