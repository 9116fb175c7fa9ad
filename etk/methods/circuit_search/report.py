"""Report section of `circuit_search`: the position-aware circuit of each model, its roles, and its overlap per role
between the members."""

from __future__ import annotations

from etk.circuits import load_circuit, overlap
from etk.data.roles import ROLE_VOCAB
from etk.metrics import fmt
from etk.report.context import ReportContext, Section
from etk.report.tables import markdown, with_ci


def section(ctx: ReportContext) -> Section | None:
    """The position-aware circuit of each model, its roles, and its overlap per role between the members."""
    search = {d.model: d for d in ctx.of("circuit_search")}
    if not search:
        return None
    lines = ["Units (head, position role) at every token role of the prompt, grown to a target faithfulness on a search "
             "split; faithfulness on held-out prompts, with the all-heads reference on the same prompts.", ""]
    rows, findings = [], []
    for name, d in search.items():
        f = with_ci(d, "faithfulness") if d.ci_low is not None else fmt(d.faithfulness)
        units = (f"{d.units_kept} of {d.units_total} ({100 * d.unit_fraction:.1f}%)"
                 if d.unit_fraction is not None else "")
        rows.append([f"`{name}`", f, fmt((d.all_heads or {}).get("faithfulness"), 2), units])
        if d.faithfulness is not None:
            roles = sorted(d.heads_per_role.items(), key=lambda kv: -kv[1])
            findings.append(f"**Position-aware circuit, `{name}`.** {d.units_kept} (head, position) units "
                            f"({100 * d.unit_fraction:.1f}% of them) keep {d.faithfulness:.2f} [{fmt(d.ci_low, 2)}, "
                            f"{fmt(d.ci_high, 2)}] on held-out prompts (all-heads reference "
                            f"{fmt(d.all_heads['faithfulness'], 2)}), with most heads at "
                            + ", ".join(f"{r} ({k})" for r, k in roles[:4]) + ".")
    lines += [markdown(["model", "held-out F [95% CI]", "all-heads reference", "units kept"], rows)]
    roles = sorted({r for d in search.values() for r in d.heads_per_role}, key=ROLE_VOCAB.index)
    lines += ["Heads kept per position role:", "",
              markdown(["role"] + [f"`{m}`" for m in search],
                       [[r] + [str(d.heads_per_role.get(r, 0)) for d in search.values()] for r in roles])]
    paths = {m: search[m].dir / "circuit.json" for m in (ctx.base, ctx.ft) if m in search}
    if len(paths) == 2 and all(p.exists() for p in paths.values()):
        ov = overlap(load_circuit(paths[ctx.base]), load_circuit(paths[ctx.ft]))
        lines += [f"Overlap per role (`{ctx.base}` ∩ `{ctx.ft}`):", "",
                  markdown(["role", "shared", f"`{ctx.base}`", f"`{ctx.ft}`"],
                           [[r, str(v["shared"]), str(v["size_a"]), str(v["size_b"])] for r, v in ov.items()])]
        findings.append(f"**Position-aware circuits compared.** {sum(v['shared'] for v in ov.values())} units are shared "
                        f"between `{ctx.base}` ({sum(v['size_a'] for v in ov.values())} units) and `{ctx.ft}` "
                        f"({sum(v['size_b'] for v in ov.values())} units).")
    for m, d in search.items():
        if (d.dir / "circuit.png").exists():
            lines += [f"`{m}`: ![position-aware circuit]({ctx.rel(d.dir)}/circuit.png)", ""]
    return Section("Position-aware circuits", lines, findings)
