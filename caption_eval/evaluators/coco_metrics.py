"""The COCO caption metrics (pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE
on request, it needs a download).

References and candidates are normalised with the project's own
caption_io.text.normalize (the function that made the vocabulary), not with
pycocoevalcap's PTBTokenizer: the model's words were cut by that function, so
scoring with another tokenizer would count tokenizer disagreements as caption
errors, and it saves the PTBTokenizer's separate Java run.
"""
from __future__ import annotations

import contextlib

import numpy as np

from caption_io import cli
from caption_io import text as text_lib

METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


class ScoringError(RuntimeError, cli.UserError):
    """A scorer that could not run (Java missing, SPICE's download unreachable). Exit 1, not 2:
    the flags were right and the captions are written; the machine lacks what scoring needs."""

    exit_code = 1


def _some(ids, n: int = 5) -> str:
    try:
        ids = sorted(ids)
    except TypeError:  # ids of mixed types (a results file with "12" beside 12)
        ids = sorted(ids, key=repr)
    return ", ".join(str(i) for i in ids[:n]) + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


def check_results(results, references: dict) -> dict:
    """{image_id: caption} from a COCO results list, or a ValueError that names the
    image ids that are missing, extra or duplicated relative to the references."""
    if not isinstance(results, list):
        raise ValueError(f"results must be a list of {{'image_id', 'caption'}} objects, got {type(results).__name__}")
    captions, dup = {}, []
    for k, r in enumerate(results):
        if not isinstance(r, dict) or "image_id" not in r or not isinstance(r.get("caption"), str):
            raise ValueError(f"results[{k}] is not an {{'image_id', 'caption': str}} object: {str(r)[:80]}")
        if r["image_id"] in captions:
            dup.append(r["image_id"])
        captions[r["image_id"]] = r["caption"]
    missing = set(references) - set(captions)
    extra = set(captions) - set(references)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} image id(s) (references but no caption): {_some(missing)}")
    if extra:
        problems.append(f"extra {len(extra)} image id(s) (a caption but no references): {_some(extra)}")
    if dup:
        problems.append(f"duplicate {len(set(dup))} image id(s) (captioned more than once): {_some(set(dup))}")
    if problems:
        raise ValueError("results do not match the references: " + "; ".join(problems))
    return captions


def _normalise(texts: list[str]) -> list[str]:
    if not texts:
        return []
    return [t.decode("utf-8") for t in text_lib.normalize(texts).numpy()]


def _prepare(results, references: dict) -> tuple[dict, dict]:
    """Checked and normalised (gts, res) in the scorers' format: {id: [captions]}, {id: [caption]}."""
    captions = check_results(results, references)
    ids = list(references)
    if not ids:
        raise ValueError("nothing to score: no references")
    bad = [i for i in ids if isinstance(references[i], str) or not isinstance(references[i], (list, tuple))]
    if bad:
        raise ValueError(f"references must map each image id to a list of captions; not for {_some(bad)}")
    flat = [r for i in ids for r in references[i]]
    norm = iter(_normalise(flat + [captions[i] for i in ids]))
    gts = {i: [next(norm) for _ in references[i]] for i in ids}
    res = {i: [next(norm)] for i in ids}
    no_refs = [i for i in ids if not any(gts[i])]
    if no_refs:
        raise ValueError(f"{len(no_refs)} image id(s) have no non-empty reference caption: {_some(no_refs)}")
    # Blank references would divide by zero in ROUGE-L; they carry nothing to match.
    return {i: [r for r in refs if r] for i, refs in gts.items()}, res


def score(results, references: dict, spice: bool = False, meteor: Meteor | None = None) -> dict:
    """COCO caption metrics of `results` ([{"image_id", "caption"}], one per image)
    against `references` ({image_id: [captions]}), both normalised first.

    Returns {"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr"[, "SPICE"], "n_images",
    "n_empty_captions"}. Raises ValueError for results that do not match the
    references, ScoringError when a Java scorer cannot run. CIDEr's document
    frequencies come from these references, so it needs more than one image to be
    non-zero (as in the COCO toolkit). `meteor`: a kept METEOR process (see Meteor);
    None starts one for this call and ends it after.
    """
    gts, res = _prepare(results, references)
    out, _ = _score(gts, res, meteor)
    if spice:
        out["SPICE"] = _spice(gts, res)
    return out


def _score(gts: dict, res: dict, meteor: Meteor | None) -> tuple[dict, dict]:
    """(the metrics of normalised gts and res, without SPICE; {image_id: the image's own CIDEr})."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = list(gts)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    if meteor is None:
        with Meteor() as once:
            out["METEOR"] = once.score(gts, res)
    else:
        out["METEOR"] = meteor.score(gts, res)
    # ROUGE-L divides by the candidate's length: an empty caption (the model said
    # <end> first) scores 0, so it is left out of the call and counted as 0.
    spoken = [i for i in ids if res[i][0]]
    rouge = Rouge().compute_score({i: gts[i] for i in spoken}, {i: res[i] for i in spoken})[1] if spoken else []
    out["ROUGE-L"] = float(np.sum(rouge) / len(ids))
    # Cider returns the images' own scores in gts' order.
    cider, per_image = Cider().compute_score(gts, res)
    out["CIDEr"] = float(cider)
    out["n_images"] = len(ids)
    out["n_empty_captions"] = sum(1 for i in ids if not res[i][0])
    return out, dict(zip(gts, (float(c) for c in per_image)))


class Meteor:
    """One METEOR Java process, kept for as many scorings as its owner asks for.

    Starting it (the JVM, then METEOR's paraphrase table) takes seconds, where scoring a few
    hundred captions takes a fraction of one: a trainer that scores every epoch keeps one
    for the run, and start() lets it load while the first epoch trains. close() (or the
    with-block's end) ends the process; a process that failed is ended at once.
    """

    def __init__(self):
        self._scorer = None

    def start(self) -> Meteor:
        """Launch the Java process now (it loads in the background); ScoringError without Java."""
        if self._scorer is None:
            from pycocoevalcap.meteor.meteor import Meteor as JavaMeteor

            try:
                self._scorer = JavaMeteor()  # a Java subprocess
            except OSError as e:
                raise ScoringError(f"METEOR runs Java, which could not start ({e.strerror or e}); "
                                   "`make java` installs it") from None
        return self

    def score(self, gts: dict, res: dict) -> float:
        """The corpus METEOR of normalised {id: [references]}, {id: [caption]}. A Java process
        that died (killed for memory in a long run, say) is started again, once."""
        for attempt in (1, 2):
            self.start()
            try:
                return float(self._scorer.compute_score(gts, res)[0])
            except (ValueError, OSError) as e:  # readline() gave nothing to parse, or a broken pipe
                self.close()
                if attempt == 2:
                    raise ScoringError(f"METEOR's Java process failed ({e})") from None

    def close(self) -> None:
        scorer, self._scorer = self._scorer, None
        if scorer is None:
            return
        # Ended here, not left to the wrapper's __del__ (which runs whenever the last reference
        # goes, and hangs on the lock a scoring that failed half-way still holds).
        if scorer.lock.locked():
            scorer.lock.release()
        process = scorer.meteor_p
        with contextlib.suppress(OSError):  # a dead process's pipe refuses the flush
            process.stdin.close()
        process.kill()
        process.wait()

    def __enter__(self) -> Meteor:
        return self.start()

    def __exit__(self, *_) -> None:
        self.close()


def _spice(gts, res) -> float:
    try:
        from pycocoevalcap.spice.spice import Spice

        return float(Spice().compute_score(gts, res)[0])
    except Exception as e:
        raise ScoringError(f"SPICE could not run (it downloads Stanford CoreNLP on first use): "
                           f"{type(e).__name__}: {str(e).strip()[:200]}") from None


class CocoMetrics:
    """The split's captions against all of each image's references, scored at the end
    (CIDEr's document frequencies need every reference at once).

    summary() raises ValueError when the split holds an image twice or one without
    references, ScoringError when METEOR cannot run. SPICE failing is not fatal: the
    other metrics are worth keeping, so it records "SPICE": None and "spice_error".
    `results` is the COCO results list ([{"image_id", "caption"}]) in split order.
    meteor: a kept METEOR process to score with (None: one for this summary).
    After summary(), image_cider holds each image's own CIDEr ({image_id: score}; the split's
    CIDEr is their mean), for figures over a part of the split and the gallery.
    """

    def __init__(self, spice: bool = False, meteor: Meteor | None = None):
        self.spice, self.meteor = spice, meteor
        self.results, self.references = [], {}
        self.image_cider: dict = {}

    def add(self, item: dict) -> None:
        self.results.append({"image_id": item["image_id"], "caption": item["caption"]})
        self.references[item["image_id"]] = item["references"]

    def summary(self) -> dict:
        gts, res = _prepare(self.results, self.references)
        out, self.image_cider = _score(gts, res, self.meteor)
        if self.spice:
            try:
                out["SPICE"] = _spice(gts, res)
            except ScoringError as e:
                out["SPICE"], out["spice_error"] = None, str(e)
        return out
