"""What notebook 06 says about the metrics blog tutorials report (NLTK's BLEU, the `rouge` package's ROUGE-L) holds.

Its section "Blog numbers and paper numbers" explains how these differ from the COCO evaluation's; each claim it
rests on is checked here on fixed inputs, so an upgrade of either package that changes one shows up as a failure."""
import math
import warnings

import pytest

from captioning.metrics import bleu, caption_tokens, rouge_l_scores

nltk_bleu = pytest.importorskip("nltk.translate.bleu_score", reason="nltk is a notebook extra: pip install '.[notebooks]'")
rouge = pytest.importorskip("rouge", reason="the `rouge` package is a notebook extra: pip install '.[notebooks]'")

REFERENCES = [["a big red circle above a small blue square", "a red circle over a blue square",
               "two shapes with a red circle above a blue square"],
              ["three small green stars", "a group of three green stars", "three little green stars in a row"]]
CANDIDATES = ["a red circle above a blue square", "three small green stars in a row"]


def tokens(captions): return [caption_tokens(c) for c in captions]


def rouge_l_package(candidate: str, reference: str) -> float:
    return rouge.Rouge(metrics=["rouge-l"], stats=["f"]).get_scores(candidate, reference)[0]["rouge-l"]["f"]


def test_nltk_corpus_bleu_is_the_coco_bleu_on_the_same_tokens():
    ours = bleu(CANDIDATES, REFERENCES)[3]
    theirs = nltk_bleu.corpus_bleu([tokens(refs) for refs in REFERENCES], tokens(CANDIDATES))
    assert math.isclose(ours, theirs, rel_tol=1e-9)


def test_nltk_corpus_bleu_counts_a_short_caption_as_one_missed_ngram():
    "A caption shorter than n words has no n-grams, yet NLTK adds one to its n-gram total; the COCO code adds none."
    candidates, references = [*CANDIDATES, "three stars"], [*REFERENCES, ["three stars", "three green stars"]]
    ours = bleu(candidates, references)[3]
    theirs = nltk_bleu.corpus_bleu([tokens(refs) for refs in references], tokens(candidates))
    assert theirs < ours - 0.01


def test_sentence_bleu_without_smoothing_is_zero_without_a_matching_4gram():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns about the missing 4-grams: that is the point here
        score = nltk_bleu.sentence_bleu(tokens(REFERENCES[0]), caption_tokens("a blue square and a red circle"))
    smoothed = nltk_bleu.sentence_bleu(tokens(REFERENCES[0]), caption_tokens("a blue square and a red circle"),
                                       smoothing_function=nltk_bleu.SmoothingFunction().method1)
    assert score < 1e-10 < 0.05 < smoothed  # NLTK returns a tiny number, not 0


def test_rouge_package_is_an_f1_on_one_reference():
    "With distinct words and no full stop, the package's ROUGE-L is the COCO formula with beta = 1 and one reference."
    for candidate, refs in zip(CANDIDATES, REFERENCES):
        for reference in refs:
            if len(set(reference.split())) < len(reference.split()): continue  # repeated words: see the next test
            expected = rouge_l_scores([candidate], [[reference]], beta=1.0)[0]
            assert math.isclose(rouge_l_package(candidate, reference), expected, abs_tol=1e-6)
    beta_12 = rouge_l_scores([CANDIDATES[0]], [[REFERENCES[0][1]]])[0]
    assert not math.isclose(rouge_l_package(CANDIDATES[0], REFERENCES[0][1]), beta_12, abs_tol=1e-3)


def test_rouge_package_counts_distinct_words():
    "Repeated words count once (its n-gram sets are sets), so a stutter costs the candidate nothing in precision."
    reference = "a red circle above a blue square"
    stutter = "a red circle a red circle"
    assert math.isclose(rouge_l_package(stutter, reference), rouge_l_package("a red circle", reference))
    assert rouge_l_scores([stutter], [[reference]], beta=1.0)[0] < rouge_l_package(stutter, reference)


def test_rouge_package_splits_sentences_at_full_stops_and_keeps_case():
    reference = "A dog runs on the grass ."
    assert math.isclose(rouge_l_package("A dog runs on the grass", reference), 1.0, abs_tol=1e-6)  # "." ends a sentence
    assert rouge_l_package("a dog runs on the grass", reference) < 1.0  # "a" is not "A"
    with pytest.raises(ValueError):  # an empty caption is an error, not a score of 0
        rouge_l_package("", reference)
