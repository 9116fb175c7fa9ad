"""`method=study pair=<p>`: the paper's whole argument for one model pair, step by step, then report.md.

Each step is a registered method; its `study_jobs(study)` yields the jobs (folder name + Hydra overrides). Every
job's config is composed through Hydra's compose API from the method's own primary config, with the study's
overrides (pair, data, seed, trainer, ...), the step's sizes (`method.<step>`) and the job's own settings, so
defaults lists and overrides apply exactly as on the command line. Results go to `<run dir>/<step>/<job>/`; a rerun
with the same `hydra.run.dir` skips every job whose results.json exists with the expected schema (resumable)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from etk.artifacts import read_json, write_text
from etk.data.datasets import task_examples
from etk.data.roles import MEMBERS
from etk.errors import ConfigError
from etk.methods.registry import MethodSpec, get
from etk.models.loading import reuse_models
from etk.models.pair import load_pair
from etk.runners.common import barrier, compose, data_config, free_model, output_dir, step_output, to_overrides

INHERITED = ("pair", "data.", "seed=", "trainer.", "ablation.")  # study overrides every job inherits


@dataclass
class Job:
    name: str  # the job's folder under <run dir>/<step>/
    overrides: list[str] = field(default_factory=list)  # on top of the study's and the step's


class Study:
    def __init__(self, cfg: DictConfig):
        self.cfg, self.m, self.root = cfg, cfg.method, output_dir()
        self.members = MEMBERS
        self.log: list[str] = []
        self.seconds = 0.0  # compute time of all jobs, including those finished by an earlier run
        self.inherited = [o for o in _task_overrides() if o.startswith(INHERITED)] + [f"seed={cfg.seed}"]

    # -- what the steps' job functions read -------------------------------------------------------------------
    def member(self, member: str) -> DictConfig:
        """The member's model config (pair.base / pair.finetuned)."""
        return self.cfg.pair[member]

    @property
    def plan(self) -> DictConfig:
        return self.m.plan

    def sizes(self, step: str, prefix: str = "method") -> list[str]:
        """The step's block of the study config as overrides of the method's config."""
        block = self.m.get(step)
        return to_overrides(prefix, block) if block else []

    def ablation(self) -> list[str]:
        return [f"ablation.n_prompts={int(self.m.ablation_prompts)}"]

    def dir(self, step: str, name: str = "") -> Path:
        return self.root / step / name if name else self.root / step

    def circuit_path(self, member: str) -> str:
        """The member's circuit: minimality's pruned circuit, or path patching's candidates when the study skips
        minimality."""
        pruned = self.dir("minimality", member) / "circuit.json"
        return str(pruned if pruned.exists() else self.dir("path_patching", member) / "circuit.json")

    def docs(self, step: str) -> list[Path]:
        """The results.json files a step wrote so far."""
        return sorted(self.dir(step).glob("*/results.json"))

    def note(self, line: str) -> None:
        self.log.append(line)

    def per_member(self, step: str, *extra: str) -> list[Job]:
        """One job per member: `model=<member>`, `extra` overrides, the step's sizes."""
        return [Job(m, [f"model={m}", *extra, *self.sizes(step)]) for m in self.members]

    # -- running ----------------------------------------------------------------------------------------------
    def compose(self, spec: MethodSpec, job: Job) -> DictConfig:
        """The job's config, composed and validated (before any model is loaded)."""
        from etk.validate import validate

        head = [f"method={spec.name}"] if spec.entry == "patching" else []
        sub = compose(spec.entry, head + self.inherited + job.overrides + ["logger=none"])
        validate(sub)
        return sub

    def run_job(self, spec: MethodSpec, job: Job) -> dict:
        """Run one job in its folder unless a valid result is already there."""
        folder = self.dir(spec.name, job.name)
        res, timing = folder / "results.json", folder / "job_seconds.json"
        label = f"{spec.name}/{job.name}"
        if res.exists():
            try:
                doc = read_json(res, spec.schema)
                earlier = json.loads(timing.read_text())["seconds"] if timing.exists() else None
                self.log.append(f"{label}: done earlier" + (f" ({earlier:.0f} s), skipped" if earlier else ", skipped"))
                self.seconds += earlier or 0.0
                return doc
            except ValueError:
                pass
        sub = self.compose(spec, job)
        t0 = time.time()
        with step_output(folder):
            spec.runner()(sub)
        barrier()  # in a distributed run rank 0 writes the results; every rank reads them after this
        free_model()
        dt = time.time() - t0
        write_text(timing, json.dumps({"seconds": round(dt, 1)}))
        self.seconds += dt
        self.log.append(f"{label}: {dt:.0f} s")
        return read_json(res, spec.schema)

    def validate_pair(self) -> None:
        """Before any work: the two members must be comparable head by head (architecture, dims, tokenizer
        vocabulary, the ids of the study's prompts); a mismatch raises PairMismatchError naming the first one."""
        b, f = (OmegaConf.to_container(self.member(m), resolve=True) for m in self.members)
        pair = load_pair(b, f)
        pair.check([e.render().text for e in task_examples(data_config(self.cfg, 50), pair.tokenizer)])
        del pair
        free_model()

    def run(self) -> dict[str, Any]:
        from etk.report.report import write_report

        specs = [get(step) for step in self.m.steps]
        for spec in specs:
            if spec.study is None:
                raise ConfigError(f"method {spec.name!r} has no study step; study steps: "
                                  + ", ".join(s for s in _study_steps()))
        self.validate_pair()
        with reuse_models(int(self.m.get("reuse_models", 0))):  # jobs of the same member share its loaded weights
            for spec in specs:
                for job in spec.study_jobs()(self):
                    self.run_job(spec, job)
        self.log.append(f"total compute time of the study's jobs: {self.seconds / 60:.1f} min")
        report = write_report(self.root, self.cfg, [s.name for s in specs], self.log)
        print(f"[etk] study of pair {self.cfg.pair.name}: {report}")
        for line in self.log:
            print(f"[etk]   {line}")
        return {"report": str(report), "log": self.log}


def _study_steps() -> Iterable[str]:
    from etk.methods.registry import REGISTRY

    return [n for n, s in REGISTRY.items() if s.study]


def _task_overrides() -> list[str]:
    """The command line's overrides of the running (study) job."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra
        return []


def run_study(cfg: DictConfig) -> dict[str, Any]:
    return Study(cfg).run()



