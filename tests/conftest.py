"""Shared fixtures: generated images, a real (small) encoder, and a tiny decoder overfit on four
images, saved as a real checkpoint directory."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from captioner import Captioner
from captioner.data.vocab import Vocabulary
from captioner.model.decoder import CaptionDecoder, DecoderConfig, caption_loss
from captioner.model.encoders import build_encoder
from captioner.training.batches import pad_batch


ROOT = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    """A script of bench/ as a module: the load tests share its server and request helpers."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

FLICKR8K = Path(os.environ.get("CAPTIONER_FLICKR8K", ROOT.parent / "shared" / "data" / "flickr8k"))
COCO_EXTRA = FLICKR8K.parent / "coco_extra"
needs_coco_extra = pytest.mark.skipif(not (COCO_EXTRA / "captions.txt").is_file(),
                                      reason=f"coco_extra not found at {COCO_EXTRA} (../shared/data/coco_extra)")
needs_flickr8k = pytest.mark.skipif(not (FLICKR8K / "captions.txt").is_file(),
                                    reason=f"Flickr8k not found at {FLICKR8K} (../shared is absent)")

# Four scenes a model can tell apart, each with its own caption.
SCENES = [
    ("red_circle", "a red circle on a white background", lambda d: d.ellipse((20, 20, 76, 76), fill=(220, 20, 20))),
    ("blue_square", "a blue square in the middle of the picture", lambda d: d.rectangle((24, 24, 72, 72), fill=(20, 40, 220))),
    ("green_stripes", "green stripes cross a grey field", lambda d: [d.rectangle((0, y, 96, y + 8), fill=(20, 180, 40)) for y in range(0, 96, 16)]),
    ("yellow_triangle", "a yellow triangle points up", lambda d: d.polygon([(48, 10), (86, 86), (10, 86)], fill=(230, 210, 0))),
]
BACKGROUNDS = {"green_stripes": (128, 128, 128)}


def add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One member of a shard, as img2dataset writes them."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def draw_scene(name: str, size: int = 96) -> Image.Image:
    img = Image.new("RGB", (96, 96), BACKGROUNDS.get(name, (255, 255, 255)))
    dict((n, f) for n, _, f in SCENES)[name](ImageDraw.Draw(img))
    return img.resize((size, size))


@pytest.fixture(scope="session")
def scene_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    for name, _, _ in SCENES:
        draw_scene(name).save(folder / f"{name}.jpg", quality=95)
    return folder


@pytest.fixture(scope="session")
def scene_paths(scene_dir) -> list[Path]:
    return [scene_dir / f"{name}.jpg" for name, _, _ in SCENES]


@pytest.fixture(scope="session")
def scene_captions() -> list[str]:
    return [caption for _, caption, _ in SCENES]


@pytest.fixture(scope="session")
def lite0():
    return build_encoder("efficientnet_lite0")


def overfit_decoder(features: torch.Tensor, captions: list[str], vocab: Vocabulary, steps: int = 300,
                    seed: int = 0, **sizes) -> CaptionDecoder:
    """A plain teacher-forced loop: the smallest thing that must learn four captions by heart."""
    torch.manual_seed(seed)
    config = DecoderConfig(features.size(1), len(vocab), **{"embed_dim": 32, "hidden_dim": 64, "dropout": 0.0, **sizes})
    decoder = CaptionDecoder(config)
    tokens, lengths = pad_batch([vocab.encode(c) for c in captions])
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = caption_loss(decoder(features, tokens, lengths), tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return decoder.eval()


@pytest.fixture(scope="session")
def scene_features(lite0, scene_paths) -> torch.Tensor:
    pixels = torch.stack([lite0.transform.load(p) for p in scene_paths])
    with torch.no_grad():
        return lite0(pixels)


@pytest.fixture(scope="session")
def tiny_captioner(lite0, scene_features, scene_captions) -> Captioner:
    vocab = Vocabulary.build(scene_captions, min_count=1)
    decoder = overfit_decoder(scene_features, scene_captions, vocab)
    return Captioner(lite0, decoder, vocab, lite0.transform, {"training": {"dataset": "four generated scenes"}},
                     device="cpu")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_captioner, tmp_path_factory) -> Path:
    return tiny_captioner.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def grounded_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny model with one object its encoder's classifier vouches for in every image, named by
    the word "square": grounding "full" must bring it into every beam-searched caption, at whatever
    cost to the tiny model's sure caption."""
    folder = tmp_path_factory.mktemp("grounded") / "tiny"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["decoder"].update(include_threshold=0.5, include_cost=1000.0, label_objects={"square": {
        "classes": list(range(1000)), "words": ["square"], "slope": 1.0, "intercept": 10.0}})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def bomb(path):
    """A 30000x30000 PNG: a few hundred KB on disk, 2.7 GB once decoded."""
    Image.new("L", (30000, 30000)).save(path, optimize=True)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    base = draw_scene("yellow_triangle", size=160)
    base.convert("L").save(folder / "grey_L.png")
    base.convert("LA").save(folder / "grey_alpha_LA.png")
    paletted = base.convert("P")
    paletted.info["transparency"] = 0
    paletted.save(folder / "palette_transparent_P.png", transparency=0)
    rgba = base.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(folder / "rgba.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257)).save(folder / "sixteen_bit.png")
    frames = [base, draw_scene("blue_square", size=160)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(folder / "animated.webp", save_all=True, append_images=frames[1:], duration=100)
    return folder
