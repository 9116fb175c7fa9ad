"""The device-parametrised subset (`pytest -m device`; ETK_TEST_DEVICES=cpu,cuda runs it on a GPU too): every
intervention gives the same result on the device as on the CPU reference."""

import os

import pytest
import torch

from etk.interventions.components import all_heads
from etk.interventions.heads import HeadSet, capture
from etk.interventions.hooks import hooked
from etk.methods.path_patching.fast import fast_scores
from etk.methods.path_patching.naive import naive_scores
from etk.methods.path_patching.stages import reachable_layers, receivers_from, task_stages
from etk.models.arch import LlamaFamily
from etk.models.forward import last_logits
from etk.models.tiny import tiny_llama
from etk.tasks import task_named
from tests.helpers import RECV, TINY_CFG, assert_scores_close, batch_of, means_of, pair_batch, pp_batch

DEVICES = [d for d in os.environ.get("ETK_TEST_DEVICES", "cpu").split(",") if d == "cpu" or torch.cuda.is_available()]
pytestmark = [pytest.mark.device, pytest.mark.parametrize("device", DEVICES)]


@pytest.fixture(scope="module")
def models(tok):
    return tiny_llama(len(tok), n_layers=4, n_heads=4, n_kv_heads=2, seed=7), tiny_llama(len(tok), n_layers=4, seed=8)


def on(model, device):
    import copy

    return copy.deepcopy(model).to(device)


def test_head_set_patching_on_device(tok, models, device):
    if device == "cpu":  # the reference runs on the CPU: this would compare a model with its own deepcopy
        pytest.skip("needs a non-CPU device (ETK_TEST_DEVICES=cpu,cuda); on the CPU tests/test_heads.py covers head-set "
                    "patching against hand-written hooks")
    a, b = models
    batch, _ = batch_of(tok, n=6, n_boxes=3)
    hs = HeadSet({"last": [(2, 1), (0, 3)], "query_label": [(1, 0)]})
    with hooked(a, patches=hs.patches(capture(b, batch, hs), batch, 4)):
        ref = last_logits(a, batch)
    da, db, dbatch = on(a, device), on(b, device), batch.to(device)
    with hooked(da, patches=hs.patches(capture(db, dbatch, hs), dbatch, 4)):
        got = last_logits(da, dbatch)
    assert torch.allclose(got.cpu(), ref, atol=1e-4, rtol=1e-4)


def test_vital_fast_path_on_device(tok, models, device):
    from etk.circuits import Circuit
    from etk.methods.mean_ablation.ablation import ablation_patches, circuit_ablation, keep_rows
    from etk.methods.mean_ablation.vital import background, vital_logits

    model, batch = on(models[0], device), batch_of(tok, n=6, n_boxes=3)[0].to(device)
    means = means_of(model, batch)
    abl = [circuit_ablation(Circuit({"value_fetcher": [[2, 1], [1, 0]], "pos_detector": [[0, 2]]}), LlamaFamily(model).dims)]
    fast = vital_logits(model, batch, means, abl, background(model, batch, means))
    with hooked(model, patches=ablation_patches(means, keep_rows(abl, batch))):
        full = last_logits(model, batch)
    assert torch.allclose(fast, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("group", ["value_fetcher", "pos_detector", "struct_reader"])
def test_fast_equals_naive_in_fp32_on_device(tok, models, device, group):
    model, batch = on(models[0], device), pp_batch(tok, n=6, n_boxes=3).to(device)
    dims = LlamaFamily(model).dims
    st = task_stages(task_named("entity_tracking"))[group]
    rec = None if st.receiver_site is None else receivers_from(RECV[:2], st.receiver_site, dims)
    reach = [h for h in all_heads(dims) if h.layer in reachable_layers(st, rec, dims.n_layers)]
    naive = naive_scores(model, batch, st, rec, all_heads(dims))[0] / 6
    fast = fast_scores(model, batch, st, rec, reach)[0] / 6
    assert_scores_close(fast, naive)


def test_dcm_step_on_device_sends_gradient_to_the_mask_only(tok, device):
    from etk.methods.dcm.module import DCMModule

    module = DCMModule(dict(TINY_CFG), "value_fetcher", [[1, 2], [1, 0]])
    module.configure_model()
    module = module.to(device)
    module.training_step(pair_batch(tok).to(device), 0).backward()
    assert module.mask.values.grad is not None and module.mask.values.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.net.parameters())
