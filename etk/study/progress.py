"""What a running study tells its user: one line per job (step, index of the step's jobs, the job, its time, the
study's elapsed time and an estimate of what is left), and the order in which a step's jobs load their models."""

from __future__ import annotations

import time

from etk.data.roles import MEMBERS
from etk.results import Job
from etk.runtime import say

# Seconds of each step of the embedded study (`make run`, 2 CPU cores, 2026-12-08): the weights of the estimate of
# what is left (a study of another pair or size scales them by its own pace so far; steps not listed weigh one minute).
STEP_SECONDS = {
    "eval": 44, "path_patching": 232, "minimality": 93, "faithfulness": 61, "faithfulness_curve": 53,
    "circuit_search": 203, "dcm": 164, "activation_patching": 32, "cmap": 70, "model_diff": 13, "knockout": 13,
    "completeness": 74, "attention_patterns": 14, "causal_impact": 1, "positional_hypotheses": 79,
}


def member_order(jobs: list[Job], first: str | None) -> list[int]:
    """Indices of `jobs` grouped by the model they load: `first`'s jobs (the member the previous step ended on, so
    a study that keeps one model loaded does not reload it), then pair jobs, then the other member's, then other
    models' (each model's jobs together, in plan order)."""
    members = [first] + [m for m in MEMBERS if m != first] if first in MEMBERS else list(MEMBERS)
    rank = {members[0]: 0, None: 1, **{m: 2 + i for i, m in enumerate(members[1:])}}
    others = sorted({j.member for j in jobs if j.member not in rank}, key=[j.member for j in jobs].index)
    rank.update({m: 2 + len(members) + i for i, m in enumerate(others)})
    return sorted(range(len(jobs)), key=lambda i: (rank[jobs[i].member], i))


def clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class StudyProgress:
    """Prints `[etk] [step 7/15 dcm 3/12] finetuned-pos_transmitter-position: 24 s | elapsed 12:31 | left ≈ 18:00`
    after each job. The estimate: the current step's remaining jobs at its mean job time, plus the later steps
    weighted by `STEP_SECONDS` at the pace of the steps done so far."""

    def __init__(self, steps: list[str] | None = None):
        self.t0 = time.time()
        self.steps = list(steps or [])
        self.step, self.index, self.n_steps, self.n_jobs, self.k = "", 0, 0, 0, 0
        self.step_seconds = 0.0  # run time of this step's jobs run so far (not those found done)
        self.step_run = 0
        self.done_weight = 0.0  # STEP_SECONDS of the steps finished so far
        self.done_seconds = 0.0  # their measured seconds

    def start_step(self, step: str, index: int, n_steps: int, n_jobs: int, steps: list[str] | None = None) -> None:
        if self.step and self.n_jobs:  # jobs found done earlier carry no weight (their time is not in the pace)
            self.done_weight += STEP_SECONDS.get(self.step, 60) * self.step_run / self.n_jobs
            self.done_seconds += self.step_seconds
        self.steps = list(steps or self.steps)
        self.step, self.index, self.n_steps, self.n_jobs, self.k = step, index, n_steps, n_jobs, 0
        self.step_seconds, self.step_run = 0.0, 0
        if n_jobs == 0:
            say(f"[etk] [step {index}/{n_steps} {step}] no jobs")

    def left(self) -> float | None:
        """Seconds left (estimate), or None before any job has run."""
        if not self.step_run or not self.n_jobs:
            return None
        in_step = self.step_seconds / self.step_run * (self.n_jobs - self.k)
        later = sum(STEP_SECONDS.get(s, 60) for s in self.steps[self.index:])
        done_w = self.done_weight + STEP_SECONDS.get(self.step, 60) * self.step_run / max(self.n_jobs, 1)
        pace = (self.done_seconds + self.step_seconds) / done_w if done_w else 1.0
        return in_step + later * pace

    def done(self, job: Job, seconds: float | None) -> None:
        self.k += 1
        if seconds is not None:
            self.step_seconds += seconds
            self.step_run += 1
        took = f"{seconds:.0f} s" if seconds is not None else "done earlier"
        left = self.left()
        eta = f" | left ≈ {clock(left)}" if left is not None else ""
        where = (f"step {self.index}/{self.n_steps} {self.step} {self.k}/{self.n_jobs}" if self.n_jobs
                 else f"{job.step} {self.k}")  # a job run outside the study's steps (e.g. study_tasks' specificity)
        say(f"[etk] [{where}] {job.name}: {took} | elapsed {clock(time.time() - self.t0)}{eta}")
