"""Pico models (2 layers, hidden 32) for every architecture in the table, built from config.

A tiny word-level tokenizer goes with them so prompts, subjects and targets behave like real text.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "The the a of is in and to was by for on at with as his her its their from capital city country language "
    "mother tongue native speaker citizen plays position sport football basketball soccer baseball "
    "France Paris Germany Berlin Italy Rome Spain Madrid English French German Italian Spanish Japanese "
    "Danielle Darrieux Toko Yasuda Autonomous University Madrid Apple Nokia Google Microsoft Toyota BMW "
    "produced manufactured developed located continent Europe Asia Africa Antarctica Americas "
    "works worked died born official religion Christianity Islam Buddhism jazz opera rock pop genre music "
    "who where which that this what be are were has have had not it he she they an one two three "
    "because therefore I you we so then also new old first last good great many some other ' s ."
).split()
VOCAB = ["<pad>", "<eos>", "<unk>"] + list(dict.fromkeys(WORDS))
VOCAB_SIZE = 160
assert len(VOCAB) <= VOCAB_SIZE

COMMON = dict(vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=1, pad_token_id=0)


def configs() -> dict:
    import transformers as T

    small = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, **COMMON)
    return {
        "gpt2": T.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, **COMMON),
        "gptj": T.GPTJConfig(n_layer=2, n_embd=32, n_head=2, n_positions=128, rotary_dim=8, **COMMON),
        "gpt_neox": T.GPTNeoXConfig(**small),
        "llama": T.LlamaConfig(num_key_value_heads=2, **small),
        "mistral": T.MistralConfig(num_key_value_heads=1, **small),
        "qwen2": T.Qwen2Config(num_key_value_heads=1, **small),
        "qwen3": T.Qwen3Config(num_key_value_heads=1, head_dim=16, **small),
        "gemma2": T.Gemma2Config(num_key_value_heads=1, head_dim=16, **small),
        "gemma3_text": T.Gemma3TextConfig(num_key_value_heads=1, head_dim=16, **small),
    }


ARCHS = sorted(configs())


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    from tokenizers import normalizers

    core.normalizer = normalizers.Replace("\u200b", "")  # like real tokenizers, drops zero-width spaces
    from tokenizers import decoders

    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def dummy_prefix_tokenizer():
    """A sentencepiece-style tokenizer as Llama-2's and Mistral's: "▁" prepended to every text and spaces
    read as "▁", so " English" alone is ["▁", "▁English"] while after a word it is ["▁English"]. The ids
    of the words are the word-level tokenizer's, so a pico model works with either."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = [(token, 0.0) for token in VOCAB[:3]]
    pieces += [(token if token in ("'", "s", ".") else "\u2581" + token, -1.0) for token in VOCAB[3:]]
    pieces.append(("\u2581", -2.0))  # the dummy prefix's own piece, last
    core = Tokenizer(models.Unigram(pieces, unk_id=2))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    core.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build(model_type: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised pico model of `model_type` (+ tokenizer) as an HF folder;
    `overrides` set config fields (e.g. a small sliding_window)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = configs()[model_type]
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the default init, so edits have something to fight
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder
