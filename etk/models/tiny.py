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


PLANTED = ("last_head", "object_relay")


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
