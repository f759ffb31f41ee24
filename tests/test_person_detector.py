"""The person detector: fitted after training on one dataset's photos, it drives a decode-time penalty
on the words that name a person; in the checkpoint, the CLI's export and the ONNX start graph."""

import json

import pytest
import torch

from captioner import Captioner, decoding
from captioner.cli import main as cli
from captioner.decoder import DecoderConfig, build_decoder, set_step
from captioner.hallucination import ObjectTable
from captioner.person_detector import auc, fit_person_detector, person_word_ids, with_person_detector
from captioner.recipe import TrainConfig
from captioner.training import train
from captioner.vocab import Vocabulary

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
    return plain, with_person_detector(plain, direction, 0.0, torch.tensor([4, 5])).eval()


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
    with_detector = with_person_detector(ensemble, direction, 0.0, torch.tensor([4])).eval()
    assert [m.fold_step for m in with_detector.members] == [False, False]  # decodes as it was set to
    features = torch.randn(1, 8)
    features[0, 0] = -1.0
    assert with_detector.person_probability(features).item() == pytest.approx(torch.sigmoid(torch.tensor(-10.0)))
    off = [bias for _, _, bias in with_detector.start(features, person_weight=0.0)]
    on = [bias for _, _, bias in with_detector.start(features, person_weight=1.0)]
    assert off == [None, None] and all(b[0, 0, 4] < -8 and b[0, 0, 5] == 0 for b in on)  # log(4.5e-5 / 0.3)


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
    with pytest.raises(ValueError, match="person_threshold"):
        DecoderConfig(feature_dim=8, vocab_size=10, person_threshold=1.5)


@pytest.mark.skipif(not installed("onnxruntime"), reason="onnxruntime is an optional extra, not installed")
def test_the_onnx_start_graph_carries_the_person_penalty(tmp_path):
    import onnxruntime

    from captioner.onnx_export import export_decoder
    from captioner.onnx_captioner import FILES

    _, decoder = person_decoder()
    decoder.config.person_weight = 3.0
    export_decoder(decoder, tmp_path)
    features = torch.randn(3, 8)
    features[:, 0] = torch.tensor([-0.3, -0.15, 0.4])  # P(person) 0.05, 0.18, 0.98
    session = onnxruntime.InferenceSession(str(tmp_path / FILES["start"]), providers=["CPUExecutionProvider"])
    bias = session.run(None, {"features": features.numpy()})[2]
    expected = decoder.start(features)[2][0]
    assert expected[:2, 4].lt(-1).all() and expected[2].eq(0).all()
    assert torch.allclose(torch.from_numpy(bias), expected, atol=1e-5)


def test_a_run_fits_the_detector_on_the_named_dataset_and_export_sets_its_weight(tiny_dataset, tmp_path):
    # circles and squares stand in for people: the table makes them the person group's words
    (tmp_path / "objects.txt").write_text("person, circle, square\n")
    name = tiny_dataset.parent.name
    best = train(tiny_config(tiny_dataset, tmp_path, epochs=2, person_detector_from=name,
                             objects=str(tmp_path / "objects.txt")))
    saved = json.loads((best / "config.json").read_text())
    assert saved["decoder"]["person_detector"] and saved["decoder"]["person_weight"] == 0.0
    record = saved["training"]["person_detector"]
    assert (record["from"], record["photos"], record["with_person"]) == (name, 4, 2)
    assert saved["training"]["recipe"]["person_detector_from"] == name
    captioner = Captioner.from_pretrained(best)
    words = captioner.decoder.person_words.nonzero()[:, 0].tolist()
    assert sorted(captioner.vocab.itos[i] for i in words) == ["circle", "square"]
    out = tmp_path / "exported"
    assert cli(["export", str(best), str(out), "--person-weight", "4"]) == 0
    assert Captioner.from_pretrained(out).decoder.config.person_weight == 4.0


def test_the_person_detector_needs_a_table_and_a_dataset_of_that_name_before_anything_trains(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="person_detector_from needs objects"):
        train(TrainConfig(output=str(tmp_path / "run"), person_detector_from="coco_extra"))
    (tmp_path / "objects.txt").write_text("person, man\n")
    config = tiny_config(tiny_dataset, tmp_path, person_detector_from="coco", objects=str(tmp_path / "objects.txt"))
    with pytest.raises(ValueError, match=f"'coco': no training photos .*datasets: {tiny_dataset.parent.name}"):
        train(config)
    assert not (tmp_path / "run" / "best").exists()
