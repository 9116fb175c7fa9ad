"""A tiny random-init Llama and a locally built tokenizer, created offline in well under a second (for tests)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from etk.data.vocab import LETTERS, load_objects

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def tiny_tokenizer(extra_words: tuple[str, ...] = (), bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the task's words: every shipped object and letter is one token (with the
    leading space), unseen words split into several tokens, and BOS is prepended like Llama's tokenizer."""
    words = load_objects("objects.csv") + load_objects("objects_train.csv") + list(LETTERS) + list(extra_words)
    frame = "The the is in Box contains , . There are boxes containing objects crate holds bin has"
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


def tiny_llama(
    vocab_size: int,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_model: int = 64,
    d_mlp: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """Random-init Llama (GQA by default: 4 query heads over 2 KV groups), eval mode, no gradients."""
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval().requires_grad_(False)
