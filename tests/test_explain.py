"""Why a caption says what it says: per-word Grad-CAM maps that point at the object named, word
probabilities and alternatives, the given-caption path, attention maps, and `captioner explain`."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from captioner import Captioner
from captioner.data.vocab import Vocabulary
from captioner.model.decoder import CaptionDecoder, DecoderConfig

from conftest import overfit_decoder

SIZE, SHAPE = 224, 80
CORNERS = {"top left": (12, 12), "top right": (132, 12), "bottom left": (12, 132), "bottom right": (132, 132)}
COLOURS = {"circle": (220, 30, 30), "square": (30, 60, 220)}
# Two shapes in two corners, each a circle or a square: every shape word depends on the image alone.
PLACEMENTS = [((a, ka), (b, kb)) for i, a in enumerate(CORNERS) for b in list(CORNERS)[i + 1:]
              for ka in COLOURS for kb in COLOURS]


def two_shapes(placement) -> tuple[Image.Image, dict]:
    """-> the image, and each shape kind's boxes."""
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    boxes = {"circle": [], "square": []}
    for where, kind in placement:
        x, y = CORNERS[where]
        box = (x, y, x + SHAPE, y + SHAPE)
        (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=COLOURS[kind])
        boxes[kind].append(box)
    return img, boxes


def scene_caption(placement) -> str:
    return " and ".join(f"{where} a {kind}" for where, kind in placement)


@pytest.fixture(scope="module")
def placement_captioner(lite0):
    """A tiny decoder trained here to say which shape is where, on 16 of the 24 placements."""
    order = list(PLACEMENTS)
    random.Random(0).shuffle(order)
    train = order[:16]
    pixels = torch.stack([lite0.transform(two_shapes(p)[0]) for p in train])
    with torch.no_grad():
        features = lite0(pixels)
    captions = [scene_caption(p) for p in train]
    vocab = Vocabulary.build(captions, min_count=1)
    decoder = overfit_decoder(features, captions, vocab, steps=300)
    return Captioner(lite0, decoder, vocab, lite0.transform, device="cpu", precision="fp32")


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    y, x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    return int(x), int(y)


def inside(point, boxes) -> bool:
    return any(box[0] <= point[0] < box[2] and box[1] <= point[1] < box[3] for box in boxes)


def shape_maps(captioner, placement, path):
    img, boxes = two_shapes(placement)
    img.save(path)
    explanation = captioner.explain(path, caption=scene_caption(placement))
    return [(w.word, w.heatmap) for w in explanation.words if w.word in COLOURS], boxes


def test_the_map_of_a_shape_word_peaks_inside_that_shape(placement_captioner, tmp_path):
    found, boxes_of = [], []
    for placement in PLACEMENTS:
        if placement[0][1] == placement[1][1]:
            continue  # two of a kind: any peak on a shape would do
        maps, boxes = shape_maps(placement_captioner, placement, tmp_path / "scene.png")
        found += [(word, heatmap) for word, heatmap in maps]
        boxes_of += [boxes[word] for word, _ in maps]

    def hits(heatmaps) -> int:
        return sum(inside(peak(h), boxes) for h, boxes in zip(heatmaps, boxes_of))

    assert len(found) == 24
    # A shape covers 13% of the image, so a map that ignores the image rarely peaks inside the
    # right one: the same count on random maps, and on uniform ones (peak at the corner), fails.
    grad_cam = hits([h for _, h in found])
    noise = np.random.default_rng(0)
    assert hits([noise.random(h.shape) for _, h in found]) < 12 and hits([np.ones_like(h) for _, h in found]) == 0
    assert grad_cam >= 14, f"{grad_cam} of 24 maps peak inside their own shape"


def centroid(heatmap: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(heatmap.shape)
    return float((xs * heatmap).sum() / heatmap.sum()), float((ys * heatmap).sum() / heatmap.sum())


def test_the_map_moves_when_the_shape_moves(placement_captioner, tmp_path):
    """The circle's map has its weight on the circle's side, and follows it across the image (a
    uniform map's centre of mass is the middle, on neither side)."""
    centres = {}
    for placement in ((("top left", "circle"), ("bottom right", "square")),
                      (("top left", "square"), ("bottom right", "circle"))):
        maps, _ = shape_maps(placement_captioner, placement, tmp_path / "moved.png")
        centres[placement[0][1]] = centroid(dict(maps)["circle"])
    (left_x, top_y), (right_x, bottom_y) = centres["circle"], centres["square"]
    assert left_x < SIZE / 2 < right_x and top_y < SIZE / 2 < bottom_y, centres


def test_one_map_per_word_of_the_image_size_and_probabilities(tiny_captioner, tmp_path):
    wide = Image.new("RGB", (300, 140), (255, 255, 255))
    ImageDraw.Draw(wide).ellipse((20, 20, 120, 120), fill=(220, 30, 30))
    wide.save(tmp_path / "wide.png")
    explanation = tiny_captioner.explain(tmp_path / "wide.png", method="beam", beam_size=2)
    assert explanation.caption == tiny_captioner.caption(tmp_path / "wide.png", method="beam", beam_size=2)
    assert explanation.maps == "grad-cam" and len(explanation.words) == len(explanation.caption.split())
    for word in explanation.words:
        assert word.heatmap.shape == (140, 300) and np.isfinite(word.heatmap).all()
        assert 0 <= word.heatmap.min() and word.heatmap.max() <= 1
        assert 0 < word.probability <= 1
        assert word.word not in [a for a, _ in word.alternatives]
        assert [p for _, p in word.alternatives] == sorted((p for _, p in word.alternatives), reverse=True)
    assert explanation.labels and explanation.labels[0].probability >= explanation.labels[-1].probability


def test_a_given_caption_is_explained_word_by_word(tiny_captioner, scene_paths):
    own = tiny_captioner.explain(scene_paths[0])  # "a red circle on a white background"
    asked = tiny_captioner.explain(scene_paths[0], caption="A blue circle on a white zebra.")
    assert [w.word for w in asked.words] == ["a", "blue", "circle", "on", "a", "white", "zebra"]
    assert asked.caption == "A blue circle on a white zebra."
    # the model wanted "red", not "blue": "blue" is improbable and "red" is its first alternative
    blue = asked.words[1]
    assert blue.probability < 0.2 and blue.alternatives[0][0] == "red"
    assert own.words[1].word == "red" and own.words[1].probability > 0.8
    with pytest.raises(ValueError, match="no words"):
        tiny_captioner.explain(scene_paths[0], caption="...")


def test_an_attention_decoder_shows_its_attention_weights(lite0, scene_paths, scene_captions):
    pixels = torch.stack([lite0.transform.load(p) for p in scene_paths])
    with torch.no_grad():
        maps = lite0(pixels, spatial=True)
    vocab = Vocabulary.build(scene_captions, min_count=1)
    decoder = overfit_decoder(maps, scene_captions, vocab, steps=150, attention_dim=16)
    captioner = Captioner(lite0, decoder, vocab, lite0.transform, device="cpu")
    attention = captioner.explain(scene_paths[1])
    grad_cam = captioner.explain(scene_paths[1], maps="grad-cam")
    assert attention.maps == "attention" and grad_cam.maps == "grad-cam"
    assert [w.word for w in attention.words] == [w.word for w in grad_cam.words]
    for word in attention.words:
        assert word.heatmap.max() == pytest.approx(1.0) and word.heatmap.shape == (96, 96)
    plain = Captioner(lite0, CaptionDecoder(DecoderConfig(1280, len(vocab))).eval(), vocab, lite0.transform,
                      device="cpu")
    with pytest.raises(ValueError, match="no attention"):
        plain.explain(scene_paths[1], maps="attention")


def test_explain_command_writes_an_overlay_per_word_and_json(tiny_checkpoint, scene_paths, tmp_path):
    out = tmp_path / "why"
    result = subprocess.run([sys.executable, "-m", "captioner", "explain", str(scene_paths[2]), "--out", str(out),
                             "--checkpoint", str(tiny_checkpoint)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "explanation.json").read_text())
    assert record["caption"] == "Green stripes cross a grey field."
    assert [w["word"] for w in record["words"]] == ["green", "stripes", "cross", "a", "grey", "field"]
    for word in record["words"]:
        overlay = Image.open(out / word["overlay"])
        assert overlay.size == (96, 96) and overlay.mode == "RGB"
    assert len(list(out.glob("*.png"))) == 6 and "stripes" in result.stdout
