"""An offline CLIP BPE tokenizer whose vocabulary holds a given word list whole.

The embedded Fashion-MNIST teacher ships one (its prompt words, ``tsm_core.data.fmnist.prompt_words``)
and the tiny test pipelines use one (``tsm_core.testing.tiny``): no tokenizer can be downloaded here,
and a byte-level vocabulary alone would turn every prompt into dozens of tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-character table that GPT-2 / CLIP byte-level BPE uses.
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    # Byte-pair encoding of one word: repeatedly merge the adjacent pair with the lowest rank.
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def write_clip_tokenizer(folder: str | Path, words: Iterable[str], model_max_length: int = 16):
    """Write a CLIP BPE tokenizer whose vocabulary holds ``words`` whole, and load it by path.

    The vocabulary is the 256 byte characters (alone and word-final) plus one merge chain per
    word, so any text still tokenizes (byte by byte) and prompt words become one token each.
    transformers 5 ignores ``CLIPTokenizer(vocab_file=...)``, hence ``from_pretrained(folder)``.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    known = set(vocab)
    ranks: dict[tuple[str, str], int] = {}  # merge -> priority (lower merges first)
    for word in sorted(set(words)):
        # Segment the word with the merges so far (they win over new ones), then chain the
        # segments left to right, so the word ends as one token whatever came before.
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        left = pieces[0]
        for right in pieces[1:]:
            ranks.setdefault((left, right), len(ranks))
            if left + right not in known:
                known.add(left + right)
                vocab.append(left + right)
            left = left + right
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": model_max_length, "tokenizer_class": "CLIPTokenizer"}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
