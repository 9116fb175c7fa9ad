"""DCM: interpolation end points, gradients only to the mask, mask-only checkpoints, a planted head recovered
for the matching desideratum only, and a 2-job sweep through the real CLI."""

import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from etk.data.datasets import pair_loader
from etk.interventions.heads import HeadSet, capture
from etk.interventions.hooks import Patch, hooked
from etk.methods.dcm.module import DCMModule
from etk.methods.dcm.run import run_dcm
from etk.models.forward import last_logits
from etk.models.loading import LoadedModel
from etk.tasks import task_named
from etk.tasks.entity_tracking.boxes import generate_examples
from etk.tasks.entity_tracking.data import task_vocab
from etk.tasks.entity_tracking.desiderata import desideratum_pairs
from tests.conftest import ROOT
from tests.helpers import TINY_CFG, compose_cfg, pair_batch, planted_model


def mixed(model, batch, hs, m, src):
    with hooked(model, patches=hs.patches(src, batch.base, 4, m)):
        return last_logits(model, batch.base)


def test_mask_endpoints(tiny, tok):
    batch = pair_batch(tok)
    hs = HeadSet.at("last", [(1, 2), (0, 1), (1, 0)])
    src = capture(tiny, batch.source, hs)
    plain = last_logits(tiny, batch.base)
    assert torch.equal(mixed(tiny, batch, hs, torch.ones(3), src), plain)
    m0 = mixed(tiny, batch, hs, torch.zeros(3), src)
    assert not torch.allclose(m0, plain)
    assert torch.allclose(mixed(tiny, batch, hs, None, src), m0, atol=1e-6)  # m = 0 is replacement
    # m = 0 equals full replacement written with the raw primitive
    pos = batch.base.roles["last"][:, None]
    patches = []
    for layer, heads in ((0, [1]), (1, [0, 2])):
        keep = torch.ones(len(batch), 1, 4, dtype=torch.bool)
        keep[:, :, heads] = False
        patches.append(Patch("z", layer, src[("last", layer)], keep, pos))
    with hooked(tiny, patches=patches):
        assert torch.allclose(last_logits(tiny, batch.base), m0, atol=1e-6)
    # source values come from the source's own role position
    z = capture(tiny, batch.source, HeadSet.at("prev_query_label", [(0, 1)]))[("prev_query_label", 0)]
    assert z.shape == (len(batch), 1, 4, 16)


def test_capture_stops_early_and_matches_a_plain_forward(tiny, tok):
    """capture (forward cut after its last layer) equals o_proj inputs captured by a hand-written hook on a full
    HF forward, and the layers after the last requested one never run."""
    batch = pair_batch(tok)
    layers = tiny.model.layers
    seen, ran = {}, []
    hooks = [layers[j].self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args, j=j: seen.__setitem__(j, args[0].detach().clone())) for j in range(len(layers))]
    with torch.no_grad():
        tiny(**batch.source.model_inputs())
    for h in hooks:
        h.remove()
    probe = layers[1].register_forward_hook(lambda *a: ran.append(1))
    try:
        z = capture(tiny, batch.source, HeadSet.at("last", [(0, 2)]))
    finally:
        probe.remove()
    assert not ran  # layer 1 skipped
    b = torch.arange(len(batch))
    want = seen[0][b, batch.source.roles["last"]].unflatten(-1, (4, 16))  # [B, H, D]
    assert torch.equal(z[("last", 0)][:, 0], want)


def compose_dcm(tmp_path, overrides):
    return compose_cfg("dcm", tmp_path, overrides)


SMALL = ["logger=none", "dcm.n_train=48", "dcm.n_eval=24", "dcm.n_test=24", "dcm.batch_size=8", "data.n_boxes=3",
         "trainer.enable_progress_bar=false"]


def test_gradients_only_to_mask_and_checkpoint_is_mask_only(tmp_path, monkeypatch):
    import etk.methods.dcm.run as dcm_run

    cfg = compose_dcm(tmp_path, ["model=tiny", "desideratum=object", "dcm.reference=true"] + SMALL)
    used = []

    class Recording(DCMModule):  # the module the run itself builds and trains
        def configure_model(self):  # Lightning calls it at fit, validate and test: record the first load
            super().configure_model()
            if not used:
                self.loaded = {k: v.clone() for k, v in self.net.state_dict().items()}
                self.mask_at_start = self.mask.values.detach().clone()
                used.append(self)

    monkeypatch.setattr(dcm_run, "DCMModule", Recording)
    res = run_dcm(cfg)
    assert res.extra["checkpoint_bytes"] < 100_000
    ck = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=False)
    assert set(ck["state_dict"]) == {"mask.values"}
    again = DCMModule.load_from_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    assert torch.equal(again.mask.values.detach(), torch.tensor(res.mask_raw))
    # the model the run trained over is bit-for-bit what it loaded, while its mask moved
    run_module = used[0]
    assert all(torch.equal(run_module.loaded[k], v) for k, v in run_module.net.state_dict().items())
    assert not torch.equal(run_module.mask.values.detach(), run_module.mask_at_start)
    # and a step sends gradient to the mask only
    module = DCMModule(dict(TINY_CFG), "pos_transmitter", [[1, 1], [0, 2]])
    module.configure_model()
    batch = pair_batch(module.tokenizer)
    module.training_step(batch, 0).backward()
    assert module.mask.values.grad is not None and module.mask.values.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.net.parameters())
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["schema"] == "etk.dcm/v1"
    # the test accuracy is k / n over the run's own per-prompt correctness: dcm.n_test=24 is eight whole 3-box
    # contexts, one (base, source) pair per base prompt
    correct = run_module.test_acc.per_example()
    assert doc["test"]["n"] == len(correct) == 24
    assert doc["test"]["accuracy"] == int(correct.sum()) / 24
    assert (tmp_path / "mask.pt").exists() and (tmp_path / "selected_heads.json").exists()


@pytest.mark.parametrize("kind", ["clamp", "sigmoid", "hard_concrete"])
def test_parametrisations_train(kind, tok):
    module = DCMModule(dict(TINY_CFG), "value_fetcher", [[1, 2], [1, 0]], parametrisation=kind)
    module.configure_model()
    loss = module.training_step(pair_batch(tok), 0)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.mask.parameters())
    assert module.binary().dtype == torch.bool and module.binary().all()  # starts keeping everything


@pytest.mark.parametrize("desideratum,expect", [("object_value", True), ("positional", False), ("box_label_value", False)])
def test_dcm_recovers_the_planted_head(tok, desideratum, expect):
    """Head (1, 2) copies the context's objects to the answer: it carries object value, not position/label."""
    L.seed_everything(0, verbose=False)
    module = DCMModule(dict(TINY_CFG), "value_fetcher", [[1, 2], [1, 0], [0, 1]], lr=0.1, lam=0.01,
                       model=LoadedModel(planted_model(tok, head=2), tok, dict(TINY_CFG)))
    objects, labels = task_vocab(tok, 2)
    exs = generate_examples(160, 2, objects, labels, seed=1)
    train = pair_loader(task_named("entity_tracking"), tok, desideratum_pairs(desideratum, exs, 0), 16, shuffle=True)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(module, train)
    sel = module.selected_heads()
    assert ([1, 2] in sel) == expect
    assert [1, 0] not in sel and [0, 1] not in sel  # heads that cannot matter stay unpatched


@pytest.mark.slow
def test_two_job_sweep_through_cli(tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "train_dcm.py", "-m", "model=tiny", "desideratum=object,position", f"hydra.sweep.dir={sweep}"]
        + SMALL, cwd=ROOT, env=dict(os.environ, WANDB_MODE="disabled"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for d in ("object", "position"):
        run = sweep / f"tiny-pos_transmitter-{d}"
        assert (run / "results.json").exists() and (run / "mask.pt").exists() and (run / "checkpoints" / "best.ckpt").exists()
    table = (sweep / "dcm_table.md").read_text()
    assert "object_value" in table and "positional" in table
    assert "[etk] DCM" in out.stdout


@pytest.mark.parametrize("reference", [True, False])
def test_cached_sources_give_exactly_the_uncached_run(tmp_path, monkeypatch, reference):
    """The cache (sources' z, base prompts' prefix K/V or clean rows) serves later epochs and validation checks
    (hits counted) and changes no number: mask values, selection and accuracies are bit-identical to a run that
    recomputes every source and prefix; for the one-mask reference fit and for the joint fit."""
    import etk.methods.dcm.run as dcm_run

    built = []
    name = "DCMModule" if reference else "MultiDCMModule"

    class Recording(getattr(dcm_run, name)):
        def configure_model(self):
            super().configure_model()
            if self not in built:
                built.append(self)

    monkeypatch.setattr(dcm_run, name, Recording)
    docs = {}
    for mb in (512, 0):
        cfg = compose_dcm(tmp_path / f"c{mb}", ["model=tiny", "desideratum=object", "dcm.epochs=3", "dcm.val_every=2",
                                                f"dcm.cache_mb={mb}", f"dcm.reference={str(reference).lower()}"] + SMALL)
        run_dcm(cfg)
        docs[mb] = json.loads((tmp_path / f"c{mb}" / "results.json").read_text())
    cached, plain = built
    assert cached.cache.hits >= cached.cache.misses > 0 and plain.cache.hits == 0
    for k in ("mask_raw", "mask_last_step", "selected_heads", "best_val_accuracy", "test", "chance_floor_unpatched"):
        assert docs[512][k] == docs[0][k], k


@pytest.mark.parametrize("reference", [True, False])
def test_mask_last_step_is_the_mask_after_the_last_step_not_the_best(tmp_path, monkeypatch, reference):
    """[bug, etk <= 0.8] `mask_last_step` was read as a reference to the mask's parameter, which loading the best
    checkpoint then overwrote: it always equalled `mask_raw`. It is the mask after the last training step, as the
    module holds it when the fit ends (recorded here), for the one-mask fit and for the joint fit."""
    import etk.methods.dcm.run as dcm_run

    name = "DCMModule" if reference else "MultiDCMModule"
    at_end = []

    class Recording(getattr(dcm_run, name)):
        def on_fit_end(self):
            masks = [self.mask] if reference else list(self.masks)
            at_end.append([m.state_dict()[next(iter(m.state_dict()))].detach().clone() for m in masks])
            assert self.training and not self.net.training  # the fit's train() never reaches the frozen model

    monkeypatch.setattr(dcm_run, name, Recording)
    cfg = compose_dcm(tmp_path, ["model=tiny_planted", "data.n_boxes=2", "desideratum=object", "dcm.epochs=3",
                                 "dcm.val_every=2", "group=value_fetcher", f"dcm.reference={str(reference).lower()}"] + SMALL)
    res = run_dcm(cfg)
    assert res.extra["mask_last_step"] == at_end[0][0].tolist()
    assert res.extra["mask_last_step"] != res.mask_raw  # here the best mask is an earlier one: the old bug shows
