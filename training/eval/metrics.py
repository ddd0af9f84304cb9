"""AVEB metrics with the paper's rules (Sun et al., appendix B), on plain strings.

    WER          ASR / AVSR: jiwer word error rate over the corpus, on normalised text
    qa_correct   VQA / open QA: correct if the reference occurs in the answer word by word; for a yes/no
                 reference the opposite word must not occur ("yes" in "yes, no" is wrong)
    exact_match  Video QA multiple choice (and the paper's "same measurement" for ISQA / AVM): the whole
                 normalised answer equals the reference
    ocr_score    TextVQA: every reference answer found in the generation contributes 1/3, capped at 1
                 (Singh et al., 2019: min(1, #humans who gave that answer / 3))
    captions     BLEU-4 (sacrebleu), METEOR (nltk; WordNet synonyms only when WordNet is installed
                 locally) and CIDEr-D (pycocoevalcap), each a corpus score in [0, 100] (CIDEr x 100)

SPICE (and so SPIDEr, the paper's AC metric) needs Java and Stanford models that cannot be fetched
here; it is not computed. Free-form AVSD / VGGSS answers use judge.py when a judge is configured.

Notation: N samples; ``refs`` is a list of N lists of reference strings (captions may have several).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache

_NON_WORD = re.compile(r"[^\w\s]")
YES_NO_OPPOSITE = {"yes": "no", "no": "yes"}
OCR_HITS_FOR_FULL_CREDIT = 3  # TextVQA: an answer given by 3 of the 10 annotators scores 1


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed (the comparison form of every rule)."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def words(text: str) -> list[str]:
    return normalise(text).split()


def contains_words(answer: str, reference: str) -> bool:
    """True if the reference's words occur contiguously, as whole words, in the answer."""
    a, r = words(answer), words(reference)
    if not r:
        return False
    return any(a[i:i + len(r)] == r for i in range(len(a) - len(r) + 1))


def qa_correct(answer: str, reference: str) -> bool:
    """Appendix B VQA rule: reference found word by word; for yes/no, the opposite must be absent."""
    if not contains_words(answer, reference):
        return False
    opposite = YES_NO_OPPOSITE.get(normalise(reference))
    return opposite is None or opposite not in words(answer)


def exact_match(answer: str, reference: str) -> bool:
    """Multiple-choice rule: the normalised answer is exactly the normalised reference."""
    return normalise(answer) == normalise(reference) != ""


def ocr_score(answer: str, references: Sequence[str]) -> float:
    """TextVQA-style: each reference answer (with repeats) found in the answer adds 1/3, capped at 1."""
    hits = sum(contains_words(answer, r) for r in references)
    return min(1.0, hits / OCR_HITS_FOR_FULL_CREDIT)


def _check(hyps: Sequence[str], refs: Sequence, what: str) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{what}: {len(hyps)} hypotheses but {len(refs)} references (expected equal counts)")
    if not hyps:
        raise ValueError(f"{what}: no samples to score")


def wer(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus WER in [0, inf) on normalised words (jiwer). An empty reference is a ValueError."""
    import jiwer

    _check(hyps, refs, "wer")
    r = [normalise(x) for x in refs]
    empty = [i for i, x in enumerate(r) if not x]
    if empty:
        raise ValueError(f"wer: reference {empty[0]} is empty after normalisation (expected words)")
    return float(jiwer.wer(r, [normalise(x) for x in hyps]))


def _as_lists(refs: Sequence) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in refs]


def bleu(hyps: Sequence[str], refs: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU-4 in [0, 100] (sacrebleu, 13a tokenisation, on normalised text); any number of refs."""
    import sacrebleu

    _check(hyps, refs, "bleu")
    lists = _as_lists(refs)
    width = max(len(r) for r in lists)
    # sacrebleu takes reference *streams*; None marks a sample with fewer references than the widest.
    streams = [[normalise(r[k]) if k < len(r) else None for r in lists] for k in range(width)]
    return float(sacrebleu.corpus_bleu([normalise(h) for h in hyps], streams).score)


class _NoWordNet:
    """Stands in for WordNet when it is not installed: METEOR then matches exact words and stems only."""

    @staticmethod
    def synsets(*_args, **_kwargs) -> list:
        return []


@lru_cache(maxsize=1)
def wordnet():
    """nltk's WordNet if its data is installed locally (nltk data dir or Debian's wordnet-base), else None."""
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    try:
        from nltk.corpus import wordnet as wn

        wn.ensure_loaded()
        return wn
    except LookupError:
        pass
    for root in ("/usr/share/wordnet",):
        try:
            return WordNetCorpusReader(root, None)
        except (OSError, LookupError):
            continue
    return None


def meteor(hyps: Sequence[str], refs: Sequence[str | Sequence[str]], synonyms: bool | None = None) -> float:
    """Mean sentence METEOR in [0, 100] (nltk: exact, Porter stem and, if available, WordNet synonyms).

    ``synonyms=None`` uses WordNet when installed; False forces exact + stem (deterministic everywhere).
    """
    from nltk.translate.meteor_score import meteor_score

    _check(hyps, refs, "meteor")
    wn = wordnet() if synonyms is not False else None
    if synonyms and wn is None:
        raise ValueError("meteor: synonyms=True needs WordNet (apt-get install wordnet-base), none found")
    scores = [meteor_score([words(r) for r in rs], words(h), wordnet=wn or _NoWordNet())
              for h, rs in zip(hyps, _as_lists(refs), strict=True)]
    return 100.0 * sum(scores) / len(scores)


def cider(hyps: Sequence[str], refs: Sequence[str | Sequence[str]]) -> float:
    """Corpus CIDEr-D x 100 (pycocoevalcap; IDF from this corpus' references, as COCO does)."""
    from pycocoevalcap.cider.cider import Cider

    _check(hyps, refs, "cider")
    gts = {i: [normalise(r) for r in rs] for i, rs in enumerate(_as_lists(refs))}
    res = {i: [normalise(h)] for i, h in enumerate(hyps)}
    score, _ = Cider().compute_score(gts, res)
    return 100.0 * float(score)


def caption_scores(hyps: Sequence[str], refs: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """BLEU-4, METEOR and CIDEr together (what IC / AC / free-form tasks report)."""
    return {"bleu4": bleu(hyps, refs), "meteor": meteor(hyps, refs), "cider": cider(hyps, refs)}


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan
