"""`method=study pair=<p>`: the paper's whole argument for one model pair, step by step, then report.md.

Every step writes its typed results into `<run dir>/<step>/<member or job>/`; a rerun with the same
`hydra.run.dir` skips every job whose results.json exists with the expected schema (resumable)."""

from __future__ import annotations

from etk.errors import ConfigError

import copy
import json
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from etk.artifacts import read_json, write_text
from etk.circuits import load_circuit, overlap
from etk.runners.circuit_eval import run_circuit_search, run_faithfulness, run_faithfulness_curve, run_minimality
from etk.runners.cmap import run_activation_patching, run_cmap
from etk.data.datasets import task_examples
from etk.models.pair import load_pair
from etk.runners.common import data_config, free_model, output_dir, step_output
from etk.runners.dcm import run_dcm
from etk.runners.eval import run_eval
from etk.runners.knockout import run_knockout
from etk.runners.path_patching import run_path_patching
from etk.runners.report import write_report

CONF = Path(__file__).resolve().parents[1] / "conf"
DESIDERATUM_FILES = {"object": "object", "position": "position", "label": "label"}


def method_cfg(name: str, overrides: dict | DictConfig | None = None) -> DictConfig:
    """A method's shipped config with study-sized overrides."""
    base = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    return OmegaConf.merge(base, overrides or {})


def sub_config(cfg: DictConfig, member: DictConfig | None, method: DictConfig, **extra: Any) -> DictConfig:
    """The study's config with another model/method, no logger (the study reports itself)."""
    c = OmegaConf.to_container(cfg, resolve=False)
    c.pop("hydra", None)
    sub = OmegaConf.create(c)
    with open_dict(sub):
        if member is not None:
            sub.model = copy.deepcopy(member)
        sub.method = method
        sub.logger = {}
        for k, v in extra.items():
            OmegaConf.update(sub, k, v, force_add=True)
    return sub


class Study:
    def __init__(self, cfg: DictConfig):
        self.cfg, self.m, self.root = cfg, cfg.method, output_dir()
        self.members = {"base": cfg.pair.base, "finetuned": cfg.pair.finetuned}
        self.log: list[str] = []
        self.seconds = 0.0  # compute time of all jobs, including those finished by an earlier run

    def job(self, step: str, name: str, schema: str, fn: Callable[[DictConfig], Any], sub: DictConfig) -> dict:
        """Run one job in its folder unless a valid result is already there."""
        folder = self.root / step / name
        res = folder / "results.json"
        timing = folder / "job_seconds.json"
        if res.exists():
            try:
                doc = read_json(res, schema)
                earlier = json.loads(timing.read_text())["seconds"] if timing.exists() else None
                self.log.append(f"{step}/{name}: done earlier" + (f" ({earlier:.0f} s), skipped" if earlier else ", skipped"))
                self.seconds += earlier or 0.0
                return doc
            except ValueError:
                pass
        t0 = time.time()
        with step_output(folder):
            fn(sub)
        free_model()
        dt = time.time() - t0
        write_text(timing, json.dumps({"seconds": round(dt, 1)}))
        self.seconds += dt
        self.log.append(f"{step}/{name}: {dt:.0f} s")
        return read_json(res, schema)

    def validate(self) -> None:
        """Before any work: the two members must be comparable head by head (architecture, dims, tokenizer
        vocabulary, the ids of the study's prompts); a mismatch raises PairMismatchError naming the first one."""
        b, f = (OmegaConf.to_container(m, resolve=True) for m in (self.cfg.pair.base, self.cfg.pair.finetuned))
        pair = load_pair(b, f)
        pair.check([e.render().text for e in task_examples(data_config(self.cfg, 50), pair.tokenizer)])
        del pair
        free_model()

    def accuracy(self) -> None:
        for name, member in self.members.items():
            self.job("accuracy", name, "etk.eval/v1", run_eval,
                     sub_config(self.cfg, member, method_cfg("eval", self.m.accuracy)))

    def path_patching(self) -> None:
        for name, member in self.members.items():
            self.job("path_patching", name, "etk.path_patching/v1", run_path_patching,
                     sub_config(self.cfg, member, method_cfg("path_patching", self.m.path_patching)))

    def minimality(self) -> None:
        """The paper's construction: prune each member's path-patching candidates with the significance rule at the
        model's threshold (`discovery.minimality_threshold`); the pruned circuit is what later steps use."""
        for name, member in self.members.items():
            threshold = (member.get("discovery") or {}).get("minimality_threshold", 0.01)
            mc = method_cfg("minimality", {"threshold": threshold, **self.m.minimality})
            self.job("minimality", name, "etk.minimality/v1", run_minimality,
                     sub_config(self.cfg, member, mc, circuit=str(self.root / "path_patching" / name / "circuit.json"),
                                **{"ablation.n_prompts": self.m.ablation_prompts}))

    def circuit_path(self, member: str) -> str:
        """The member's circuit: minimality's pruned circuit, or path patching's candidates when the study skips
        minimality."""
        pruned = self.root / "minimality" / member / "circuit.json"
        return str(pruned if pruned.exists() else self.root / "path_patching" / member / "circuit.json")

    def curve(self) -> None:
        for name, member in self.members.items():
            self.job("curve", name, "etk.faithfulness_curve/v1", run_faithfulness_curve,
                     sub_config(self.cfg, member, method_cfg("faithfulness_curve", self.m.curve),
                                scores=str(self.root / "path_patching" / name),
                                **{"ablation.n_prompts": self.m.ablation_prompts}))

    def circuit_search(self) -> None:
        for name, member in self.members.items():
            self.job("circuit_search", name, "etk.circuit_search/v1", run_circuit_search,
                     sub_config(self.cfg, member, method_cfg("circuit_search", self.m.circuit_search),
                                **{"ablation.n_prompts": self.m.ablation_prompts}))

    def faithfulness(self) -> None:
        for c in self.members:
            for name, member in self.members.items():
                self.job("faithfulness", f"{c}_circuit-on-{name}", "etk.faithfulness/v1", run_faithfulness,
                         sub_config(self.cfg, member, method_cfg("faithfulness", self.m.faithfulness),
                                    circuit=self.circuit_path(c), **{"ablation.n_prompts": self.m.ablation_prompts}))

    def dcm(self) -> None:
        dcm_defaults = OmegaConf.load(CONF / "dcm.yaml")
        for owner in self.m.dcm.members:
            for group in self.m.dcm.groups:
                if not load_circuit(self.circuit_path(owner)).groups.get(group):
                    continue
                for d in self.m.dcm.desiderata:
                    des = OmegaConf.load(CONF / "desideratum" / f"{DESIDERATUM_FILES.get(d, d)}.yaml")
                    sub = sub_config(self.cfg, self.members[owner], OmegaConf.create({"name": "dcm"}),
                                     circuit=self.circuit_path(owner), group=group, desideratum=des,
                                     dcm=OmegaConf.merge(dcm_defaults.dcm, self.m.dcm.sizes),
                                     **{"trainer.num_sanity_val_steps": 0, "trainer.log_every_n_steps": 1})
                    self.job("dcm", f"{owner}-{group}-{d}", "etk.dcm/v1", run_dcm, sub)

    def dcm_runs(self) -> list[Path]:
        return sorted((self.root / "dcm").glob("*/results.json"))

    def activation_patching(self) -> None:
        ap = self.m.activation_patching
        sizes = {k: v for k, v in ap.items() if k not in ("members", "desiderata")}
        wanted = set(ap.get("desiderata") or self.m.dcm.desiderata)
        for run in self.dcm_runs():
            if run.parent.name.rsplit("-", 1)[-1] not in wanted:
                continue
            if not read_json(run).get("selected_heads"):
                self.log.append(f"activation_patching/{run.parent.name}: DCM selected no heads, nothing to patch")
                continue
            for name in ap.get("members") or self.members:
                self.job("activation_patching", f"{run.parent.name}-in-{name}", "etk.activation_patching/v1",
                         run_activation_patching,
                         sub_config(self.cfg, self.members[name], method_cfg("activation_patching", {**sizes, "heads": str(run)})))

    def cmap(self) -> None:
        # the paper's head choice: DCM selections for VF (object value), PT and PD (positional); all SR heads
        chosen = [str(p) for p in self.dcm_runs()
                  if p.parent.name in ("finetuned-value_fetcher-object", "finetuned-pos_transmitter-position",
                                       "finetuned-pos_detector-position")]
        for direction in self.m.cmap.directions:
            mc = method_cfg("cmap", {k: v for k, v in self.m.cmap.items() if k != "directions"})
            with open_dict(mc):
                mc.direction, mc.dcm_runs = direction, chosen
            self.job("cmap", direction, "etk.cmap/v1", run_cmap,
                     sub_config(self.cfg, None, mc, circuit=self.circuit_path("finetuned")))

    def knockout(self) -> None:
        k = self.m.knockout
        for name, member in self.members.items():
            mc = method_cfg("knockout", {"n_examples": k.n_examples, "batch_size": k.batch_size})
            with open_dict(mc):
                mc.start_layers_every = int(k.get("start_layers_every", 1))
            self.job("knockout", name, "etk.knockout/v1", run_knockout, sub_config(self.cfg, member, mc))

    def run(self) -> dict[str, Any]:
        self.validate()
        for step in self.m.steps:
            getattr(self, step)()
        circuits = {n: load_circuit(self.circuit_path(n)) for n in self.members
                    if Path(self.circuit_path(n)).exists()}
        ov = overlap(circuits["base"], circuits["finetuned"]) if len(circuits) == 2 else {}
        self.log.append(f"total compute time of the study's jobs: {self.seconds / 60:.1f} min")
        report = write_report(self.root, self.cfg, ov, self.log,
                              circuits["finetuned"].sizes() if "finetuned" in circuits else None)
        print(f"[etk] study of pair {self.cfg.pair.name}: {report}")
        for line in self.log:
            print(f"[etk]   {line}")
        return {"report": str(report), "log": self.log}


def run_study(cfg: DictConfig) -> dict[str, Any]:
    unknown = set(cfg.method.steps) - {"accuracy", "path_patching", "minimality", "faithfulness", "curve",
                                       "circuit_search", "dcm", "activation_patching", "cmap", "knockout"}
    if unknown:
        raise ConfigError(f"unknown study steps {sorted(unknown)}")
    return Study(cfg).run()
