import pytest

from captioner.data.vocab import END, PAD, SPECIALS, START, UNK, Vocabulary, detokenize, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Dog's ball, isn't it RED?") == ["a", "dog", "'s", "ball", "is", "n't", "it", "red"]


def test_specials_have_fixed_ids():
    vocab = Vocabulary.build(["a dog"], min_count=1)
    assert vocab.itos[:4] == list(SPECIALS)
    assert (PAD, START, END, UNK) == (0, 1, 2, 3)


def test_round_trip_and_unknown_words():
    vocab = Vocabulary.build(["a dog runs on the grass", "a dog sits"], min_count=1)
    ids = vocab.encode("A dog runs on the grass.")
    assert ids[0] == START and ids[-1] == END
    assert vocab.decode(ids[1:]) == "a dog runs on the grass"
    unknown = vocab.encode("a zebra runs")
    assert unknown[2] == UNK
    assert vocab.words(unknown[1:]) == ["a", "<unk>", "runs"]


def test_min_count_and_max_size_order_by_frequency():
    captions = ["a a a b b c"]
    assert Vocabulary.build(captions, min_count=2).itos[4:] == ["a", "b"]
    assert Vocabulary.build(captions, min_count=1, max_size=5).itos[4:] == ["a"]


def test_decode_stops_at_end_and_skips_specials():
    vocab = Vocabulary.build(["a dog"], min_count=1)
    a, dog = vocab.stoi["a"], vocab.stoi["dog"]
    assert vocab.words([START, a, PAD, dog, END, a]) == ["a", "dog"]


def test_json_round_trip(tmp_path):
    vocab = Vocabulary.build(["a dog runs", "über café"], min_count=1)
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json").itos == vocab.itos


def test_load_rejects_vocab_without_specials(tmp_path):
    (tmp_path / "vocab.json").write_text('{"words": ["a", "b"]}')
    with pytest.raises(ValueError, match="vocab.json.*must start with"):
        Vocabulary.load(tmp_path / "vocab.json")


def test_detokenize_for_display():
    assert detokenize(["a", "dog", "'s", "ball", "is", "n't", "red"]) == "A dog's ball isn't red."
    assert detokenize(["two", "dogs", "play", ",", "then", "rest"]) == "Two dogs play, then rest."
    assert detokenize([]) == ""


def test_sentence_guard_makes_articles_and_numbers_agree():
    from captioner.data.vocab import agree

    known = {"zebra", "zebras", "elephant", "dog", "dogs", "black", "blacks", "man", "men"}
    assert agree("a elephant near a umbrella".split(), known) == "an elephant near an umbrella".split()
    assert agree("an dog and an uniform and a hour".split(), known) == "a dog and a uniform and an hour".split()
    assert agree("two zebra and three man".split(), known) == "two zebras and three men".split()
    assert agree("two black dogs".split(), known) == "two black dogs".split()  # the noun comes later
    assert agree("two giraffe".split(), known) == "two giraffe".split()  # no known plural: left alone
    assert agree([], known) == []
