"""Grounding in both directions (captioner/grounding/evidence.py): constrained beam search writes the
objects the image surely shows, calibrated evidence says which, and one switch (off / avoid / full)
reaches them through Captioner, the CLI, the JSON API and the web app."""

import json

import httpx
import pytest
import torch

from captioner import Captioner
from captioner.cli import main as cli
from captioner.data.vocab import Vocabulary
from captioner.evaluation.hallucination import ObjectTable
from captioner.grounding.detectors import calibrate, label_objects, named_once
from captioner.grounding.evidence import object_presence, object_word_groups, repeat_mask, required_objects
from captioner.inference.decoding import beam_search, constrained_beam_search, greedy, sample

from test_app import start_app, stop_app
from test_server import start_server, stop_server


@pytest.fixture(scope="module")
def decoder(tiny_captioner):
    return tiny_captioner.decoder


def ids(vocab, *words):
    return [[vocab.stoi[w]] for w in words]


def text(vocab, caption):
    return " ".join(vocab.words(caption.tokens))


def test_a_required_word_is_written_where_the_plain_beam_leaves_it_out(tiny_captioner, decoder, scene_features):
    vocab = tiny_captioner.vocab
    [plain] = beam_search(decoder, scene_features[:1], beam_size=3)
    assert "square" not in text(vocab, plain[0]).split()  # "a red circle on a white background"
    [beams] = constrained_beam_search(decoder, scene_features[:1], [[ids(vocab, "square")]], beam_size=3)
    assert beams and all("square" in text(vocab, b).split() for b in beams)
    assert all(b.ended for b in beams)
    # a finished caption with the word outranks the plain one, though the decoder scores it lower
    assert beams[0].logprob < plain[0].logprob
    assert beams[0].logprob == pytest.approx(sum(beams[0].token_logprobs), abs=1e-4)


def test_any_word_of_a_constraint_satisfies_it(tiny_captioner, decoder, scene_features):
    vocab = tiny_captioner.vocab
    [plain] = beam_search(decoder, scene_features[:1], beam_size=3)
    # "circle" is already in the plain caption: the constraint {square, circle} costs nothing
    [met] = constrained_beam_search(decoder, scene_features[:1], [[ids(vocab, "square", "circle")]], beam_size=3)
    assert met[0].tokens == plain[0].tokens
    # two constraints: both are written
    [both] = constrained_beam_search(decoder, scene_features[:1], [[ids(vocab, "square"), ids(vocab, "yellow")]],
                                     beam_size=3)
    assert {"square", "yellow"} <= set(text(vocab, both[0]).split())


def test_a_constraint_is_met_only_within_its_cost(tiny_captioner, decoder, scene_features):
    vocab = tiny_captioner.vocab
    constraint = [[ids(vocab, "square")]]
    [plain] = beam_search(decoder, scene_features[:1], beam_size=3)
    [forced] = constrained_beam_search(decoder, scene_features[:1], constraint, beam_size=3)
    cost = plain[0].score - forced[0].score  # what writing "square" costs the caption
    assert cost > 1.0
    [within] = constrained_beam_search(decoder, scene_features[:1], constraint, beam_size=3, max_cost=cost + 0.01)
    assert within[0].tokens == forced[0].tokens
    [beyond] = constrained_beam_search(decoder, scene_features[:1], constraint, beam_size=3, max_cost=cost - 0.01)
    assert "square" not in text(vocab, beyond[0]).split() and beyond[0].tokens == plain[0].tokens


def test_a_two_word_phrase_counts_only_as_a_phrase(tiny_captioner, decoder, scene_features):
    vocab = tiny_captioner.vocab
    phrase = [[vocab.stoi["blue"], vocab.stoi["square"]]]
    [beams] = constrained_beam_search(decoder, scene_features[:1], [[phrase]], beam_size=3)
    assert " blue square " in f" {text(vocab, beams[0])} "


def test_results_do_not_depend_on_the_batch(tiny_captioner, decoder, scene_features):
    vocab = tiny_captioner.vocab
    constraints = [[ids(vocab, "square")], [], [ids(vocab, "circle"), ids(vocab, "yellow")], [ids(vocab, "grey")]]
    together = constrained_beam_search(decoder, scene_features, constraints, beam_size=3)
    for i in range(4):
        [alone] = constrained_beam_search(decoder, scene_features[i:i + 1], constraints[i:i + 1], beam_size=3)
        assert [b.tokens for b in alone] == [b.tokens for b in together[i]]
        assert [b.logprob for b in alone] == pytest.approx([b.logprob for b in together[i]], abs=1e-4)
    # an image without constraints gets exactly the plain beam search
    [plain] = beam_search(decoder, scene_features[1:2], beam_size=3)
    assert [b.tokens for b in together[1]] == [b.tokens for b in plain]


def test_a_constraint_that_cannot_be_met_in_time_falls_back_to_what_was_met(tiny_captioner, decoder, scene_features):
    vocab = tiny_captioner.vocab
    [beams] = constrained_beam_search(decoder, scene_features[:1], [[ids(vocab, "square"), ids(vocab, "yellow")]],
                                      beam_size=2, max_length=2)
    assert beams and all(len(b.tokens) <= 2 for b in beams)
    with pytest.raises(ValueError, match="one list of constraints per image"):
        constrained_beam_search(decoder, scene_features[:2], [[]], beam_size=2)


def test_an_object_is_named_once_and_no_word_follows_itself():
    vocab = Vocabulary.build(["a laptop computer and a bed", "beds and laptops"], min_count=1)
    groups = object_word_groups(vocab, [["bed", "beds"], ["laptop", "laptops", "computer"]])

    def banned(*words):
        return {vocab.itos[i] for i in repeat_mask(groups, torch.tensor([vocab.encode(" ".join(words))[1:-1]]))[0].nonzero()[:, 0].tolist()}

    assert banned("a") == {"a"}
    assert banned("a", "bed") == {"bed"}  # the next word may go on naming it: "a laptop computer"
    assert banned("a", "laptop", "computer") == {"laptop", "laptops", "computer"}
    assert banned("a", "bed", "and", "a") == {"a", "bed", "beds"}
    assert object_word_groups(vocab, []) is None


def test_the_objects_named_once_are_things(tmp_path):
    (tmp_path / "objects.txt").write_text("dog, puppy\nbed\nperson, man, men\nlaptop, computer\nsink\n")
    vocab = Vocabulary.build(["a dog and two puppies", "a man on a bed by beds", "a laptop computer"], min_count=1)
    # people and animals are often two in a photo; a decoder naming a bed twice is looping
    groups = named_once(vocab, ObjectTable.load(tmp_path / "objects.txt"))
    assert [sorted(words) for words in groups] == [["bed", "beds"], ["computer", "laptop"]]


def test_every_decoding_method_names_an_object_once(tiny_captioner, decoder, scene_features):
    vocab = tiny_captioner.vocab
    # "circle" and "background" made one object: "a red circle on a white background" names it twice
    groups = object_word_groups(vocab, [["circle", "background"], ["square"]])
    [plain] = greedy(decoder, scene_features[:1])
    assert {"circle", "background"} <= set(text(vocab, plain[0]).split())

    def names_once(caption):
        words = text(vocab, caption).split()
        named = [i for i, w in enumerate(words) if w in ("circle", "background")]
        return all(b == a + 1 for a, b in zip(named, named[1:])) and all(x != y for x, y in zip(words, words[1:]))

    runs = [greedy(decoder, scene_features, named_once=groups),
            sample(decoder, scene_features, seeds=[0, 1, 2, 3], num_samples=3, named_once=groups),
            beam_search(decoder, scene_features, beam_size=3, named_once=groups),
            constrained_beam_search(decoder, scene_features, [[ids(vocab, "square")]] * 4, beam_size=3,
                                    named_once=groups)]
    for captions in runs:
        assert all(names_once(c) for per_image in captions for c in per_image)
    assert runs[0][0][0].tokens != plain[0].tokens
    [alone] = beam_search(decoder, scene_features[:1], beam_size=3, named_once=groups)
    assert [b.tokens for b in alone] == [b.tokens for b in runs[2][0]]


def test_the_switch_turns_naming_once_off(tiny_checkpoint, scene_paths, tmp_path):
    import shutil

    folder = tmp_path / "once"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["decoder"]["named_once"] = [["circle", "background"]]
    (folder / "config.json").write_text(json.dumps(config))
    captioner = Captioner.from_pretrained(folder, device="cpu")
    off = captioner.generate(scene_paths[0], "greedy", grounding="off")[0].captions[0].words
    avoid = captioner.generate(scene_paths[0], "greedy", grounding="avoid")[0].captions[0].words
    assert {"circle", "background"} <= set(off) and not {"circle", "background"} <= set(avoid)
    features = captioner.encode(captioner.transform.load(scene_paths[0])[None])
    assert captioner.decode(features, "greedy", grounding="avoid", name_once=False)[0][0].words == off
    assert captioner.decode(features, "greedy", grounding="off", name_once=True)[0][0].words == avoid
    config["decoder"]["named_once"] = [[]]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="named_once"):
        Captioner.from_pretrained(folder, device="cpu")


def test_calibration_recovers_known_slopes_and_intercepts():
    generator = torch.Generator().manual_seed(0)
    support = torch.rand(40000, 3, generator=generator) * 0.96 + 0.02
    slopes, intercepts = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([-1.0, 0.5, 1.5])
    truth = torch.sigmoid(slopes * torch.logit(support) + intercepts)
    present = torch.rand(40000, 3, generator=generator) < truth
    fitted_slopes, fitted_intercepts = calibrate(support, present, l2=1e-3)
    assert fitted_slopes.tolist() == pytest.approx(slopes.tolist(), abs=0.08)
    assert fitted_intercepts.tolist() == pytest.approx(intercepts.tolist(), abs=0.08)
    # an object seen in a handful of photos keeps the shared fit instead of its own noise
    few = torch.zeros(40000, 1)
    few[:5] = 0.9
    rare_slopes, _ = calibrate(torch.cat([support, few], 1), torch.cat([present, torch.ones(40000, 1, dtype=torch.bool)], 1))
    assert abs(float(rare_slopes[3]) - float(rare_slopes[:3].mean())) < 0.5


def test_the_objects_the_classifier_vouches_for_carry_their_words_and_classes(tmp_path):
    (tmp_path / "objects.txt").write_text("dog, puppy, pup\nparking meter\ndining table, table\nperson, man\n")
    table = ObjectTable.load(tmp_path / "objects.txt")
    vocab = Vocabulary.build(["a dog and two puppies", "a parking meter by a table", "a man"], min_count=1)
    objects = label_objects(vocab, table)
    assert set(objects) == {"dog", "parking meter", "dining table"}  # no ImageNet class names a man
    assert set(objects["dog"]["words"]) == {"dog", "puppies"} and objects["parking meter"]["words"] == ["parking meter"]
    assert 207 in objects["dog"]["classes"] and len(objects["dog"]["classes"]) > 100  # golden retriever, and more
    config = type("Config", (), {"label_objects": {name: dict(entry, slope=1.0, intercept=0.0)
                                                   for name, entry in objects.items()}})()
    probs = torch.full((2, 1000), 0.0)
    probs[0, 207], probs[1, 704] = 0.9, 0.3  # a golden retriever; a parking meter, less sure
    names, presence = object_presence(config, probs)
    assert presence[0, names.index("dog")] == pytest.approx(0.9) and presence[1, names.index("dog")] == 0
    assert required_objects(config, probs, 0.5, 2) == [["dog"], []]
    assert required_objects(config, probs, 0.2, 2) == [["dog"], ["parking meter"]]
    assert required_objects(config, probs, 0.0, 2) == [[], []]  # 0: nothing is required


def test_the_switch_in_python(grounded_checkpoint, scene_paths):
    captioner = Captioner.from_pretrained(grounded_checkpoint, device="cpu")
    path = scene_paths[0]
    full = captioner.generate(path, "beam")[0].captions[0]
    off = captioner.generate(path, "beam", grounding="off")[0].captions[0]
    avoid = captioner.generate(path, "beam", grounding="avoid")[0].captions[0]
    assert "square" in full.words and full.required == ["square"]
    assert "square" not in off.words and off.required == [] and avoid.words == off.words
    assert captioner.generate(path, "beam", include_threshold=0.0)[0].captions[0].words == off.words
    # the tiny model is sure of its caption: a low enough include_cost keeps "square" out
    cheap = captioner.generate(path, "beam", include_cost=0.5)[0].captions[0]
    assert cheap.words == off.words and cheap.required == []
    # greedy and sampling read "full" as "avoid"
    greedy = captioner.generate(path, "greedy")[0].captions[0]
    assert greedy.words == captioner.generate(path, "greedy", grounding="avoid")[0].captions[0].words
    assert "square" not in greedy.words and greedy.required == []
    with pytest.raises(ValueError, match="grounding must be one of off, avoid, full"):
        captioner.generate(path, "beam", grounding="on")


def test_the_switch_through_the_cli(grounded_checkpoint, scene_paths, tmp_path):
    out = {g: tmp_path / f"{g}.jsonl" for g in ("full", "off", "cheap")}
    for grounding, path in out.items():
        options = ["--grounding", "full", "--include-cost", "0.5"] if grounding == "cheap" else ["--grounding", grounding]
        assert cli(["caption", str(scene_paths[0]), "--checkpoint", str(grounded_checkpoint), "--method", "beam",
                    *options, "--out", str(path)]) == 0
    full, off, cheap = (json.loads(out[g].read_text()) for g in ("full", "off", "cheap"))
    assert full["grounding"] == "full" and full["brought_in"] == ["square"] and "square" in full["caption"]
    assert off["grounding"] == "off" and "brought_in" not in off and "square" not in off["caption"]
    assert "brought_in" not in cheap and cheap["caption"] == off["caption"]
    with pytest.raises(SystemExit):
        cli(["caption", str(scene_paths[0]), "--checkpoint", str(grounded_checkpoint), "--grounding", "on"])


def test_the_switch_through_the_json_api(grounded_checkpoint, scene_paths):
    proc, url = start_server("--checkpoint", str(grounded_checkpoint))
    try:
        answers = {}
        for grounding in ("full", "off"):
            with open(scene_paths[0], "rb") as f:
                reply = httpx.post(f"{url}/v1/captions", files={"images": f},
                                   data={"method": "beam", "grounding": grounding}, timeout=60)
            assert reply.status_code == 200, reply.text
            answers[grounding] = reply.json()["images"][0]
        assert answers["full"]["brought_in"] == ["square"] and "square" in answers["full"]["caption"]
        assert "brought_in" not in answers["off"] and "square" not in answers["off"]["caption"]
        with open(scene_paths[0], "rb") as f:
            bad = httpx.post(f"{url}/v1/captions", files={"images": f}, data={"grounding": "on"}, timeout=60)
        assert bad.status_code == 422 and "grounding" in bad.text
        with open(scene_paths[0], "rb") as f:
            bad = httpx.post(f"{url}/v1/captions", files={"images": f}, data={"include_cost": "0"}, timeout=60)
        assert bad.status_code == 422 and "include_cost" in bad.text
    finally:
        stop_server(proc)


def test_the_switch_in_the_web_app_says_what_it_brought_in(grounded_checkpoint, scene_paths):
    from gradio_client import Client, handle_file

    proc, url = start_app("--checkpoint", str(grounded_checkpoint))
    try:
        client = Client(url, verbose=False)
        common = (handle_file(str(scene_paths[0])), "Beam search", 1.0, 0, 1.0, 3, 0, 3, 0.0, 20)
        full, _, _, note = client.predict(*common, "Full: keep out what is not there, bring in what surely is",
                                          api_name="/caption")
        off, _, _, off_note = client.predict(*common, "Off", api_name="/caption")
        assert "square" in full.lower() and "square" not in off.lower()
        assert "Brought in" in note and "square" in note and off_note == ""
    finally:
        stop_app(proc)


def test_a_malformed_calibration_in_a_config_is_named(grounded_checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(grounded_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["decoder"]["label_objects"]["square"]["slope"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"label_objects\['square'\]"):
        Captioner.from_pretrained(broken, device="cpu")
    config = json.loads((grounded_checkpoint / "config.json").read_text())
    config["decoder"]["include_cost"] = 0
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="include_cost must be positive"):
        Captioner.from_pretrained(broken, device="cpu")
