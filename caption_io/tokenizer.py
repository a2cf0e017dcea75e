"""What a caption's tokens are, and how tokens are written back as text: the vocabulary's modes.

    words      a token per word (caption_io.text.words), as the project always did
    chars      a token per character: a word's first character as itself, the rest as
               continuations ("red" -> r ##e ##d)
    wordpiece  WordPiece pieces learned from the training words (tensorflow-text's learner and
               tokenizer): frequent words whole, the rest spelled from pieces ("reddish" -> red ##dish)

Every mode first splits text into words with caption_io.text, where each CJK character is a
word of its own, so Chinese and Japanese captions are characters in every mode.

Text from tokens is one rule for all three (Spelling, in the graph; `join`, in Python): a
continuation ("##dish") joins the token before it, two CJK characters join with no space
between them, and every other pair of tokens is separated by one space. The rule needs the
vocabulary's tokens only, and TensorFlow's core ops, so the SavedModel spells captions
without tensorflow-text (TF Serving has none).
"""
from __future__ import annotations

import numpy as np

from caption_io import cjk, cli
from caption_io import vocab as vocab_lib

WORDS, CHARS, WORDPIECE = MODES = ("words", "chars", "wordpiece")
DEFAULT = WORDS
SUFFIX = "##"  # a token that continues the word before it starts with this
PIECE_LABEL = "-"  # how a continuation is labelled for a reader: "##dish" -> "-dish"
# WordPiece's longest word, in UTF-8 bytes: longer words are <unk> (tensorflow-text's default).
MAX_WORD_BYTES = 100


class TokenizerError(ValueError, cli.UserError):
    """An unknown tokenizer mode."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise TokenizerError(f"unknown tokenizer {mode!r}: the modes are {', '.join(MODES)}")
    return mode


def continues(token: str) -> bool:
    """Whether a token continues the word before it (a WordPiece suffix)."""
    return token.startswith(SUFFIX) and len(token) > len(SUFFIX)


def surface(token: str) -> str:
    """The token as written inside its word: a continuation without its mark."""
    return token[len(SUFFIX):] if continues(token) else token


def label(token: str) -> str:
    """The token as a reader sees it on its own (a plot's panel, the page's word): "-dish"."""
    return PIECE_LABEL + surface(token) if continues(token) else token


def _glues(left: str, right: str) -> bool:
    """Whether `right` is written against `left` with no space between them."""
    return continues(right) or (cjk.is_cjk(left[-1]) and cjk.is_cjk(surface(right)[0]))


def join(tokens: list[str]) -> str:
    """Tokens (words of a caption, specials already left out) -> the caption as written."""
    out = []
    for i, token in enumerate(tokens):
        if i and not _glues(tokens[i - 1], token):
            out.append(" ")
        out.append(surface(token))
    return "".join(out)


def decode(ids, tokens: list[str]) -> str:
    """A token id sequence -> its caption as written (up to <end>; specials left out)."""
    return join(vocab_lib.words_of(ids, tokens))


# ------------------------------------------------------------------------------- vocabularies
def _char_counts(word_counts: dict[str, int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for word, n in word_counts.items():
        for i, char in enumerate(word):
            key = char if i == 0 else SUFFIX + char
            counts[key] = counts.get(key, 0) + n
    return counts


def vocabulary(word_counts: dict[str, int], mode: str, size: int, min_count: int = 1) -> list[str]:
    """The vocabulary's tokens in id order (specials first) from the training split's word counts.

    size: tokens beyond the specials, at most. min_count: words (chars: characters) seen fewer
    times are left out (wordpiece: the learner's lowest count for a piece)."""
    check_mode(mode)
    if mode == WORDS:
        return vocab_lib.select_words(word_counts, size, min_count)
    if mode == CHARS:
        return vocab_lib.select_words(_char_counts(word_counts), size, min_count)
    from tensorflow_text.tools.wordpiece_vocab import wordpiece_tokenizer_learner_lib as learner

    counts = sorted((w, n) for w, n in word_counts.items() if w not in vocab_lib.SPECIALS)
    # Every character the learner keeps comes with its continuation (r, ##r), so at most half the
    # vocabulary is characters: words of other characters are <unk>.
    tokens = learner.learn(counts, vocab_size=size + len(vocab_lib.SPECIALS),
                           reserved_tokens=list(vocab_lib.SPECIALS), lower_thresh=min_count,
                           max_unique_chars=max(1, size // 2), joiner=SUFFIX)
    # The learner may overshoot the size; what goes is its rarest longer pieces, never a
    # character, which would leave words it spells unspellable.
    longer = [t for t in tokens[len(vocab_lib.SPECIALS):] if len(surface(t)) > 1]
    over = len(tokens) - size - len(vocab_lib.SPECIALS)
    dropped = set(longer[len(longer) - over:]) if over > 0 else set()
    return [t for t in tokens if t not in dropped]


# ------------------------------------------------------------------------------- captions -> ids
class Encoder:
    """Captions' words -> token ids (<start> ... <end>) with one vocabulary, in its mode."""

    def __init__(self, tokens: list[str], mode: str):
        self._mode = check_mode(mode)
        self._index = {t: i for i, t in enumerate(tokens)}
        self._pieces = None
        if mode != WORDS:
            import tensorflow as tf
            import tensorflow_text as tf_text

            # no_pretokenization: its inputs are single words already (caption_io.text cut them).
            self._pieces = tf_text.FastWordpieceTokenizer(
                vocab=tokens, suffix_indicator=SUFFIX, max_bytes_per_word=MAX_WORD_BYTES,
                token_out_type=tf.int64, unknown_token=vocab_lib.UNK, no_pretokenization=True)

    def __call__(self, captions: list[list[str]]) -> list[list[int]]:
        if self._pieces is None:
            return [vocab_lib.encode(words, self._index) for words in captions]
        flat = [w for words in captions for w in words]
        pieces = iter(self._pieces.tokenize(flat).to_list() if flat else [])
        return [[vocab_lib.START_ID] + [int(i) for _ in words for i in next(pieces)] + [vocab_lib.END_ID]
                for words in captions]


# ------------------------------------------------------------------------------- ids -> text
class Spelling:
    """Token ids -> text, as TensorFlow core ops (the export's captions and per-token text).

    Per vocabulary id, computed once here: the surface (a continuation without its mark),
    the label a reader sees ("" for the specials), and whether the token glues to the one
    before it or, being CJK, to a CJK token before it."""

    def __init__(self, tokens: list[str]):
        import tensorflow as tf

        words = vocab_lib.is_word(range(len(tokens)))
        self.surface = tf.constant([surface(t) for t in tokens])
        self.labels = tf.constant([label(t) if w else "" for t, w in zip(tokens, words)])
        self.continues = tf.constant(np.array([continues(t) for t in tokens]))
        self.cjk_start = tf.constant(np.array([cjk.is_cjk(surface(t)[0]) for t in tokens]))
        self.cjk_end = tf.constant(np.array([cjk.is_cjk(t[-1]) for t in tokens]))

    def text(self, ids):
        """ids int [..., T] -> the captions as written [...]: their words (vocab.is_word) by `join`'s rule."""
        import tensorflow as tf

        kept = tf.ragged.boolean_mask(ids, vocab_lib.is_word(ids))
        flat = kept.flat_values
        # The token before each in the flattened batch: across a row's start it is another
        # caption's, but a row's first separator is stripped below whatever it is.
        before_cjk = tf.concat([[False], tf.gather(self.cjk_end, flat)[:-1]], axis=0)
        glued = tf.gather(self.continues, flat) | (before_cjk & tf.gather(self.cjk_start, flat))
        written = tf.strings.join([tf.where(glued, "", " "), tf.gather(self.surface, flat)])
        text = tf.strings.strip(tf.strings.reduce_join(kept.with_flat_values(written), axis=-1))
        # [B, K] ids come out ragged in K (every row has K): a dense tensor, which a SavedModel
        # output must be for TF Serving to fetch it by name.
        return text.to_tensor() if isinstance(text, tf.RaggedTensor) else text

    def token_text(self, ids):
        """ids int [..., T] -> each token as a reader sees it [..., T] ("" where it is not a word)."""
        import tensorflow as tf

        return tf.gather(self.labels, ids)
