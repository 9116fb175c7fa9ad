"""Pair configs: `model=base` / `model=finetuned` resolve to the members of `pair=...`; the collector table."""

import json

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from etk.methods.eval.report import accuracy_table
from etk.study.collect import collect_all
from tests.conftest import CONF

PAIRS = {"smol_tracking": ("smollm2_135m_instruct", "smollm2_tracker"),
         "smol_arith": ("smollm2_tracker", "smollm2_tracker_arith"),
         "tiny": ("tiny", "tiny_other"), "tiny_self": ("tiny", "tiny")}


def test_model_member_of_pair():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        for pair, names in sorted(PAIRS.items()):
            for member, want in zip(("base", "finetuned"), names):
                cfg = compose("patching", overrides=[f"pair={pair}", f"model={member}"])
                model = OmegaConf.to_container(cfg.model, resolve=True)
                assert model["name"] == want, (pair, member)


def test_embedded_pair_adapters_stack():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("patching", overrides=["pair=smol_arith"])
    assert list(cfg.pair.base.adapters) == ["etk:assets/adapters/tracker"]
    assert list(cfg.pair.finetuned.adapters) == ["etk:assets/adapters/tracker", "etk:assets/adapters/tracker_arith"]


def test_member_overrides_reach_the_model():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("patching", overrides=["pair=tiny", "model=finetuned", "pair.finetuned.tiny.n_layers=3"])
    assert cfg.model.tiny.n_layers == 3 and cfg.model.tiny.seed == 1


def test_collector_table(tmp_path):
    for i, m in enumerate(["a", "b"]):
        d = tmp_path / str(i)
        d.mkdir()
        rows = [{"n_boxes": n, "accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 10} for n in (2, 7)]
        (d / "results.json").write_text(json.dumps({"schema": "etk.eval/v1", "model": m, **rows[-1], "by_n_boxes": rows}))
    md = dict(collect_all([tmp_path], tmp_path))["accuracy (95% CI)"]
    assert "| a | 0.500 [0.400, 0.600] | 0.500 [0.400, 0.600] |" in md
    assert (tmp_path / "accuracy_table.csv").read_text().startswith("model,2 boxes,7 boxes")
    header, _ = accuracy_table([])
    assert header == ["model"]


def test_embedded_models_load_with_their_adapters():
    """The committed adapters load and merge; each fine-tune changes the logits of the model it starts from."""
    import torch

    from etk.models.loading import load_model

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfgs = [compose("patching", overrides=[f"model={m}"]).model
                for m in ("smollm2_135m_instruct", "smollm2_tracker", "smollm2_tracker_arith")]
    ids = torch.tensor([[504, 11977, 314, 281, 13637, 426, 30, 13637, 426, 3593, 260]])
    logits = []
    for cfg in cfgs:
        model, tok = load_model(cfg)
        assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
        logits.append(model(ids).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)
    assert not torch.allclose(logits[1], logits[2], atol=1e-3)
    assert tok.decode([int(logits[1].argmax())]) == " apple"
