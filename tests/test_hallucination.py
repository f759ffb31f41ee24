"""The CHAIR scorer on a small object table and captions whose answers are counted by hand."""

import pytest

from captioner.evaluation.hallucination import ObjectTable, by_person, hallucination, names_person, singular

TABLE = """person, man, woman, people, child, boy, baby
dog, puppy
bear
elephant
dining table, table
toilet
tie, bow tie
teddy bear, teddybear
hot dog
train, locomotive
"""


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "synonyms.txt"
    path.write_text(TABLE)
    return ObjectTable.load(path)


def test_words_two_word_names_and_plurals(table):
    assert table.mentions("A man and two dogs at a dining table.") == ["person", "dog", "dining table"]
    assert table.mentions("A teddy bear beside a bear.") == ["teddy bear", "bear"]  # two words first
    assert table.mentions("Men eating hot dogs.") == ["person", "hot dog"]
    assert table.mentions("A baby elephant near the train tracks.") == ["elephant"]  # not a person, no train
    assert table.mentions("A man sits on the toilet seat.") == ["person", "toilet"]
    assert table.mentions("A boy in a bow tie.") == ["person", "tie"]
    assert table.mentions("Puppies and puppy.") == ["dog", "dog"]
    assert table.mentions("A grassy field.") == []
    assert singular("benches") == "bench" and singular("ponies") == "pony" and singular("grass") == "grass"


def test_chair_scores_counted_by_hand(table):
    references = {
        "1": ["A man walks a dog.", "A person with a dog.", "A man and his dog.", "Man and puppy.", "A dog."],
        "2": ["An elephant.", "An elephant by a tree.", "A large elephant.", "An elephant walks.", "A man rides an elephant."],
        "3": ["A table.", "A dining table.", "Food on a table.", "A table set for dinner.", "A kitchen."],
    }
    predictions = {
        "1": "A man and a dog on a bench.",        # person, dog: both named by references
        "2": "A man and a dog near an elephant.",  # person (1 reference of 5: present), dog absent
        "3": "A woman and a bear at a table.",     # person absent, bear absent, table present
    }
    h = hallucination(predictions, references, table)
    # mentions: 2 + 3 + 3 = 8; absent: dog (2), person and bear (3) = 3
    assert h["CHAIRi"] == pytest.approx(100 * 3 / 8)
    assert h["CHAIRs"] == pytest.approx(100 * 2 / 3)
    # salient (>= 3 of 5 references): 1: person (4: "man" x2, "person", "man"), dog (5); 2: elephant; 3: table
    # named: person, dog | elephant | table -> 4 of 4
    assert h["object_recall"] == pytest.approx(100.0)
    assert dict(h["most_invented"]) == {"dog": 1, "person": 1, "bear": 1}
    missed = hallucination({"2": "A tree by a river."}, references, table)
    assert missed["object_recall"] == 0.0 and missed["CHAIRs"] == 0.0 and missed["CHAIRi"] == 0.0


def test_photos_with_and_without_a_person_scored_apart(table):
    references = {
        "walk": ["A man walks a dog.", "A dog on a leash.", "A dog.", "A dog walks.", "A brown dog."],
        "zoo": ["An elephant.", "An elephant by a tree.", "A large elephant.", "An elephant walks.", "A tree."],
        "dinner": ["A table.", "A dining table.", "Food on a table.", "A table set for dinner.", "A kitchen."],
    }
    predictions = {
        "walk": "A dog on a leash.",               # with a person (one reference says "man")
        "zoo": "A man feeds an elephant.",         # without one: a person invented
        "dinner": "A table with food.",            # without one: nothing invented
    }
    assert [names_person(table, refs) for refs in references.values()] == [True, False, False]
    split = by_person(predictions, references, table)
    assert split["with_person"]["photos"] == 1 and "person_invented" not in split["with_person"]
    assert split["with_person"]["CHAIRs"] == 0.0 and split["with_person"]["object_recall"] == 100.0
    without = split["without_person"]
    assert without["photos"] == 2 and without["person_invented"] == 1
    assert without["CHAIRs"] == pytest.approx(50.0) and without["CHAIRi"] == pytest.approx(100 * 1 / 3)
    assert dict(without["most_invented"]) == {"person": 1}
    assert "with_person" not in by_person({"zoo": "A tree."}, references, table)


def test_a_bad_table_names_its_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("person, man\ndog, 42\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected"):
        ObjectTable.load(bad)
    with pytest.raises(ValueError, match=r"missing.txt: cannot read"):
        ObjectTable.load(tmp_path / "missing.txt")
