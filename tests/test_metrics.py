"""Caption metrics: BLEU, ROUGE-L and CIDEr-D equal pycocoevalcap's on the same tokens; METEOR never crashes.

Only the tests that compare with pycocoevalcap or run METEOR need pycocoevalcap (and Java); the others run without it."""
import contextlib
import io
import logging
import random
import shutil
import time

import numpy as np
import pytest

from captioning import metrics
from captioning.metrics import (METRIC_NAMES, CiderD, bleu, bleu_statistics, caption_statistics, caption_tokens,
                                cider_d, evaluate_captions, lcs_length, meteor_score, meteor_unavailable_reason,
                                most_frequent_captions, ngram_counts, repeated_ngram_rate, rouge_l, rouge_l_scores,
                                scores_by_length, vocabulary_used)

TOLERANCE = 1e-6


def coco_scorers():
    "pycocoevalcap's Bleu, Rouge and Cider, or skip the calling test: only the parity tests need them."
    reason = "pycocoevalcap is not installed: the parity tests compare with it"
    return tuple(pytest.importorskip(f"pycocoevalcap.{m}.{m}", reason=reason) for m in ("bleu", "rouge", "cider"))


requires_java = pytest.mark.skipif(shutil.which("java") is None,
                                   reason="no `java` on the PATH: METEOR 1.5 is a Java program (.ci/run installs one)")

# 20 images described the way Flickr8k annotators write, five references each
REFERENCES = [
    ["A black dog is running through the grass .", "A dog runs across a green field .",
     "A black dog running on the lawn .", "The dog is running fast in a field .", "A black puppy sprints over grass ."],
    ["Two children are playing in the sand at the beach .", "Two kids dig in the sand near the ocean .",
     "A boy and a girl play on a sandy beach .", "Children building a sandcastle on the beach .",
     "Two young children playing in the sand ."],
    ["A man in a red jacket is climbing a rock wall .", "A rock climber scales a steep cliff .",
     "A person climbs up the side of a large rock .", "A climber in red hangs from a rocky cliff face .",
     "A man is rock climbing ."],
    ["A woman rides a bicycle down a city street .", "A lady on a bike in the street .",
     "A woman in a helmet is riding her bike past parked cars .", "A cyclist rides through town .",
     "A woman riding a bicycle on the road ."],
    ["A black and white dog jumps to catch a frisbee .", "A dog leaps into the air after a frisbee .",
     "The dog is catching a red frisbee in the park .", "A border collie jumps for a flying disc .",
     "A dog jumping up to catch a toy ."],
    ["Three people sit on a bench in the park .", "A group of friends sitting on a park bench .",
     "Three men are sitting on a wooden bench .", "People resting on a bench under a tree .",
     "Three people are sitting outside on a bench ."],
    ["A surfer rides a large wave .", "A man on a surfboard riding a wave in the ocean .",
     "A person surfing a big blue wave .", "A surfer in a black wetsuit is on a wave .",
     "Someone is surfing in the ocean ."],
    ["A little girl in a pink dress is running up the stairs .", "A child climbs a set of stairs .",
     "A young girl wearing pink goes up some steps .", "A girl in pink walking up a staircase .",
     "A small child is climbing the stairs inside a house ."],
    ["A man plays the guitar on a stage .", "A musician performs with his guitar in front of a crowd .",
     "A guitarist is singing into a microphone .", "A man with long hair playing an electric guitar .",
     "A singer plays guitar at a concert ."],
    ["Two dogs play tug of war with a rope .", "Two brown dogs pull on a toy .",
     "A pair of dogs fighting over a rope toy .", "Two dogs are playing together in the yard .",
     "The dogs tug on a red rope ."],
    ["A skier goes down a snowy mountain .", "A person skiing on fresh snow .",
     "A man in an orange jacket skis down a slope .", "Someone is skiing down a hill covered in snow .",
     "A skier jumps over a pile of snow ."],
    ["A boy in a blue shirt kicks a soccer ball .", "A child playing soccer on a field .",
     "A young boy is kicking a ball on the grass .", "A kid runs after a soccer ball .",
     "A boy plays football in the park ."],
    ["An old man sits on a bench reading a newspaper .", "A man is reading the paper outside .",
     "An elderly man reads a newspaper on a park bench .", "A gray haired man sitting and reading .",
     "A man in a hat reads the news ."],
    ["A crowd of people walks down a busy street .", "Many people are walking in the city .",
     "Pedestrians cross a crowded street .", "A busy city street full of people .",
     "People walking past shops on a sidewalk ."],
    ["A brown horse runs in a field .", "A horse gallops across the meadow .",
     "A brown horse is running on the grass .", "A horse running near a fence .",
     "The horse runs through a green pasture ."],
    ["A little boy is swimming in a pool .", "A child splashes in the water .",
     "A boy in goggles swims in a swimming pool .", "A young child is playing in a pool .",
     "A kid jumps into the blue water ."],
    ["A woman is cooking in the kitchen .", "A lady stirs a pot on the stove .",
     "A woman prepares food in a kitchen .", "A person is cooking dinner .",
     "A woman in an apron cooks at the stove ."],
    ["Two men are fishing from a boat .", "Two people sit in a small boat on a lake .",
     "Men fishing on the water .", "Two fishermen in a boat .", "A pair of men cast their lines from a boat ."],
    ["A cat is sleeping on a couch .", "A gray cat naps on the sofa .", "A cat curled up on a pillow .",
     "The cat is lying on the couch .", "A sleepy cat rests on a blue couch ."],
    ["A man rides a motorcycle down the road .", "A motorcyclist on a highway .",
     "A person in a black helmet riding a motorbike .", "A man on a motorcycle speeds along a road .",
     "A biker rides down a country road ."],
]
# varied candidates: good, short, an exact match, empty, one word, word salad, wrong image, repetition, ...
CANDIDATES = [
    "A black dog runs across the grass .", "Two kids play in the sand .", "A man is rock climbing .", "",
    "dog", "frisbee the catch to jumps dog a", "A man plays the guitar on a stage .", "a girl a girl a girl",
    "A man plays a guitar .", "Two dogs play with a rope .", "A person is skiing .",
    "A boy kicks a soccer ball on the grass in the park near some trees .", "A man reads a newspaper .",
    "People walking .", "A horse .", "A child swims in the pool .", "A woman cooking .",
    "Two men fishing in a boat on a lake .", "A cat is sleeping on a couch .", "A man on a bicycle .",
]


def coco_scores(candidates, references):
    "pycocoevalcap's BLEU-1..4, ROUGE-L and CIDEr-D (corpus and per caption) on our tokens joined by spaces."
    coco_bleu, coco_rouge, coco_cider = coco_scorers()
    joined = lambda caption: " ".join(caption_tokens(caption))
    gts = {i: [joined(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [joined(c)] for i, c in enumerate(candidates)}
    with contextlib.redirect_stdout(io.StringIO()):
        b, _ = coco_bleu.Bleu(4).compute_score(gts, res)
    r, r_each = coco_rouge.Rouge().compute_score(gts, res)
    c, c_each = coco_cider.Cider().compute_score(gts, res)
    return b, r, r_each, c, c_each


def assert_matches_coco(candidates, references):
    b, r, r_each, c, c_each = coco_scores(candidates, references)
    assert np.abs(np.array(bleu(candidates, references)) - b).max() < TOLERANCE
    assert abs(rouge_l(candidates, references) - r) < TOLERANCE
    assert np.abs(rouge_l_scores(candidates, references) - r_each).max() < TOLERANCE
    assert abs(cider_d(candidates, references) - c) < TOLERANCE
    assert np.abs(CiderD(references).score(candidates) - c_each).max() < TOLERANCE


def random_corpus(seed, n_images=30):
    "Random captions over a 12-word vocabulary (so n-grams do match), 1-5 references per image, 0-12 words."
    rng = random.Random(seed)
    vocab = "a dog cat runs sits on the red grass mat big small".split()
    caption = lambda shortest: " ".join(rng.choices(vocab, k=rng.randint(shortest, 12)))
    references = [[caption(1) for _ in range(rng.randint(1, 5))] for _ in range(n_images)]
    return [caption(0) for _ in range(n_images)], references


def test_fixed_set_matches_pycocoevalcap():
    assert len(REFERENCES) == len(CANDIDATES) == 20 and all(len(refs) == 5 for refs in REFERENCES)
    assert_matches_coco(CANDIDATES, REFERENCES)


@pytest.mark.parametrize("seed", range(10))
def test_random_corpora_match_pycocoevalcap(seed):
    assert_matches_coco(*random_corpus(seed))


def test_synthetic_corpus_matches_pycocoevalcap():
    from captioning.synthetic import synthetic_corpus
    references = [item.captions for item in synthetic_corpus(n_train=0, n_dev=40, n_test=0)["dev"]]
    candidates = [refs[0] if i % 3 == 0 else references[(i + 1) % 40][1] if i % 3 == 1 else "a red circle"
                  for i, refs in enumerate(references)]
    assert_matches_coco(candidates, references)


def test_tokenized_lists_and_raw_strings_agree():
    tokenized = [caption_tokens(c) for c in CANDIDATES]
    assert bleu(tokenized, REFERENCES) == bleu(CANDIDATES, REFERENCES)
    assert np.array_equal(CiderD(REFERENCES).score(tokenized), CiderD(REFERENCES).score(CANDIDATES))
    assert caption_tokens("A Dog's ball!") == ["a", "dog", "'s", "ball"]


def test_building_blocks():
    assert ngram_counts(["a", "b", "a"], max_n=2) == {("a",): 2, ("b",): 1, ("a", "b"): 1, ("b", "a"): 1}
    assert lcs_length("a dog runs on grass".split(), "a brown dog runs fast on the grass".split()) == 5
    stats = bleu_statistics("the the the the", ["the dog runs", "a cat sits on the mat"], max_n=2)
    assert stats == dict(length=4, reference_length=3, ngrams=[4, 3], matches=[1, 0])


def test_exact_match_scores_one():
    references = REFERENCES[:5]
    copies = [refs[2] for refs in references]
    assert np.allclose(bleu(copies, references), 1.0, atol=1e-8)
    assert rouge_l(copies, references) == 1.0


def test_cider_with_training_document_frequencies_matches_pycocoevalcap_on_the_whole_set():
    "Self-critical use: several candidates per image, document frequencies from all images."
    candidates, references = random_corpus(seed=42, n_images=40)
    scorer = CiderD(references)
    rng = random.Random(0)
    for _ in range(3):  # each round: one candidate per image, scored by the COCO code on the whole set
        round_candidates = [rng.choice(refs) if rng.random() < 0.3 else rng.choice(candidates) for refs in references]
        _, _, _, _, expected = coco_scores(round_candidates, references)
        indices = rng.sample(range(40), k=15)  # score a "batch" of 15 images only
        got = scorer.score([round_candidates[i] for i in indices], indices)
        assert np.abs(got - expected[indices]).max() < TOLERANCE


def test_document_frequency_source():
    _, _, _, _, expected = coco_scores(CANDIDATES, REFERENCES)
    subset = CiderD(REFERENCES[:6], document_frequency_source=REFERENCES)
    assert subset.n_df_images == 20 and subset.n_images == 6
    assert np.abs(subset.score(CANDIDATES[:6]) - expected[:6]).max() < TOLERANCE
    assert np.array_equal(CiderD(REFERENCES, document_frequency_source=REFERENCES).score(CANDIDATES),
                          CiderD(REFERENCES).score(CANDIDATES))
    assert CiderD(REFERENCES[:1]).score([REFERENCES[0][0]])[0] == 0.0  # one image: every IDF weight is 0


def test_cider_multiple_candidates_per_image_and_validation():
    scorer = CiderD(REFERENCES)
    scores = scorer.score(["a black dog runs on the grass", "a dog", "", "a black dog runs on the grass"], [0, 0, 0, 1])
    assert scores[0] > scores[1] > scores[2] == 0.0 and scores[3] < scores[0]
    assert scorer.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="pass image_indices"):
        scorer.score(["a dog"])
    with pytest.raises(ValueError, match="must lie in"):
        scorer.score(["a dog"], [20])
    with pytest.raises(ValueError, match="non-empty list"):
        CiderD([["a dog"], []])


def test_cider_reward_throughput():
    "Loose bound: the reward must score thousands of captions per second (this CPU does about 20,000)."
    scorer = CiderD(REFERENCES * 50)
    rng = random.Random(0)
    candidates = [rng.choice(refs) for refs in REFERENCES * 250]
    indices = [rng.randrange(len(REFERENCES) * 50) for _ in candidates]
    start = time.perf_counter()
    scorer.score(candidates, indices)
    assert len(candidates) / (time.perf_counter() - start) > 2000


def test_evaluate_captions_returns_plain_floats_in_order():
    results = evaluate_captions(CANDIDATES, REFERENCES, meteor=False)
    assert list(results) == [m for m in METRIC_NAMES if m != "METEOR"]
    assert all(type(v) is float for v in results.values())
    assert all(0 <= results[m] <= 1 for m in ("BLEU-1", "BLEU-4", "ROUGE-L")) and 0 <= results["CIDEr-D"] <= 10
    with pytest.raises(ValueError, match="one candidate per image"):
        evaluate_captions(CANDIDATES[:3], REFERENCES, meteor=False)
    with pytest.raises(ValueError, match="non-empty list"):
        evaluate_captions(["a dog"], ["a dog runs"], meteor=False)


def test_meteor_without_java_is_none_with_a_reason(monkeypatch, caplog):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "java" in meteor_unavailable_reason()
    with caplog.at_level(logging.WARNING, logger=metrics.__name__):
        results = evaluate_captions(CANDIDATES, REFERENCES)
    assert results["METEOR"] is None and "METEOR unavailable" in caplog.text
    assert type(results["CIDEr-D"]) is float


@requires_java
def test_meteor_with_java():
    pytest.importorskip("pycocoevalcap.meteor.meteor", reason="pycocoevalcap (which ships METEOR 1.5) is not installed")
    assert meteor_unavailable_reason() is None  # Java and pycocoevalcap are here: METEOR must run, not return None
    try:
        value = meteor_score(CANDIDATES, REFERENCES)
        assert isinstance(value, float) and 0 < value < 1, f"METEOR gave {value!r} although Java is installed"
        assert meteor_score([REFERENCES[0][1]], [REFERENCES[0]]) > 0.9
        assert meteor_score(["grass"], [REFERENCES[0]]) < meteor_score([CANDIDATES[0]], [REFERENCES[0]])
    finally:
        metrics.close_meteor()


def test_error_analysis_helpers():
    captions = ["a dog", "A dog.", "a red circle and a red circle", "a cat"]
    assert repeated_ngram_rate(captions) == 0.25 and repeated_ngram_rate(captions, n=1) == 0.25
    assert most_frequent_captions(captions, k=1) == [("a dog", 2)]
    assert len(vocabulary_used(captions)) == 6
    assert scores_by_length(captions, [1.0, 0.0, 0.5, 0.5]) == {2: (3, 0.5), 7: (1, 0.5)}
    stats = caption_statistics(captions)
    assert stats["captions"] == 4 and stats["distinct captions"] == 0.75 and stats["distinct words"] == 6


def test_a_failing_meteor_process_is_reported_and_stopped(monkeypatch, caplog):
    "A Java process that dies or answers garbage gives None and a warning, and leaves no lock held."
    import subprocess
    import threading

    coco_meteor = pytest.importorskip("pycocoevalcap.meteor.meteor", reason="pycocoevalcap is not installed")

    class BrokenMeteor:
        def __init__(self):
            self.meteor_p = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE)
            self.lock = threading.Lock()

        def compute_score(self, gts, res):
            self.lock.acquire()  # as the real wrapper does, then fails before releasing it
            raise ValueError("could not convert string to float: ''")

    metrics.close_meteor()
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(coco_meteor, "Meteor", BrokenMeteor)
    with caplog.at_level(logging.WARNING, logger=metrics.__name__):
        assert meteor_score(CANDIDATES, REFERENCES) is None
    assert "the Java METEOR failed" in caplog.text and metrics._meteor is None


def test_cider_d_of_captions_that_match_nothing_is_zero():
    "An untrained model can emit only empty captions: CIDEr-D is 0, not a crash."
    from captioning.metrics import cider_d
    assert cider_d(["", ""], [["a dog runs"], ["a cat sits"]]) == 0.0
    assert cider_d(["zebra", "zebra"], [["a dog runs"], ["a cat sits"]]) == 0.0
