"""Regenerates captioner/grounding/imagenet_words.json: each ImageNet-1k class -> the word a person would
write in a caption (Norwich terrier -> dog, trolleybus -> bus, tusker -> elephant).

    apt-get install wordnet-base wordnet-sense-index      # WordNet 3.0, Debian's copy
    python data/imagenet_words.py ../shared/data/flickr8k/captions.txt ../shared/data/coco_extra/captions.txt

How a class is mapped: its WordNet noun synset is found by name (the animal sense for classes 0-397,
which are all animals in ImageNet's order), then the synset and its hypernyms, nearest first, are
searched for the lemma that captions use most, where "use" is a phrase count in the caption files
given. The class's own lemmas win when captions use them at all (`ice bear` -> `polar bear`); a
hypernym must be used clearly more often than the class's own words. Nothing more general than the
words in STOP is taken: "animal", "device" or "object" say nothing a caption can use.

`animals` lists, for every name a caption may give an animal (a word that WordNet's sense counts
use more as an animal than as another noun or an adjective, or, where they do not tell, whose first
noun sense is an animal: "bird",
"cat", "bear", "retriever"; not "kite" or "young"), the animal classes it covers: those whose synset,
or one of its hypernyms up to "animal", has it as a lemma. A caption's "bird" is then supported by
every bird class, and not by a cheetah (captioner/grounding/naming.py). `not_animals`: two-word phrases the
captions use that end in such a name but are a food or a made thing to WordNet ("hot dog", "teddy
bear").
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from captioner.evaluation.hallucination import singular
from captioner.grounding.naming import ANIMAL_CLASSES
STOP = {"entity", "physical_entity", "object", "whole", "artifact", "instrumentality", "organism", "living_thing",
        "animal", "chordate", "vertebrate", "mammal", "placental", "device", "container", "covering", "commodity",
        "structure", "conveyance", "equipment", "implement", "matter", "substance", "food", "solid", "material",
        "invertebrate", "arthropod", "abstraction", "thing", "unit", "part", "system", "consumer_goods",
        "creation", "decoration", "merchandise", "article", "protective_covering", "craft", "vessel", "toiletry",
        "mechanism", "machine", "instrument", "surface", "area", "region", "location", "geological_formation",
        "natural_elevation", "shape", "produce", "foodstuff", "nutriment", "dish", "ware"}
# Class names that WordNet's first sense of the other kind gets wrong.
OVERRIDES = {"cab": "taxi", "tusker": "elephant", "teddy": "teddy bear", "ice bear": "polar bear", "schooner": "sailboat",
             "drumstick": "drumstick", "grasshopper": "grasshopper", "manhole cover": "manhole cover",
             "washbasin": "sink"}
# WordNet's 45 lexicographer files, which nltk needs as `lexnames` and Debian does not ship.
LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
            "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
            "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
            "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
            "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
            "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
            "adj.ppl").split()


def wordnet(debian_dir: Path = Path("/usr/share/wordnet")):
    """nltk's WordNet reader over Debian's files, copied into a temporary nltk_data folder."""
    if not (debian_dir / "data.noun").is_file():
        sys.exit(f"{debian_dir}: no WordNet; apt-get install wordnet-base wordnet-sense-index")
    root = Path(tempfile.mkdtemp()) / "corpora" / "wordnet"
    root.mkdir(parents=True)
    for f in debian_dir.iterdir():
        if f.is_file():
            shutil.copy(f, root / f.name)
    pos = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
    (root / "lexnames").write_text("".join(f"{i:02d}\t{name}\t{pos[name.split('.')[0]]}\n"
                                           for i, name in enumerate(LEXNAMES)))
    import nltk

    nltk.data.path.insert(0, str(root.parent.parent))
    from nltk.corpus import wordnet as wn

    wn.ensure_loaded()
    return wn


def phrase_counts(caption_files: list[Path]) -> Counter:
    """How often each word and two-word phrase occurs in the captions (lowercased words)."""
    counts: Counter = Counter()
    for path in caption_files:
        for line in path.read_text(encoding="utf-8").splitlines():
            words = re.findall(r"[a-z]+", line.partition("\t")[2].lower())
            counts.update(words)
            counts.update(" ".join(pair) for pair in zip(words, words[1:]))
    return counts


def use(lemma: str, counts: Counter) -> int:
    """Caption count of a lemma and its plural."""
    phrase = lemma.replace("_", " ").lower()
    plural = phrase[:-1] + "ies" if phrase.endswith("y") else phrase + ("es" if phrase.endswith(("s", "x", "ch", "sh")) else "s")
    return counts[phrase] + counts[plural]


def class_synset(wn, name: str, index: int):
    """The noun synset of an ImageNet class by its name: an animal sense among the first 398
    classes, else the first sense that is a thing, food or plant (a doormat, not a person)."""
    candidates = wn.synsets(name.replace(" ", "_"), pos=wn.NOUN)
    if index < ANIMAL_CLASSES:
        kinds = ("noun.animal",)
    else:
        kinds = ("noun.artifact", "noun.food", "noun.plant", "noun.object", "noun.substance", "noun.shape")
    return next((s for s in candidates if s.lexname() in kinds), candidates[0] if candidates else None)


def nearest_used(synset, counts: Counter, levels: int, minimum: int = 5):
    """The most used lemma of the nearest level of hypernyms that has one used `minimum` times."""
    frontier, seen = [synset], {synset}
    for _ in range(levels):
        frontier = [h for s in frontier for h in s.hypernyms() + s.instance_hypernyms() if h not in seen]
        seen.update(frontier)
        frontier = [h for h in frontier if h.name().split(".")[0] not in STOP]
        # a synset's first lemma is its everyday name; later ones are often other senses' words
        used = [(use(h.lemmas()[0].name(), counts), h.lemmas()[0].name(), h) for h in frontier]
        used = [u for u in used if u[0] >= minimum]
        if used:
            return max(used, key=lambda u: u[0])
    return None


def everyday_word(wn, name: str, index: int, counts: Counter, levels: int = 4) -> str:
    if name in OVERRIDES:
        return OVERRIDES[name]
    synset = class_synset(wn, name, index)
    if synset is None:
        return name.lower()
    own = name.replace(" ", "_") if use(name, counts) else max((l.name() for l in synset.lemmas()),
                                                                 key=lambda l: use(l, counts))
    own_use = use(own, counts)
    if index >= ANIMAL_CLASSES or ("_" not in own and " " not in name and own_use):
        # objects and single-word animals keep a name that captions use ("lion", "laptop")
        found = None if own_use else nearest_used(synset, counts, levels)
        return (found[1] if found else own if own_use else name).replace("_", " ").lower()
    # breeds and species named with a modifier go up to the word captions use for them, when it is
    # used ten times as often ("golden retriever" -> "dog", "Indian elephant" -> "elephant")
    word, word_use, anchor = own, own_use, synset
    if not own_use:
        found = nearest_used(synset, counts, levels)
        if found is None:
            return name.lower()
        word_use, word, anchor = found
    while True:
        found = nearest_used(anchor, counts, levels, minimum=max(10 * word_use, 5))
        if found is None:
            return word.replace("_", " ").lower()
        word_use, word, anchor = found


def animal_names(wn, categories, words: list[str]) -> dict[str, list[int]]:
    """Each name of an animal -> the animal classes it covers (see the module's docstring)."""
    animal = wn.synset("animal.n.01")
    covers: dict[str, set[int]] = {}
    for index, name in enumerate(categories[:ANIMAL_CLASSES]):
        synset = class_synset(wn, name, index)
        up = [synset, *synset.closure(lambda s: s.hypernyms() + s.instance_hypernyms())] if synset else []
        kinds = [s for s in up if s == animal or animal in s.closure(lambda h: h.hypernyms())]
        names = {words[index]} | {lemma.name().replace("_", " ").lower() for s in kinds for lemma in s.lemmas()}
        for word in names:
            covers.setdefault(word, set()).add(index)

    def names_an_animal(word: str) -> bool:
        # verbs do not count against a noun ("bear", "duck"): captions use those words as nouns
        lemmas = [lemma for lemma in wn.lemmas(word.replace(" ", "_")) if lemma.synset().pos() != "v"]
        is_animal = [lemma.synset() == animal or lemma.synset().lexname() == "noun.animal" for lemma in lemmas]
        as_animal = sum(lemma.count() for lemma, a in zip(lemmas, is_animal) if a)
        otherwise = sum(lemma.count() for lemma, a in zip(lemmas, is_animal) if not a)
        first_noun = next((a for lemma, a in zip(lemmas, is_animal) if lemma.synset().pos() == "n"), False)
        return as_animal > otherwise or as_animal == otherwise and first_noun

    # "kite" and "crane" are toys and machines in captions before they are birds, "young" an adjective
    return {word: sorted(covers[word]) for word in sorted(covers) if names_an_animal(word)}


def not_animals(wn, names: dict[str, list[int]], counts: Counter) -> list[str]:
    """Two-word phrases the captions use that end in an animal's name but which WordNet knows as a
    food or a made thing ("hot dog", "teddy bear"); not "little dog", whose only sense is a
    constellation."""
    found = set()
    for phrase, n in counts.items():
        first, _, last = phrase.partition(" ")
        # as decoding looks a caption's word up: itself if it is a name, else its singular
        name = last if last in names else singular(last)
        if not last or n < 2 or name not in names:
            continue
        senses = wn.synsets(f"{first}_{name}", pos=wn.NOUN)
        kinds = {s.lexname() for s in senses}
        if kinds & {"noun.food", "noun.artifact"} and "noun.animal" not in kinds:
            found.add(f"{first} {name}")
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("captions", nargs="+", type=Path, help="Flickr-format caption files (image#n<TAB>caption)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parents[1] / "captioner" / "grounding" / "imagenet_words.json")
    args = parser.parse_args(argv)
    from torchvision.models._meta import _IMAGENET_CATEGORIES as categories

    wn = wordnet()
    counts = phrase_counts(args.captions)
    words = [everyday_word(wn, name, i, counts) for i, name in enumerate(categories)]
    animals = animal_names(wn, categories, words)
    args.out.write_text(json.dumps({"source": "WordNet 3.0 hypernyms, ranked by use in caption data "
                                              "(data/imagenet_words.py)", "words": words, "animals": animals,
                                    "not_animals": not_animals(wn, animals, counts)}, indent=0) + "\n")
    print(f"{args.out}: {len(set(words))} distinct words for {len(words)} classes, {len(animals)} animal names")
    return 0


if __name__ == "__main__":
    sys.exit(main())
