"""Consensus re-ranking of beam search: the rule on token lists, and the option through the
Captioner, the CLI, the JSON API and an export."""

import json
import shutil

import httpx
import pytest
import torch

from captioner import Captioner
from captioner.cli import main as cli
from captioner.data.vocab import Vocabulary
from captioner.grounding.evidence import word_objects
from captioner.inference.consensus import consensus_order, repeats, similarity
from captioner.inference.decoding import beam_search, sample

from conftest import overfit_decoder
from test_server import start_server, stop_server


def no_objects(tokens):
    return set()


def test_the_beam_the_samples_agree_with_wins():
    top, agreed, odd = [10, 11, 12, 13], [10, 20, 21, 13], [30, 31, 32, 33]
    samples = [[10, 20, 21, 13], [10, 20, 21, 14], [15, 20, 21, 13]]
    assert consensus_order([top, agreed, odd], samples, no_objects) == [1, 0, 2]
    # nothing to agree on: the best-scored beam keeps its place
    assert consensus_order([top, agreed, odd], [], no_objects) == [0, 1, 2]
    assert consensus_order([top, top, top], samples, no_objects) == [0, 1, 2]
    assert consensus_order([top], samples, no_objects) == [0]


def test_only_a_beam_that_names_the_same_objects_as_the_best_beam_can_win():
    top, agreed = [10, 11, 12, 13], [10, 20, 21, 13]
    samples = [[10, 20, 21, 13]] * 3

    def objects(tokens):
        return {"dog"} if 20 in tokens else set()

    assert consensus_order([top, agreed], samples, no_objects) == [1, 0]
    assert consensus_order([top, agreed], samples, objects) == [0, 1]
    assert consensus_order([[20, *top], agreed], samples, objects) == [1, 0]  # the best beam names it too
    assert consensus_order([[20, *top], [10, 11, 12, 13]], [[10, 11, 12, 13]] * 3, objects) == [0, 1]  # or drops it


def test_a_beam_that_repeats_words_more_than_the_best_beam_cannot_win():
    top, looping = [20, 21, 22, 23], [20, 21, 22, 23, 21, 22]  # "... food with plates of food"
    samples = [looping] * 3
    assert consensus_order([top, looping], samples, no_objects) == [0, 1]
    assert repeats(looping) == 2 and repeats(top) == 0
    assert repeats([4, 30, 4, 6, 6]) == 0  # the most frequent words ("a", "the") repeat freely
    assert consensus_order([[*top, 21], looping], samples, no_objects) == [0, 1]
    assert consensus_order([[*top, 22, 21], looping], samples, no_objects) == [1, 0]  # the best beam loops as much


def test_closeness_weighs_rare_words_and_length():
    # one shared word each: the rarer (a later vocabulary id: Vocabulary.build lists words most
    # frequent first) counts for more
    assert similarity([5, 2000], [6, 2000]) > similarity([2000, 5], [2001, 5]) > 0
    assert similarity([5, 6, 7, 8], [5, 6, 7, 8]) == pytest.approx(1.0)
    assert similarity([5, 6, 7], [8, 9]) == 0
    assert similarity([5, 6, 7, 8], [5, 6, 7]) == pytest.approx(similarity([5, 6, 7], [5, 6, 7, 8]))
    longer = [5, 6, 7, *range(100, 112)]
    assert similarity([5, 6, 7], longer) < similarity([5, 6, 7], [5, 6, 7, 100])


def test_the_objects_a_word_names():
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "man", "dog", "dogs", "bike", "bicycle", "red"])
    objects = word_objects(vocab, [["bike", "bicycle"]], None)
    ids = vocab.stoi
    assert objects[ids["bike"]] == objects[ids["bicycle"]] != objects[ids["dog"]]
    assert objects[ids["dog"]] == objects[ids["dogs"]]  # a plural names its singular's animal
    assert ids["man"] not in objects and ids["red"] not in objects
    person = torch.zeros(len(vocab))
    person[ids["man"]] = 1
    assert word_objects(vocab, [], person)[ids["man"]] == "person"


@pytest.fixture(scope="module")
def unsure_captioner(lite0, scene_features, scene_captions):
    """The tiny model after 6 steps of its 300: unsure enough that its samples and its best beam
    disagree ("A yellow triangle points." against "... points up.")."""
    vocab = Vocabulary.build(scene_captions, min_count=1)
    return Captioner(lite0, overfit_decoder(scene_features, scene_captions, vocab, steps=6), vocab, lite0.transform,
                     {}, device="cpu")


def test_consensus_through_the_captioner_is_a_reordering_of_the_same_beams(unsure_captioner, scene_features):
    captioner, features = unsure_captioner, scene_features
    plain = captioner.decode(features, "beam", beam_size=3, consensus_samples=0)
    ranked = captioner.decode(features, "beam", beam_size=3, consensus_samples=6)
    beams = beam_search(captioner.decoder, features, beam_size=3)
    drawn = sample(captioner.decoder, features, seeds=[0] * len(features), num_samples=6)
    objects = word_objects(captioner.vocab, captioner.decoder.config.named_once, captioner.decoder.person_words)
    for image_beams, reranked, own in zip(beams, ranked, drawn):
        order = consensus_order([b.tokens for b in image_beams], [s.tokens for s in own],
                                lambda t: {objects[i] for i in t if i in objects})
        texts = [captioner.vocab.sentence(captioner.vocab.words(image_beams[i].tokens))[1] for i in order]
        assert [b.text for b in reranked] == texts
    assert sum(p[0].text != r[0].text for p, r in zip(plain, ranked)) >= 2
    # a caption depends on neither its batch nor its place in it
    alone = [captioner.decode(features[i:i + 1], "beam", beam_size=3, consensus_samples=6)[0] for i in (2, 0)]
    assert [[b.text for b in a] for a in alone] == [[b.text for b in ranked[i]] for i in (2, 0)]
    with pytest.raises(ValueError, match="consensus_samples must be 0"):
        captioner.decode(features, "beam", consensus_samples=-1)
    # the checkpoint's default, 0, leaves beam search's ranking as it was
    assert [[b.text for b in p] for p in captioner.decode(features, "beam", beam_size=3)] == \
        [[b.text for b in p] for p in plain]


def test_consensus_through_an_export_the_cli_and_the_api(unsure_captioner, scene_paths, tmp_path):
    saved = unsure_captioner.save_pretrained(tmp_path / "unsure")
    exported = tmp_path / "exported"
    assert cli(["export", str(saved), str(exported), "--consensus-samples", "5"]) == 0
    assert Captioner.from_pretrained(exported).decoder.config.consensus_samples == 5
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    config = json.loads((broken / "config.json").read_text())
    config["decoder"]["consensus_samples"] = 65
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="consensus_samples must be 0"):
        Captioner.from_pretrained(broken, device="cpu")

    captioner = Captioner.from_pretrained(saved, device="cpu")
    expected = {n: [r.captions[0].text for r in captioner.generate(scene_paths, "beam", consensus_samples=n)]
                for n in (0, 5)}
    assert expected[0] != expected[5]
    for n, options in ((5, []), (0, ["--consensus-samples", "0"])):  # the export's default, and a flag
        out = tmp_path / f"cli{n}.jsonl"
        assert cli(["caption", *map(str, scene_paths), "--checkpoint", str(exported), "--method", "beam", *options,
                    "--out", str(out)]) == 0
        assert [json.loads(line)["caption"] for line in out.read_text().splitlines()] == expected[n]

    proc, url = start_server("--checkpoint", str(exported))
    try:
        for n, fields in ((5, {}), (0, {"consensus_samples": "0"})):
            files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in scene_paths]
            reply = httpx.post(f"{url}/v1/captions", files=files, data={"method": "beam", **fields}, timeout=60)
            assert reply.status_code == 200 and [i["caption"] for i in reply.json()["images"]] == expected[n]
        with open(scene_paths[0], "rb") as f:
            bad = httpx.post(f"{url}/v1/captions", files={"images": f}, data={"consensus_samples": "-1"}, timeout=60)
        assert bad.status_code == 422 and "consensus_samples" in bad.text
        assert httpx.get(f"{url}/v1/model", timeout=60).json()["defaults"]["consensus_samples"] == 5
    finally:
        stop_server(proc)


def test_consensus_keeps_the_objects_grounding_required(unsure_captioner, scene_paths, tmp_path):
    # two objects required in every photo; where a beam can afford only one, the beams differ in which
    folder = unsure_captioner.save_pretrained(tmp_path / "grounded")
    config = json.loads((folder / "config.json").read_text())
    config["decoder"].update(include_threshold=0.5, max_constraints=2, include_cost=4.0, label_objects={
        word: {"classes": list(range(1000)), "words": [word], "slope": 1.0, "intercept": 10.0}
        for word in ("square", "circle")})
    (folder / "config.json").write_text(json.dumps(config))
    captioner = Captioner.from_pretrained(folder, device="cpu")
    plain = captioner.generate(scene_paths, "beam", consensus_samples=0)
    assert any(len({tuple(c.required) for c in r.captions}) > 1 for r in plain)
    for before, after in zip(plain, captioner.generate(scene_paths, "beam", consensus_samples=6)):
        assert after.captions[0].required == before.captions[0].required
