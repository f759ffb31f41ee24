import pytest
import torch

from captioner.model.decoder import CaptionDecoder, DecoderConfig, caption_loss


def batch():
    captions = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]])
    return torch.randn(2, 16), captions, torch.tensor([5, 3])


@pytest.mark.parametrize("feed", ["state", "input", "both"])
@pytest.mark.parametrize("layers", [1, 2])
def test_shapes_for_every_image_feed(feed, layers):
    torch.manual_seed(0)
    decoder = CaptionDecoder(DecoderConfig(16, 30, embed_dim=8, hidden_dim=12, num_layers=layers, image_feed=feed)).eval()
    features, captions, lengths = batch()
    logits = decoder(features, captions, lengths)
    assert logits.shape == (2, 4, 30)
    state = decoder.start(features)
    (h, c, *recurrent), memory, bias = state  # one layer also carries the next step's W_hh h
    assert h.shape == c.shape == (layers, 2, 12) and memory is None and bias is None  # no evidence
    assert [r.shape for r in recurrent] == ([(1, 2, 48)] if layers == 1 else [])
    step_logits, _ = decoder.step(torch.tensor([1, 1]), state)
    # the first teacher-forced step and the first decoding step see the same thing
    assert torch.allclose(step_logits, logits[:, 0], atol=1e-5)


def test_attention_decoder_reads_the_map_and_looks_where_the_regions_differ():
    torch.manual_seed(0)
    decoder = CaptionDecoder(DecoderConfig(16, 30, embed_dim=8, hidden_dim=12, dropout=0.0,
                                           attention_dim=6)).eval()
    fmap, (_, captions, lengths) = torch.randn(2, 16, 3, 3), batch()
    logits = decoder(fmap, captions, lengths)
    assert logits.shape == (2, 4, 30)
    (h, _), memory, _ = decoder.start(fmap)
    assert h.shape == (1, 2, 12) and memory.shape == (9, 2, 6)  # regions x batch x attention units
    # a decoding step sees what the teacher-forced pass saw, image by image
    step_logits, _ = decoder.step(torch.tensor([1, 1]), decoder.start(fmap))
    assert torch.allclose(step_logits, logits[:, 0], atol=1e-5)
    # moving content between regions keeps the pooled features (and so W_ih's initial state) but not
    # what attention reads
    shuffled = fmap.flatten(2)[:, :, torch.randperm(9)].view_as(fmap)
    assert torch.allclose(decoder.start(shuffled)[0][0], h, atol=1e-6)
    swapped = fmap.clone()
    swapped[:, :, 0, 0], swapped[:, :, 2, 2] = fmap[:, :, 2, 2] * 3, fmap[:, :, 0, 0] * 3
    swapped[:, :, 1, 1] = fmap[:, :, 1, 1] + (fmap[:, :, 0, 0] + fmap[:, :, 2, 2]) * -2  # same mean
    assert torch.allclose(swapped.mean((2, 3)), fmap.mean((2, 3)), atol=1e-5)
    assert not torch.allclose(decoder(swapped, captions, lengths), logits, atol=1e-4)


def test_attention_decoder_decodes_in_batches_like_one_image_at_a_time():
    from captioner.inference.decoding import beam_search, greedy

    torch.manual_seed(0)
    decoder = CaptionDecoder(DecoderConfig(16, 30, embed_dim=8, hidden_dim=12, attention_dim=6)).eval()
    fmaps = torch.randn(3, 16, 2, 2)
    for method in (lambda x: greedy(decoder, x, max_length=8), lambda x: beam_search(decoder, x, 3, max_length=8)):
        together = method(fmaps)
        alone = [method(fmaps[i:i + 1])[0] for i in range(3)]
        assert [[c.tokens for c in r] for r in together] == [[c.tokens for c in r] for r in alone]


def test_the_image_changes_the_output():
    decoder = CaptionDecoder(DecoderConfig(16, 30, embed_dim=8, hidden_dim=12, dropout=0.0)).eval()
    features, captions, lengths = batch()
    assert not torch.allclose(decoder(features, captions, lengths), decoder(features * 0, captions, lengths))


def test_loss_is_masked_to_real_tokens():
    torch.manual_seed(0)
    decoder = CaptionDecoder(DecoderConfig(16, 30, embed_dim=8, hidden_dim=12, dropout=0.0)).eval()
    features, captions, lengths = batch()
    logits = decoder(features, captions, lengths)
    manual = torch.nn.functional.cross_entropy(
        torch.cat([logits[0, :4], logits[1, :2]]), torch.cat([captions[0, 1:5], captions[1, 1:3]]))
    assert torch.allclose(caption_loss(logits, captions), manual)
    # what sits beyond a caption's length changes nothing
    noisy = captions.clone()
    noisy[1, 3:] = 9
    assert torch.allclose(caption_loss(decoder(features, noisy, lengths), captions), manual)


def test_tied_weights_share_the_embedding():
    decoder = CaptionDecoder(DecoderConfig(16, 30, embed_dim=8, hidden_dim=12, tie_weights=True))
    assert decoder.classifier.weight is decoder.embed.weight


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="image_feed"):
        DecoderConfig(16, 30, image_feed="sideways")


def test_an_ensemble_of_identical_members_decodes_like_one_decoder():
    from captioner.inference.decoding import beam_search, greedy
    from captioner.model.ensemble import DecoderEnsemble, build_decoder

    torch.manual_seed(0)
    single = CaptionDecoder(DecoderConfig(16, 30, embed_dim=8, hidden_dim=12)).eval()
    pair = build_decoder(DecoderConfig(16, 30, embed_dim=8, hidden_dim=12, members=2)).eval()
    assert isinstance(pair, DecoderEnsemble)
    for member in pair.members:
        member.load_state_dict(single.state_dict())
    features = torch.randn(3, 16)
    for a, b in zip(greedy(single, features, max_length=8), greedy(pair, features, max_length=8)):
        assert a[0].tokens == b[0].tokens and abs(a[0].logprob - b[0].logprob) < 1e-4
    for a, b in zip(beam_search(single, features, beam_size=3, max_length=8),
                    beam_search(pair, features, beam_size=3, max_length=8)):
        assert [c.tokens for c in a] == [c.tokens for c in b]
    _, captions, lengths = batch()
    stacked = pair(features[:2], captions, lengths)
    assert stacked.shape == (2, 2, 4, 30)
    assert torch.allclose(caption_loss(stacked, captions), caption_loss(stacked[0], captions))


def test_ensemble_members_differ_and_average_their_distributions():
    from captioner.model.ensemble import build_decoder

    torch.manual_seed(0)
    pair = build_decoder(DecoderConfig(16, 30, embed_dim=8, hidden_dim=12, members=2)).eval()
    features, tokens = torch.randn(2, 16), torch.tensor([1, 1])
    log_probs, _ = pair.step(tokens, pair.start(features))
    each = [torch.log_softmax(m.step(tokens, m.start(features))[0], -1) for m in pair.members]
    assert not torch.allclose(each[0], each[1])
    assert torch.allclose(log_probs.exp(), (each[0].exp() + each[1].exp()) / 2, atol=1e-6)
