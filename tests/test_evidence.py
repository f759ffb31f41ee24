"""What the encoder sees, and how the decoder uses it: ImageNet labels and their everyday words, the
decoder's evidence step and its decode-time penalty on unsupported object words."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner import Captioner
from captioner.data.vocab import Vocabulary
from captioner.grounding.concepts import concept_targets, concept_words
from captioner.grounding.labels import WORDS_FILE, imagenet_classes, top_labels
from captioner.inference import decoding
from captioner.model.decoder import CaptionDecoder, DecoderConfig, caption_loss
from captioner.model.efficientnet_lite import efficientnet_lite
from captioner.training.batches import pad_batch

from conftest import ROOT

SHARED = ROOT.parent / "shared" / "data"


def test_labels_are_the_classifier_of_the_whole_network(tiny_captioner, scene_paths):
    """Captioner.labels reads the classifier on the pooled features the captioner computes anyway:
    it must give what the package's own network gives end to end."""
    network = efficientnet_lite("efficientnet_lite0").eval()
    c = tiny_captioner
    fp32 = Captioner(c.encoder, c.decoder, c.vocab, c.transform, device="cpu", precision="fp32")
    pixels = torch.stack([tiny_captioner.transform.load(p) for p in scene_paths])
    with torch.no_grad():
        expected = network(pixels).softmax(-1)
    labels = fp32.labels(scene_paths, k=4)
    names, words = imagenet_classes()
    for row, probs in zip(labels, expected):
        assert len(row) == 4
        top = probs.topk(4)
        assert [names.index(label.name) for label in row] == top.indices.tolist()
        assert [label.probability for label in row] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [label.probability for label in row] == sorted((label.probability for label in row), reverse=True)
        assert [label.word for label in row] == [words[names.index(label.name)] for label in row]
    single = fp32.labels(scene_paths[0], k=2)
    assert [label.name for label in single] == [label.name for label in labels[0][:2]]


def test_every_class_has_an_everyday_word():
    names, words = imagenet_classes()
    assert len(names) == len(words) == 1000
    assert all(w and w == w.lower() for w in words)
    word = dict(zip(names, words))
    # the examples people expect: a breed is a dog, a trolleybus a bus, a tusker an elephant
    assert word["Norfolk terrier"] == word["golden retriever"] == word["Border terrier"] == "dog"
    assert word["trolleybus"] == word["minibus"] == "bus"
    assert word["tusker"] == word["Indian elephant"] == word["African elephant"] == "elephant"
    assert word["ice bear"] == "polar bear" and word["washbasin"] == "sink" and word["Persian cat"] == "cat"
    assert word["pizza"] == "pizza" and word["laptop"] == "laptop"
    assert len(set(words)) < 800  # fine-grained classes share words


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file() or not (SHARED / "coco_extra").is_dir(),
                    reason="needs WordNet (apt-get install wordnet-base wordnet-sense-index) and ../shared")
def test_the_shipped_mapping_is_what_its_script_makes(tmp_path):
    out = tmp_path / "words.json"
    subprocess.run([sys.executable, str(ROOT / "data" / "imagenet_words.py"), str(SHARED / "flickr8k" / "captions.txt"),
                    str(SHARED / "coco_extra" / "captions.txt"), "--out", str(out)], check=True, capture_output=True)
    assert json.loads(out.read_text()) == json.loads(WORDS_FILE.read_text())


def test_top_labels_rejects_the_wrong_number_of_classes():
    with pytest.raises(ValueError, match="1000 ImageNet class probabilities"):
        top_labels(torch.rand(1, 10))


def test_concept_words_and_targets():
    images = [["A dog runs on the grass .", "a dog plays"], ["Two dogs and a man."], ["A man on a bench."]]
    vocab = Vocabulary.build([c for caps in images for c in caps], min_count=1)
    words = concept_words(images, vocab, count=3, min_images=1)
    assert words == ["man", "bench", "dog"]  # by images using them, then alphabetical
    assert not {"a", "on", "and", "the"} & set(concept_words(images, vocab, count=50, min_images=1))
    assert concept_words(images, vocab, count=50, min_images=2) == ["man"]
    targets = concept_targets(images, ["dog", "man", "bench"])
    assert targets.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]  # "dogs" is not "dog": words as written


def evidence_decoder(**overrides) -> CaptionDecoder:
    torch.manual_seed(0)
    config = DecoderConfig(feature_dim=8 + 5, vocab_size=12, embed_dim=6, hidden_dim=10, dropout=0.0, labels=5,
                           concepts=3, **overrides)
    decoder = CaptionDecoder(config).eval()
    decoder.set_evidence_words(torch.tensor([4, 5, 6]), torch.tensor([6, -1, 7, 7, -1]))
    return decoder


def evidence_features(concept_logits: list[float], label_probs: list[float]) -> torch.Tensor:
    decoder = evidence_decoder()
    image = torch.randn(1, 8)
    with torch.no_grad():  # make the concept head say exactly `concept_logits` for this image
        decoder.concept_head.weight.zero_()
        decoder.concept_head.bias.copy_(torch.tensor(concept_logits))
    return decoder, torch.cat([image, torch.tensor([label_probs])], dim=1)


def test_the_evidence_step_is_the_same_in_training_and_decoding():
    decoder = evidence_decoder()
    features = torch.cat([torch.randn(2, 8), torch.softmax(torch.randn(2, 5), -1)], dim=1)
    tokens, lengths = pad_batch([[1, 4, 9, 2], [1, 5, 2]])
    teacher = decoder(features, tokens, lengths)
    state = decoder.start(features)
    for t in range(3):
        logits, state = decoder.step(tokens[:, t], state)
        for row in range(2):
            if t < lengths[row] - 1:
                assert torch.allclose(logits[row], teacher[row, t], atol=1e-5)
    assert caption_loss(teacher, tokens).isfinite()


def test_unsupported_concept_words_are_penalised_at_decoding():
    # concept probabilities sigmoid(-3) = 0.047, sigmoid(3) = 0.95, sigmoid(-3); label word 6 gets 0.7
    decoder, features = evidence_features([-3.0, 3.0, -3.0], [0.5, 0.1, 0.1, 0.1, 0.2])
    tokens = torch.tensor([1])
    plain, _ = decoder.step(tokens, decoder.start(features, evidence_weight=0.0))
    biased, _ = decoder.step(tokens, decoder.start(features, evidence_weight=2.0, evidence_threshold=0.5))
    shift = (biased - plain)[0]
    support = torch.tensor([torch.sigmoid(torch.tensor(-3.0)), 1.0, 0.5])  # word 4, 5 (0.95 > 0.5), 6 (label 0.5)
    expected = 2.0 * torch.log(support / 0.5).clamp(max=0)
    assert torch.allclose(shift[[4, 5, 6]], expected, atol=1e-5)
    assert torch.allclose(shift[[0, 1, 2, 3, 7, 8, 9, 10, 11]], torch.zeros(9))  # only concept words move
    assert shift[4] < -4  # "a dog" where nothing supports a dog


def test_the_checkpoint_default_weight_applies_and_decoding_can_override_it():
    decoder, features = evidence_features([-4.0, -4.0, -4.0], [0.2] * 5)
    decoder.config.evidence_weight = 3.0
    default = decoding.greedy(decoder, features, max_length=6)[0][0]
    off = decoding.greedy(decoder, features, max_length=6, evidence={"evidence_weight": 0.0})[0][0]
    forced = decoding.greedy(decoder, features, max_length=6, evidence={"evidence_weight": 3.0})[0][0]
    assert default.tokens == forced.tokens and default.logprob == pytest.approx(forced.logprob)
    assert default.logprob != pytest.approx(off.logprob)
    beams = decoding.beam_search(decoder, features, beam_size=3, max_length=6)[0]
    assert all(not set(b.tokens) & {4, 5, 6} or b.logprob < beams[0].logprob + 1e-6 for b in beams)


def test_decoder_config_refuses_evidence_it_cannot_read():
    with pytest.raises(ValueError, match="labels need pooled features"):
        DecoderConfig(feature_dim=8, vocab_size=10, labels=5, attention_dim=4)
    with pytest.raises(ValueError, match="evidence_threshold"):
        DecoderConfig(feature_dim=8, vocab_size=10, evidence_threshold=0.0)
