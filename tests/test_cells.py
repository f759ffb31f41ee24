"""The recurrent cell is a choice (captioner/model/decoder.py): LSTM, GRU or vanilla RNN, with every
image feed and stacked layers, trained through the CLI and decoded every way; the LSTM's path is
unchanged."""

import pytest
import torch

from captioner import Captioner
from captioner.cli import main
from captioner.data.vocab import Vocabulary
from captioner.inference import decoding
from captioner.inference.onnx_export import export_decoder
from captioner.model.decoder import CELLS, CaptionDecoder, DecoderConfig

from conftest import overfit_decoder
from test_training import cli_flags, tiny_config, tiny_dataset  # noqa: F401 (a fixture)


@pytest.mark.parametrize("cell", ["gru", "rnn"])
@pytest.mark.parametrize("image_feed,num_layers", [("state", 1), ("input", 2), ("both", 2)])
def test_each_cell_learns_the_scenes_with_every_image_feed(cell, image_feed, num_layers, scene_features,
                                                           scene_captions):
    vocab = Vocabulary.build(scene_captions, min_count=1)
    decoder = overfit_decoder(scene_features, scene_captions, vocab, cell=cell, image_feed=image_feed,
                              num_layers=num_layers)
    assert isinstance(decoder.recurrent, CELLS[cell]) and not hasattr(decoder, "lstm")
    expected_state = (decoder.state_parts * num_layers * 64 if image_feed != "input" else 0) + (
        32 if image_feed != "state" else 0)
    assert decoder.w_ih.out_features == expected_state and decoder.state_parts == 1
    greedy = [" ".join(vocab.words(c.tokens)) for [c] in decoding.greedy(decoder, scene_features)]
    assert greedy == scene_captions
    beams = decoding.beam_search(decoder, scene_features, beam_size=3)
    assert [" ".join(vocab.words(b[0].tokens)) for b in beams] == scene_captions
    samples = decoding.sample(decoder, scene_features, seeds=[0, 1, 2, 3], temperature=0.5)
    assert all(s[0].ended and s[0].tokens for s in samples)


def test_weights_of_one_cell_do_not_load_into_another(scene_features, scene_captions):
    vocab = Vocabulary.build(scene_captions, min_count=1)
    config = dict(feature_dim=scene_features.size(1), vocab_size=len(vocab), embed_dim=32, hidden_dim=64)
    gru = CaptionDecoder(DecoderConfig(**config, cell="gru"))
    with pytest.raises(ValueError, match="GRU decoder; this decoder's cell is LSTM"):
        CaptionDecoder(DecoderConfig(**config)).load_state_dict(gru.state_dict())
    with pytest.raises(ValueError, match="cell must be one of lstm, gru, rnn"):
        DecoderConfig(**config, cell="transformer")
    with pytest.raises(ValueError, match="supports the LSTM cell only; this decoder's cell is GRU"):
        export_decoder(gru, "unused")


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_a_cell_trains_through_the_cli_loads_as_itself_and_captions_every_way(cell, tiny_dataset, tmp_path,
                                                                              scene_paths):
    config = tiny_config(tiny_dataset, tmp_path, epochs=6, cell=cell, self_critical_epochs=1,
                         self_critical_samples=2)
    assert main(["train", *cli_flags(config)]) == 0
    captioner = Captioner.from_pretrained(tmp_path / "run" / "best", device="cpu")
    assert captioner.decoder.config.cell == cell and isinstance(captioner.decoder.recurrent, CELLS[cell])
    for method, options in (("greedy", {}), ("sample", {"seed": 0}), ("beam", {"beam_size": 3})):
        results = captioner.generate(scene_paths, method, **options)
        assert all(r.text for r in results), method
    explanation = captioner.explain(scene_paths[0])
    assert explanation.words and all(0 <= w.probability <= 1 for w in explanation.words)
    out = tmp_path / "captions.jsonl"
    assert main(["caption", str(scene_paths[0]), "--checkpoint", str(tmp_path / "run" / "best"), "--method", "beam",
                 "--out", str(out)]) == 0 and out.read_text().strip()


def test_the_lstm_steps_exactly_as_before(tiny_captioner, scene_features):
    """The LSTM keeps its weights' names and its matrix-product step: the module path and the folded
    step agree, and its state is (h, c)."""
    decoder = tiny_captioner.decoder
    assert decoder.config.cell == "lstm" and decoder.state_parts == 2
    assert any(k.startswith("lstm.weight_hh_l0") for k in decoder.state_dict())
    folded = decoding.beam_search(decoder, scene_features, beam_size=3)
    decoder.fold_step = False
    try:
        plain = decoding.beam_search(decoder, scene_features, beam_size=3)
    finally:
        decoder.fold_step = True
    assert [[b.tokens for b in x] for x in folded] == [[b.tokens for b in x] for x in plain]
    with torch.inference_mode():
        state = decoder.start(scene_features)[0]
    assert isinstance(state, tuple) and state[0].shape == state[1].shape == (1, 4, 64)
    assert torch.isfinite(state[0]).all()
