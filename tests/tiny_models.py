"""Tiny random BERT and Llama checkpoints built locally (no download), for tests and benches."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

WORDS = (
    "the a an and or not is are was be to of in on for with this that it i you we they my your "
    "refund invoice billing payment card charge login password account error bug crash slow app "
    "shipping delivery order late package tracking address return broken great thanks love hate "
    "help please why how when what where who cannot can will would should could very really"
).split()


def build_tiny_bert(path: Path, *, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """A BERT encoder with random weights and a WordPiece vocabulary of WORDS."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=64,
        architectures=["BertModel"],
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_llama(path: Path, *, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """A decoder-only Llama with random weights, saved as a causal LM, with no pad token."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path
