import pytest
import torch

from captioner.data.vocab import END
from captioner.inference import decoding
from captioner.inference.decoding import _banned_ngram_mask, beam_search, greedy, sample


@pytest.fixture(scope="module")
def decoder(tiny_captioner):
    return tiny_captioner.decoder


@pytest.fixture(scope="module")
def features(scene_features):
    # the four training scenes plus blends of them: the model has not seen the blends
    mixes = torch.stack([(scene_features[i] + scene_features[(i + 1) % 4]) / 2 for i in range(4)])
    return torch.cat([scene_features, mixes])


def test_greedy_stops_and_reports_logprobs(decoder, features):
    results = greedy(decoder, features, max_length=20)
    assert len(results) == 8 and all(len(r) == 1 for r in results)
    for [c] in results:
        assert c.ended and len(c.token_logprobs) == len(c.tokens) + 1  # <end> counted
        assert abs(sum(c.token_logprobs) - c.logprob) < 1e-4
        assert END not in c.tokens


def test_max_length_cuts_and_flags_it(decoder, features):
    for [c] in greedy(decoder, features, max_length=3):
        assert len(c.tokens) <= 3 and not c.ended


def test_beam_size_one_equals_greedy(decoder, features):
    for [g], [b] in zip(greedy(decoder, features), beam_search(decoder, features, beam_size=1)):
        assert g.tokens == b.tokens and abs(g.logprob - b.logprob) < 1e-4


def test_beam_reaches_at_least_greedy_logprob(decoder, features):
    for [g], beams in zip(greedy(decoder, features), beam_search(decoder, features, beam_size=5)):
        assert beams[0].logprob >= g.logprob - 1e-4


def test_beam_returns_ranked_beams(decoder, features):
    for beams in beam_search(decoder, features, beam_size=4, length_penalty_alpha=0.7):
        assert len(beams) == 4
        scores = [b.score for b in beams]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(b.tokens) for b in beams}) == 4


def test_length_penalty_favours_longer_captions(decoder, features):
    short = beam_search(decoder, features, beam_size=5, length_penalty_alpha=-2.0)
    long = beam_search(decoder, features, beam_size=5, length_penalty_alpha=3.0)
    assert sum(len(b[0].tokens) for b in long) >= sum(len(b[0].tokens) for b in short)


def test_no_repeat_ngram_blocks_repeats(decoder, features):
    for beams in beam_search(decoder, features, beam_size=3, no_repeat_ngram_size=2, max_length=25):
        for b in beams:
            bigrams = list(zip(b.tokens, b.tokens[1:]))
            assert len(bigrams) == len(set(bigrams))


def test_ngram_mask():
    history = torch.tensor([[5, 6, 7, 5]])
    mask = _banned_ngram_mask(history, 2, 10)
    assert mask[0].nonzero().flatten().tolist() == [6]  # "5 6" was seen, so 6 may not follow 5 again


def test_temperature_near_zero_equals_greedy(decoder, features):
    cold = sample(decoder, features, seeds=list(range(8)), temperature=1e-5, num_samples=2)
    for [g], samples in zip(greedy(decoder, features), cold):
        assert all(s.tokens == g.tokens for s in samples)


def test_seeds_reproduce_and_differ(decoder, features):
    kwargs = dict(temperature=1.5, num_samples=3)
    a = sample(decoder, features, seeds=list(range(8)), **kwargs)
    b = sample(decoder, features, seeds=list(range(8)), **kwargs)
    c = sample(decoder, features, seeds=list(range(100, 108)), **kwargs)
    tokens = lambda r: [[s.tokens for s in per] for per in r]
    assert tokens(a) == tokens(b)
    assert tokens(a) != tokens(c)


def test_a_sample_does_not_depend_on_its_batch(decoder, features):
    together = sample(decoder, features, seeds=list(range(8)), temperature=1.3, top_k=10, top_p=0.9)
    alone = sample(decoder, features[5:6], seeds=[5], temperature=1.3, top_k=10, top_p=0.9)
    assert alone[0][0].tokens == together[5][0].tokens


def test_top_k_one_is_greedy(decoder, features):
    for [g], [s] in zip(greedy(decoder, features), sample(decoder, features, seeds=list(range(8)), top_k=1)):
        assert s.tokens == g.tokens


def test_filter_keeps_the_top_p_nucleus():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = decoding._filter_logits(logp, 1.0, 0, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
