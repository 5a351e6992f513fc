"""The toy world's frozen text side: the stock tiny CLIP tokenizer and text encoder, plus one token
per word of the toy grammar.

    tokenizer, text_encoder = toy_text_components(build_tiny_pipeline())
    tokenizer.tokenize("two red circles on a white background")
    # ['two</w>', 'red</w>', 'circles</w>', 'on</w>', 'a</w>', 'white</w>', 'background</w>']

The stock byte-level vocabulary spells "red" as r, e, d</w>, so a word's embedding depends on its
position in the caption (which shifts with the length of the words before it); measured here, the
UNet then learns colour and count more slowly and generalises worse to held-out captions. BPE
merges learned on the grammar's words (each word once, until each is one symbol) make every word
one token at a fixed position; any other text still tokenizes byte by byte as before. The text
encoder is the stock one (same weights, frozen) with one extra embedding row per new token, drawn
N(0, 0.02) — CLIP's token-embedding init — from a fixed seed.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..models.tiny import tiny_tokenizer_files
from .scenes import vocabulary

TEXT_SEED = 0


def grammar_words() -> list[str]:
    return sorted(vocabulary())


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges (most frequent pair first, ties by the pair) until every word is one symbol."""
    segments = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(pair for seg in segments.values() for pair in zip(seg, seg[1:]))
        if not pairs:
            return merges
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        for word, seg in segments.items():
            merged, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    merged.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    merged.append(seg[i])
                    i += 1
            segments[word] = merged


def toy_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    vocab = json.loads(Path(tiny_tokenizer_files()[0]).read_text())
    merges = learn_merges(grammar_words())
    for a, b in merges:  # every intermediate symbol gets an id too (tokenizers' BPE requires it)
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab, merges, model_max_length=max_length, pad_token="<|endoftext|>")


def toy_text_components(stock) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """(tokenizer, frozen text encoder) for the toy world from the stock tiny pipeline's encoder."""
    tokenizer = toy_tokenizer()
    config = CLIPTextConfig.from_dict({**stock.text_encoder.config.to_dict(), "vocab_size": len(tokenizer)})
    encoder = CLIPTextModel(config)
    state = {k: v.clone() for k, v in stock.text_encoder.state_dict().items()}
    key = next(k for k in state if k.endswith("token_embedding.weight"))
    extra = torch.randn(len(tokenizer) - state[key].shape[0], state[key].shape[1],
                        generator=torch.Generator().manual_seed(TEXT_SEED)) * 0.02
    state[key] = torch.cat([state[key], extra.to(state[key].dtype)])
    encoder.load_state_dict(state)
    return tokenizer, encoder.eval().requires_grad_(False)
