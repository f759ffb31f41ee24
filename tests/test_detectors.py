"""The detectors: fitted after training, the person detector on one dataset's photos and a calibrated
detector for each other object on all of them, they drive decode-time penalties on the words that
name their objects; in the checkpoint, the CLI's export and the ONNX start graph."""

import json
import math

import pytest
import torch

from captioner import Captioner
from captioner.cli import main as cli
from captioner.data.vocab import Vocabulary
from captioner.evaluation.hallucination import ObjectTable
from captioner.grounding.detectors import (animal_objects, auc, fit_object_detectors, fit_person_detector,
                                           person_word_ids, shows, word_masks)
from captioner.inference import decoding
from captioner.model.decoder import DecoderConfig, set_step
from captioner.model.ensemble import build_decoder
from captioner.training.fit_detectors import with_detectors
from captioner.training.loop import train
from captioner.training.recipe import TrainConfig

from test_engines import installed
from test_training import tiny_config, tiny_dataset  # noqa: F401 (a fixture)


def test_the_fitted_detector_separates_people_with_its_standardisation_folded_in():
    generator = torch.Generator().manual_seed(0)
    # as in pooled CNN features: every dimension carries a little of whether there are people, each on
    # its own scale and offset
    there = torch.randn(2300, 1, generator=generator)
    x = (there + torch.randn(2300, 64, generator=generator)) * torch.logspace(-2, 2, 64) + torch.linspace(-50, 50, 64)
    shows = there[:, 0] > 0
    direction, bias = fit_person_detector(x[:2000], shows[:2000], seed=0)
    p = torch.sigmoid(x[2000:] @ direction + bias)  # the raw features: the standardisation is inside
    assert auc(p, shows[2000:]) > 0.95
    assert p[shows[2000:]].mean() > 0.6 and p[~shows[2000:]].mean() < 0.4
    again, _ = fit_person_detector(x[:2000], shows[:2000], seed=0)
    assert torch.equal(direction, again)  # seeded: the same recipe fits the same detector


def test_the_object_detectors_are_calibrated_each_on_its_own_object():
    generator = torch.Generator().manual_seed(0)
    # two objects, one common and one rare, each carried by its own few of 64 dimensions on their own scales
    there = torch.randn(3000, 2, generator=generator) + torch.tensor([0.0, -1.5])
    mixing = torch.zeros(2, 64)
    mixing[0, :4], mixing[1, 4:8] = 1.0, 1.0
    x = (there @ mixing + torch.randn(3000, 64, generator=generator)) * torch.logspace(-2, 2, 64)
    shown = there > 0
    directions, biases = fit_object_detectors(x[:2500], shown[:2500])
    p = torch.sigmoid(x[2500:] @ directions.T + biases)
    for k in range(2):
        assert auc(p[:, k], shown[2500:, k]) > 0.9
        # calibrated: the mean probability is the object's frequency, common (0.5) or rare (0.07)
        assert p[:, k].mean().item() == pytest.approx(shown[2500:, k].float().mean().item(), abs=0.03)
    assert torch.equal(directions, fit_object_detectors(x[:2500], shown[:2500])[0])  # deterministic


def test_which_objects_references_name_and_which_words_name_them(tmp_path):
    (tmp_path / "objects.txt").write_text("person, man\ndog, puppy\ndining table, table\n")
    table = ObjectTable.load(tmp_path / "objects.txt")
    references = [["A man and his puppy.", "A dog."], ["A man at the dining table."], ["A field."]]
    assert shows(references, table, ["dog", "dining table"]).tolist() == [[True, False], [False, True], [False, False]]
    vocab = Vocabulary.build(["a man and two dogs", "a puppy at a table", "tables"], 1)
    masks = word_masks(vocab, table, ["dining table", "dog"])
    assert [sorted(vocab.itos[i] for i in row.nonzero()[:, 0]) for row in masks] == [["table", "tables"],
                                                                                      ["dogs", "puppy"]]
    assert animal_objects(table, ["dining table", "dog", "person"]).tolist() == [0.0, 1.0, 0.0]


def test_auc_counts_ties_as_half():
    score, positive = torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor([True, True, False, False])
    assert auc(score, positive) == pytest.approx((2 + 1 + 0.5) / 4)


def test_the_words_that_name_a_person_come_from_the_object_table(tmp_path):
    (tmp_path / "objects.txt").write_text("person, man, woman, people, skateboarder\ndog, puppy\n")
    vocab = Vocabulary.build(["a man and two women", "people watch a skateboarder", "a dog and a puppy"], 1)
    ids = person_word_ids(vocab, ObjectTable.load(tmp_path / "objects.txt"))
    assert sorted(vocab.itos[i] for i in ids) == ["man", "people", "skateboarder", "women"]


def person_decoder():
    """A tiny decoder whose detector reads feature 0: P(person) = sigmoid(10 x0); words 4, 5 name a person."""
    torch.manual_seed(0)
    plain = build_decoder(DecoderConfig(feature_dim=8, vocab_size=12, embed_dim=8, hidden_dim=16, dropout=0.0)).eval()
    direction = torch.zeros(8)
    direction[0] = 10.0
    return plain, with_detectors(plain, person=(direction, 0.0, torch.tensor([4, 5]))).eval()


def test_the_penalty_lowers_only_person_words_and_only_where_the_detector_sees_none():
    plain, decoder = person_decoder()
    features = torch.randn(2, 8)
    features[:, 0] = torch.tensor([-0.2, 0.5])  # P(person) = 0.12 and 0.99
    tokens = torch.tensor([1, 1])
    off, _ = decoder.step(tokens, decoder.start(features, person_weight=0.0))
    on, _ = decoder.step(tokens, decoder.start(features, person_weight=2.0))
    shift = on - off
    expected = 2.0 * torch.log(torch.sigmoid(torch.tensor(-2.0)) / 0.3)
    assert torch.allclose(shift[0, [4, 5]], expected.expand(2), atol=1e-5)
    assert torch.count_nonzero(shift[0, [0, 1, 2, 3, 6, 7, 8, 9, 10, 11]]) == 0
    assert torch.count_nonzero(shift[1]) == 0  # a person is there: nothing moves
    # the copy keeps every weight: switched off it decodes exactly as the decoder it came from
    before = decoding.greedy(plain, features, max_length=6)
    after = decoding.greedy(decoder, features, max_length=6, evidence={"person_weight": 0.0})
    assert [c.tokens for [c] in before] == [c.tokens for [c] in after]


def test_an_ensemble_takes_one_detector_for_all_its_members():
    torch.manual_seed(0)
    ensemble = build_decoder(DecoderConfig(feature_dim=8, vocab_size=12, embed_dim=8, hidden_dim=16, dropout=0.0,
                                           members=2)).eval()
    set_step(ensemble, fold=False)
    direction = torch.zeros(8)
    direction[0] = 10.0
    with_detector = with_detectors(ensemble, person=(direction, 0.0, torch.tensor([4]))).eval()
    assert [m.fold_step for m in with_detector.members] == [False, False]  # decodes as it was set to
    features = torch.randn(1, 8)
    features[0, 0] = -1.0
    assert with_detector.person_probability(features).item() == pytest.approx(torch.sigmoid(torch.tensor(-10.0)))
    off = [bias for _, _, bias in with_detector.start(features, person_weight=0.0)]
    on = [bias for _, _, bias in with_detector.start(features, person_weight=1.0)]
    assert off == [None, None] and all(b[0, 0, 4] < -8 and b[0, 0, 5] == 0 for b in on)  # log(4.5e-5 / 0.3)


def test_each_object_penalty_lowers_only_its_words_and_only_below_the_threshold():
    plain, person = person_decoder()
    directions = torch.zeros(2, 8)
    directions[0, 1], directions[1, 2] = 10.0, 10.0  # object 0 reads feature 1, object 1 feature 2
    words = torch.zeros(2, 12)
    words[0, 6], words[1, [7, 8]] = 1.0, 1.0
    decoder = with_detectors(person, objects=(["dog", "bench"], directions, torch.zeros(2), words,
                                              torch.tensor([1.0, 0.0]))).eval()
    assert decoder.config.object_detectors == ("dog", "bench") and decoder.config.person_detector  # person kept
    features = torch.randn(1, 8)
    features[0, 1:3] = torch.tensor([-0.3, 0.3])  # P(dog) 0.05, P(bench) 0.95
    tokens = torch.tensor([1])
    off, _ = decoder.step(tokens, decoder.start(features, person_weight=0.0, object_weight=0.0))
    on, _ = decoder.step(tokens, decoder.start(features, person_weight=0.0, object_weight=2.0, object_threshold=0.2))
    shift = (on - off)[0]
    assert shift[6].item() == pytest.approx(2.0 * math.log(torch.sigmoid(torch.tensor(-3.0)).item() / 0.2), abs=1e-4)
    assert torch.count_nonzero(shift[torch.arange(12) != 6]) == 0  # the bench is there: 7 and 8 keep theirs
    before = decoding.greedy(plain, features, max_length=6)
    after = decoding.greedy(decoder, features, max_length=6, evidence={"person_weight": 0.0, "object_weight": 0.0})
    assert [c.tokens for [c] in before] == [c.tokens for [c] in after]


def animal_decoder():
    """A tiny decoder that reads 8 image dimensions, then 1000 ImageNet class probabilities (0..397
    are animals), with detectors for a dog (an animal, word 6) and a bench (word 7), both doubting
    their object (P = 0.05) in the images of `animal_features`."""
    torch.manual_seed(0)
    plain = build_decoder(DecoderConfig(feature_dim=1008, vocab_size=12, embed_dim=8, hidden_dim=16, dropout=0.0,
                                        labels=1000)).eval()
    directions = torch.zeros(2, 8)
    directions[:, 0] = -10.0
    words = torch.zeros(2, 12)
    words[0, 6], words[1, 7] = 1.0, 1.0
    return with_detectors(plain, objects=(["dog", "bench"], directions, torch.zeros(2), words,
                                          torch.tensor([1.0, 0.0]))).eval()


def animal_features():
    """A cheetah the classifier is sure of, an animal it is unsure of, a water tower."""
    features = torch.zeros(3, 1008)
    features[:, 0] = 0.3
    features[0, 8 + 293] = 0.9
    features[1, 8 + 293], features[1, 8 + 900] = 0.5, 0.5
    features[2, 8 + 900] = 0.9
    return features


def test_an_animal_detector_stands_down_where_the_classifier_is_sure_of_an_animal():
    bias = animal_decoder().start(animal_features(), object_weight=1.0)[2][0]
    doubt = math.log(torch.sigmoid(torch.tensor(-3.0)).item() / 0.3)
    assert bias[0, 6].item() == 0 and bias[0, 7].item() == pytest.approx(doubt, abs=1e-4)  # the bench stays doubted
    assert bias[1:, 6].tolist() == pytest.approx([doubt, doubt], abs=1e-4)


@pytest.mark.skipif(not installed("onnxruntime"), reason="onnxruntime is an optional extra, not installed")
def test_the_onnx_start_graph_lets_an_animal_detector_stand_down(tmp_path):
    import onnxruntime

    from captioner.inference.onnx_captioner import FILES
    from captioner.inference.onnx_export import export_decoder

    decoder = animal_decoder()
    decoder.config.object_weight = 1.0
    export_decoder(decoder, tmp_path)
    features = animal_features()
    session = onnxruntime.InferenceSession(str(tmp_path / FILES["start"]), providers=["CPUExecutionProvider"])
    bias = torch.from_numpy(session.run(None, {"features": features.numpy()})[2])
    assert bias[0, 6] == 0 and bias[1, 6] < -1
    assert torch.allclose(bias, decoder.start(features)[2][0], atol=1e-5)


def test_the_checkpoint_weight_applies_and_decoding_can_override_it():
    _, decoder = person_decoder()
    decoder.config.person_weight = 50.0
    features = torch.randn(1, 8)
    features[0, 0] = -1.0
    for method in (decoding.greedy, decoding.beam_search):
        default = [c.tokens for c in method(decoder, features, max_length=6)[0]]
        assert not any({4, 5} & set(tokens) for tokens in default)
    allowed = decoding.greedy(decoder, features, max_length=6, evidence={"person_weight": 0.0})[0][0]
    forced = decoding.greedy(decoder, features, max_length=6, evidence={"person_weight": 50.0})[0][0]
    assert forced.logprob != pytest.approx(allowed.logprob)
    for threshold in ("person_threshold", "object_threshold"):
        with pytest.raises(ValueError, match=threshold):
            DecoderConfig(feature_dim=8, vocab_size=10, **{threshold: 1.5})


@pytest.mark.skipif(not installed("onnxruntime"), reason="onnxruntime is an optional extra, not installed")
def test_the_onnx_start_graph_carries_the_detectors_penalties(tmp_path):
    import onnxruntime

    from captioner.inference.onnx_captioner import FILES
    from captioner.inference.onnx_export import export_decoder

    _, person = person_decoder()
    directions = torch.zeros(1, 8)
    directions[0, 1] = 10.0
    decoder = with_detectors(person, objects=(["dog"], directions, torch.zeros(1), torch.eye(12)[6:7],
                                              torch.ones(1))).eval()
    decoder.config.person_weight, decoder.config.object_weight = 3.0, 1.0
    export_decoder(decoder, tmp_path)
    features = torch.randn(3, 8)
    features[:, 0] = torch.tensor([-0.3, -0.15, 0.4])  # P(person) 0.05, 0.18, 0.98
    features[:, 1] = torch.tensor([0.4, 0.4, -0.3])  # P(dog) 0.98, 0.98, 0.05
    session = onnxruntime.InferenceSession(str(tmp_path / FILES["start"]), providers=["CPUExecutionProvider"])
    bias = session.run(None, {"features": features.numpy()})[2]
    expected = decoder.start(features)[2][0]
    assert expected[:2, 4].lt(-1).all() and expected[2, 4].eq(0) and expected[2, 6].lt(-1)
    assert expected[:2, 6].eq(0).all()
    assert torch.allclose(torch.from_numpy(bias), expected, atol=1e-5)


def test_a_run_fits_the_detectors_and_export_sets_their_weights(tiny_dataset, tmp_path):
    # circles and squares stand in for people: the table makes them the person group's words; a
    # triangle and a background are objects of their own, a cat one no caption names
    (tmp_path / "objects.txt").write_text("person, circle, square\ntriangle\nbackground\ncat\n")
    name = tiny_dataset.parent.name
    best = train(tiny_config(tiny_dataset, tmp_path, epochs=2, person_detector_from=name, object_detector_photos=1,
                             objects=str(tmp_path / "objects.txt")))
    saved = json.loads((best / "config.json").read_text())
    assert saved["decoder"]["person_detector"] and saved["decoder"]["person_weight"] == 0.0
    record = saved["training"]["person_detector"]
    assert (record["from"], record["photos"], record["with_person"]) == (name, 4, 2)
    assert saved["training"]["recipe"]["person_detector_from"] == name
    captioner = Captioner.from_pretrained(best)
    words = captioner.decoder.person_words.nonzero()[:, 0].tolist()
    assert sorted(captioner.vocab.itos[i] for i in words) == ["circle", "square"]
    assert saved["decoder"]["object_detectors"] == ["background", "triangle"]  # the cat is in no caption
    objects = saved["training"]["object_detectors"]["objects"]
    assert {obj: record["photos"] for obj, record in objects.items()} == {"background": 1, "triangle": 1}
    assert captioner.decoder.object_animals.tolist() == [0.0, 0.0]
    triangle = captioner.decoder.object_words[1].nonzero()[:, 0].tolist()
    assert [captioner.vocab.itos[i] for i in triangle] == ["triangle"]
    out = tmp_path / "exported"
    assert cli(["export", str(best), str(out), "--person-weight", "4", "--object-weight", "2",
                "--object-threshold", "0.4"]) == 0
    config = Captioner.from_pretrained(out).decoder.config
    assert (config.person_weight, config.object_weight, config.object_threshold) == (4.0, 2.0, 0.4)


def test_the_detectors_need_a_table_and_the_person_detector_a_dataset_of_that_name_before_anything_trains(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="person_detector_from needs objects"):
        train(TrainConfig(output=str(tmp_path / "run"), person_detector_from="coco_extra"))
    with pytest.raises(ValueError, match="object_detector_photos needs objects"):
        train(TrainConfig(output=str(tmp_path / "run"), object_detector_photos=40))
    with pytest.raises(ValueError, match="object_detector_photos must be 0"):
        train(TrainConfig(output=str(tmp_path / "run"), object_detector_photos=-1))
    (tmp_path / "objects.txt").write_text("person, man\n")
    config = tiny_config(tiny_dataset, tmp_path, person_detector_from="coco", objects=str(tmp_path / "objects.txt"))
    with pytest.raises(ValueError, match=f"'coco': no training photos .*datasets: {tiny_dataset.parent.name}"):
        train(config)
    config = tiny_config(tiny_dataset, tmp_path, object_detector_photos=2, objects=str(tmp_path / "objects.txt"))
    with pytest.raises(ValueError, match="object_detector_photos = 2: no object"):
        train(config)  # the table has the person alone
    assert not (tmp_path / "run" / "best").exists()
