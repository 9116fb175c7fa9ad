"""A bottom-up 7B plan for `method=study_paper` on a 7B pair: an ESTIMATE, torch-free.

Per study step it counts the work in token-layer blocks (one token through one decoder layer) of each kernel kind:
plain forwards (sender chains at their o_proj+MLP share), path patching's receiver chunks, vital-only rows, DCM
forward+backward rows, and suffix rows on a prefix K/V (knockout, patched suffixes), plus Lightning loops and model
loads. Sizes come from conf/method/study_paper.yaml over study.yaml and each method's config; receiver and head layers
from the pair's discovery schedules and shipped circuits; positions from a 7-box prompt of T tokens. It counts twice,
by the rules of shared/reference/REVIEW-performance.md §1-3: "now" (before the exact savings) and "after" (with
them). Minutes = blocks x the per-block seconds that benchmarks/probe_7b.py measured on one 7B-shaped layer, or,
without a probe file, the review's assumed H100 figures (14 / 2.4 ms per 7B prompt forward in fp32 / TF32).

    python benchmarks/scale_plan.py [--probe outputs/probe_7b.json] [--pair llama_goat] [--tokens 55]
        [--ap-models [NAME ...]] [--no-ap-variants]     (`--ap-models --no-ap-variants`: the review's 48 AP jobs)"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
L, H, D, DFF = 32, 32, 4096, 11008  # Llama-7B
CHAIN = (D * D + 3 * D * DFF) / (4 * D * D + 3 * D * DFF)  # a sender-chain block: o_proj + MLP of one layer (0.75)
KINDS = {"plain": "plain", "receiver": "receiver_chunk", "vital": "vital_chunk", "dcm": "dcm_step",
         "knockout": "knockout_rows"}  # kind -> probe_7b kernel
GROUPS = {"value_fetcher": "last", "pos_transmitter": "last", "pos_detector": "query_label",
          "struct_reader": "prev_query_label"}  # entity tracking: each group's position role
VITAL = 3  # vital-only rows recompute last, query_label, prev_query_label
EDGES = ("last->correct_object", "last->query_label", "last->random", "query_label->prev_query_label",
         "query_label->random")  # the task's knockout edges
DESIDERATA, AP_DESIDERATA = ("object", "position", "label"), ("object", "position")
CMAP_CHOICE = (("value_fetcher", "object"), ("pos_transmitter", "position"), ("pos_detector", "position"))
ASSUMED = {"ms_per_F": {"fp32": 14.0, "tf32": 2.4},  # the review's H100 figures (no probe file)
           "load_s": 45.0, "move_s": 6.0, "loop_s": 1.0,  # per load (30-60 s), per PCIe round trip of 27 GB, per loop
           "val_distinct": 0.25,  # share of a DCM mask's 16 validations whose binary mask is new (memo misses)
           "active": 0.4,  # share of the prompt an active-token circuit-search evaluation recomputes
           "hyp_jobs": 4}  # positional-hypotheses jobs: the PT and PD position head sets of both members


def load(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


class Geometry:
    """Positions of a 7-box prompt of T tokens: BOS, 7 segments '... is in Box X,' (label 2 tokens before a segment's
    end), '. Box Q contains the' (query_label = T-3, last = T-1)."""

    def __init__(self, T: int, n_boxes: int = 7):
        self.T, self.n, self.F = T, n_boxes, T * L
        self.labels = [round((T - 5) / n_boxes * (i + 1)) - 2 for i in range(n_boxes)]
        self.pos = {"last": T - 1, "query_label": T - 3}

    def suffix(self, role: str, batch: int = 1, min_prefix: float = 0.0) -> float:
        """Tokens from the role's position to `last`: per prompt (batch 1: the mean over the queried box) or from the
        batch's earliest one; T (one plain forward) where that prefix is under min_prefix of the prompt."""
        if role in self.pos:
            return self.T - self.pos[role]
        if batch == 1:
            return sum(self.T - p for p in self.labels) / self.n
        n = self.n  # E[min label position over `batch` prompts]
        e = sum(p * (((n - i) / n) ** batch - ((n - i - 1) / n) ** batch) for i, p in enumerate(self.labels))
        return self.T if e < min_prefix * self.T else self.T - e


class Step:
    """Blocks per kind now / after, Lightning loops now / after, and the model each job loads (in run order)."""

    def __init__(self, name: str):
        self.name, self.now, self.after, self.loops, self.models = name, Counter(), Counter(), [0, 0], []
        self.note = ""

    def both(self, kind: str, blocks: float) -> None:
        self.now[kind] += blocks
        self.after[kind] += blocks

    def job(self, model: str, loops_now: int, loops_after: int) -> None:
        self.models.append(model)
        self.loops[0] += loops_now
        self.loops[1] += loops_after


def members(pair: str) -> dict:
    """{member: {model, circuit {group: [[layer, head]]}, recv, cand}} from conf/pair, conf/model, etk/data/circuits."""
    out = {}
    for d in load(CONF / "pair" / f"{pair}.yaml")["defaults"]:
        for key, model in (d.items() if isinstance(d, dict) else []):
            if key.startswith("/model@"):
                mc = load(CONF / "model" / f"{model}.yaml")
                path = ROOT / "etk" / "data" / "circuits" / f"{mc.get('circuit')}.json"
                if not path.exists():
                    raise SystemExit(f"scale_plan: {model} ships no circuit ({path}); the plan is for the 7B pairs")
                disc = mc["discovery"]
                out[key.split("@")[1]] = {"model": model, "circuit": json.loads(path.read_text()),
                                          "recv": disc["receivers_top_k"], "cand": disc["candidates_top_k"]}
    return out


def start_layer(mem: dict, owner: str, group: str) -> int:
    return min(lay for lay, _ in mem[owner]["circuit"][group])


def plan_work(study: dict, m: dict, geo: Geometry, mem: dict, extra_models: list[str]) -> list[Step]:
    """Every step's work, by the counting rules (`rules` prints them)."""
    F, T, plan, abl = geo.F, geo.T, study["plan"], int(study["ablation_prompts"])
    steps = {s: Step(s) for s in study["steps"]}
    M = list(mem)

    def ablation_job(s: Step, model: str, n: int, vital: int, full: int, loops=(2, 2)) -> None:
        """A mean-ablation job: means on the ablation prompts, one all-ablated background, full-forward and vital configs."""
        s.both("plain", (abl + n + full * n) * F)
        s.both("vital", vital * n * VITAL * L)
        s.job(model, *loops)

    s, n = steps["eval"], int(m["eval"]["n_examples"])
    for mb in M:
        s.both("plain", len(m["eval"]["box_counts"] or [7]) * n * F)
        s.job(mb, 1, 1)
    s, n = steps["path_patching"], int(m["path_patching"]["n_examples"])
    for mb, info in mem.items():
        s.job(mb, 4, 4)
        for recv, ts in ((None, 1), ("value_fetcher", 1), ("pos_transmitter", geo.suffix("query_label")),
                         ("pos_detector", geo.suffix("prev_query_label"))):
            s.both("plain", 2 * n * F)  # the clean and the corrupt cache forward
            if recv is None:  # direct effect: every head's position-local chain to the top
                s.both("plain", n * CHAIN * H * sum(L - lay for lay in range(L)))
                continue
            rl = sorted({lay for lay, _ in info["circuit"][recv][:int(info["recv"][recv])]})
            s.both("plain", n * CHAIN * H * sum(rl[-1] - lay for lay in range(rl[-1])))
            s.both("receiver", n * ts * H * sum(L - min(r for r in rl if r > lay) for lay in range(rl[-1])))
            s.now["plain"] += n * F  # now: _suffix_probs' second clean forward
    s, mm = steps["minimality"], m["minimality"]
    for mb, info in mem.items():
        k = {g: int(v) for g, v in info["cand"].items()}
        k["value_fetcher"] -= k["pos_transmitter"]  # PT removed from VF's candidates
        cfgs = sum(x * (x + 1) // 2 + 2 * x if mm["mode"] == "batched" else 3 * x + 1 for x in k.values())
        ablation_job(s, mb, int(mm["n_examples"]), cfgs, 0, (1 + 2 * len(k), 1 + 2))
    fm = m["faithfulness"]
    for _c in M:
        for mb in M:
            ablation_job(steps["faithfulness"], mb, int(fm["n_examples"]), int(fm["n_random"]) + 2, 1)
    cm, k = m["faithfulness_curve"], len(m["faithfulness_curve"]["fractions"])
    for mb in M:
        ablation_job(steps["faithfulness_curve"], mb, int(cm["n_examples"]), 1 + k + k * int(cm["n_random"]), 1)
    cp = m["completeness"]
    for mb in M:
        nk = int(cp["n_random"]) + len(GROUPS) + (2 if plan.get("split") and mb == "finetuned" else 0)
        ablation_job(steps["completeness"], mb, int(cp["n_examples"]), nk, nk)  # C \ K vital, M \ K full forwards

    s, c = steps["circuit_search"], m["circuit_search"]
    ns, nh, nv, nu = int(c["n_search"]), int(c["n_heldout"]), min(int(c["n_search"]), int(c["verify_prompts"])), int(c["n_verify"])
    rounds = 1 + int(c["grow_rounds"])
    for mb in M:
        s.both("plain", (abl + 2 * ns + nv + nh) * F)  # means, full model, backgrounds of the 3 splits
        s.both("dcm", rounds * int(c["steps"]) * ns * F)  # IG attribution (fwd+bwd), one pass per round
        s.both("plain", (nu * nv + nh) * F)  # removals from the full model; the full model held out
        s.both("vital", nh * VITAL * L)  # the all-heads reference
        part = (rounds * (int(c["grid_points"]) + int(c["refine_points"])) + int(c["prune_rounds"]) * int(c["prune_chunks"])) * ns
        part += nu * nv + (1 + int(c["n_random"])) * nh  # removals from the circuit; circuit + randoms held out
        s.now["plain"] += part * F
        s.after["vital"] += part * ASSUMED["active"] * F  # active tokens only (the vital kernel)
        s.job(mb, 3 + 3 * rounds + int(c["prune_rounds"]) + 2, 3 + 3 * rounds + int(c["prune_rounds"]) + 2)

    s, dm = steps["dcm"], m["dcm"]
    B = int(dm["batch_size"])
    n_steps = int(dm["epochs"]) * math.ceil(int(dm["n_train"]) / B)
    vals, ne, nt = n_steps // int(dm["val_every"]), int(dm["n_eval"]), int(dm["n_test"])
    fits: dict[tuple, list] = {}  # (owner, desideratum) -> [(group, start layer, part)]
    for owner in plan["dcm_members"]:
        for g in plan.get("dcm_groups") or GROUPS:
            if mem[owner]["circuit"].get(g):
                for d in plan.get("dcm_desiderata") or DESIDERATA:
                    fits.setdefault((owner, d), []).append((g, start_layer(mem, owner, g), None))
    for part in (("shared", "added") if plan.get("split") else ()):
        for g, d in plan.get("split_dcm") or CMAP_CHOICE:
            fits.setdefault(("finetuned", d), []).append((g, start_layer(mem, "finetuned", g), part))
    for (owner, d), masks in fits.items():
        for g, start, _ in masks:  # now: one job per mask; source and base prefix recomputed (CPU-sized RowCache)
            t = geo.suffix(GROUPS[g], B, 0.25)
            s.job(owner, 2, 0)
            if t == T:  # the batch's earliest SR label: one plain forward (+ backward), no prefix
                s.now["plain"] += (n_steps * B + 2 * (vals * ne + nt)) * F
                s.now["dcm"] += n_steps * B * F
            else:
                s.now["plain"] += 2 * (n_steps * B + vals * ne + nt) * F
                s.now["dcm"] += n_steps * B * t * (L - start)
                s.now["knockout"] += (vals * ne + nt) * t * (L - start)
        # after: one joint fit; frozen work once per pair; the masks of one role from their lowest layer, each row
        # from its own patched position; validations of a binary mask already scored are not run again
        own = sum(geo.suffix(GROUPS[g], 1) * (L - st) for g, st, _ in masks)
        s.after["plain"] += 2 * (int(dm["n_train"]) + ne + nt) * F  # source + clean rows once (test floor from them)
        s.after["dcm"] += n_steps * B * own
        s.after["knockout"] += (vals * ASSUMED["val_distinct"] * ne + nt) * own
        s.loops[1] += 2

    s, am = steps["activation_patching"], m["activation_patching"]
    n, R, B = int(am["n_examples"]), int(am["repeats"]), int(am["batch_size"])
    wanted = plan.get("ap_desiderata") or AP_DESIDERATA
    variants, models = plan.get("ap_variants") or {}, list(plan["ap_members"]) + extra_models
    sets = sorted((owner, g, d) for (owner, d), masks in fits.items() if d in wanted for g, _, p in masks if p is None)
    for owner, g, d in sets:  # now: one job per (head set, model, variant), one loop per repeat
        t = geo.suffix(GROUPS[g], B, 0.25)
        for model in models:
            for _v in [d, *variants.get(d, [])]:
                s.job(model, R, 0)  # source capture + unpatched base each repeat; selected and random set patched
                s.now["plain"] += n * R * (2 + (2 if t == T else 0)) * F
                s.now["knockout"] += 0 if t == T else n * R * 2 * t * L
    members_models = {mem[x]["model"] for x in plan["ap_members"] if x in mem}
    after_models = list(plan["ap_members"]) + [x for x in extra_models if x not in members_models]  # no repeats
    for model in after_models:  # after: one pass per (model, desideratum or variant), rows split at their own position
        for d in wanted:
            for _v in [d, *variants.get(d, [])]:
                s.after["plain"] += n * (1 + R) * F  # base once, one source capture per repeat
                s.after["knockout"] += n * R * sum(2 * geo.suffix(GROUPS[g]) * L for _, g, dd in sets if dd == d)
                s.loops[1] += 1
    s, n = steps["cmap"], int(m["cmap"]["n_examples"])
    for _j in range(len(plan["cmap_directions"]) + (2 if plan.get("split") else 0)):
        s.job("pair", 1, 1)
        s.both("plain", 2 * n * F)  # the source model's run and the target's unpatched run
        for role in [*GROUPS.values(), "prev_query_label"]:  # each group, then `all`
            t = geo.suffix(role, int(m["cmap"]["batch_size"]), 0.25)
            s.both("plain" if t == T else "knockout", n * t * L)
    steps["model_diff"].both("plain", 2 * int(m["model_diff"]["n_examples"]) * F)  # both members, captured
    steps["model_diff"].job("pair", 1, 1)
    s, km = steps["knockout"], m["knockout"]
    n, starts = int(km["n_examples"]), range(0, L, int(km["start_layers_every"]))
    for mb in M:
        s.job(mb, 1, 1)
        s.both("plain", n * F)  # the clean forward
        for e in km.get("edges") or EDGES:
            for st in starts:  # now: every position from the start layer; after: from the blocked query on
                s.now["plain"] += n * T * (L - st)
                s.after["knockout"] += n * geo.suffix(e.split("->")[0]) * (L - st)
    for mb in M:
        steps["attention_patterns"].both("plain", int(m["attention_patterns"]["n_examples"]) * F)
        steps["attention_patterns"].job(mb, 1, 1)
    s, pm = steps["positional_hypotheses"], m["positional_hypotheses"]
    n, probes = int(pm["n_examples"]), len(pm["variants"]) + len(pm["source_boxes"])
    for j in range(ASSUMED["hyp_jobs"]):
        t = geo.suffix(GROUPS[("pos_transmitter", "pos_detector")[j % 2]])
        s.job(M[j // 2 % len(M)], probes, probes)
        s.both("plain", n * probes * F)  # source captures
        s.both("knockout", n * probes * 2 * t * L)  # selected and random set patched
        s.now["plain"] += n * probes * F  # now: the base run per probe; after: once per job
        s.after["plain"] += n * F
    return list(steps.values())


def rules(study: dict, m: dict, geo: Geometry, ap_models: list[str]) -> list[str]:
    """The counting rules, with the sizes they read (one line per step)."""
    pp, mi, c, dm, am, km = (m[k] for k in ("path_patching", "minimality", "circuit_search", "dcm",
                                            "activation_patching", "knockout"))
    return [
        f"path patching (n={pp['n_examples']}/member): per stage 2 cache F; VF chains sum(L-l) per head; PT/PD/SR "
        f"chains to the deepest receiver + sum(L-start)*Ts receiver blocks (Ts 1/3/{geo.suffix('prev_query_label'):.1f}"
        "; receivers = first receivers_top_k heads of the shipped group); now +1 clean F per receiver stage",
        f"minimality (n={mi['n_examples']}, {mi['mode']}): sum n(n+1)/2+2n configs x {VITAL} vital tokens x L "
        "(n = candidates_top_k, VF minus PT) + means + background; loops 9 -> 3 (two rounds; dedup: no change batched)",
        "faithfulness/curve/completeness: means + background + full-model F + vital configs (completeness: M\K full F "
        f"per K); ablation_prompts={study['ablation_prompts']}",
        f"circuit search (search {c['n_search']}, held-out {c['n_heldout']}): IG (1+grow_rounds)*steps fwd+bwd F; "
        "grid+refine, prune, verify, held-out circuit/randoms full F now, active share after",
        f"DCM (n_train {dm['n_train']}, eval {dm['n_eval']} x 16 vals, test {dm['n_test']}, batch {dm['batch_size']}): now "
        "per job source+prefix F every step/val/test (SR: plain F+bwd) + suffix x (L-start); after one fit per "
        "(member, desideratum): frozen once, J masks from the fit's earliest position and layer, memoised vals",
        f"AP (n {am['n_examples']} x {am['repeats']} repeats, models {'/'.join(ap_models)}): now per job per repeat "
        "source+base F + 2 patched suffixes (batch-min; SR plain F); after one pass per (model, desideratum/variant): "
        "base once, source per repeat, every head set split at its own position",
        f"knockout (n {km['n_examples']}, {len(km.get('edges') or EDGES)} edges x every start layer): now T x (L-s) per "
        "config; after q..last only (1 token last->*, 3 query_label->*); + 1 clean F",
        "CMAP/model_diff/eval/attention/hypotheses: 2 F per prompt (pair), group suffixes (batch-min, SR plain); "
        "hypotheses: 11 probes, base per probe now, once after; loads: now one per model switch in job order, "
        "after one per model; moves: 2 PCIe crossings per loop now, 0 after",
    ]


def block_seconds(probe: dict | None, T: int) -> dict:
    """{precision: {kind: seconds per token-layer block}}."""
    if probe is None:
        return {p: {k: ms / 1e3 / (T * L) * (2 if k == "dcm" else 1) for k in KINDS} for p, ms in ASSUMED["ms_per_F"].items()}
    kern = probe["kernels"]
    return {p: {k: kern[v][p]["s_per_token_layer"] for k, v in KINDS.items()} for p in ("fp32", "tf32") if p in kern["plain"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", type=Path, default=ROOT / "outputs" / "probe_7b.json")
    ap.add_argument("--pair", default="llama_goat")
    ap.add_argument("--tokens", type=int, default=55, help="7-box prompt length T (Llama tokenizer)")
    ap.add_argument("--ap-models", nargs="*", default=None,
                    help="plan.ap_models whose weights are present (default: those that are the pair's own models)")
    ap.add_argument("--no-ap-variants", action="store_true", help="drop plan.ap_variants (the review's 48-job AP)")
    args = ap.parse_args()
    paper = load(CONF / "method" / "study_paper.yaml")
    paper.pop("defaults", None)
    study = OmegaConf.to_container(OmegaConf.merge(load(CONF / "method" / "study.yaml"), paper))
    m = {s: {**load(CONF / "method" / f"{s}.yaml"), **study.get(s, {})} for s in study["steps"]
         if (CONF / "method" / f"{s}.yaml").exists()}
    m["dcm"] = {**load(CONF / "dcm.yaml")["dcm"], **study["dcm"]}
    geo, mem = Geometry(args.tokens), members(args.pair)
    own = {info["model"] for info in mem.values()}
    extra = [x for x in study["plan"].get("ap_models") or [] if x in own] if args.ap_models is None else args.ap_models
    probe = json.loads(args.probe.read_text()) if args.probe.exists() else None
    sec = block_seconds(probe, args.tokens)
    cpu = probe is not None and probe.get("device_type") == "cpu"
    device = probe["device"] if probe else "assumed H100 (no probe file)"
    loop_s = probe["loop_round_trip"]["seconds"] if probe else ASSUMED["loop_s"]
    move_s = 0.0 if cpu else ASSUMED["move_s"]  # a CPU run moves nothing at teardown
    if args.no_ap_variants:
        study["plan"]["ap_variants"] = None
    steps = plan_work(study, m, geo, mem, extra)

    print(f"ESTIMATE: study_paper on {args.pair} ({', '.join(i['model'] for i in mem.values())}), bottom-up; device: {device}"
          + ("; CPU-measured blocks, so these are CPU hours for a 7B pair" if cpu else ""))
    print(f"  geometry: T={geo.T} (box labels at {geo.labels}, query_label T-3, last T-1), L={L}, H={H}; "
          f"1 F = T x L = {geo.F} blocks; sender chains at {CHAIN:.2f} of a plain block")
    used = {**ASSUMED, "loop_s": f"{loop_s:.2f}" + (" (probe)" if probe else ""), "move_s": move_s}
    print("  " + "; ".join(f"{k}={v}" for k, v in used.items() if k != "ms_per_F")
          + ("" if probe else f"; {ASSUMED['ms_per_F']['fp32']} / {ASSUMED['ms_per_F']['tf32']} ms per 7B F (fp32 / "
             "TF32), a dcm block 2x"))
    for line in rules(study, m, geo, list(study["plan"]["ap_members"]) + extra):
        print("  " + line)
    precs = list(sec)
    mins = lambda w, p: sum(b * sec[p][k] for k, b in w.items()) / 60  # noqa: E731
    head = f"{'step (est.)':<22}{'jobs':>5}{'blocks now':>12}{'after':>10}{'min now':>9}{'after':>8}"
    print(head + "".join(f"{'now ' + p:>10}{'after ' + p:>11}" for p in precs[1:]))
    tot = Counter()
    for s in steps:
        row = [mins(s.now, p) for p in precs] + [mins(s.after, p) for p in precs]
        tot.update({i: v for i, v in enumerate(row)})
        print(f"{s.name:<22}{len(s.models):>5}{sum(s.now.values()) / 1e6:>11.0f}M{sum(s.after.values()) / 1e6:>9.0f}M"
              f"{row[0]:>9.0f}{row[len(precs)]:>8.0f}" + "".join(f"{row[i]:>10.0f}{row[len(precs) + i]:>11.0f}"
                                                             for i in range(1, len(precs))))
    seq = [x for s in steps for x in s.models]
    loads_now = sum(1 for i, x in enumerate(seq) if i == 0 or x != seq[i - 1])
    loads_after = len(mem) + len(extra)
    loops = [sum(s.loops[i] for s in steps) for i in (0, 1)]
    over = [(loops[0] * (loop_s + move_s) + loads_now * ASSUMED["load_s"]) / 60,
            (loops[1] * loop_s + loads_after * ASSUMED["load_s"]) / 60]
    print(f"{'loops+moves, loads':<22}{'':>5}{loops[0]:>8} lp{loops[1]:>7} lp{over[0]:>9.0f}{over[1]:>8.0f}"
          + "".join(f"{over[0]:>10.0f}{over[1]:>11.0f}" for _ in precs[1:])
          + f"   ({loads_now} -> {loads_after} loads)")
    total = {p: (tot[i] + over[0], tot[len(precs) + i] + over[1]) for i, p in enumerate(precs)}
    print(f"{'total (h, est.)':<22}{'':>5}{'':>22}{total['fp32'][0] / 60:>9.2f}{total['fp32'][1] / 60:>8.2f}"
          + "".join(f"{total[p][0] / 60:>10.2f}{total[p][1] / 60:>11.2f}" for p in precs[1:]))
    print("blocks by kind (M, now -> after; s/block " + "/".join(precs) + "): " + "; ".join(
        f"{k} {sum(s.now[k] for s in steps) / 1e6:.0f} -> {sum(s.after[k] for s in steps) / 1e6:.0f} ("
        + "/".join(f"{sec[p][k]:.2g}" for p in precs) + ")" for k in KINDS))
    ap_now = sum(1 for s in steps if s.name == "activation_patching" for _ in s.models)
    print(f"note: activation patching runs {ap_now} jobs now (head sets x models x variants)"
          + (f"; {', '.join(sorted(set(extra) & own))} repeat the members' own jobs (after: skipped, the study plan "
             "leaves out plan.ap_models that are an AP member's model)" if set(extra) & own else ""))
    for s in steps:
        if s.note:
            print(f"note: {s.note}")
    tf = f" tf32 after={total['tf32'][1] / 60:.2f} h" if "tf32" in total else ""
    print(f"scale_plan: study_paper 7B now={total['fp32'][0] / 60:.2f} h after={total['fp32'][1] / 60:.2f} h{tf} "
          f"(device={device})")


if __name__ == "__main__":
    main()
