"""`method=study pair=<p>`: the paper's whole argument for one model pair, step by step, then report.md.

Each step is a registered method (`etk.methods.registry`); `etk.study.plan` builds its jobs from the study's plan and
the typed results of earlier steps. Every job's config is composed through Hydra's compose API from the method's own
primary config, with the study's overrides (pair, data, seed, trainer, ...), the step's sizes (`method.<step>`) and the
job's own settings, so defaults lists and overrides apply exactly as on the command line. Results go to
`<run dir>/<step>/<job>/`; the study keeps its job graph — every (job, typed result) — and hands it to the report. A
rerun with the same `hydra.run.dir` skips every job whose results.json is valid for its method (resumable)."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from etk.artifacts import write_text
from etk.data.roles import MEMBERS
from etk.errors import ConfigError, DataError
from etk.methods.registry import REGISTRY, MethodSpec, get
from etk.models.loading import model_slots, reuse_models
from etk.models.pair import load_pair
from etk.results import Job, Result, member_circuit, select
from etk.runtime import (announce, barrier, compose, data_config, free_model, inside_study, output_dir, quiet_dependencies,
                         run_device, say, step_output, to_overrides)
from etk.study.plan import SPLIT_PARTS, STEP_JOBS
from etk.study.progress import StudyProgress, member_order
from etk.study.report import write_report
from etk.tasks import task_of

INHERITED = ("pair", "task=", "task.", "data.", "seed=", "trainer.", "ablation.")  # study overrides every job inherits


def inherited_overrides(cfg: DictConfig) -> list[str]:
    """The running command line's overrides that every job of a study inherits (pair, task, data, seed, ...)."""
    return [o for o in _task_overrides() if o.startswith(INHERITED)] + [f"seed={cfg.seed}"]


class Study:
    def __init__(self, cfg: DictConfig, root: Path | None = None, inherited: list[str] | None = None):
        """The study of `cfg` (a composed `method=study` config) writing into `root` (default: the run's folder);
        its jobs inherit `inherited` (default: the command line's pair/task/data/seed/trainer/ablation overrides)."""
        self.cfg, self.m, self.root = cfg, cfg.method, Path(root) if root is not None else output_dir()
        self.log: list[str] = []
        self.seconds = 0.0  # compute time of all jobs, including those finished by an earlier run
        self.inherited = list(inherited) if inherited is not None else inherited_overrides(cfg)
        self.graph: list[tuple[Job, Result]] = []  # every job run (or found done) so far, with its result
        self.split_paths: dict[str, str] = {}  # part of the fine-tuned circuit -> its circuit file (`split_circuit`)
        self.last_member: str | None = None  # the member the last job ran on (the next step starts with it)
        self.progress = StudyProgress()

    # -- what the plan's job functions read -------------------------------------------------------------------
    def member(self, member: str) -> DictConfig:
        """The member's model config (pair.base / pair.finetuned)."""
        return self.cfg.pair[member]

    @property
    def plan(self) -> DictConfig:
        return self.m.plan

    @property
    def task(self):
        """The study's task (`etk.tasks.Task`)."""
        return task_of(self.cfg)

    def sizes(self, step: str, prefix: str = "method") -> list[str]:
        """The step's block of the study config as overrides of the method's config."""
        block = self.m.get(step)
        return to_overrides(prefix, block) if block else []

    def ablation(self) -> list[str]:
        return [f"ablation.n_prompts={int(self.m.ablation_prompts)}"]

    def dir(self, step: str, name: str = "") -> Path:
        return self.root / step / name if name else self.root / step

    def results(self, step: str, **match: Any) -> list[tuple[Job, Result]]:
        """The (job, result) pairs of a step so far, in run order; `match` filters on Job fields."""
        return select(self.graph, step, **match)

    def result(self, step: str, **match: Any) -> Result | None:
        """The first result of a step whose job matches, or None."""
        found = self.results(step, **match)
        return found[0][1] if found else None

    def circuit_path(self, member: str) -> str:
        """The member's circuit: minimality's pruned circuit, or path patching's candidates when the study skips
        minimality."""
        path = member_circuit(self.graph, member)
        if path is not None:
            return str(path)
        raise ConfigError(f"the study has no circuit of the {member} member: run path_patching (and minimality) "
                          "before the steps that use circuits")

    def split_circuit(self, part: str) -> str:
        """The fine-tuned circuit's `part`: `shared` (its heads the base circuit has in the same group) or `added`
        (the rest), written once per run to `<run dir>/circuits/<part>.json` from the two members' circuits."""
        from etk.circuits import load_circuit

        if part not in SPLIT_PARTS:
            raise ConfigError(f"unknown part {part!r} of the fine-tuned circuit: {', '.join(SPLIT_PARTS)}")
        if part not in self.split_paths:
            ft, base = (load_circuit(self.circuit_path(m)) for m in ("finetuned", "base"))
            circuit = ft.intersect(base) if part == "shared" else ft.minus(base)
            path = self.root / "circuits" / f"{part}.json"
            circuit.save(path)  # rank 0 writes; every process reads it after the barrier
            barrier()
            self.split_paths[part] = str(path)
        return self.split_paths[part]

    def available_models(self, names: list[str], step: str) -> list[str]:
        """The model configs among `names` whose weights are on this machine; each missing one noted with why."""
        from etk.models.loading import missing_weights

        out = []
        for name in names:
            why = missing_weights(compose("patching", [f"model={name}", "logger=none"]).model)
            if why:
                self.note(f"{step}: model {name} skipped: {why}")
            else:
                out.append(name)
        return out

    def note(self, line: str) -> None:
        self.log.append(line)

    # -- running ----------------------------------------------------------------------------------------------
    def compose(self, spec: MethodSpec, job: Job) -> DictConfig:
        """The job's config, composed and validated (before any model is loaded)."""
        from etk.validate import validate

        head = [f"method={spec.name}"] if spec.entry == "patching" else []
        quiet = ["trainer.enable_progress_bar=false"]  # the study prints one line per job (`StudyProgress`)
        sub = compose(spec.entry, head + quiet + self.inherited + list(job.overrides) + ["logger=none"])
        validate(sub)
        return sub

    def done_result(self, spec: MethodSpec, job: Job) -> Result | None:
        """The job's valid result from an earlier run (noted and counted), or None when it must run."""
        folder = self.dir(job.step, job.name)
        try:
            result = spec.result.load(folder)
        except DataError:  # not run yet, interrupted, or written by another method: run it
            return None
        timing = folder / "job_seconds.json"
        earlier = json.loads(timing.read_text())["seconds"] if timing.exists() else None
        self.log.append(f"{job.step}/{job.name}: done earlier" + (f" ({earlier:.0f} s), skipped" if earlier else ", skipped"))
        self.seconds += earlier or 0.0
        self.progress.done(job, None)
        return result

    def run_jobs(self, spec: MethodSpec, jobs: list[Job], subs: list[DictConfig]) -> list[Result]:
        """Run jobs (one, or several of one `batch_key` as one pass) in their folders; their results. A batch's time
        is shared equally among its jobs."""
        folders = [self.dir(j.step, j.name) for j in jobs]
        t0 = time.time()
        with job_console(folders[0]):  # the method's own printed lines go to the job's job.log, not the console
            if len(jobs) > 1:
                spec.run_batch(list(zip(subs, folders)))
            else:
                with step_output(folders[0]):
                    spec.run(subs[0])
        barrier()  # in a distributed run rank 0 writes the results; every rank reads them after this
        free_model()
        dt = (time.time() - t0) / len(jobs)
        together = f" (one pass with {len(jobs) - 1} other job(s), time shared)" if len(jobs) > 1 else ""
        out = []
        for job, folder in zip(jobs, folders):
            write_text(folder / "job_seconds.json", json.dumps({"seconds": round(dt, 1)}))
            self.seconds += dt
            self.log.append(f"{job.step}/{job.name}: {dt:.0f} s{together}")
            self.progress.done(job, dt)
            out.append(spec.result.load(folder))
        return out

    def run_job(self, spec: MethodSpec, job: Job) -> Result:
        """Run one job in its folder unless a valid result is already there; record it in the job graph."""
        done = self.done_result(spec, job)
        result = done if done is not None else self.run_jobs(spec, [job], [self.compose(spec, job)])[0]
        self.graph.append((job, result))
        return result

    def run_step(self, step: str, index: int, n_steps: int) -> None:
        """Run a step's jobs grouped by the model they load (`member_order`), jobs that share frozen work as one pass
        (`MethodSpec.batch_key`), and record them in the job graph in the plan's order (what the report and later
        steps read does not depend on the run order)."""
        spec = REGISTRY[step]
        jobs = STEP_JOBS[step](self)
        self.progress.start_step(step, index, n_steps, len(jobs), list(self.m.steps))
        done: dict[int, Result] = {}
        pending: dict[str | int, list[tuple[int, DictConfig]]] = {}  # batch key (or the job's index) -> jobs
        for i in member_order(jobs, self.last_member):
            found = self.done_result(spec, jobs[i])
            if found is not None:
                done[i] = found
                continue
            sub = self.compose(spec, jobs[i])
            key = spec.batch_key(sub) if spec.batch_key and spec.run_batch else None
            pending.setdefault(i if key is None else key, []).append((i, sub))
        for group in pending.values():
            idx = [i for i, _ in group]
            for i, result in zip(idx, self.run_jobs(spec, [jobs[i] for i in idx], [sub for _, sub in group])):
                done[i] = result
            self.last_member = jobs[idx[-1]].member or self.last_member
        self.graph.extend((job, done[i]) for i, job in enumerate(jobs))

    def validate_pair(self) -> None:
        """Before any work: the two members must be comparable head by head (architecture, dims, tokenizer
        vocabulary, the ids of the study's prompts); a mismatch raises PairMismatchError naming the first one."""
        b, f = (OmegaConf.to_container(self.member(m), resolve=True) for m in MEMBERS)
        pair = load_pair(b, f)
        task = task_of(self.cfg)
        pair.check([task.text(e) for e in task.examples(data_config(self.cfg, 50), pair.tokenizer)])
        del pair
        free_model()

    def run(self) -> dict[str, Any]:
        steps = list(self.m.steps)
        for step in steps:
            get(step)  # an unknown method: a ConfigError naming the methods
            if step not in STEP_JOBS:
                raise ConfigError(f"method {step!r} has no study step; study steps: {', '.join(STEP_JOBS)}")
        quiet_dependencies()
        self.validate_pair()
        announce(self.cfg)
        slots = model_slots(self.m.get("reuse_models", "auto"), [self.member(m) for m in MEMBERS], run_device(self.cfg))
        self.note(f"models kept loaded between jobs: {slots}")
        with inside_study(self.cfg.pair.name), reuse_models(slots):  # jobs of a member share its loaded weights
            for i, step in enumerate(steps):
                self.run_step(step, i + 1, len(steps))
        self.log.append(f"total compute time of the study's jobs: {self.seconds / 60:.1f} min")
        report = write_report(self.root, self.cfg, steps, self.graph, self.log)
        say(f"[etk] study of pair {self.cfg.pair.name}: {report}")
        for line in self.log:
            say(f"[etk]   {line}", console=not line.startswith(tuple(f"{s}/" for s in steps)))  # job lines: printed already
        return {"report": str(report), "log": self.log}


@contextmanager
def job_console(folder: Path):
    """Inside the block, what the job prints goes to `<folder>/job.log` (a study's console keeps one line per job);
    errors still reach the console (stderr)."""
    import os
    import sys
    from contextlib import redirect_stdout

    from etk.artifacts import is_main_process

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "job.log" if is_main_process() else os.devnull, "a") as f, redirect_stdout(f):
        try:
            yield
        finally:
            sys.stdout.flush()


def _task_overrides() -> list[str]:
    """The command line's overrides of the running (study) job."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra
        return []


def run_study(cfg: DictConfig) -> dict[str, Any]:
    return Study(cfg).run()
