"""Model diffing on the same prompts, as a predict loop over both members of a pair: per (position role, layer,
head) the relative change of z and its cosine; per head its direct logit attribution (DLA) to the answer in each
model; per layer the logit lens' KL to the model's own output; per position role the KL between the members'
next-token distributions. Sums over prompts, all-reduced across processes."""

from __future__ import annotations

from typing import Any

import torch

from etk.data.roles import MEMBERS, PromptBatch
from etk.interventions.hooks import Capture, hooked
from etk.methods.base import PairHost
from etk.metrics import all_sum
from etk.models.arch import LlamaFamily
from etk.models.forward import assert_eval
from etk.models.pair import PairModels
from etk.models.partial import LayerInputs
from etk.tasks import collapsed_index, collapsed_roles


@torch.no_grad()
def member_run(model, batch: PromptBatch) -> dict[str, torch.Tensor]:
    """One forward of a member: z of every layer [L, B, T, H, D], the logits [B, T, V], the residual entering each
    layer and the final norm at `last` [L + 1, B, d] (index L = the final norm's input)."""
    arch = LlamaFamily.of(model)
    L = arch.dims.n_layers
    last = batch.roles["last"]
    b = torch.arange(len(batch), device=last.device)
    seen: dict[str, torch.Tensor] = {}

    def grab(mod, args):
        seen["final"] = args[0][b, last]

    handle = arch.final_norm.register_forward_pre_hook(grab)
    try:
        with LayerInputs(arch, last) as resid, hooked(model, captures=[Capture("z", j) for j in range(L)]) as zc:
            logits = arch.base(**batch.model_inputs(), use_cache=False).logits
    finally:
        handle.remove()
    return {"z": torch.stack([zc[("z", j)] for j in range(L)]),
            "logits": logits,
            "resid": torch.stack([resid[j] for j in range(L)] + [seen["final"]])}


def direct_logit_attribution(model, run: dict[str, torch.Tensor], batch: PromptBatch) -> torch.Tensor:
    """[B, L, H]: each head's output at `last` read by the answer's unembedding through the final RMSNorm's scale
    of the run itself (frozen): (w_norm * W_O^h z_h) . W_U[y] / rms(final residual)."""
    arch = LlamaFamily.of(model)
    d = arch.dims
    B = len(batch)
    b = torch.arange(B, device=batch.input_ids.device)
    norm = arch.final_norm
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    x = run["resid"][-1].float()  # [B, d] final residual at last
    rms = (x.pow(2).mean(-1) + eps).sqrt()  # [B]
    u = arch.lm_head.weight[batch.answer].float() * norm.weight.float()  # [B, d]
    out = torch.empty(B, d.n_layers, d.n_heads, device=x.device)
    for j in range(d.n_layers):  # one matmul per layer: u @ W_O -> [B, H*D]
        uw = (u @ arch.proj(j, "o_proj").weight.float()).view(B, d.n_heads, d.head_dim)
        out[:, j] = (run["z"][j][b, batch.roles["last"]].float() * uw).sum(-1) / rms[:, None]
    return out


def lens_kl(model, run: dict[str, torch.Tensor], batch: PromptBatch) -> torch.Tensor:
    """[B, L]: KL(final || read-out of the residual after layer l) at `last`, the read-out being the final norm and
    the unembedding applied to that residual (the logit lens)."""
    arch = LlamaFamily.of(model)
    b = torch.arange(len(batch), device=batch.input_ids.device)
    final = torch.log_softmax(run["logits"][b, batch.roles["last"]].float(), -1)  # [B, V]
    after = run["resid"][1:]  # [L, B, d]: the residual after layer l = the input of layer l+1 (or of the final norm)
    lens = torch.log_softmax(arch.lm_head(arch.final_norm(after)).float(), -1)  # [L, B, V]
    return (final.exp()[None] * (final[None] - lens)).sum(-1).T.clamp_min(0)  # [B, L]


class ModelDiffModule(PairHost):
    """Both members on the same prompts; per batch, the sums behind every per-(role, layer, head) delta."""

    def __init__(self, base_cfg: dict[str, Any], finetuned_cfg: dict[str, Any], toggle_adapter: bool = True,
                 pair: PairModels | None = None):
        super().__init__(base_cfg, finetuned_cfg, toggle_adapter, pair)
        self.totals: dict[str, torch.Tensor] = {}

    def on_predict_epoch_start(self) -> None:
        assert_eval(self.base_net)
        assert_eval(self.ft_net)
        self.totals = {}
        self.roles_of = collapsed_index().to(self.device)  # token role id -> its collapsed_roles() row

    def _add(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().double().cpu()
        self.totals[name] = self.totals[name] + v if name in self.totals else v

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> None:
        runs, dla, lens = {}, {}, {}
        for member in MEMBERS:
            with self.pair.use(member) as model:
                runs[member] = member_run(model, batch)
                dla[member] = direct_logit_attribution(model, runs[member], batch)  # [B, L, H]
                lens[member] = lens_kl(model, runs[member], batch)  # [B, L]
        zb, zf = runs["base"]["z"].float(), runs["finetuned"]["z"].float()  # [L, B, T, H, D]
        real = batch.token_roles >= 0  # [B, T]
        R = len(collapsed_roles())
        onehot = torch.zeros(*real.shape, R, device=real.device)  # [B, T, R]
        onehot[real] = torch.nn.functional.one_hot(self.roles_of[batch.token_roles[real]], R).float()
        rel = (zf - zb).norm(dim=-1) / zb.norm(dim=-1).clamp_min(1e-12)  # [L, B, T, H]
        cos = torch.nn.functional.cosine_similarity(zf, zb, dim=-1, eps=1e-12)  # [L, B, T, H]
        self._add("rel", torch.einsum("btr,lbth->rlh", onehot, rel))
        self._add("cos", torch.einsum("btr,lbth->rlh", onehot, cos))
        self._add("tokens", onehot.sum((0, 1)))  # [R]
        lp_b = torch.log_softmax(runs["base"]["logits"].float(), -1)
        lp_f = torch.log_softmax(runs["finetuned"]["logits"].float(), -1)
        kl = (lp_f.exp() * (lp_f - lp_b)).sum(-1).clamp_min(0)  # [B, T] KL(finetuned || base) per token
        self._add("token_kl", torch.einsum("btr,bt->r", onehot, kl))
        for member in MEMBERS:
            self._add(f"dla_{member}", dla[member].sum(0))
            self._add(f"lens_{member}", lens[member].sum(0))
        self._add("dla_abs_diff", (dla["finetuned"] - dla["base"]).abs().sum(0))
        self._add("prompts", torch.tensor(float(len(batch))))

    def gathered(self) -> dict[str, torch.Tensor]:
        """The means over every process's prompts: `rel`, `cos` [R, L, H] per token role (NaN where a role has no
        token), `token_kl` [R], `dla_*` [L, H], `lens_*` [L], `tokens` [R], `prompts`."""
        t = {k: all_sum(v) for k, v in self.totals.items()}
        n, tokens = float(t["prompts"]), t["tokens"]
        per_tok = tokens.clamp_min(1)
        nan_role = tokens == 0
        out = {"prompts": n, "tokens": tokens}
        for k in ("rel", "cos"):
            out[k] = (t[k] / per_tok[:, None, None]).masked_fill(nan_role[:, None, None], float("nan"))
        out["token_kl"] = (t["token_kl"] / per_tok).masked_fill(nan_role, float("nan"))
        for k in ("dla_base", "dla_finetuned", "dla_abs_diff", "lens_base", "lens_finetuned"):
            out[k] = t[k] / n
        return out

