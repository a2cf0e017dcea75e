"""caption_eval.cider_d: the vectorised CIDEr-D reward against pycocoevalcap's Cider, its
document-frequency cache, and the leave-one-out baseline."""
from __future__ import annotations

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from caption_eval import cider_d
from caption_io import vocab

S, E, UNK, PAD = vocab.START_ID, vocab.END_ID, vocab.UNK_ID, vocab.PAD_ID
W = vocab.FIRST_WORD_ID  # the first word id


def _text(ids, count_end: bool) -> str:
    """What pycocoevalcap is given for a caption, written out here by hand: its word ids as
    strings up to its first <end>, then "<end>" when that is counted."""
    out = []
    for i in ids:
        if i == E:
            if count_end:
                out.append("<end>")
            break
        if i >= W:
            out.append(f"w{i}")
    return " ".join(out)


def _pycoco(candidates, references, count_end: bool) -> np.ndarray:
    gts = {k: [_text(r, count_end) for r in refs] for k, refs in enumerate(references)}
    res = {k: [_text(c, count_end)] for k, c in enumerate(candidates)}
    return np.asarray(Cider().compute_score(gts, res)[1], np.float64)


def _caption(rng, n_words: int, words: int = 12) -> list[int]:
    return [S] + [int(w) for w in rng.integers(W, W + words, n_words)] + [E]


def _corpus(seed: int = 0, images: int = 24):
    """Reference sets of 1-6 captions over a small vocabulary (so n-grams are shared and
    repeated), and candidates covering the cases CIDEr-D treats specially."""
    rng = np.random.default_rng(seed)
    references = [[_caption(rng, int(rng.integers(3, 11))) for _ in range(int(rng.integers(1, 7)))]
                  for _ in range(images)]
    references[3].append([S, E])  # an empty reference beside real ones
    first = [refs[0] for refs in references]
    candidates = [
        [S, E],                                     # empty: the model said <end> at once
        [S, E, W, W + 1, E],                        # words after the first <end> are not the caption's
        [S] + first[2][1:-1],                       # a reference's words, never ended
        first[3],                                   # exactly a reference
        [S] + first[4][1:-1] * 4 + [E],             # far longer than its references
        [S, W, W, W, W, W, W, E],                   # one word repeated: clipped by the references' counts
        [S, 5000, W + 1, 5001, E],                  # words no reference holds (df 0)
        [S, W + 2, UNK, W + 3, PAD, W + 4, E],      # specials between words are not words
        [S, W + 3, E],                              # one word: unigrams only
    ]
    while len(candidates) < images:  # references with some words replaced or dropped, as a model errs
        ref = list(references[len(candidates)][0][1:-1])
        for _ in range(int(rng.integers(0, 4))):
            at = int(rng.integers(0, len(ref)))
            if rng.random() < 0.3:
                del ref[at]
            else:
                ref[at] = int(rng.integers(W, W + 14))
        candidates.append([S] + ref + ([E] if rng.random() < 0.8 else []))
    return candidates, references


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("count_end", [True, False])
def test_every_candidate_scores_as_pycocoevalcap_cider(count_end, seed):
    candidates, references = _corpus(seed)
    df = cider_d.DocumentFrequencies.from_references(references)  # as Cider does: from the refs it is given
    ours = cider_d.CiderD(df, count_end=count_end).score(candidates, references)
    expected = _pycoco(candidates, references, count_end)
    assert ours.dtype == np.float64 and ours.shape == (len(candidates),)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    assert expected.max() > 1.0 and (expected > 0).sum() > len(candidates) // 2  # a test that scores something


def test_end_counts_only_when_asked():
    candidates, references = _corpus()
    df = cider_d.DocumentFrequencies.from_references(references)
    reward, words = cider_d.CiderD(df, count_end=True), cider_d.CiderD(df, count_end=False)
    s, w = reward.score(candidates, references), words.score(candidates, references)
    assert w[0] == 0.0  # no words: nothing to match
    assert s[0] == 0.0  # "<end>" alone: every reference set holds that unigram, so its idf is 0
    unended = [c[:c.index(E)] if E in c else c for c in candidates]
    np.testing.assert_array_equal(words.score(unended, references), w)  # without <end> counted: the same
    cut = reward.score(unended, references)
    assert cut[3] < s[3]  # a reference's words never ended score below the reference itself
    assert (cut != s)[[3, 4, 5, 6, 7]].all()  # every candidate that had an <end> after words changed


def test_arrays_with_lengths_score_as_the_same_lists():
    candidates, references = _corpus(seed=1)
    scorer = cider_d.CiderD(cider_d.DocumentFrequencies.from_references(references))
    longest = max(map(len, candidates))
    padded = np.full((len(candidates), longest + 3), W + 7)  # junk past each length
    for i, c in enumerate(candidates):
        padded[i, :len(c)] = c
    lengths = [len(c) for c in candidates]
    np.testing.assert_allclose(scorer.score(padded, references, lengths=lengths),
                               scorer.score(candidates, references), rtol=0, atol=1e-12)
    prepared = scorer.references(references)
    np.testing.assert_array_equal(scorer.score(candidates, prepared), scorer.score(candidates, references))


def test_k_samples_per_image_score_against_their_images_references():
    rng = np.random.default_rng(2)
    b, k, t = 6, 4, 10
    references = [[_caption(rng, int(rng.integers(3, 9)), words=8) for _ in range(5)] for _ in range(b)]
    samples = rng.integers(W, W + 8, (b, k, t))
    samples[:, :, 0] = S
    samples[np.arange(b), rng.integers(0, k, b), rng.integers(2, t, b)] = E
    flat = samples.reshape(b * k, t).tolist()
    per_candidate = [references[i // k] for i in range(b * k)]
    # pycocoevalcap counts each candidate's reference set as a document: the same DF here.
    scorer = cider_d.CiderD(cider_d.DocumentFrequencies.from_references(per_candidate))
    rewards = scorer.score_samples(samples, scorer.references(references))
    assert rewards.shape == (b, k)
    np.testing.assert_allclose(rewards.reshape(-1), _pycoco(flat, per_candidate, True), rtol=0, atol=1e-6)
    np.testing.assert_allclose(rewards.reshape(-1), scorer.score(flat, per_candidate), rtol=0, atol=1e-12)


def test_document_frequencies_count_sets_not_captions():
    refs = [[[S, W, W + 1, E], [S, W, E]], [[S, W + 1, E]]]
    df = cider_d.DocumentFrequencies.from_references(refs)
    key = lambda *ids: int(np.bitwise_or.reduce(
        [(len(ids) - 1) << 60] + [i << (15 * (len(ids) - 1 - j)) for j, i in enumerate(ids)]))
    held = dict(zip(df.keys.tolist(), df.counts.tolist()))
    assert df.n_documents == 2
    assert held[key(W)] == 1  # twice in the first set: one document
    assert held[key(W + 1)] == 2 and held[key(W, W + 1)] == 1 and held[key(E)] == 2
    np.testing.assert_allclose(df.idf(np.array([key(W), key(W + 1), key(W + 9)])),
                               [np.log(2), 0.0, np.log(2)])


def test_cache_round_trips_and_refuses_or_rebuilds_for_other_references(tmp_path):
    candidates, references = _corpus(seed=3)
    path = str(tmp_path / "cider_df.npz")
    df = cider_d.load_or_build(path, references)
    loaded = cider_d.DocumentFrequencies.load(path, cider_d.references_digest(references))
    np.testing.assert_array_equal(loaded.keys, df.keys)
    np.testing.assert_array_equal(loaded.counts, df.counts)
    assert (loaded.n_documents, loaded.digest) == (df.n_documents, df.digest)
    np.testing.assert_array_equal(cider_d.CiderD(loaded).score(candidates, references),
                                  cider_d.CiderD(df).score(candidates, references))

    other = references[:-1] + [[[S, W + 11, E]]]
    assert cider_d.references_digest(other) != df.digest
    with pytest.raises(cider_d.StaleCacheError, match="other references"):
        cider_d.DocumentFrequencies.load(path, cider_d.references_digest(other))
    rebuilt = cider_d.load_or_build(path, other)
    fresh = cider_d.DocumentFrequencies.from_references(other)
    np.testing.assert_array_equal(rebuilt.counts, fresh.counts)
    assert cider_d.DocumentFrequencies.load(path).digest == fresh.digest  # the file was replaced


def test_cache_keyed_by_the_callers_digest_reads_no_references_on_a_hit(tmp_path):
    _, references = _corpus(seed=4)
    path = str(tmp_path / "df.npz")
    calls = []

    def read():
        calls.append(1)
        return references

    first = cider_d.load_or_build(path, read, digest="shards-v1")
    again = cider_d.load_or_build(path, read, digest="shards-v1")
    assert len(calls) == 1 and again.digest == first.digest == "shards-v1"
    cider_d.load_or_build(path, read, digest="shards-v2")
    assert len(calls) == 2


def test_a_cache_of_another_key_format_is_stale(tmp_path):
    path = tmp_path / "old.npz"
    np.savez(path, keys=np.zeros(1, np.int64), counts=np.ones(1, np.int64), n_documents=np.int64(1),
             digest=np.array("x"), format=np.array("cider-d-ids/0"))
    with pytest.raises(cider_d.StaleCacheError, match="cider-d-ids/0"):
        cider_d.DocumentFrequencies.load(str(path))


def test_leave_one_out_baseline_is_the_mean_of_the_other_samples():
    rewards = np.array([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0], [0.0, 0.0, 9.0]])
    np.testing.assert_allclose(cider_d.leave_one_out_baseline(rewards),
                               [[2.5, 2.0, 1.5], [4.0, 4.0, 4.0], [4.5, 4.5, 0.0]])
    rng = np.random.default_rng(5)
    r = rng.random((7, 5))
    base = cider_d.leave_one_out_baseline(r)
    for i in range(7):
        for j in range(5):
            assert base[i, j] == pytest.approx(np.delete(r[i], j).mean())
    with pytest.raises(ValueError, match="K >= 2"):
        cider_d.leave_one_out_baseline(np.ones((3, 1)))


def test_refuses_what_it_cannot_score():
    refs = [[[S, W, E]]]
    scorer = cider_d.CiderD(cider_d.DocumentFrequencies.from_references(refs))
    with pytest.raises(ValueError, match="15-bit"):
        scorer.score([[S, cider_d.MAX_ID + 1, E]], refs)
    with pytest.raises(ValueError, match="hold no caption"):
        scorer.references([[]])
    with pytest.raises(ValueError, match="image_index"):
        scorer.score([[S, W, E]] * 2, refs, image_index=[0, 1])
    with pytest.raises(ValueError, match="count_end"):
        cider_d.CiderD(scorer.df, count_end=False).score([[S, W, E]], scorer.references(refs))


def test_document_frequency_look_up_finds_every_key_and_no_other():
    rng = np.random.default_rng(6)
    keys = np.unique(rng.integers(0, 1 << 62, 50000))
    stored, misses = keys[:40000], keys[40000:]
    order = np.argsort(cider_d._mix(stored))
    df = cider_d.DocumentFrequencies(stored[order], np.arange(1, 40001)[order], 50000, "x")
    queries = np.concatenate([stored[::-1], misses, stored[:10]])
    expected_df = np.concatenate([np.arange(40000, 0, -1), np.zeros(misses.size), np.arange(1, 11)])
    np.testing.assert_allclose(df.idf(queries), np.log(50000) - np.log(np.maximum(expected_df, 1)))
    with pytest.raises(ValueError, match="order"):
        cider_d.DocumentFrequencies(stored, np.ones(40000, np.int64), 1, "x").idf(stored[:1])
