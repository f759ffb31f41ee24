"""The built-in model: shipped inside the package, loads offline, captions real photos."""

import pytest

from captioner import Captioner
from captioner.data.datasets import load_dataset
from captioner.evaluation.metrics import score_captions
from captioner.pipeline import BUILTIN, PRETRAINED_DIR

from conftest import COCO_EXTRA, FLICKR8K, draw_scene, needs_coco_extra, needs_flickr8k


@pytest.fixture(scope="module")
def builtin():
    return Captioner.from_pretrained(device="cpu")


def test_ships_inside_the_package_within_25_mb():
    files = {p.name: p.stat().st_size for p in (PRETRAINED_DIR / BUILTIN).iterdir()}
    assert set(files) == {"config.json", "vocab.json", "model.safetensors"}
    assert sum(files.values()) <= 25 * 2**20


def test_loads_offline_and_captions_a_generated_image(builtin, tmp_path):
    draw_scene("blue_square", size=224).save(tmp_path / "square.png")
    text = builtin.caption(tmp_path / "square.png")
    assert text[0].isupper() and text.endswith(".") and len(text.split()) >= 3
    assert all(report["scores"]["CIDEr"] > 0 for report in builtin.config["training"]["test"].values())


@needs_flickr8k
def test_captions_of_flickr8k_test_images_score(builtin):
    records = load_dataset(FLICKR8K).split("test")[:20]
    results = builtin.generate([r.image for r in records], "beam", beam_size=3)
    predictions = {str(r.image): res.text for r, res in zip(records, results)}
    scores = score_captions(predictions, {str(r.image): r.captions for r in records}, metrics=("bleu", "cider"))
    assert scores["CIDEr"] > 30  # 0.3 on pycocoevalcap's 0-1 scale


@needs_coco_extra
def test_labels_of_coco_photos(builtin):
    """What the encoder sees in a brown bear and a street sign (coco_extra 285 and 724)."""
    bear, sign = builtin.labels([COCO_EXTRA / "images" / "000000000285.jpg", COCO_EXTRA / "images" / "000000000724.jpg"])
    assert (bear[0].name, bear[0].word) == ("brown bear", "bear") and bear[0].probability > 0.9
    assert sign[0].name == "street sign"
    assert "bear" in builtin.caption(COCO_EXTRA / "images" / "000000000285.jpg", method="beam")
