"""The study's job graph: for each step, the jobs it runs, built from the study's plan and the typed results of
earlier steps (never from folder names). Each function is `(study) -> list[Job]`; `STEP_JOBS` maps step -> it."""

from __future__ import annotations

from typing import Any, Callable, Protocol

from etk.data.roles import MEMBERS
from etk.results import SPLIT_PARTS, Job, Result
from etk.runtime import hydra_value


class Study(Protocol):
    """What a step's job function reads of the running study (`etk.study.run.Study`)."""

    plan: Any  # the study config's `plan` block
    task: Any  # the study's task (etk.tasks.Task): its groups, desiderata and CMAP head choice

    def member(self, member: str) -> Any: ...
    def sizes(self, step: str, prefix: str = "method") -> list[str]: ...
    def ablation(self) -> list[str]: ...
    def results(self, step: str, **match: Any) -> list[tuple[Job, Result]]: ...
    def result(self, step: str, **match: Any) -> Any: ...
    def circuit_path(self, member: str) -> str: ...
    def split_circuit(self, part: str) -> str: ...
    def available_models(self, names: list[str], step: str) -> list[str]: ...
    def note(self, line: str) -> None: ...


def split_parts(study: Study) -> tuple[str, ...]:
    """The parts of the fine-tuned circuit the study runs CMAP, DCM and completeness on (`plan.split`)."""
    return SPLIT_PARTS if study.plan.get("split") else ()


def per_member(study: Study, step: str, *extra: str) -> list[Job]:
    """One job per member: `model=<member>`, `extra` overrides, the step's sizes."""
    return [Job(step, m, (f"model={m}", *extra, *study.sizes(step)), member=m) for m in MEMBERS]


def eval_jobs(study: Study) -> list[Job]:
    """Accuracy of both members."""
    return per_member(study, "eval")


def path_patching_jobs(study: Study) -> list[Job]:
    """Circuit discovery on both members (their candidate sets)."""
    return per_member(study, "path_patching")


def minimality_jobs(study: Study) -> list[Job]:
    """The paper's construction: each member's candidates pruned at its model's threshold
    (`discovery.minimality_threshold`); the pruned circuit is what later steps use."""
    jobs = []
    for m in MEMBERS:
        threshold = (study.member(m).get("discovery") or {}).get("minimality_threshold", 0.01)
        pp = study.result("path_patching", member=m)
        jobs.append(Job("minimality", m, (f"model={m}", f"circuit.path={pp.dir / 'circuit.json'}",
                                          f"method.threshold={threshold}", *study.sizes("minimality"), *study.ablation()),
                        member=m, circuit_of=m, reads=(("path_patching", m),)))
    return jobs


def faithfulness_jobs(study: Study) -> list[Job]:
    """Each member's circuit on each member: the cross-model faithfulness matrix."""
    return [Job("faithfulness", f"{c}_circuit-on-{m}", (f"model={m}", f"circuit.path={study.circuit_path(c)}",
                                                         *study.sizes("faithfulness"), *study.ablation()),
                member=m, circuit_of=c) for c in MEMBERS for m in MEMBERS]


def curve_jobs(study: Study) -> list[Job]:
    """Each member's curve from its own path-patching scores."""
    return [Job("faithfulness_curve", m, (f"model={m}", f"scores={study.result('path_patching', member=m).dir}",
                                          *study.sizes("faithfulness_curve"), *study.ablation()),
                member=m, reads=(("path_patching", m),)) for m in MEMBERS]


def search_jobs(study: Study) -> list[Job]:
    """Each member's position-aware circuit."""
    return per_member(study, "circuit_search", *study.ablation())


def dcm_jobs(study: Study) -> list[Job]:
    """A mask per (member in plan.dcm_members, group with heads in its circuit, desideratum); groups and desiderata
    default to the task's (`plan.dcm_groups` / `plan.dcm_desiderata` null)."""
    from etk.circuits import load_circuit

    jobs = []
    for owner in study.plan.dcm_members:
        path = study.circuit_path(owner)
        circuit = load_circuit(path)
        for group in (study.plan.dcm_groups or study.task.group_names):
            if not circuit.groups.get(group):
                continue
            for d in (study.plan.dcm_desiderata or study.task.study_desiderata):
                jobs.append(Job("dcm", f"{owner}-{group}-{d}", (f"model={owner}", f"circuit.path={path}", f"group={group}",
                                                               f"desideratum={d}", *study.sizes("dcm", "dcm")),
                                member=owner, circuit_of=owner, group=group, desideratum=d))
    return jobs + split_dcm_jobs(study)


def split_dcm_jobs(study: Study) -> list[Job]:
    """With `plan.split`: a mask over the shared and over the added heads of a fine-tuned group, for each (group,
    desideratum) of `plan.split_dcm` (null = the task's CMAP choice: the functionality each group is known for)."""
    from etk.circuits import load_circuit

    jobs = []
    for part in split_parts(study):
        path = study.split_circuit(part)
        circuit = load_circuit(path)
        for group, d in (study.plan.get("split_dcm") or study.task.cmap_choice):
            if circuit.groups.get(group):
                jobs.append(Job("dcm", f"finetuned-{part}-{group}-{d}",
                                ("model=finetuned", f"circuit.path={path}", f"group={group}", f"desideratum={d}",
                                 *study.sizes("dcm", "dcm")),
                                member="finetuned", circuit_of="finetuned", group=group, desideratum=d, part=part))
            else:
                study.note(f"dcm/finetuned-{part}-{group}-{d}: the fine-tuned {group} has no {part} heads, no mask")
    return jobs


def activation_patching_jobs(study: Study) -> list[Job]:
    """Every DCM head set of plan.ap_desiderata patched inside each member of plan.ap_members and each model of
    plan.ap_models whose weights are there (the paper's 4-model matrix); a head set of a desideratum listed in
    plan.ap_variants also under each of its variants (the paper's 11 positional variants)."""
    wanted = set(study.plan.ap_desiderata or study.task.study_ap_desiderata or study.plan.dcm_desiderata
                 or study.task.study_desiderata)
    members = {str(study.member(m).name): m for m in study.plan.ap_members}  # model config name -> member
    extra = []
    for name in list(study.plan.get("ap_models") or []):
        if name in members:  # the pair's own model: its member's jobs already patch it
            study.note(f"activation_patching: model {name} is the {members[name]} member, patched there once")
        else:
            extra.append(name)
    models = [(m, m) for m in study.plan.ap_members] + [(None, name) for name in study.available_models(
        extra, "activation_patching")]
    variants = dict(study.plan.get("ap_variants") or {})
    jobs = []
    for dj, res in sorted(study.results("dcm", part=None), key=lambda jr: jr[0].name):  # whole-group masks, by name
        if dj.desideratum not in wanted:
            continue
        if not res.selected_heads:
            study.note(f"activation_patching/{dj.name}: DCM selected no heads, nothing to patch")
            continue
        for member, model in models:
            for d in [dj.desideratum, *variants.get(dj.desideratum, [])]:
                name = f"{dj.name}-in-{model}" if d == dj.desideratum else f"{dj.name}-{d}-in-{model}"
                extra = () if d == dj.desideratum else (f"method.desideratum={d}",)
                jobs.append(Job("activation_patching", name,
                                (f"model={model}", f"method.heads={res.dir / 'results.json'}", *extra,
                                 *study.sizes("activation_patching")),
                                member=member, circuit_of=dj.member, group=dj.group, desideratum=d,
                                reads=(("dcm", dj.name),)))
    return jobs


def cmap_jobs(study: Study) -> list[Job]:
    """The fine-tuned circuit patched across the pair in each direction, with the task's head choice (entity tracking:
    the paper's, SPEC §6.1: DCM selections for VF (object value), PT and PD (positional), all SR heads)."""
    choice = set(study.task.cmap_choice)
    chosen = [(dj, res) for dj, res in sorted(study.results("dcm", member="finetuned", part=None),
                                              key=lambda jr: jr[0].name) if (dj.group, dj.desideratum) in choice]
    runs = hydra_value([str(res.dir / "results.json") for _, res in chosen])
    jobs = [Job("cmap", d, (f"circuit.path={study.circuit_path('finetuned')}", f"method.direction={d}",
                            f"method.dcm_runs={runs}", *study.sizes("cmap")),
                circuit_of="finetuned", direction=d, reads=tuple(("dcm", dj.name) for dj, _ in chosen))
            for d in study.plan.cmap_directions]
    # the shared/added split: each part's whole groups patched forward, on the same prompts as the main forward run
    # (its shares of the gap are measured against the same source and target; the parts' shares need not add up)
    jobs += [Job("cmap", f"forward-{part}", (f"circuit.path={study.split_circuit(part)}", "method.direction=forward",
                                              *study.sizes("cmap")),
                 circuit_of="finetuned", direction="forward", part=part) for part in split_parts(study)]
    return jobs


def model_diff_jobs(study: Study) -> list[Job]:
    """The pair diffed on the study's prompts, beside the forward CMAP's shares of the gain."""
    fwd = study.result("cmap", direction="forward", part=None)
    extra = (f"method.cmap_run={fwd.dir / 'results.json'}",) if fwd is not None else ()
    return [Job("model_diff", "pair", (f"circuit.path={study.circuit_path('finetuned')}", *extra,
                                       *study.sizes("model_diff")),
                circuit_of="finetuned", reads=(("cmap", "forward"),) if fwd is not None else ())]


def knockout_jobs(study: Study) -> list[Job]:
    """Knockout curves of both members."""
    return per_member(study, "knockout")


def completeness_jobs(study: Study) -> list[Job]:
    """Each member's circuit on its own model; the fine-tuned one also with K = its shared and its added heads."""
    jobs = []
    for m in MEMBERS:
        named = [study.split_circuit(p) for p in split_parts(study)] if m == "finetuned" else []
        extra = (f"method.k_circuits={hydra_value(named)}",) if named else ()
        jobs.append(Job("completeness", m, (f"model={m}", f"circuit.path={study.circuit_path(m)}", *extra,
                                            *study.sizes("completeness"), *study.ablation()),
                        member=m, circuit_of=m))
    return jobs


def attention_patterns_jobs(study: Study) -> list[Job]:
    """Where each member's circuit heads look (the paper's Fig. 1)."""
    return [Job("attention_patterns", m, (f"model={m}", f"circuit.path={study.circuit_path(m)}",
                                          *study.sizes("attention_patterns")), member=m, circuit_of=m)
            for m in MEMBERS]


def positional_hypotheses_jobs(study: Study) -> list[Job]:
    """Each DCM head set of a desideratum in plan.hypotheses_desiderata (null = the task's; entity tracking:
    position) that carries it (its test interval above the unpatched floor), scored against the positional
    hypotheses in the member it came from; none for a task without them."""
    from etk.methods.dcm.report import encodes

    wanted = set(study.plan.get("hypotheses_desiderata") or study.task.hypotheses_desiderata)
    jobs = []
    for dj, res in sorted(study.results("dcm", part=None), key=lambda jr: jr[0].name):
        if dj.desideratum in wanted and encodes(res):
            jobs.append(Job("positional_hypotheses", dj.name, (f"model={dj.member}", f"method.heads={res.dir / 'results.json'}",
                                                              *study.sizes("positional_hypotheses")),
                            member=dj.member, circuit_of=dj.member, group=dj.group, desideratum=dj.desideratum,
                            reads=(("dcm", dj.name),)))
    return jobs


def causal_impact_jobs(study: Study) -> list[Job]:
    """The fine-tuned circuit's heads scored by path patching in both members (no model is loaded)."""
    pp = {m: study.result("path_patching", member=m) for m in MEMBERS}
    if any(r is None for r in pp.values()):
        study.note("causal_impact: needs both members' path patching; skipped")
        return []
    return [Job("causal_impact", "pair", (f"circuit.path={study.circuit_path('finetuned')}",
                                          f"method.base_circuit={study.circuit_path('base')}",
                                          f"method.finetuned_scores={pp['finetuned'].dir}",
                                          f"method.base_scores={pp['base'].dir}"),
                circuit_of="finetuned", reads=(("path_patching", "base"), ("path_patching", "finetuned")))]


STEP_JOBS: dict[str, Callable[[Study], list[Job]]] = {
    "eval": eval_jobs, "path_patching": path_patching_jobs, "minimality": minimality_jobs,
    "faithfulness": faithfulness_jobs, "faithfulness_curve": curve_jobs, "circuit_search": search_jobs,
    "dcm": dcm_jobs, "activation_patching": activation_patching_jobs, "cmap": cmap_jobs,
    "model_diff": model_diff_jobs, "knockout": knockout_jobs, "completeness": completeness_jobs,
    "attention_patterns": attention_patterns_jobs, "causal_impact": causal_impact_jobs,
    "positional_hypotheses": positional_hypotheses_jobs,
}
