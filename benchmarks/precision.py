"""What bf16 changes against the paper's fp32 on the same model and data: accuracy, and the Value-Fetcher and
Position-Transmitter path-patching scores (Spearman rank correlation, top-k overlap, largest difference).

    python benchmarks/precision.py [--model smollm2_tracker] [--prompts 300] [--pairs 20] [--device cpu|cuda]

Last line: acc_fp32=<a> acc_bf16=<b> vf_spearman=<r> pt_spearman=<r> vf_topk_overlap=<o> pt_topk_overlap=<o>
max_score_diff=<d>"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from etk.circuits import top_k  # noqa: E402
from etk.data.datasets import prompt_loader
from etk.interventions.components import all_heads  # noqa: E402
from etk.methods.path_patching.fast import fast_scores  # noqa: E402
from etk.methods.path_patching.stages import (  # noqa: E402
    discovery_schedule,
    pp_loader,
    reachable_layers,
    receivers_from,
    task_stages,
)
from etk.metrics import spearman  # noqa: E402
from etk.models.arch import LlamaFamily  # noqa: E402
from etk.models.forward import last_logits  # noqa: E402
from etk.models.loading import load_model  # noqa: E402
from etk.tasks import task_named
from etk.tasks.entity_tracking.data import task_examples  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


def measure(model, tok, data, pairs: int, schedule, device):
    """Accuracy and the VF, PT score maps of one model copy."""
    loader = prompt_loader(task_named("entity_tracking"), tok, task_examples(data, tok), 50)
    correct = []
    for b in loader:
        b = b.to(device)
        correct.append((last_logits(model, b).argmax(-1) == b.answer).float())
    acc = float(torch.cat(correct).mean())
    d = data.copy()
    with open_dict(d):
        d.n_examples = pairs
    batches = [b.to(device) for b in pp_loader(task_named("entity_tracking"), tok, task_examples(d, tok), 20, pairs)]
    dims = LlamaFamily.of(model).dims
    out, prev = {}, None
    for group in ("value_fetcher", "pos_transmitter"):
        st = task_stages(task_named("entity_tracking"))[group]
        rec = None if st.receiver_site is None else receivers_from(prev, st.receiver_site, dims)
        reach = reachable_layers(st, rec, dims.n_layers)
        senders = [h for h in all_heads(dims) if h.layer in reach]
        s = sum(fast_scores(model, b, st, rec, senders)[0].double() for b in batches) / pairs
        mask = torch.zeros(dims.n_layers, dims.n_heads, dtype=torch.bool)
        mask[reach] = True
        out[group] = (s.float().cpu(), mask)
        prev = top_k(s.float(), schedule["receivers_top_k"][group], mask)
    return acc, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_tracker")
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    res = {}
    for dtype in ("float32", "bfloat16"):
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("patching", overrides=[f"model={args.model}", f"model.dtype={dtype}"])
        model, tok = load_model(cfg.model, args.device)
        data = cfg.data.copy()
        with open_dict(data):
            data.n_examples = args.prompts
        schedule = discovery_schedule({}, cfg.model, LlamaFamily.of(model).dims, task_named("entity_tracking"))
        res[dtype] = measure(model, tok, data, args.pairs, schedule, args.device)
        del model
    (a32, s32), (a16, s16) = res["float32"], res["bfloat16"]
    print(f"model={args.model} device={args.device} prompts={args.prompts} pairs={args.pairs}")
    print(f"accuracy: fp32 {a32:.3f}, bf16 {a16:.3f}")
    line = {"acc_fp32": f"{a32:.3f}", "acc_bf16": f"{a16:.3f}"}
    worst = 0.0
    for group, short in (("value_fetcher", "vf"), ("pos_transmitter", "pt")):
        (x, mask), (y, _) = s32[group], s16[group]
        k = schedule["candidates_top_k"][group]
        rho = spearman(x[mask], y[mask])
        ov = len(set(top_k(x, k, mask)) & set(top_k(y, k, mask))) / k
        diff = float((x - y)[mask].abs().max())
        worst = max(worst, diff)
        print(f"{group}: Spearman {rho:.3f}, top-{k} overlap {ov:.2f}, max |score diff| {diff:.2e} "
              f"(largest |fp32 score| {float(x.abs().max()):.2e})")
        line[f"{short}_spearman"], line[f"{short}_topk_overlap"] = f"{rho:.3f}", f"{ov:.2f}"
    line["max_score_diff"] = f"{worst:.2e}"
    print(" ".join(f"{k}={v}" for k, v in line.items()))


if __name__ == "__main__":
    main()
