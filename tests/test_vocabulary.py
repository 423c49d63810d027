import pytest

from captioning.vocabulary import END_ID, PAD_ID, START_ID, UNK_ID, Vocabulary, tokenize


def test_tokenize_drops_punctuation_and_keeps_hyphens():
    assert tokenize("A man's T-shirt , red !") == ["a", "man", "'s", "t-shirt", "red"]


# Raw text and the tokens the COCO evaluation gives it (Stanford PTBTokenizer 3.4.1 with -lowerCase, then
# pycocoevalcap's punctuation filter), written out so that no Java is needed here; tests/test_metrics_reference.py
# runs the Java program itself, on these kinds of captions and on all of Flickr8k.
PTB_TOKENS = {
    "Three dogs ( brown , white and black ) play [ outside ] {!}": "three dogs -lrb- brown white and black -rrb- play "
                                                                  "-lsb- outside -rsb- -lcb- -rcb-",
    "The dog isn't running, it can't, it cannot, it won't.": "the dog is n't running it ca n't it can not it wo n't",
    "It’s gonna be a dog 's day ; we're sure they'll like it": "it 's gon na be a dog 's day we 're sure they 'll like it",
    "A man in Washington D.C. with Mr. Potato Head , Jr. and a S.C.U.B.A. diver in the U.S.":
        "a man in washington d.c. with mr. potato head jr. and a s.c.u.b.a. diver in the u.s.",
    "Main St. at 10:30 a.m. , no. 5 , a couple getting wed. , a dog getting a wash. , he says no.":
        "main st. at 10:30 a.m. no. 5 a couple getting wed. a dog getting a wash he says no",
    "Player # 2 , #teamwork , jeans & a hat for $5 or 50% , 1,000 or 3.5 or -5 , and/or www.statefarm.com":
        "player # 2 #teamwork jeans & a hat for $ 5 or 50 % 1,000 or 3.5 or -5 and/or www.statefarm.com",
    "A five o'clock shadow at a café , rock 'n' roll in the '90s , wow!! what?! ... -- - `` ''":
        "a five o'clock shadow at a café rock 'n' roll in the '90s wow !! what ?!",
    "RIF=ding a 2.5-year-old's x-ray <unk> dogs' 'quoted'": "rif = ding a 2.5-year-old 's x-ray <unk> dogs quoted",
}


@pytest.mark.parametrize("text", PTB_TOKENS)
def test_tokenize_gives_the_coco_evaluation_tokens(text):
    assert tokenize(text) == PTB_TOKENS[text].split()


@pytest.mark.parametrize("text", PTB_TOKENS)
def test_tokenize_gives_back_its_own_tokens(text):
    "Decoded captions are joined tokens, and the metrics tokenize them again."
    tokens = tokenize(text)
    assert tokenize(" ".join(tokens)) == tokens


def test_each_token_alone_is_itself_except_an_abbreviation_before_a_number():
    "Self-critical training (notebook 08) tokenizes vocabulary words one at a time; one PTB rule looks past a space."
    tokens = [t for text in PTB_TOKENS for t in tokenize(text)]
    assert [t for t in tokens if tokenize(t) != [t]] == ["no."]
    assert tokenize("no. 5") == ["no.", "5"] and tokenize("no.") == ["no"]


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


def test_special_tokens_typed_in_a_caption_are_unknown_words():
    vocab = Vocabulary.build(["a dog runs"], min_freq=1)
    assert tokenize("a <end> dog") == ["a", "<end>", "dog"]  # PTB keeps tags whole
    assert vocab.encode("a <end> dog <pad> runs <unk>") == vocab.encode("a cat dog cat runs cat")


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
