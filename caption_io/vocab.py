"""The vocabulary file: one token a line, line number = id.

0 <pad>, 1 <unk>, 2 <start>, 3 <end>, then words by falling count in the
training split, ties broken alphabetically (so the file is the same whatever
order the pipeline saw the captions in).
"""
from __future__ import annotations

from caption_io import cli, datadir, fileio

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
SPECIALS = (PAD, UNK, START, END)
PAD_ID, UNK_ID, START_ID, END_ID = range(4)
FIRST_WORD_ID = len(SPECIALS)  # ids below it are the specials: never a word of a caption shown or scored
FILE_NAME = datadir.VOCAB_FILE


class VocabError(ValueError, cli.UserError):
    """A file that is not a vocabulary."""


def select_words(counts: dict[str, int], max_words: int, min_count: int = 1) -> list[str]:
    """The vocabulary from word counts: specials, then the `max_words` most
    frequent words seen at least `min_count` times."""
    kept = [(w, c) for w, c in counts.items() if c >= min_count and w not in SPECIALS]
    kept.sort(key=lambda wc: (-wc[1], wc[0]))
    return list(SPECIALS) + [w for w, _ in kept[:max_words]]


def write(path: str, tokens: list[str]) -> None:
    bad = [t for t in tokens if not t or any(ch.isspace() for ch in t)]
    if bad:
        raise ValueError(f"{path}: vocabulary tokens may not be empty or hold whitespace: {bad[:5]}")
    fileio.write_text(path, "\n".join(tokens) + "\n")


def read(path: str) -> list[str]:
    tokens = fileio.read_text(path).split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    if tuple(tokens[:4]) != SPECIALS:
        raise VocabError(f"{path}: not a vocabulary file (the first four lines must be {', '.join(SPECIALS)})")
    return tokens


def encode(words: list[str], index: dict[str, int]) -> list[int]:
    """<start> w1 ... wn <end>, unknown words as <unk>."""
    return [START_ID] + [index.get(w, UNK_ID) for w in words] + [END_ID]


def is_word(ids):
    """Which of `ids` (a list, numpy or TensorFlow array) are a caption's words: every id that
    is not a special (<unk> is left out like the others: it tells a reader nothing). The
    export's text, the attention rows of its words and `words_of` all use this one rule."""
    return ids >= FIRST_WORD_ID if hasattr(ids, "dtype") else [int(i) >= FIRST_WORD_ID for i in ids]


def words_of(ids, tokens: list[str]) -> list[str]:
    """The words of a token id sequence, stopping at <end>."""
    out = []
    for i in ids:
        i = int(i)
        if i == END_ID:
            break
        if i >= FIRST_WORD_ID:
            out.append(tokens[i])
    return out

