"""A tiny random-init Llama and a locally built tokenizer, created offline in well under a second (for tests), and
tiny Llamas with a planted, known mechanism (ground truth for circuit methods)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from etk.data.vocab import LETTERS, load_objects, load_words
from etk.errors import ConfigError

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def tiny_tokenizer(extra_words: tuple[str, ...] = (), bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the task's words: every shipped object and letter is one token (with the
    leading space), unseen words split into several tokens, and BOS is prepended like Llama's tokenizer."""
    words = (load_objects("objects.csv") + load_objects("objects_train.csv") + list(LETTERS)
             + load_words("names.csv", "name") + list(extra_words))
    frame = ("The the is in Box contains , . There are boxes containing objects crate holds bin has belongs to owns "
             "carries received ;")
    corpus = [frame] + [f" {w}" for w in words] * 2
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="right", name_or_path="etk-tiny-bpe",
    )


TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral")


def tiny_llama(
    vocab_size: int,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_model: int = 64,
    d_mlp: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    arch: str = "llama",
) -> PreTrainedModel:
    """Random-init decoder (GQA by default: 4 query heads over 2 KV groups), eval mode, no gradients. `arch`:
    `llama`, `qwen2` (q/k/v biases, drawn non-zero so that they matter), `qwen3` (per-head q/k RMSNorm) or `mistral` (its sliding window longer
    than any prompt, as in Mistral-7B at these lengths)."""
    from transformers import (
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    if arch not in TINY_ARCHS:
        raise ConfigError(f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHS}")
    common = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
                  num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    cls, cfg = {"llama": (LlamaForCausalLM, lambda: LlamaConfig(**common)),
                "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**common, use_sliding_window=False)),
                "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**common, head_dim=d_model // n_heads,
                                                                use_sliding_window=False)),
                "mistral": (MistralForCausalLM, lambda: MistralConfig(**common, sliding_window=4096))}[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg())
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                    mod.bias.normal_(0.0, 0.5)
    return model.to(dtype).eval().requires_grad_(False)


PLANTED = ("last_head", "object_relay", "ioi")


def planted_llama(tokenizer, mechanism: str = "last_head", head: int = 2, relay_head: int = 1,
                  dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A 2-layer GQA Llama (4 heads, 2 KV groups, d_model 128) whose answer rests on a planted mechanism; every
    other W_O and every MLP output is zero. Embeddings carry a constant feature (dim 0), an is-object feature
    (dim 1) and a random identity; the unembedding scores object tokens only. With one box it answers correctly.

    `last_head`: head (1, head) at `last` attends to the context objects (query reads the constant, key the
        object feature, in the slowest RoPE pair) and copies their identity into the logits.
    `object_relay`: head (0, relay_head) at each object's own position copies the object's identity into a
        subspace the embeddings leave empty, and head (1, head) at `last` reads the objects through that subspace
        only: the answer needs a head at a non-vital position (`correct_object`), so three-position circuits
        cannot explain it."""
    from etk.data.vocab import load_objects, single_token_id
    from etk.models.arch import LlamaFamily

    if mechanism not in PLANTED:
        raise ConfigError(f"unknown planted mechanism {mechanism!r}; choose from {PLANTED}")
    if mechanism == "ioi":
        return planted_ioi_llama(tokenizer, dtype)
    d = 128
    m = tiny_llama(len(tokenizer), n_layers=2, n_heads=4, n_kv_heads=2, d_model=d, seed=5)
    arch = LlamaFamily.of(m)
    D, gs = arch.dims.head_dim, arch.dims.group_size
    ids = [i for i in (single_token_id(tokenizer, w) for w in load_objects()) if i is not None]
    is_obj = torch.zeros(arch.lm_head.weight.shape[0], dtype=torch.bool)
    is_obj[ids] = True
    gen = torch.Generator().manual_seed(1)
    slow = D // 2 - 1  # the slowest-rotating RoPE pair
    relay = mechanism == "object_relay"
    with torch.no_grad():
        emb = arch.base.model.embed_tokens.weight
        emb.copy_(torch.randn(emb.shape, generator=gen))
        if relay:
            emb[:, d // 2:] = 0  # the relay subspace: written only by the layer-0 head
        emb[:, 0] = 1.0
        emb[:, 1] = torch.where(is_obj, 3.0, 0.0)
        for j in range(2):
            for name in ("q_proj", "k_proj", "o_proj"):
                arch.proj(j, name).weight.zero_()
            arch.mlp(j).down_proj.weight.zero_()

        def attend_to_objects(layer: int, h: int) -> None:
            arch.proj(layer, "q_proj").weight[h * D + slow, 0] = 60.0
            arch.proj(layer, "k_proj").weight[(h // gs) * D + slow, 1] = 1.0

        ident = torch.zeros(d, D)
        ident[2:d // 2 if relay else d] = torch.linalg.qr(torch.randn((d // 2 if relay else d) - 2, D, generator=gen))[0]
        attend_to_objects(1, head)
        v1, o1 = arch.proj(1, "v_proj").weight, arch.proj(1, "o_proj").weight
        if relay:
            hidden = torch.zeros(d, D)
            hidden[d // 2:] = torch.linalg.qr(torch.randn(d // 2, D, generator=gen))[0]
            attend_to_objects(0, relay_head)
            g0 = relay_head // gs
            arch.proj(0, "v_proj").weight[g0 * D:(g0 + 1) * D] = ident.T * 8
            arch.proj(0, "o_proj").weight[:, relay_head * D:(relay_head + 1) * D] = hidden * 0.1  # keeps the norm small
            v1[(head // gs) * D:(head // gs + 1) * D] = hidden.T * 8
        else:
            v1[(head // gs) * D:(head // gs + 1) * D] = ident.T * 8
        o1[:, head * D:(head + 1) * D] = ident * 8
        arch.lm_head.weight.copy_(emb * 4)
        arch.lm_head.weight[~is_obj] = 0
        arch.lm_head.weight[~is_obj, 0] = -100.0  # non-objects never win
    return m.to(dtype).eval()


def planted_ioi_llama(tokenizer, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A 3-layer GQA Llama (4 heads, 2 KV groups, d_model 128, every MLP output and every other head zero) that does
    IOI by a planted chain — the name mover at END copies the name that appears once:

    (0, 0) previous-token head: at every position copies the previous token's identity into a `prev` subspace
        (RoPE: its score peaks at distance 1);
    (1, 0) induction head: at a name, attends to the token whose `prev` matches its own identity (the token after
        an earlier occurrence: S1+1 at S2) and writes -2x that identity into the position's identity, else to BOS
        (value 0): S2's identity becomes -S, cancelling S1's;
    (2, 0) name mover at END: attends to every name token and copies its identity into the logits (names only).
    Residual layout: dim 0 constant, 1 is-name, 2 is-BOS, 3 filler (equal norms), 4..35 identity (names only),
    64..95 prev."""
    from etk.data.vocab import load_words, single_token_id
    from etk.models.arch import LlamaFamily

    d = 128
    m = tiny_llama(len(tokenizer), n_layers=3, n_heads=4, n_kv_heads=2, d_model=d, seed=5)
    arch = LlamaFamily.of(m)
    D = arch.dims.head_dim  # 32
    half = D // 2
    ident, prev = slice(4, 4 + D), slice(64, 64 + D)
    names = [i for i in (single_token_id(tokenizer, w) for w in load_words("names.csv", "name")) if i is not None]
    is_name = torch.zeros(arch.lm_head.weight.shape[0], dtype=torch.bool)
    is_name[names] = True
    gen = torch.Generator().manual_seed(3)
    theta = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / D)  # RoPE frequencies of the pairs
    with torch.no_grad():
        emb = arch.base.model.embed_tokens.weight
        emb.zero_()  # every token the same norm (RMSNorm then scales all alike); only names have an identity
        emb[:, 0] = 1.0
        emb[:, 1] = torch.where(is_name, 3.0, 0.0)
        emb[:, 3] = torch.where(is_name, 0.0, float((9 + D) ** 0.5))
        idv = torch.randn(emb.shape[0], D, generator=gen)
        emb[:, ident] = torch.where(is_name[:, None], idv / idv.norm(dim=1, keepdim=True) * D ** 0.5, 0.0)
        bos = tokenizer.bos_token_id
        emb[bos, 2], emb[bos, 3] = 1.0, float((9 + D - 1) ** 0.5)
        for j in range(3):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                arch.proj(j, name).weight.zero_()
            arch.mlp(j).down_proj.weight.zero_()
        eye = torch.eye(D)
        # (0, 0): q and k read the constant; in the 6 fastest pairs q leads k by one position's angle
        q0, k0 = arch.proj(0, "q_proj").weight, arch.proj(0, "k_proj").weight
        for i in range(6):
            q0[i, 0], q0[i + half, 0] = 6.0 * float(torch.cos(theta[i])), -6.0 * float(torch.sin(theta[i]))
            k0[i, 0] = 6.0
        arch.proj(0, "v_proj").weight[:D, ident] = eye
        arch.proj(0, "o_proj").weight[prev, :D] = eye
        # (1, 0): content match in the 10 slowest pairs (nearly position-invariant over a prompt), 20 identity dims:
        # same name ~58, other names ~0 +- 13; BOS is the sink at ~39 (3 sd above a chance match)
        q1, k1 = arch.proj(1, "q_proj").weight, arch.proj(1, "k_proj").weight
        for n, i in enumerate(range(half - 10, half)):
            q1[i, 4 + n], q1[i + half, 4 + 10 + n] = 1.0, 1.0
            k1[i, 64 + n], k1[i + half, 64 + 10 + n] = 1.0, 1.0
        q1[half - 11, 0], k1[half - 11, 2] = 13.0, 1.0
        arch.proj(1, "v_proj").weight[:D, prev] = eye
        arch.proj(1, "o_proj").weight[ident, :D] = -1.2 * eye  # the value arrives ~1.67x the identity (two norms)
        # (2, 0): the name mover
        q2, k2 = arch.proj(2, "q_proj").weight, arch.proj(2, "k_proj").weight
        q2[half - 1, 0], k2[half - 1, 1] = 3.0, 1.0  # names score ~15 above other tokens; names about equally
        arch.proj(2, "v_proj").weight[:D, ident] = eye
        arch.proj(2, "o_proj").weight[ident, :D] = 3.0 * eye
        lm = arch.lm_head.weight
        lm.zero_()
        lm[names, ident] = emb[names, ident]
    return m.to(dtype).eval().requires_grad_(False)
