"""Small shared helpers for tests."""

from etk.data.boxes import generate_examples
from etk.data.datasets import pad_id, task_vocab
from etk.data.roles import collate, encode_example


def batch_of(tok, n=8, n_boxes=3, seed=0, padding_side="right", examples=None):
    if examples is None:
        objects, labels = task_vocab(tok, n_boxes)
        examples = generate_examples(n, n_boxes, objects, labels, seed)
    enc = [encode_example(tok, ex) for ex in examples]
    return collate(enc, pad_id(tok), padding_side), examples


def mixed_length_examples(tok, n=8, seed=0):
    """Prompts of different lengths (2..4 boxes) so padding is exercised."""
    out = []
    for nb in (2, 3, 4):
        objects, labels = task_vocab(tok, nb)
        out += generate_examples(n // 3 + 1, nb, objects, labels, seed + nb)
    return out[:n]


def planted_model(tok, head=2):
    """A tiny model with a planted one-head mechanism. Only head (1, head) writes to the residual (every other W_O
    and every MLP output is zero). Embeddings carry a constant feature (dim 0) and an is-object feature (dim 1);
    the head's query reads the constant and its key the object feature (in the slowest RoPE pair, so position
    barely matters), so at `last` it attends to the context objects; its OV circuit copies their identity into
    the logits, and the unembedding scores object tokens only. With one box it answers correctly, and the answer
    rests on that one head."""
    import torch

    from etk.data.vocab import load_objects, single_token_id
    from etk.models.arch import LlamaFamily
    from etk.models.tiny import tiny_llama

    m = tiny_llama(len(tok), n_layers=2, n_heads=4, n_kv_heads=2, d_model=128, seed=5)
    arch = LlamaFamily(m)
    D = arch.dims.head_dim
    g = head // arch.dims.group_size
    ids = [i for i in (single_token_id(tok, w) for w in load_objects()) if i is not None]
    is_obj = torch.zeros(arch.lm_head.weight.shape[0], dtype=torch.bool)
    is_obj[ids] = True
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        emb = arch.base.model.embed_tokens.weight
        emb.copy_(torch.randn(emb.shape, generator=gen))
        emb[:, 0] = 1.0
        emb[:, 1] = torch.where(is_obj, 3.0, 0.0)
        for j in range(2):
            arch.proj(j, "o_proj").weight.zero_()
            arch.mlp(j).down_proj.weight.zero_()
        q, k = arch.proj(1, "q_proj").weight, arch.proj(1, "k_proj").weight
        q.zero_()
        k.zero_()
        slow = D // 2 - 1  # the slowest-rotating RoPE pair
        q[head * D + slow, 0] = 60.0
        k[g * D + slow, 1] = 1.0
        v, o = arch.proj(1, "v_proj").weight, arch.proj(1, "o_proj").weight
        basis = torch.linalg.qr(torch.randn(128, D, generator=gen))[0]  # [d, D]
        v[g * D:(g + 1) * D] = basis.T * 8
        o[:, head * D:(head + 1) * D] = basis * 8
        o[:2] = 0  # the head never writes the constant / object features
        arch.lm_head.weight.copy_(emb * 4)
        arch.lm_head.weight[~is_obj] = 0
        arch.lm_head.weight[~is_obj, 0] = -100.0  # non-objects never win
    return m.eval()


def compose_cfg(primary: str, run_dir, overrides: list[str]):
    """Compose a primary config with a run directory, registered as the current Hydra config (so
    `${hydra:...}` and `output_dir()` resolve as under the real CLI)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from tests.conftest import CONF

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(primary, overrides=overrides + [f"hydra.run.dir={run_dir}"], return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg
