"""The vocabulary's modes: what a token is (words, chars, wordpiece) and how tokens are written back
as text, in Python (tokenizer.join) and in the graph the SavedModel runs (tokenizer.Spelling)."""
import collections

import numpy as np
import pytest
import tensorflow as tf

from caption_io import text, tokenizer, vocab

CAPTIONS = [
    "A red circle in the top left.",
    "Two shapes: a reddish square, and a blue triangle",
    "一个红色的圆形在左上方。",
    "左边有一个小的蓝色三角形",
    "コーヒーとT恤 on a table",
]


def _counts(captions):
    return dict(collections.Counter(w for words in text.words(captions) for w in words))


def _vocabulary(mode, size=200):
    return tokenizer.vocabulary(_counts(CAPTIONS), mode, size)


def _spelled(spelling, ids):
    """Python id lists -> Spelling.text of them as one padded batch."""
    width = max(map(len, ids))
    batch = tf.constant([row + [vocab.PAD_ID] * (width - len(row)) for row in ids])
    return [t.decode("utf-8") for t in spelling.text(batch).numpy()]


def test_cjk_characters_are_words_of_their_own_and_spaces_elsewhere_split_words():
    assert text.words(["一个红色的圆形。", "Red, a surf-board; コーヒー", "t恤"]) == [
        ["一", "个", "红", "色", "的", "圆", "形"], ["red", "a", "surf", "board", "コ", "ー", "ヒ", "ー"], ["t", "恤"]]


@pytest.mark.parametrize("mode", tokenizer.MODES)
def test_each_mode_round_trips_captions_in_python_and_in_the_graph(mode):
    """Text -> ids -> text gives the caption as the project writes it (normalised, no space
    between CJK characters, one between other words), the same in Python and in the graph."""
    tokens = _vocabulary(mode)
    ids = tokenizer.Encoder(tokens, mode)(text.words(CAPTIONS))
    assert all(row[0] == vocab.START_ID and row[-1] == vocab.END_ID for row in ids)
    assert vocab.UNK_ID not in {i for row in ids for i in row}
    written = [tokenizer.decode(row[1:], tokens) for row in ids]
    assert written == ["a red circle in the top left", "two shapes a reddish square and a blue triangle",
                       "一个红色的圆形在左上方", "左边有一个小的蓝色三角形", "コーヒーと t 恤 on a table"]
    assert _spelled(tokenizer.Spelling(tokens), ids) == written
    # And back: the written caption cuts into the same tokens.
    assert tokenizer.Encoder(tokens, mode)(text.words(written)) == ids


def test_chars_spells_a_word_from_its_characters_and_wordpiece_from_learned_pieces():
    chars = _vocabulary(tokenizer.CHARS)
    ids = tokenizer.Encoder(chars, tokenizer.CHARS)([["red", "红"]])[0]
    assert [chars[i] for i in ids[1:-1]] == ["r", "##e", "##d", "红"]
    assert all(len(tokenizer.surface(t)) == 1 for t in chars[len(vocab.SPECIALS):])
    # Words seen often enough are whole pieces; a word never seen in training (of the training
    # captions' letters) is spelled from pieces rather than <unk>, and written back as itself.
    counts = _counts(["a red circle and a red square"] * 20 + ["a green triangle"] * 20)
    pieces = tokenizer.vocabulary(counts, tokenizer.WORDPIECE, 100)
    assert {"red", "circle", "square", "green", "triangle"} <= set(pieces)
    ids = tokenizer.Encoder(pieces, tokenizer.WORDPIECE)([["reddest", "circles"]])[0]
    assert vocab.UNK_ID not in ids and len(ids) > 4
    assert tokenizer.decode(ids, pieces) == "reddest circles"
    words = tokenizer.Encoder(pieces, tokenizer.WORDS)([["reddest"]])[0]
    assert words == [vocab.START_ID, vocab.UNK_ID, vocab.END_ID]  # what words mode does with it


def test_the_graph_spells_any_token_sequence_as_python_does():
    """Whatever a decoder emits (a piece first, CJK beside Latin, specials in the middle)."""
    tokens = list(vocab.SPECIALS) + ["a", "red", "##dish", "##s", "红", "色", "t", "恤", "コ", "ー"]
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(0, len(tokens), size=rng.integers(0, 9))) for _ in range(200)]
    rows = [[int(i) for i in row] for row in rows] + [[]]
    python = [tokenizer.join([tokens[i] for i in row if i >= vocab.FIRST_WORD_ID]) for row in rows]
    assert _spelled(tokenizer.Spelling(tokens), [row + [vocab.PAD_ID] for row in rows]) == python
    assert tokenizer.join(["a", "red", "##dish", "红", "色", "t", "恤"]) == "a reddish 红色 t 恤"
    # Per token, the text a reader sees: pieces marked, specials empty (n-best's [B, K, T] too).
    labels = tokenizer.Spelling(tokens).token_text(tf.constant([[[2, 4, 6, 8, 3]]])).numpy()
    assert [t.decode("utf-8") for t in labels[0, 0]] == ["", "a", "-dish", "红", ""]


def test_an_unknown_mode_is_refused_naming_the_modes():
    with pytest.raises(tokenizer.TokenizerError,
                       match="unknown tokenizer 'bpe': the modes are words, chars, wordpiece"):
        tokenizer.vocabulary({"a": 1}, "bpe", 10)


@pytest.mark.parametrize("mode, size", [(tokenizer.WORDPIECE, 60)])
def test_the_pipeline_writes_each_caption_as_tokens_that_spell_it_again(mode, size, scene_dir, tmp_path):
    """preprocess --tokenizer: the vocabulary in that mode, recorded in metadata.json; every stored
    training caption's ids written back give its normalised text (a vocabulary too small for the
    scene set's words in wordpiece mode, so words are spelled from pieces; val captions may hold a
    letter training never saw, which is <unk>)."""
    from caption_io import metadata, records
    from pipelines import preprocess

    out = str(tmp_path / "data")
    preprocess.run(["--coco-dir", scene_dir, "--output", out, "--encoder", "mobilenet_v3_large",
                    "--encoder-weights", "random", "--seed", "1",
                      "--num-shards", "1", "--tokenizer", mode, "--vocab-size", str(size)])
    meta = metadata.read(out)
    tokens = metadata.load_vocab(out, meta)
    assert meta.vocab.tokenizer == mode and len(tokens) <= size + len(vocab.SPECIALS)
    assert any(tokenizer.continues(t) for t in tokens)
    longest = 0
    for split in meta.splits:
        for rec in records.read_records(metadata.shard_files(out, split, meta)):
            if split == "train":
                normalised = [t.decode("utf-8") for t in text.normalize(rec["caption_text"]).numpy()]
                assert [tokenizer.decode(ids[1:], tokens) for ids in rec["captions"]] == normalised
            longest = max([longest] + [len(ids) for ids in rec["captions"]])
        assert meta.splits[split].max_tokens <= longest
    assert meta.max_tokens == longest
