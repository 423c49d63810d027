import pytest

from captioning.vocabulary import END_ID, PAD_ID, START_ID, UNK_ID, Vocabulary, tokenize


def test_tokenize_drops_punctuation_and_keeps_hyphens():
    assert tokenize("A man's T-shirt , red !") == ["a", "man", "'s", "t-shirt", "red"]


def test_build_orders_by_frequency_and_applies_threshold():
    vocab = Vocabulary.build(["a dog", "a cat", "a dog runs"], min_freq=2)
    assert vocab.itos == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"]
    assert (PAD_ID, START_ID, END_ID, UNK_ID) == (0, 1, 2, 3)


def test_encode_decode_round_trip_and_unknown_words():
    vocab = Vocabulary.build(["a dog runs on grass"], min_freq=1)
    ids = vocab.encode("A dog runs on the grass.")
    assert ids[0] == START_ID and ids[-1] == END_ID and UNK_ID in ids
    assert vocab.decode(ids) == "a dog runs on <unk> grass"
    assert vocab.decode(vocab.encode("a dog runs")) == "a dog runs"


def test_empty_caption_is_an_error():
    vocab = Vocabulary.build(["a dog"], min_freq=1)
    with pytest.raises(ValueError, match="empty caption"):
        vocab.encode(" , . ")


def test_save_load(tmp_path):
    vocab = Vocabulary.build(["a dog", "a cat"], min_freq=1)
    loaded = Vocabulary.load(vocab.save(tmp_path / "v.json"))
    assert loaded.itos == vocab.itos
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Vocabulary.load(tmp_path / "bad.json")
