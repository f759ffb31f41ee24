"""Naming the animal the encoder's classifier recognises (captioner/grounding/naming.py): which captions
change, which stay, and that the change reaches the caption, its sentence and its explanation."""

import json
from pathlib import Path

import gradio
import pytest
import torch

from captioner import Captioner
from captioner.cli import main
from captioner.data.vocab import Vocabulary
from captioner.grounding.labels import imagenet_classes
from captioner.grounding.naming import animal_names, name_animal

LION = Path(gradio.__file__).parent / "media_assets" / "images" / "lion.jpg"


def sure_of(**classes: float) -> torch.Tensor:
    """1000 class probabilities with the named classes at the given probabilities ("ice_bear"
    for "ice bear") and the rest spread evenly."""
    names, _ = imagenet_classes()
    probs = torch.full((1000,), (1 - sum(classes.values())) / (1000 - len(classes)))
    for name, p in classes.items():
        probs[names.index(name.replace("_", " "))] = p
    return probs


def test_a_caption_takes_the_animal_the_classifier_is_sure_of():
    words, renamed = name_animal("a dog runs through the grass".split(), sure_of(cheetah=0.9))
    assert words == "a cheetah runs through the grass".split() and renamed == {1: "dog"}
    # every mention of the one animal, in its number; a two-word name stays one word of the caption
    words, renamed = name_animal("two dogs play with a dog".split(), sure_of(ice_bear=0.8))
    assert words == ["two", "polar bears", "play", "with", "a", "polar bear"] and renamed == {1: "dogs", 5: "dog"}
    # the words of several classes add up: three elephant classes at 0.3 each are sure of an elephant
    words, _ = name_animal("a bird standing in the water".split(),
                           sure_of(Indian_elephant=0.3, African_elephant=0.3, tusker=0.3))
    vocab = Vocabulary.build(["a bird standing in the water"], min_count=1)
    assert vocab.sentence(words)[1] == "An elephant standing in the water."  # the article agrees


@pytest.mark.parametrize("caption, probs, why", [
    ("a dog runs on the grass", sure_of(cheetah=0.6), "the classifier is not sure"),
    ("a dog chases a cheetah", sure_of(cheetah=0.9), "the recognised animal is named already"),
    ("two cheetahs run", sure_of(cheetah=0.9), "the recognised animal is named already, in the plural"),
    ("a dog chases a bird", sure_of(cheetah=0.9), "two different animals are named"),
    ("a brown dog on the sand", sure_of(Weimaraner=0.99), "a Weimaraner is a dog: the name covers it"),
    ("a dog swims", sure_of(cheetah=0.8, Weimaraner=0.1), "the named animal has support"),
    ("a man riding a horse on the beach", sure_of(Arabian_camel=0.9),
     "one ImageNet class (a sorrel) cannot say a horse is absent"),
    ("a man eating a hot dog", sure_of(cheetah=0.9), "a hot dog is food"),
    ("a man in a red shirt", sure_of(cheetah=0.9), "no animal is named"),
    ("a dog with a pizza", sure_of(pizza=0.95), "the classifier is sure of a food, not an animal"),
])
def test_a_caption_stays_as_it_is(caption, probs, why):
    assert name_animal(caption.split(), probs) == (caption.split(), {}), why


def test_animal_names_cover_the_classes_of_their_kinds():
    names, not_animals = animal_names()
    classes, words = imagenet_classes()
    dogs = {i for i, w in enumerate(words) if w == "dog"}
    assert len(dogs) > 100 and dogs <= set(names["dog"])
    assert classes.index("goose") in names["bird"] and classes.index("cheetah") not in names["dog"]
    assert classes.index("cheetah") in names["cat"]  # WordNet: a big cat, "cat" for short
    assert len(names["animal"]) > 390 and all(i < 398 for i in names["animal"])
    # words captions use for something else first: a toy, a machine, an adjective
    assert not {"kite", "crane", "young"} & set(names)
    assert {"hot dog", "teddy bear"} <= not_animals and "little dog" not in not_animals


@pytest.fixture(scope="module")
def builtin():
    return Captioner.from_pretrained(device="cpu", precision="fp32")


def test_captions_and_explanations_name_the_recognised_animal(builtin):
    """gradio's lion photo: the built-in model's words have no "lion"; the classifier knows one."""
    assert "lion" not in builtin.vocab.stoi and builtin.labels(LION, k=1)[0].name == "lion"
    named = builtin.generate(LION, "beam")[0].captions[0]
    plain = builtin.generate(LION, "beam", name_animals=False)[0].captions[0]
    assert named.renamed, (plain.text, named.text)
    assert [named.renamed.get(i, w) for i, w in enumerate(named.words)] == plain.words
    assert all(named.words[i] == "lion" for i in named.renamed) and "lion" in named.text.lower()
    assert named.token_logprobs == plain.token_logprobs  # the decoder's scores, untouched
    explanation = builtin.explain(LION, method="beam")
    assert [w.word for w in explanation.words] == named.words and explanation.caption == named.text
    assert {i: w.decoder_word for i, w in enumerate(explanation.words) if w.decoder_word} == named.renamed
    # the renamed position is explained as the decoder's own word, not as an unknown one
    of_plain = builtin.explain(LION, caption=plain.text)
    assert [w.probability for w in explanation.words] == pytest.approx([w.probability for w in of_plain.words])


def test_the_batch_cli_names_the_animal_and_says_what_it_replaced(tmp_path):
    named, plain = tmp_path / "named.jsonl", tmp_path / "plain.jsonl"
    assert main(["caption", str(LION), "--precision", "fp32", "--out", str(named)]) == 0
    assert main(["caption", str(LION), "--precision", "fp32", "--out", str(plain), "--no-animal-names"]) == 0
    [record], [kept] = ([json.loads(line) for line in f.read_text().splitlines()] for f in (named, plain))
    assert record["name_animals"] is True and kept["name_animals"] is False and "renamed" not in kept
    [(name, word)] = record["renamed"].items()
    assert name == "lion" and word in kept["caption"].lower().split()
    assert record["caption"] == kept["caption"].replace(word, "lion", 1)
