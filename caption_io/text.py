"""Caption text processing, as TensorFlow ops (tensorflow-text).

The same function runs in the Beam pipeline (to build the vocabulary and the
token ids) and in evaluation (to normalise references), so "what is a word"
is decided once. The serving graph does not need it: it maps ids back to text
with gathers over the vocabulary (caption_io.tokenizer.Spelling).

Scripts written without spaces between words (Chinese, Japanese) cannot be split on
whitespace: every character of theirs (caption_io.cjk) is a word of its own, as BERT's basic
tokenizer does for Han characters, and kana too. A Chinese caption is its characters, and
the COCO metrics score characters, as the Chinese captioning benchmarks do.
"""
from __future__ import annotations

import tensorflow as tf
import tensorflow_text as tf_text

from caption_io import cjk

# Unicode punctuation (\p{P}) becomes a space, so "surf-board," splits into
# "surf board" rather than gluing words together.
_PUNCTUATION = r"\p{P}"



def normalize(texts) -> tf.Tensor:
    """NFKC-normalise, lower-case (Unicode case folding), drop punctuation, space out CJK
    characters, squeeze spaces."""
    texts = tf.convert_to_tensor(texts, tf.string)
    texts = tf_text.normalize_utf8(texts, "NFKC")
    texts = tf_text.case_fold_utf8(texts)
    texts = tf.strings.regex_replace(texts, _PUNCTUATION, " ")
    texts = tf.strings.regex_replace(texts, f"({cjk.RE2})", r" \1 ")
    texts = tf.strings.regex_replace(texts, r"\s+", " ")
    return tf.strings.strip(texts)


_TOKENIZER = None


def tokenize(texts) -> tf.RaggedTensor:
    """Words of each text: a [N, (words)] ragged string tensor."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = tf_text.WhitespaceTokenizer()
    return _TOKENIZER.tokenize(normalize(texts))


def words(texts: list[str]) -> list[list[str]]:
    """Python convenience: the words of each text (for Beam DoFns and tests)."""
    if not texts:
        return []
    return [[w.decode("utf-8") for w in row] for row in tokenize(tf.constant(texts)).to_list()]
