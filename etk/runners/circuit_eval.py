"""`method=faithfulness|completeness|minimality|overlap`: circuit evaluation under mean ablation."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from etk.artifacts import write_json
from etk.circuits import Circuit, circuit_label, load_circuit, overlap
from etk.data.boxes import generate_contexts
from etk.data.datasets import make_template, prompt_loader, task_examples, task_vocab
from etk.data.pairs import mean_ablation_examples
from etk.interventions.components import check_heads
from etk.metrics import fmt
from etk.methods.circuit_eval.completeness import completeness
from etk.methods.circuit_eval.faithfulness import faithfulness
from etk.methods.circuit_eval.minimality import minimality
from etk.methods.circuit_eval.module import AblationEval
from etk.models.arch import LlamaFamily
from etk.runners.common import data_config, emit, build_logger, finish_logger, output_dir, plain_config, require_circuit, trainer_kwargs


class Evaluator:
    """Loads the model, computes the per-position means on the ablation set, and evaluates ablations."""

    def __init__(self, cfg: DictConfig, circuit: Circuit):
        m = cfg.method
        self.module = AblationEval(OmegaConf.to_container(cfg.model, resolve=True), int(m.ablations_per_forward),
                                   int(m.get("vital_rows_per_forward", 2048)), bool(m.get("vital_fast_path", True)))
        self.module.configure_model()
        self.dims = LlamaFamily(self.module.net).dims
        for heads in circuit.groups.values():
            check_heads(heads, self.dims)
        tok = self.module.tokenizer
        self.trainer = L.Trainer(**trainer_kwargs(cfg), logger=False)
        objects, labels = task_vocab(tok, cfg.data.n_boxes, cfg.data.get("objects", "objects.csv"))
        contexts = generate_contexts(int(cfg.ablation.n_prompts), cfg.data.n_boxes, objects, labels, cfg.data.seed)
        abl = mean_ablation_examples(contexts, random.Random(int(cfg.ablation.seed)), make_template(cfg.data.get("template")))
        self.module.mode = "means"
        self.trainer.predict(self.module, prompt_loader(tok, abl, int(m.batch_size), cfg.data.padding_side),
                             return_predictions=False)
        self.module.finish_means()
        self.module.mode = "eval"
        data_cfg = data_config(cfg, m.n_examples)
        self.loader = prompt_loader(tok, task_examples(data_cfg, tok), int(m.batch_size), cfg.data.padding_side)
        self.evaluations = 0

    def __call__(self, ablations):
        """[K, N] correctness of K ablations on the evaluation prompts."""
        self.module.ablations = list(ablations)
        self.trainer.predict(self.module, self.loader, return_predictions=False)
        self.evaluations += len(ablations)
        return self.module.acc.per_example()


def _run(cfg: DictConfig, schema: str, body) -> dict[str, Any]:
    L.seed_everything(cfg.seed, verbose=False)
    spec, circuit = require_circuit(cfg)
    logger = build_logger(cfg)
    try:
        ev = Evaluator(cfg, circuit)
        res = body(ev, circuit)
        payload = {"model": cfg.model.name, "circuit": circuit_label(spec, circuit), "circuit_spec": spec,
                   "circuit_sizes": circuit.sizes(), **res, "evaluations": ev.evaluations, "config": plain_config(cfg)}
        return emit(payload, schema, logger, {k: v for k, v in res.items() if isinstance(v, (int, float))})
    finally:
        finish_logger(logger)


def run_faithfulness(cfg: DictConfig) -> dict[str, Any]:
    m = cfg.method

    def body(ev, circuit):
        r = faithfulness(ev, circuit, ev.dims, int(m.n_random), int(m.random_seed), bool(m.ablate_non_vital),
                         bool(m.legacy_rounding), int(m.n_bootstrap))
        c = r["ceiling"]
        print(f"[etk] faithfulness of {cfg.circuit} on {cfg.model.name}: {fmt(r['faithfulness'])} "
              f"(95% CI {fmt(r['ci_low'])}-{fmt(r['ci_high'])}; circuit acc {r['accuracy_circuit']:.3f}, model acc "
              f"{r['accuracy_model']:.3f}); ceiling of three-position circuits {fmt(c['faithfulness'])} (acc "
              f"{c['accuracy']:.3f}), relative to ceiling {fmt(r['relative_to_ceiling'])}; random circuits "
              f"{fmt(r['random']['faithfulness_mean'])} ± {fmt(r['random']['faithfulness_sd'])}")
        return r
    return _run(cfg, "etk.faithfulness/v1", body)


def run_completeness(cfg: DictConfig) -> dict[str, Any]:
    m = cfg.method

    def body(ev, circuit):
        r = completeness(ev, circuit, ev.dims, int(m.n_random), float(m.p), int(m.random_seed))
        rs = r["random"].get("incompleteness", {})
        print(f"[etk] incompleteness of {cfg.circuit} on {cfg.model.name}: random K {rs.get('mean', float('nan')):.3f} "
              f"± {rs.get('sd', float('nan')):.3f}; groups " +
              ", ".join(f"{g} {v['incompleteness']:.3f}" for g, v in r["groups"].items()))
        return r
    return _run(cfg, "etk.completeness/v1", body)


def run_minimality(cfg: DictConfig) -> dict[str, Any]:
    m = cfg.method

    def body(ev, circuit):
        r = minimality(ev, circuit, ev.dims, float(m.threshold), str(m.mode), float(m.frac))
        pruned: Circuit = r.pop("circuit")
        pruned.meta.update({"model": cfg.model.name, "source_circuit": str(cfg.circuit)})
        pruned.save(output_dir() / "circuit.json")
        done = sum(g["evaluations"] for g in r["groups"].values() if "evaluations" in g)
        paper = sum(g["paper_evaluations"] for g in r["groups"].values() if "paper_evaluations" in g)
        n2 = sum(g["n"] ** 2 for g in r["groups"].values())
        print(f"[etk] minimality ({m.mode}, threshold {m.threshold}): kept " +
              ", ".join(f"{g} {v.get('kept', 0)}/{v['n']}" for g, v in r["groups"].items()) +
              f"; {done} evaluations in {ev.module.forwards} forwards of the last pass "
              f"(paper's procedure: {paper}; sum n^2 = {n2})")
        return {**r, "pruned": pruned.to_json(), "evaluations_done": done, "paper_evaluations": paper, "sum_n_squared": n2}
    return _run(cfg, "etk.minimality/v1", body)


def run_overlap(cfg: DictConfig) -> dict[str, Any]:
    spec_a, a = require_circuit(cfg)
    if not cfg.method.get("other"):
        raise ValueError("method=overlap needs method.other=<circuit name or path>")
    b = load_circuit(str(cfg.method.other))
    res = overlap(a, b)
    for g, v in res.items():
        print(f"[etk] {g}: shared {v['shared']} (precision {v['precision']:.2f}, recall {v['recall']:.2f})")
    payload = {"a": str(cfg.circuit), "b": str(cfg.method.other), "overlap": res}
    write_json(output_dir() / "results.json", payload, "etk.overlap/v1")
    return payload
