"""Scale-out paths on CPU: a model split over devices (accelerate dispatch with CPU and disk offload) gives the unsplit
model's results bit for bit, the paper's model configs default to fp32, and a submitit-local multirun runs real
subprocesses and writes its collected table once."""

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from etk.interventions.components import HeadId, all_heads
from etk.interventions.heads import HeadSet, capture
from etk.interventions.hooks import hooked
from etk.methods.path_patching.fast import fast_scores
from etk.methods.path_patching.stages import reachable_layers, receivers_from, task_stages
from etk.models.arch import LlamaFamily
from etk.models.forward import last_logits
from etk.models.loading import is_dispatched, load_model
from etk.tasks import task_named
from tests.conftest import CONF, ROOT
from tests.helpers import batch_of, compose_run, pp_batch

SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.norm": "cpu", "lm_head": "disk"}


@pytest.fixture
def both(tiny_dir, tmp_path):
    plain_cfg = {"name": "t", "source": "local", "path": str(tiny_dir), "adapters": [], "dtype": "float32"}
    split_cfg = {**plain_cfg, "device_map": SPLIT, "offload_folder": str(tmp_path / "offload")}
    plain, tok = load_model(OmegaConf.create(plain_cfg))
    split, _ = load_model(OmegaConf.create(split_cfg))
    assert is_dispatched(split) and not is_dispatched(plain)
    assert any(p.device.type == "meta" for p in split.parameters())  # really offloaded
    return plain, split, tok, plain_cfg, split_cfg


def test_split_model_equals_unsplit_for_eval_path_patching_and_cmap(both, tok):
    plain, split, _, _, _ = both
    batch, _ = batch_of(tok, n=6, n_boxes=3)
    assert torch.equal(last_logits(split, batch), last_logits(plain, batch))
    ppb = pp_batch(tok, n=6, n_boxes=3)
    dims = LlamaFamily(plain).dims
    prev = None
    for group in ("value_fetcher", "pos_transmitter"):
        st = task_stages(task_named("entity_tracking"))[group]
        rec = None if st.receiver_site is None else receivers_from(prev, st.receiver_site, dims)
        senders = [h for h in all_heads(dims) if h.layer in reachable_layers(st, rec, dims.n_layers)]
        a, b = fast_scores(plain, ppb, st, rec, senders)[0], fast_scores(split, ppb, st, rec, senders)[0]
        assert torch.equal(a, b) and a.abs().max() > 0
        prev = [HeadId(1, 0), HeadId(1, 2)]
    hs = HeadSet({"last": [(1, 2), (0, 1)], "query_label": [(0, 3)]})
    other, _ = batch_of(tok, n=6, n_boxes=3, seed=4)
    src_a, src_b = capture(plain, other, hs), capture(split, other, hs)
    for k in src_a:
        assert torch.equal(src_a[k], src_b[k])
    with hooked(plain, patches=hs.patches(src_a, batch, 4)):
        want = last_logits(plain, batch)
    with hooked(split, patches=hs.patches(src_b, batch, 4)):
        assert torch.equal(last_logits(split, batch), want)


def test_split_model_through_a_lightning_run(both, tmp_path):
    _, _, _, plain_cfg, split_cfg = both
    common = ["logger=none", "data.n_boxes=3", "data.n_examples=12", "trainer.enable_progress_bar=false", "model=tiny"]
    a = compose_run(tmp_path / "a", common + ["model.source=local", f"+model.path={plain_cfg['path']}"])
    b = compose_run(tmp_path / "b", common + ["model.source=local", f"+model.path={split_cfg['path']}",
                                               "+model.device_map={" + ",".join(f"{k}:{v}" for k, v in SPLIT.items()) + "}",
                                               f"+model.offload_folder={split_cfg['offload_folder']}"])
    assert a.accuracy == b.accuracy and a.n == b.n == 12


def test_paper_model_configs_default_to_fp32():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        for m in ("llama_7b", "vicuna_7b", "goat_7b", "float_7b"):
            assert compose("patching", overrides=[f"model={m}"]).model.dtype == "float32", m


@pytest.mark.slow
def test_submitit_local_multirun_collects_once(tmp_path):
    sweep = tmp_path / "sweep"
    env = dict(os.environ, WANDB_MODE="disabled")
    out = subprocess.run([sys.executable, str(ROOT / "run_patching.py"), "-m", "hydra/launcher=submitit_local",
                          "model=tiny", "logger=none", "data.n_boxes=3", "data.n_examples=7,14",
                          "trainer.enable_progress_bar=false", "hydra.launcher.timeout_min=10",
                          f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    docs = [json.loads(p.read_text()) for p in sweep.rglob("results.json")]
    assert sorted(d["n"] for d in docs) == [7, 14]
    assert {d["resources"]["world_size"] for d in docs} == {1}
    assert len(list(sweep.rglob("accuracy_table.md"))) == 1 and (sweep / "accuracy_table.md").exists()
    assert list(sweep.rglob("*submitit*")) or list(sweep.rglob(".submitit"))  # real submitit jobs
